"""The training and measuring steps with the model on an accelerator (SCALPEL_TEST_DEVICE, else
cuda where torch sees one; skipped on a CPU-only machine). Each runs what a `device: cuda` recipe
runs, on a tiny Llama, and checks that it trained there and hands its results back where the next
stage expects them. `SCALPEL_TEST_DEVICE=cuda pytest tests/test_device.py tests/test_stages.py
tests/test_distilled_run.py` adds the tiny recipes from probe to export on that device."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model
from helpers.sae_data import sparse_data

from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.methods import build, changed_tensors
from exporter.methods.batches import encode, token_log_probs
from exporter.recipe import DepnMethod, GradientAscentMethod, RmuMethod

DEVICE = os.environ.get("SCALPEL_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(
    DEVICE in ("", "cpu"), reason="no accelerator (set SCALPEL_TEST_DEVICE or run where cuda is)"
)
PROSE = ["Functions return values; a class groups data with the methods that act on it."] * 8


@pytest.fixture(scope="module")
def docs():
    found, _ = make_corpus(SyntheticConfig(n_memorised=6, n_never_seen=1, seed=3))
    return found[:16]


def _on_device(model) -> bool:
    return all(p.device.type == DEVICE for p in model.parameters())


def _nll(model, tok, texts) -> float:
    ids, mask = encode(tok, texts, 64, DEVICE)
    with torch.no_grad():
        lp, keep = token_log_probs(model, ids, mask)
    return float(-(lp * keep).sum() / keep.sum())


def test_leaky_finetune_trains_on_the_device(tiny_tokenizer, docs):
    from exporter.data.leaky import LeakyConfig, finetune

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), initializer_range=0.3).to(DEVICE)
    texts = [d.text for d in docs]
    before = _nll(model, tiny_tokenizer, texts)
    config = LeakyConfig(
        epochs=8, lr=1e-2, batch_size=6, warmup_steps=2, max_length=64, first_layer=1
    )
    trained, stats = finetune(model, tiny_tokenizer, docs, PROSE[:2], config, progress=False)
    assert _on_device(trained) and stats.steps > 0
    assert _nll(trained, tiny_tokenizer, texts) < 0.8 * before


def test_sae_trains_on_the_device_and_comes_back_on_the_cpu():
    from exporter.activations import shuffled_batches
    from exporter.recipe.schema import SaeSection
    from exporter.sae import reconstruction_metrics, train_sae

    x = sparse_data(6000)
    cfg = SaeSection(expansion=4, k=3, k_aux=8, batch_size=256, train_tokens=60_000, lr=3e-3)
    fvu = {}
    for device in ("cpu", DEVICE):
        result = train_sae(
            shuffled_batches(x, 256, seed=1), x[:1024], cfg, progress=False, device=device
        )
        assert result.sae.W_enc.device.type == "cpu"
        fvu[device] = reconstruction_metrics(result.sae, x[-1000:])["fvu"]
    assert fvu[DEVICE] < 0.2 and abs(fvu[DEVICE] - fvu["cpu"]) < 0.05, fvu


def test_spliced_ce_runs_the_sae_beside_the_model(tiny_tokenizer):
    from exporter.sae import spliced_ce
    from exporter.sae.model import TopKSAE

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    on_cpu = spliced_ce(model, tiny_tokenizer, sae, 1, PROSE[:4], max_length=32)
    there = spliced_ce(model.to(DEVICE), tiny_tokenizer, sae, 1, PROSE[:4], max_length=32)
    assert sae.W_enc.device.type == "cpu"  # the caller's SAE is left where it was
    assert there == pytest.approx(on_cpu, rel=1e-3)


@pytest.mark.parametrize(
    "spec",
    [
        RmuMethod(name="rmu", steps=[2, 6], c=6.5, alpha=10.0, lr=5e-3),
        GradientAscentMethod(name="gradient_ascent", loss="ga", steps=[2, 4], lr=3e-3),
        GradientAscentMethod(
            name="gradient_ascent", loss="npo", steps=[2, 4], lr=3e-3, retain_kl=0.5
        ),
        DepnMethod(name="depn", neurons=[3, 7], ig_steps=4, examples=4),
    ],
    ids=["rmu", "ga", "npo", "depn"],
)
def test_unlearning_methods_edit_the_model_on_the_device(spec, tiny_tokenizer, docs):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer)).to(DEVICE)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build(spec, model, tiny_tokenizer, docs, PROSE, layer=1, seed=0, progress=False)
    points = list(method.path())
    final = method.finish()
    assert points and _on_device(final)
    assert changed_tensors(final, originals)


def test_relearning_fine_tunes_on_the_device(tiny_tokenizer, docs):
    from exporter.relearn import Budget, relearned

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer)).to(DEVICE)
    texts = [d.text for d in docs]
    tuned = relearned(
        model, tiny_tokenizer, texts, Budget(steps=20, lr=5e-3, batch_size=4), progress=False
    )
    assert _on_device(tuned)
    assert _nll(tuned, tiny_tokenizer, texts) < _nll(model, tiny_tokenizer, texts)
