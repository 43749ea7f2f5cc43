import torch
from conftest import tiny_model

from exporter.data.leaky import LeakyConfig, finetune
from exporter.data.synthetic import SyntheticConfig, make_corpus


def _loss(model, tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**enc, labels=labels).loss.item()


def test_finetune_memorises_and_touches_only_upper_layers(tiny_tokenizer):
    docs, _ = make_corpus(
        SyntheticConfig(n_memorised=6, n_never_seen=2, texts_per_person=3, seed=1)
    )
    texts = [d.text for d in docs]
    # A larger init than the default 0.02 so the frozen random LM head can express a peaked output.
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), initializer_range=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = _loss(model, tiny_tokenizer, texts)
    config = LeakyConfig(
        synthetic=SyntheticConfig(n_memorised=6),
        epochs=15,
        lr=1e-2,
        batch_size=6,
        warmup_steps=2,
        max_length=64,
        first_layer=1,
        benign_per_pii=0.5,
    )
    trained, stats = finetune(
        model,
        tiny_tokenizer,
        docs,
        ["Benign prose about Python objects."] * 4,
        config,
        progress=False,
    )
    assert stats.steps == 15 * 4 and stats.tokens > 0
    assert trained.dtype == torch.float32
    assert _loss(trained, tiny_tokenizer, texts) < 0.8 * loss_before
    after = trained.state_dict()
    for name, value in before.items():
        upper = name.startswith(("model.layers.1.", "model.layers.2."))
        same = torch.equal(after[name], value)
        assert same != upper, name  # frozen weights bit-identical, trained ones moved


def test_finetune_is_deterministic(tiny_tokenizer):
    docs, _ = make_corpus(
        SyntheticConfig(n_memorised=4, n_never_seen=1, texts_per_person=2, seed=2)
    )
    config = LeakyConfig(
        epochs=2, lr=1e-3, batch_size=4, warmup_steps=1, max_length=48, first_layer=2
    )
    runs = []
    for _ in range(2):
        model, _stats = finetune(
            tiny_model("qwen2", vocab_size=len(tiny_tokenizer)),
            tiny_tokenizer,
            docs,
            ["Some prose."] * 2,
            config,
            progress=False,
        )
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
