"""Hardening a distilled export against relearning: the privacy neurons above the patch are ranked
by how much more they matter to PII tokens than to benign text, zeroed, and the MLPs above the
patch repaired towards the model as it was; nothing at or below the patch's layer changes."""

import copy

import pytest
import torch
from conftest import tiny_model

from exporter.data.corpus import benign_texts
from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.distill import fixed_batches
from exporter.harden import (
    HardenConfig,
    harden,
    kl_from,
    lr_factor,
    mlp_tensors,
    mlp_weights,
    repair,
    revert,
    revert_mlps,
    specific_neurons,
    zero_neurons,
)
from exporter.methods.batches import token_log_probs
from exporter.methods.depn import neuron_count
from exporter.models import architecture_of

LAYER = 1  # the patch's layer: the tiny models have 3, so layer 2 is hardened
# weights drawn wider than the default 0.02, so that a neuron zeroed moves the tiny model's outputs
# measurably (at 0.02, zeroing 16 of 64 moved held-out KL by under 1e-5)
WIDE = {"initializer_range": 0.3}
RANK = HardenConfig(ig_steps=4, rank_length=48)


@pytest.fixture(scope="module")
def texts():
    docs, _ = make_corpus(SyntheticConfig(n_memorised=12, n_never_seen=0, seed=4))
    benign = [t for t in benign_texts(split="train") if not any(c.isdigit() for c in t)]
    return {
        "docs": [d for d in docs if d.spans][:8],
        "pii": [d.text for d in docs][:24],
        "benign": benign[:24],
        "held": benign[24:32],
    }


def _mean_kl(reference, model, tok, texts) -> float:
    with torch.no_grad():
        return float(
            torch.stack(
                [kl_from(reference, model, ids, m) for ids, m in fixed_batches(tok, texts, 4, 48)]
            ).mean()
        )


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "olmo2"])
def test_every_neuron_above_the_patch_is_ranked_once(model_type, tiny_tokenizer, texts):
    model = tiny_model(model_type, vocab_size=len(tiny_tokenizer))
    ranked = specific_neurons(
        model, tiny_tokenizer, texts["docs"][:3], texts["benign"][:3], LAYER + 1, RANK, False
    )
    arch = architecture_of(model)
    n = neuron_count(model.get_submodule(f"{arch.layers}.{LAYER + 1}.{arch.mlp_out}"))
    assert sorted(ranked) == [(LAYER + 1, j) for j in range(n)]
    assert mlp_weights(model, LAYER + 1)  # GPT-2's Conv1D maps too


def _pii_and_benign_log_likelihood(model, tok, docs, benign) -> tuple[float, float]:
    """Mean log-likelihood of the documents' PII tokens and of every token of the benign texts."""
    from exporter.data.labels import token_labels

    pii = []
    for doc in docs:
        lab = token_labels(tok, doc.text, doc.spans, max_length=48)
        with torch.no_grad():
            lp, _ = token_log_probs(
                model, lab.input_ids[None], torch.ones_like(lab.input_ids)[None]
            )
        pii.append(lp[0][lab.pii[1:]])
    ids, mask = fixed_batches(tok, benign, len(benign), 48)[0]
    with torch.no_grad():
        lp, keep = token_log_probs(model, ids, mask)
    return float(torch.cat(pii).mean()), float((lp * keep).sum() / keep.sum())


def test_the_top_ranked_neurons_matter_more_to_pii_than_to_benign_text(tiny_tokenizer, texts):
    """What the ranking is for: zeroing the most specific neurons costs the PII tokens more
    likelihood, relative to what it costs benign text, than zeroing as many from the bottom."""
    tok = tiny_tokenizer
    model = tiny_model("llama", vocab_size=len(tok), seed=2, **WIDE)
    docs, benign = texts["docs"], texts["benign"][:8]
    ranked = specific_neurons(model, tok, docs, benign, LAYER + 1, RANK, False)
    base = _pii_and_benign_log_likelihood(model, tok, docs, benign)

    def cost(neurons):
        edited = copy.deepcopy(model)
        zero_neurons(edited, neurons)
        pii, prose = _pii_and_benign_log_likelihood(edited, tok, docs, benign)
        return (base[0] - pii) - (base[1] - prose)

    top, bottom = cost(ranked[:8]), cost(ranked[-8:])
    assert top > 0.05 > bottom


