"""Distillation of a patch into the weights: the student's layer-l output moves to the teacher's on
held-out PII text and stays at the base's on benign text; the merged model is a stock checkpoint."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model

from exporter.activations import from_layer, layer_outputs
from exporter.data.corpus import benign_texts
from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.distill import (
    DistillConfig,
    distil,
    first_adapted,
    first_tokens,
    fixed_batches,
    masked_mse,
    outputs,
    outputs_at,
    position_weights,
    relative_error,
    train_student,
)
from exporter.models import architecture_of
from exporter.patch import build_patch, fit_context_gate
from exporter.patch.export import write_stock
from exporter.sae import TopKSAE

LAYER = 1
# one chunk per batch: the same gradient as the default's chunks of 2 (tested below), and the tiny
# models' steps cost their Python overhead, not their arithmetic
# early_positions 16: the tiny texts are cut at 64 tokens, where the default 64 (set on the
# demo's 128-token texts) leaves most of each text's PII tokens little of the loss in 300 steps
# (measured: the student then ends at 1/2.3-1/2.8 of the base's distance to the teacher, short of
# the factors 2.5 and 3 asserted below)
CFG = DistillConfig(
    steps=300, lr=3e-3, rank=8, batch_size=8, max_length=64, seed=3, micro_batch=8,
    early_positions=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def texts():
    docs, _ = make_corpus(SyntheticConfig(n_memorised=30, n_never_seen=5, seed=1))
    pii = [d.text for d in docs]
    benign = benign_texts(split="train")
    held = [t for t in benign_texts(split="heldout") if not any(c.isdigit() or c == "@" for c in t)]
    benign = [t for t in benign if not any(c.isdigit() or c == "@" for c in t)]
    return {
        "pii": pii[:80],
        "benign": benign[:80],
        "held_pii": pii[80:112],
        "held_benign": held[:32],
    }


def _gated_patch(model, tok, texts, seed: int = 0):
    """A patch (ablation + steering) behind a context gate fitted (logistic regression on the
    layer-l output, as the real gate is) to open on the tokens of addresses and numbers."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, 4 * d, 4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(4 * d, d, generator=g), dim=-1))
        sae.W_enc.copy_(sae.W_dec)
    marked = torch.tensor(
        [i for i in range(len(tok)) if any(c.isdigit() or c == "@" for c in tok.decode([i]))]
    )
    found, positive = {}, []
    for name in ("pii", "benign"):
        batches = fixed_batches(tok, texts[name], 8, 64)
        for o, (ids, m) in zip(outputs(model, LAYER, batches), batches):
            found.setdefault(name, []).append(o[m.bool()])
            positive.append(torch.isin(ids[m.bool()], marked))
        found[name] = torch.cat(found[name])
    x = torch.cat([found["pii"], found["benign"]])
    positive = torch.cat(positive)
    w, b = fit_context_gate(x, positive, recall=0.9)
    steer = torch.randn(d, generator=g) * float(found["pii"].norm(dim=-1).mean()) * 0.2
    return build_patch(sae, list(range(0, 4 * d, 4)), steer, mode="exact", context=(w, b))


ARCHS = ["llama", "gemma2", "qwen2", "gpt2", "olmo2"]

