"""Utility metrics on tiny models with hand-checkable cases."""

import math

import pytest
import torch
from conftest import tiny_model

from exporter.evaluate.utility import (
    against_reference,
    diversity,
    generation_diversity,
    mean_kl,
    perplexity,
    reference,
)
from exporter.patch import attached, build_patch, steering_vector
from exporter.sae import TopKSAE

TEXTS = [
    "The with statement wraps the execution of a block.",
    "Names refer to objects; binding happens here.",
    "A short one.",
]


def test_diversity_hand_checked():
    assert diversity([[1, 2, 3, 4, 1, 2, 3, 4]]) == {"distinct_2": 4 / 7, "repetition_4": 1 / 5}
    assert diversity([[5, 5, 5, 5, 5, 5]])["repetition_4"] == pytest.approx(2 / 3)
    assert diversity([[1, 2], [3, 4]]) == {"distinct_2": 1.0, "repetition_4": 0.0}


def test_kl_zero_for_same_model_positive_for_patch(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    assert mean_kl(model, model, tiny_tokenizer, TEXTS) == pytest.approx(0.0, abs=1e-7)
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    patch = build_patch(sae, [], steering_vector(sae, torch.randn(64), 0.5, 3.0), mode="exact")
    kl = mean_kl(
        model, model, tiny_tokenizer, TEXTS, other_context=lambda: attached(model, 1, patch)
    )
    assert kl > 1e-4
    # Perplexity under the same patch differs, and a uniform model's perplexity is its vocabulary
    # size.
    base = perplexity(model, tiny_tokenizer, TEXTS)
    patched = perplexity(model, tiny_tokenizer, TEXTS, context=lambda: attached(model, 1, patch))
    assert patched != base
    # The search's shortcut (base log-probs kept, one forward per variant) gives the same numbers.
    ref = reference(model, tiny_tokenizer, TEXTS, batch_size=2)
    fast = against_reference(ref, model, lambda: attached(model, 1, patch))
    assert fast["kl"] == pytest.approx(kl, rel=1e-5) and fast["perplexity"] == pytest.approx(
        patched, rel=1e-5
    )
    assert against_reference(ref, model)["kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, tiny_tokenizer, TEXTS) == pytest.approx(len(tiny_tokenizer), rel=1e-4)
    assert math.isfinite(base)


def test_generation_diversity_runs_on_prompts(tiny_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tiny_tokenizer))
    out = generation_diversity(model, tiny_tokenizer, TEXTS, max_new_tokens=12)
    assert 0 < out["distinct_2"] <= 1 and 0 <= out["repetition_4"] <= 1


def test_a_reference_too_large_to_keep_is_recomputed_with_the_same_numbers(tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    patch = build_patch(sae, [], steering_vector(sae, torch.randn(64), 0.5, 3.0), mode="exact")
    kept = reference(model, tiny_tokenizer, TEXTS, max_bytes=1 << 30)
    again = reference(model, tiny_tokenizer, TEXTS, max_bytes=1000)
    assert isinstance(kept.batches, list) and not isinstance(again.batches, list)
    want = against_reference(kept, model, lambda: attached(model, 1, patch))
    for _ in range(2):  # every pass recomputes the base's log-probs
        got = against_reference(again, model, lambda: attached(model, 1, patch))
        assert got == pytest.approx(want, rel=1e-6)
    assert against_reference(again)["kl"] == 0.0


def test_a_large_vocabulary_takes_fewer_texts_per_forward_with_the_same_results(
    tiny_tokenizer, monkeypatch
):
    """Logits of a 262k-token head at 16 texts made a 13 GiB peak on Gemma: under the budget the
    batches shrink (to one text here) and KL and perplexity do not change."""
    from exporter import lm

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    patch = build_patch(sae, [], steering_vector(sae, torch.randn(64), 0.5, 3.0), mode="exact")

    def measured():
        ctx = lambda: attached(model, 1, patch)  # noqa: E731
        kl = mean_kl(model, model, tiny_tokenizer, TEXTS, other_context=ctx)
        ref = reference(model, tiny_tokenizer, TEXTS)
        return kl, perplexity(model, tiny_tokenizer, TEXTS, context=ctx), ref

    kl, ppl, ref = measured()
    assert [len(enc["input_ids"]) for enc, _ in ref.batches] == [3]
    monkeypatch.setattr(lm, "LOGITS_BYTES", 128 * len(tiny_tokenizer) * 4)
    small_kl, small_ppl, small_ref = measured()
    assert [len(enc["input_ids"]) for enc, _ in small_ref.batches] == [1, 1, 1]
    assert small_kl == pytest.approx(kl, rel=1e-5) and small_ppl == pytest.approx(ppl, rel=1e-5)
