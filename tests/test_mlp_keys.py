"""The key directions of the MLP maps above the patch: the input directions PII tokens use most
relative to benign text, and a model's change from a reference undone along them (and only them)."""

import pytest
import torch
from conftest import tiny_model

import exporter.mlp_keys as mlp_keys
from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.harden import mlp_tensors
from exporter.mlp_keys import (
    in_width,
    key_bases,
    key_directions,
    mlp_maps,
    output_map,
    token_sets,
    undo_along,
)

LAYERS = [1, 2]


def _projector(q: torch.Tensor) -> torch.Tensor:
    return q @ q.T


def test_the_key_directions_are_those_pii_uses_more_than_benign_text():
    """A direction both use alike is no key, however large; one PII uses and benign text hardly
    does is, first."""
    d = 8
    benign = torch.diag(torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 0.5], dtype=torch.float64))
    pii = benign.clone()
    pii[3, 3], pii[7, 7] = 3.0, 2.0  # 3x and 4x what benign text uses
    q = key_directions(pii, benign, 2)
    assert q.shape == (d, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2))
    expected = torch.zeros(d, 2)
    expected[7, 0], expected[3, 1] = 1.0, 1.0
    torch.testing.assert_close(_projector(q), _projector(expected), atol=1e-5, rtol=0)
    assert key_directions(pii, benign, 100).shape == (d, d)  # k is capped at the width


@pytest.fixture(scope="module")
def sets(tiny_tokenizer):
    from exporter.data.corpus import benign_texts

    docs, _ = make_corpus(SyntheticConfig(n_memorised=6, n_never_seen=0, seed=3))
    return token_sets(tiny_tokenizer, docs[:6], benign_texts(split="train")[:6], 48)


def test_token_sets_count_the_values_and_every_benign_token_but_never_the_first(
    tiny_tokenizer, sets
):
    assert len(sets["pii"]) > 0 and len(sets["benign"]) == 6
    for ids, where in sets["pii"] + sets["benign"]:
        assert len(ids) == len(where) <= 48 and not where[0] and where.any()
    assert all(where[1:].all() for _, where in sets["benign"])
    assert all(not where.all() for _, where in sets["pii"])  # the values and the token before


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_undoing_along_the_keys_takes_back_the_change_there_and_nowhere_else(
    model_type, tiny_tokenizer, sets
):
    """Along its input's key directions each map's change from the reference is gone; across
    them it is kept; every other tensor (biases included) is untouched; all directions taken,
    the MLP weights are the reference's."""
    model = tiny_model(model_type, vocab_size=len(tiny_tokenizer), seed=1)
    reference = tiny_model(model_type, vocab_size=len(tiny_tokenizer), seed=2)
    bases = key_bases(model, LAYERS, sets, 3, progress=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    changed = undo_along(model, reference, LAYERS, bases)
    weights = mlp_tensors(model, LAYERS[0])
    assert set(changed) == set(weights)
    for name, p in model.named_parameters():
        if name not in weights:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    theirs, out = dict(reference.named_parameters()), output_map(model)
    for name, w in weights.items():
        i, map_name = int(name.split(".mlp.")[0].rsplit(".", 1)[1]), name.split(".mlp.")[1][:-7]
        q = bases[(i, "mid" if map_name == out else "in")]
        assert q.shape == (in_width(mlp_maps(model, i)[map_name]), 3)
        now, then = w - theirs[name], before[name] - theirs[name]
        if model_type == "gpt2":  # Conv1D: (in, out)
            now, then = now.T, then.T
        across = torch.eye(q.shape[0]) - _projector(q)
        torch.testing.assert_close(now @ q, torch.zeros_like(now @ q), atol=1e-5, rtol=0)
        torch.testing.assert_close(now @ across, then @ across, atol=1e-5, rtol=0)
    undo_along(model, reference, LAYERS, key_bases(model, LAYERS, sets, 10_000, progress=False))
    for name, w in weights.items():
        torch.testing.assert_close(w, theirs[name], atol=1e-5, rtol=0)


def test_layers_taken_in_groups_find_the_same_keys(tiny_tokenizer, sets, monkeypatch):
    """Where the moments of every layer do not fit at once, each group of layers is its own pass
    over the texts, with the same result."""
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=1)
    whole = key_bases(model, LAYERS, sets, 3, progress=False)
    monkeypatch.setattr(mlp_keys, "MOMENT_BYTES", 1)
    grouped = key_bases(model, LAYERS, sets, 3, progress=False)
    assert whole.keys() == grouped.keys() == {(i, w) for i in LAYERS for w in ("in", "mid")}
    for k in whole:
        torch.testing.assert_close(_projector(grouped[k]), _projector(whole[k]), atol=1e-6, rtol=0)