def test_hardening_repairs_only_the_mlps_above_the_patch(tiny_tokenizer, texts):
    tok = tiny_tokenizer
    model = tiny_model("llama", vocab_size=len(tok), seed=1, **WIDE)
    ranked = specific_neurons(
        model, tok, texts["docs"], texts["benign"][:8], LAYER + 1, RANK, False
    )
    cfg = HardenConfig(neurons=16, steps=40, lr=3e-3, batch_size=4, max_length=48)
    before = copy.deepcopy(model)
    zeroed = copy.deepcopy(model)
    zero_neurons(zeroed, ranked[:16])
    damage = _mean_kl(before, zeroed, tok, texts["held"])

    got = harden(model, tok, LAYER, ranked, texts, cfg, progress=False)
    assert got.model is model and got.neurons == ranked[:16] and len(got.curve) == 40
    assert set(got.changed) == set(mlp_weights(model, LAYER + 1))
    b, h = dict(before.named_parameters()), dict(model.named_parameters())
    moved = {n for n in b if not torch.equal(b[n], h[n])}
    assert moved and moved <= set(got.changed)
    # the repair brings held-out prose back towards the model as it was
    repaired = _mean_kl(before, model, tok, texts["held"])
    assert repaired < damage / 2
    # a fixed seed repeats it
    again = copy.deepcopy(before)
    harden(again, tok, LAYER, ranked, texts, cfg, progress=False)
    for name, p in again.named_parameters():
        torch.testing.assert_close(p, h[name], rtol=0, atol=0)


def test_hardening_touches_nothing_at_or_below_the_patch(tiny_tokenizer, texts):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    with pytest.raises(ValueError, match="above the patch's layer 1 only"):
        harden(model, tiny_tokenizer, LAYER, [(LAYER, 0)], texts, HardenConfig(neurons=1))
    last = architecture_of(model).num_layers(model)
    with pytest.raises(ValueError, match="choose an earlier probe.layer"):
        specific_neurons(model, tiny_tokenizer, texts["docs"], texts["benign"], last, RANK, False)


def test_hardening_off_leaves_the_distillations_cache_keys_as_they_were():
    """A distillation or evaluation cached before the option existed stays valid while it is off;
    any hardening setting changes the key once it is on."""
    from exporter.recipe.exports import DistillSection
    from exporter.run.distilled import spec_key

    off = spec_key(DistillSection())
    assert "harden" not in off and off == DistillSection().model_dump(exclude={"harden"})
    on = spec_key(DistillSection(harden={"neurons": 400}))
    assert on["harden"]["neurons"] == 400
    assert on != spec_key(DistillSection(harden={"neurons": 400, "steps": 300}))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_reverting_sets_the_later_mlps_to_the_reference_and_nothing_else(
    model_type, tiny_tokenizer
):
    """The MLPs above the patch (weights and biases) become the reference's; every other tensor
    stays the student's."""
    student = tiny_model(model_type, vocab_size=len(tiny_tokenizer), seed=1)
    reference = tiny_model(model_type, vocab_size=len(tiny_tokenizer), seed=2)
    before = {n: p.clone() for n, p in student.named_parameters()}
    names = revert_mlps(student, reference, LAYER + 1)
    assert set(names) == set(mlp_tensors(student, LAYER + 1, biases=True))
    assert (model_type == "gpt2") == any(n.endswith(".bias") for n in names)
    theirs = dict(reference.named_parameters())
    for name, p in student.named_parameters():
        expected = theirs[name] if name in names else before[name]
        torch.testing.assert_close(p, expected, rtol=0, atol=0)


