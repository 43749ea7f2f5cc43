import json

import pytest
import torch

from exporter.activations import Activations
from exporter.probe import people_disjoint_split, run_probes, write_probe_report


def _acts(
    signal: dict[int, float], n_docs: int = 40, per_doc: int = 30, d: int = 12, seed: int = 0
):
    """Tokens of n_docs documents (one person each); layer l separates PII with strength
    signal[l]."""
    g = torch.Generator().manual_seed(seed)
    n = n_docs * per_doc
    pii = torch.rand(n, generator=g) < 0.3
    doc = torch.arange(n) // per_doc
    direction = torch.randn(d, generator=g)
    acts = {
        li: torch.randn(n, d, generator=g) + s * pii[:, None].float() * direction
        for li, s in signal.items()
    }
    labels = {
        "pii": pii,
        "span_start": pii,
        "pre_span": torch.zeros(n, dtype=torch.bool),
        "type_id": torch.where(pii, 0, -1),
        "doc": doc,
    }
    groups = [{f"person{i}@x.com"} for i in range(n_docs)]
    return Activations(acts, labels), groups


def test_people_disjoint_split():
    groups = [{"a"}, {"b"}, {"a", "c"}, {"d"}, set(), {"c"}]
    train, held = people_disjoint_split(groups, 0.5, seed=1)
    assert not set(train) & set(held)
    people_train = set().union(*(groups[i] for i in train))
    people_held = set().union(*(groups[i] for i in held))
    assert not people_train & people_held


def test_chooses_the_separating_layer_by_accuracy():
    acts, groups = _acts({0: 0.0, 1: 0.8, 2: 3.0})
    result = run_probes(acts, groups, seed=0)
    assert result.chosen == 2 and result.criterion == "accuracy"
    assert result.accuracy[0] < 0.65 < result.accuracy[1] < result.accuracy[2]
    assert result.auroc[2] > 0.95


def test_saturated_layers_fall_back_to_few_shot_logloss():
    acts, groups = _acts({0: 8.0, 1: 30.0, 2: 8.0})
    result = run_probes(acts, groups, seed=0)
    assert all(a > 0.99 for a in result.accuracy)
    assert result.criterion == "few_shot_logloss" and result.chosen == 1
    assert result.few_shot_logloss[1] == min(result.few_shot_logloss)


def test_pinned_layer_and_report(tmp_path):
    acts, groups = _acts({0: 0.0, 1: 3.0})
    result = run_probes(acts, groups, pinned=0)
    assert result.chosen == 0 and result.criterion == "pinned"
    with pytest.raises(IndexError, match="pinned probe layer 5"):
        run_probes(acts, groups, pinned=5)
    write_probe_report(result, tmp_path / "probe")
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["chosen"] == 0
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 1000
    assert "(chosen)" in (tmp_path / "probe" / "probe.md").read_text()


def test_no_pii_is_a_clear_error():
    acts, groups = _acts({0: 1.0})
    acts.labels["pii"][:] = False
    with pytest.raises(ValueError, match="too few PII tokens"):
        run_probes(acts, groups)
