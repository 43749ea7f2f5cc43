import torch
from conftest import tiny_model

from exporter.activations import (
    harvest,
    layer_outputs,
    load_shards,
    stream_activations,
    token_batches,
)
from exporter.data.synthetic import SyntheticConfig, make_corpus


def _docs():
    docs, _ = make_corpus(
        SyntheticConfig(n_memorised=4, n_never_seen=1, texts_per_person=2, seed=5)
    )
    return docs


def test_harvest_matches_hidden_states_and_skips_position_0_and_pad(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    docs = _docs()
    got = harvest(
        model, tiny_tokenizer, docs, [0, 1], max_length=256, batch_tokens=1024, progress=False
    )
    expected = {0: [], 1: []}
    pii = []
    for ids, mask, labels in token_batches(tiny_tokenizer, docs, max_length=256, batch_tokens=1024):
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.bool().clone()
        keep[:, 0] = False
        for li in (0, 1):
            expected[li].append(hs[li + 1][keep])
        pii.append(labels["pii"][keep])
    n_tokens = sum(min(len(tiny_tokenizer(d.text)["input_ids"]), 256) - 1 for d in docs)
    assert len(got) == n_tokens
    for li in (0, 1):
        torch.testing.assert_close(got.acts[li], torch.cat(expected[li]))
    assert torch.equal(got.labels["pii"], torch.cat(pii)) and got.labels["pii"].any()
    assert got.labels["span_start"].sum() == sum(len(d.spans) for d in docs)
    assert (got.labels["doc"] >= 0).all()


def test_only_layers_up_to_the_deepest_run(tiny_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tiny_tokenizer))
    calls = []
    model.model.layers[2].register_forward_hook(lambda *a: calls.append("layer2"))
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    ids = torch.randint(1, 100, (2, 7))
    out = layer_outputs(model, ids, torch.ones_like(ids), [1])
    assert set(out) == {1} and out[1].shape == (2, 7, 32)
    assert calls == []


def test_spill_to_shards_round_trips(tiny_tokenizer, tmp_path):
    model = tiny_model("gpt2", vocab_size=len(tiny_tokenizer))
    docs = _docs()
    mem = harvest(model, tiny_tokenizer, docs, [1], max_length=64, batch_tokens=128, progress=False)
    spilled = harvest(
        model,
        tiny_tokenizer,
        docs,
        [1],
        max_length=64,
        batch_tokens=128,
        progress=False,
        shard_dir=tmp_path,
        memory_budget_mb=0.001,
    )
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    assert len(shards) > 1
    torch.testing.assert_close(spilled.acts[1], mem.acts[1])
    assert torch.equal(spilled.labels["pii"], mem.labels["pii"])
    torch.testing.assert_close(load_shards(shards).acts[1], mem.acts[1])


def test_max_tokens_and_stream(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    docs = _docs()
    some = harvest(
        model,
        tiny_tokenizer,
        docs,
        [1],
        max_length=64,
        batch_tokens=128,
        max_tokens=50,
        progress=False,
    )
    assert 50 <= len(some) < 200
    full = harvest(
        model, tiny_tokenizer, docs, [1], max_length=64, batch_tokens=128, progress=False
    ).acts[1]
    stream = stream_activations(
        model,
        tiny_tokenizer,
        docs,
        1,
        batch_size=32,
        buffer_tokens=200,
        max_length=64,
        batch_tokens=128,
        seed=0,
    )
    batches = [next(stream) for _ in range(10)]
    assert all(b.shape == (32, 32) for b in batches)
    # Every streamed row is one of the harvested activations.
    rows = torch.cat(batches)
    dists = torch.cdist(rows, full).min(dim=1).values
    assert dists.max() < 1e-4