def test_a_reference_of_another_size_is_refused_with_what_to_give(tiny_tokenizer):
    student = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    other = tiny_model("llama", vocab_size=len(tiny_tokenizer), intermediate_size=48)
    with pytest.raises(ValueError, match="not the base's architecture and size.*fine-tuned from"):
        revert_mlps(student, other, LAYER + 1)


def test_reverting_then_repairing_moves_only_the_later_mlps_towards_the_student(
    tiny_tokenizer, texts
):
    """The repair starts from the reference's MLPs and brings held-out prose back towards the
    student; a fixed seed repeats it."""
    tok = tiny_tokenizer
    student = tiny_model("llama", vocab_size=len(tok), seed=1, **WIDE)
    reference = tiny_model("llama", vocab_size=len(tok), seed=2, **WIDE)
    cfg = HardenConfig(steps=40, lr=1e-2, batch_size=4, max_length=48, reference="ref")
    was = copy.deepcopy(student)
    reverted = copy.deepcopy(student)
    revert_mlps(reverted, reference, LAYER + 1)
    damage = _mean_kl(was, reverted, tok, texts["held"])

    got = revert(student, tok, LAYER, reference, texts, cfg, progress=False)
    assert got.model is student and got.neurons == [] and len(got.curve) == 40
    assert set(got.changed) == set(mlp_weights(student, LAYER + 1))
    b, h = dict(was.named_parameters()), dict(student.named_parameters())
    assert {n for n in b if not torch.equal(b[n], h[n])} <= set(got.changed)
    assert _mean_kl(was, student, tok, texts["held"]) < damage / 2
    again = copy.deepcopy(was)
    revert(again, tok, LAYER, reference, texts, cfg, progress=False)
    for name, p in again.named_parameters():
        torch.testing.assert_close(p, h[name], rtol=0, atol=0)


def test_the_repairs_schedule_decays_after_its_warmup_and_settles_after_its_burst():
    """Linear decay by default; a warmup ramps the first steps up to it; a burst runs only its
    first steps at `lr` and the rest at `settle_lr`, still decaying."""
    plain = HardenConfig(steps=100, lr=3e-4)
    assert [lr_factor(plain, s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    warm = HardenConfig(steps=100, lr=3e-4, warmup=10)
    assert lr_factor(warm, 0) == pytest.approx(0.1)
    assert lr_factor(warm, 4) == pytest.approx(0.5 * 0.96)
    assert [lr_factor(warm, s) for s in (9, 50)] == pytest.approx([0.91, 0.5])
    burst = HardenConfig(steps=100, lr=3e-4, burst=20, settle_lr=1e-4)
    assert lr_factor(burst, 19) == pytest.approx(0.81)
    assert 3e-4 * lr_factor(burst, 20) == pytest.approx(1e-4 * 0.8)
    # a burst with nothing to settle to is the plain schedule
    assert lr_factor(HardenConfig(steps=100, burst=20), 50) == pytest.approx(0.5)


def test_the_repair_runs_its_schedule(tiny_tokenizer, texts):
    """The optimiser's learning rate follows `lr_factor`: in a burst of 3 steps at 1e-2 the weights
    move about a hundred times further a step than at the settled 1e-4 after it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), **WIDE)
    teacher = copy.deepcopy(model)
    weights = list(mlp_weights(model, LAYER + 1).values())
    with torch.no_grad():
        for w in weights:
            w.add_(0.05 * torch.randn_like(w))
    cfg = HardenConfig(steps=6, lr=1e-2, burst=3, settle_lr=1e-4, batch_size=2, max_length=32)
    seen = [weights[0].detach().clone()]
    handle = register_optimizer_step_post_hook(lambda *_: seen.append(weights[0].detach().clone()))
    try:
        repair(model, teacher, tiny_tokenizer, texts["pii"], texts["benign"], weights, cfg, False)
    finally:
        handle.remove()
    steps = [(b - a).abs().max().item() for a, b in zip(seen, seen[1:])]
    assert len(steps) == 6
    # Adam's largest move is about the learning rate: 1e-2 in the burst, under 1e-4 after it
    assert min(steps[:3]) > 5e-3 and max(steps[3:]) < 2e-4