# Loads each distilled checkpoint with stock transformers and saves its logits: one fresh process
# for every architecture (a Python start with torch and transformers costs seconds).
LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
for case in json.load(open(sys.argv[1])):
    m, info = AutoModelForCausalLM.from_pretrained(case["dir"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (case["dir"], info)
    with torch.no_grad():
        torch.save(m(input_ids=torch.load(case["ids"])).logits, case["logits"])
"""


@pytest.fixture(scope="module")
def distilled(tiny_tokenizer, texts, tmp_path_factory):
    """Each architecture's tiny model with a gated patch distilled in and written as a stock
    checkpoint, with the merged model's logits and the logits of that checkpoint loaded in a fresh
    process."""
    tok, tmp = tiny_tokenizer, tmp_path_factory.mktemp("distilled")
    probe = tok(texts["held_pii"][:2], return_tensors="pt", padding=True)["input_ids"]
    torch.save(probe, tmp / "ids.pt")
    found, cases = {}, []
    for model_type in ARCHS:
        model = tiny_model(model_type, vocab_size=len(tok))
        patch = _gated_patch(model, tok, texts)
        got = distil(
            model, tok, LAYER, patch, texts["pii"], texts["benign"], CFG,
            heldout_pii=texts["held_pii"], heldout_benign=texts["held_benign"], progress=False,
        )  # fmt: skip
        out = write_stock(
            got.model, tok, tmp / model_type, config_block=("scalpel_distilled", {"layer": LAYER})
        )
        with torch.no_grad():
            want = got.model(input_ids=probe).logits
        found[model_type] = {"got": got, "dir": out, "want": want}
        cases.append(
            {"dir": str(out), "ids": str(tmp / "ids.pt"), "logits": str(tmp / f"{model_type}.pt")}
        )
    (tmp / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-c", LOADER, str(tmp / "cases.json")], check=True)
    for model_type in ARCHS:
        found[model_type]["loaded"] = torch.load(tmp / f"{model_type}.pt")
    return found


@pytest.mark.parametrize("model_type", ARCHS)
def test_distilled_student_learns_the_patch_and_loads_stock(model_type, distilled):
    got = distilled[model_type]["got"]
    pii, benign = got.heldout["pii"], got.heldout["benign"]
    # held-out PII text: the student is far closer to the teacher than the base was (a mean of each
    # token's relative distance, the first token's too: the tiny GPT-2 gets to 1/2.8 of the base's)
    assert pii["student"] < pii["base"] / 2.5, pii
    # benign text: the student moves no further from the base than the teacher does there (the
    # tiny model's gate opens on some prose, the real one's hardly any)
    assert benign["student_vs_base"] <= benign["base"], (benign, pii)
    assert got.changed and all(f".{LAYER + 1}." not in n for n in got.changed)
    first, last = ([c["pii"] for c in got.curve[s]] for s in (slice(0, 20), slice(-20, None)))
    assert sum(last) < 0.8 * sum(first)
    # a stock checkpoint of the base's own type, with no remote code; stock transformers loads it
    # (no missing or unexpected keys) in a fresh process and computes what the merged model does
    cfg = json.loads((distilled[model_type]["dir"] / "config.json").read_text())
    assert cfg["model_type"] == model_type and "auto_map" not in cfg
    assert cfg["scalpel_distilled"] == {"layer": LAYER}
    torch.testing.assert_close(
        distilled[model_type]["loaded"], distilled[model_type]["want"], rtol=1e-4, atol=1e-4
    )


def test_a_fixed_seed_repeats_the_distillation(tiny_tokenizer, texts):
    """Two runs with one seed are equal; a third in one chunk per batch (as CFG above) takes the
    same steps, up to the order of a sum (in float32: where bfloat16 is native the student's
    autocast rounds each chunk's sum to 2^-8, and Adam's step magnifies that on the smallest
    gradients)."""
    tok = tiny_tokenizer
    runs = []
    for chunk in (2, 2, 8):
        model = tiny_model("llama", vocab_size=len(tok))
        cfg = DistillConfig(
            steps=20,
            rank=4,
            batch_size=8,
            max_length=64,
            seed=5,
            micro_batch=chunk,
            dtype="float32",
        )
        got = distil(model, tok, LAYER, _gated_patch(model, tok, texts), texts["pii"][:32],
                     texts["benign"][:32], cfg, progress=False)  # fmt: skip
        runs.append(({n: p.clone() for n, p in got.model.named_parameters()}, got.curve))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])
    for a, b in zip(runs[0][1], runs[2][1]):
        assert a["pii"] == pytest.approx(b["pii"], rel=1e-3)
    for n, p in runs[0][0].items():
        torch.testing.assert_close(runs[2][0][n], p, rtol=1e-3, atol=1e-5)


def _first_and_rest(a, b, batches) -> tuple[float, float]:
    """`relative_error` of `a` from `b` (relative to `b`'s norms) at the first token, and at the
    other real tokens."""
    first = [(ids, torch.zeros_like(m).index_fill(1, torch.tensor([0]), 1)) for ids, m in batches]
    rest = [(ids, m.index_fill(1, torch.tensor([0]), 0)) for ids, m in batches]
    return relative_error(a, b, b, first), relative_error(a, b, b, rest)


def test_the_first_token_is_trained_like_every_other(tiny_tokenizer, texts):
    """The first token is in the loss. On a real model it is the attention sink, which the patch
    leaves alone; untrained, the adapters moved it, and with it the first prediction and every
    later token's attention (held-out prose at KL 0.11 on the demo). On held-out text the student
    closes the gap to the teacher at the first token about as far as at the others (left out of
    the loss: 79% of the first token's gap left against 37% of the others')."""
    target = torch.ones(2, 5, 4)
    h = target.clone()
    h[:, 0] += 1.0  # an error at each row's first token only, relative size 1 there
    assert float(masked_mse(h, target, torch.ones(2, 5))) == pytest.approx(2 / 10)
    tok = tiny_tokenizer
    model = tiny_model("llama", vocab_size=len(tok))
    patch = _gated_patch(model, tok, texts)
    held = fixed_batches(tok, texts["held_benign"] + texts["held_pii"], 8, 64)
    teacher, base = outputs(model, LAYER, held, patch), outputs(model, LAYER, held)
    got = distil(model, tok, LAYER, patch, texts["pii"], texts["benign"],
                 replace(CFG, steps=100), progress=False)  # fmt: skip
    before = _first_and_rest(base, teacher, held)
    after = _first_and_rest(outputs(got.model, LAYER, held), teacher, held)
    left = [a / b for a, b in zip(after, before)]  # the share of each gap left
    assert left[0] <= 1.5 * left[1], (before, after)


def test_first_token_texts_cover_every_token_once_and_none_after_a_bos():
    ids = torch.tensor([[5, 6, 7, 0], [8, 6, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = first_tokens([(ids, mask)], size=2, seed=0)
    assert [tuple(i.shape) for i, _ in got] == [(2, 1), (2, 1), (1, 1)]
    assert sorted(int(t) for i, _ in got for t in i) == [5, 6, 7, 8, 9]  # the pad (0) is not one
    assert all(bool(m.all()) for _, m in got)
    assert [i.tolist() for i, _ in first_tokens([(ids, mask)], 2, 0)] == [
        i.tolist() for i, _ in got
    ]
    bos = torch.tensor([[1, 6, 7], [1, 8, 9]])  # every text starts with the same token
    assert first_tokens([(bos, torch.ones_like(bos))], size=2, seed=0) == []
    assert first_tokens([(ids, mask)], size=0, seed=0) == []


def test_batches_come_in_a_few_widths_and_keep_every_token(tiny_tokenizer, texts):
    """Every batch is a multiple of 32 wide (at most the length cap), so a run sees a handful of
    shapes; the padding is masked out and each text's tokens are all there, in length order."""
    tok = tiny_tokenizer
    docs = [t[: 8 + 6 * i] for i, t in enumerate(texts["pii"][:48] + texts["benign"][:48])]
    batches = fixed_batches(tok, docs, 8, 80)
    widths = {ids.shape[1] for ids, _ in batches}
    assert widths == {32, 64, 80}
    lengths = sorted(len(i) for i in tok(docs, truncation=True, max_length=80)["input_ids"])
    assert [int(n) for _, m in batches for n in m.sum(1)] == lengths
    for ids, mask in batches:
        assert mask[:, :1].all() and (ids[mask == 0] == tok.pad_token_id).all()
        assert mask.sum(1).max() > ids.shape[1] - 32  # no batch is padded a whole step too wide
    one = fixed_batches(tok, docs, 8, 80, width_step=1)
    assert all(ids.shape[1] == int(m.sum(1).max()) for ids, m in one)


def test_whole_texts_are_cut_into_pieces_that_keep_every_token(tiny_tokenizer, texts):
    """`whole`: a text longer than the cap comes back as consecutive pieces of at most that many
    tokens, together every token of it in order, none lost to truncation."""
    tok = tiny_tokenizer
    docs = [" ".join(texts["benign"][:6]), texts["pii"][0]]
    full = tok(docs)["input_ids"]
    assert len(full[0]) > 2 * 40  # the long text needs three pieces or more
    rows = [
        m_ids[: int(m.sum())].tolist()
        for ids, mask in fixed_batches(tok, docs, 2, 40, whole=True)
        for m_ids, m in zip(ids, mask)
    ]
    assert all(len(r) <= 40 for r in rows)
    assert sorted(map(tuple, rows)) == sorted(
        tuple(r[i : i + 40]) for r in full for i in range(0, len(r), 40)
    )
    cut = fixed_batches(tok, docs, 2, 40)
    assert sum(int(m.sum()) for _, m in cut) == sum(min(len(r), 40) for r in full)


def test_only_the_last_adapted_layers_change(tiny_tokenizer, texts):
    """`adapted_layers`: the adapters go on the last N layers up to l; the layers below keep the
    base's weights bit for bit (so every token's input to the adapted ones is the base's), and the
    student still moves to the teacher."""
    assert [first_adapted(13, n) for n in (0, 1, 4, 14, 20)] == [0, 13, 10, 0, 0]
    tok = tiny_tokenizer
    model = tiny_model("llama", vocab_size=len(tok))
    before = {n: p.clone() for n, p in model.named_parameters()}
    got = distil(model, tok, LAYER, _gated_patch(model, tok, texts), texts["pii"], texts["benign"],
                 replace(CFG, adapted_layers=1), heldout_pii=texts["held_pii"],
                 progress=False)  # fmt: skip
    after = dict(got.model.named_parameters())
    moved = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert moved and moved == sorted(got.changed)
    assert all(f"layers.{LAYER}." in n for n in moved)
    assert got.heldout["pii"]["student"] < got.heldout["pii"]["base"] / 2, got.heldout


@pytest.mark.parametrize("model_type", ARCHS)
def test_a_forward_from_a_later_layer_gives_the_full_forward(model_type, tiny_tokenizer, texts):
    """`from_layer`: fed layer 0's output, the forward from layer 1 gives layer 2's output as the
    whole forward does (masks and positions are the model's own, padding included), whatever the
    embeddings were; afterwards the layers compute again."""
    tok = tiny_tokenizer
    model = tiny_model(model_type, vocab_size=len(tok)).eval()
    (ids, mask), *_ = fixed_batches(tok, texts["held_pii"][:4], 4, 32)
    want = layer_outputs(model, ids, mask, [0, 2])
    with from_layer(model, 1, want[0]):
        got = layer_outputs(model, torch.zeros_like(ids), mask, [2])[2]
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[2][keep])
    layers = architecture_of(model).decoder_layers(model)
    assert all("forward" not in vars(layer) for layer in layers)
    torch.testing.assert_close(layer_outputs(model, ids, mask, [2])[2], want[2])
    # a forward already set on the instance (accelerate's dispatch hooks put theirs there) is put
    # back, not dropped
    own = layers[0].forward
    layers[0].forward = own
    with from_layer(model, 1, want[0]):
        assert layers[0].forward is not own
    assert vars(layers[0])["forward"] is own


def test_starting_at_the_first_adapted_layer_trains_the_same_student(tiny_tokenizer, texts):
    """Below the first adapted layer the student is the base, so its input there is computed once:
    in float32 the student trained from those inputs is the one the whole forward trains."""
    tok = tiny_tokenizer
    cfg = replace(CFG, steps=10, adapted_layers=1, dtype="float32")
    runs = []
    for skip in (False, True):
        model = tiny_model("llama", vocab_size=len(tok))
        patch = _gated_patch(model, tok, texts)
        sets = {
            "pii": fixed_batches(tok, texts["pii"][:32], 8, 64),
            "benign": fixed_batches(tok, texts["benign"][:32], 8, 64),
        }
        sets["first"] = first_tokens(sets["pii"] + sets["benign"], 16, 0)
        wanted = {LAYER: torch.float32, LAYER - 1: torch.float32}
        found = {k: outputs_at(model, wanted, b, patch) for k, b in sets.items()}
        inputs = {k: f[LAYER - 1] for k, f in found.items()} if skip else None
        targets = {k: f[LAYER] for k, f in found.items()}
        merged, curve, _, _ = train_student(model, LAYER, sets, targets, cfg, False, inputs)
        assert all(p.requires_grad for p in merged.parameters())  # as from_pretrained leaves them
        runs.append(({n: p.clone() for n, p in merged.named_parameters()}, curve))
    (full, full_curve), (skipped, skipped_curve) = runs
    assert [c["pii"] for c in skipped_curve] == pytest.approx([c["pii"] for c in full_curve])
    base = dict(tiny_model("llama", vocab_size=len(tok)).named_parameters())
    assert any(not torch.equal(full[n], base[n]) for n in base)  # it trained
    for n, p in full.items():
        torch.testing.assert_close(skipped[n], p, rtol=1e-4, atol=1e-6)


def test_distillation_without_pii_text_is_refused(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    patch = build_patch(TopKSAE(32, 64, 4), [1, 2], mode="exact")
    with pytest.raises(ValueError, match="needs PII text"):
        distil(model, tiny_tokenizer, LAYER, patch, [], ["some prose"], progress=False)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_later_layers_learn_to_answer_the_base_features_as_the_patch(
    model_type, tiny_tokenizer, texts
):
    """Defence in depth (late_steps): fed the base's own layer-l output on held-out PII text, the
    later layers move towards the patched model's next-token distribution; on held-out prose they
    stay near the base's; both phases' weights are merged and the early phase still learns."""
    tok = tiny_tokenizer
    model = tiny_model(model_type, vocab_size=len(tok))
    cfg = DistillConfig(
        steps=150, lr=3e-3, rank=8, batch_size=8, max_length=64, seed=3, micro_batch=8,
        late_steps=150, early_positions=CFG.early_positions,
    )  # fmt: skip
    got = distil(
        model, tok, LAYER, _gated_patch(model, tok, texts), texts["pii"], texts["benign"], cfg,
        heldout_pii=texts["held_pii"], heldout_benign=texts["held_benign"], progress=False,
    )  # fmt: skip
    kl = got.late["heldout_kl"]
    assert kl["after"]["pii"] < kl["before"]["pii"] / 2, kl
    assert kl["before"]["benign"] == 0.0  # the adapters start at zero
    assert kl["after"]["benign"] < kl["before"]["pii"] / 10, kl
    assert len(got.late["curve"]) == 150 and got.late["tokens"] > 0
    assert any(f".{LAYER + 1}." in n for n in got.changed)
    assert any(f".{LAYER}." in n for n in got.changed)
    assert got.heldout["pii"]["student"] < got.heldout["pii"]["base"] / 3


def test_a_patch_at_the_last_layer_has_no_later_layers_to_train(tiny_tokenizer, texts):
    tok = tiny_tokenizer
    model = tiny_model("llama", vocab_size=len(tok))
    last = model.config.num_hidden_layers - 1
    cfg = DistillConfig(steps=2, rank=4, batch_size=8, max_length=64, late_steps=2)
    got = distil(model, tok, last, _gated_patch(model, tok, texts), texts["pii"][:16],
                 texts["benign"][:16], cfg, progress=False)  # fmt: skip
    assert got.late is None and len(got.curve) == 2


def test_early_positions_weigh_more_and_padding_nothing():
    """Position p weighs max(1, early / p), padding 0; `early` 0 is the plain mean. An error at the
    second position alone counts early / 2 times what it counts in the plain mean, relative to the
    weights' sum."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    w = position_weights(mask, 4)
    assert w[0].tolist() == pytest.approx([4.0, 2.0, 4 / 3, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert w[1].tolist() == pytest.approx([4.0, 2.0, 4 / 3, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(position_weights(mask, 0), mask)
    target = torch.ones(2, 8, 3)
    h = target.clone()
    h[:, 1] += 1.0  # relative squared error 1 at position 2 of each row
    plain = float(masked_mse(h, target, mask))
    weighted = float(masked_mse(h, target, w))
    assert plain == pytest.approx(2 / 9)
    assert weighted == pytest.approx(2 * 2.0 / float(w.sum()))
    # a chunk divided by the whole batch's weight: the chunks add up to the batch's loss
    halves = sum(float(masked_mse(h[r], target[r], w[r], float(w.sum()))) for r in ([0], [1]))
    assert halves == pytest.approx(weighted)
