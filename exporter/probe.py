"""Per-layer linear probes separating PII from non-PII residual activations; choice of the layer."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .activations import Activations

# Accuracies this close to the best count as a tie: the probe cannot tell those layers apart.
SATURATION_GAP = 0.002


@dataclass
class ProbeResult:
    layers: list[int]
    accuracy: list[float]
    auroc: list[float]
    # held-out log-loss of probes fit on `few_shot` examples per class
    few_shot_logloss: list[float]
    chosen: int
    criterion: str  # "accuracy", "few_shot_logloss" or "pinned"
    n_train: int
    n_heldout: int
    few_shot: int

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = ["| layer | accuracy | AUROC | few-shot log-loss |", "|---:|---:|---:|---:|"]
        for layer, a, u, f in zip(self.layers, self.accuracy, self.auroc, self.few_shot_logloss):
            mark = " **(chosen)**" if layer == self.chosen else ""
            rows.append(f"| {layer}{mark} | {a:.4f} | {u:.4f} | {f:.4f} |")
        return "\n".join(rows)


def people_disjoint_split(doc_groups: Sequence[set[str]], held_out_fraction: float, seed: int):
    """Documents split so no person (group key) is on both sides; mixed documents are dropped.

    Returns (train_doc_ids, heldout_doc_ids)."""
    people = sorted({p for g in doc_groups for p in g})
    rng = random.Random(seed)
    rng.shuffle(people)
    held = set(people[: max(1, int(round(len(people) * held_out_fraction)))])
    train, heldout = [], []
    for i, g in enumerate(doc_groups):
        if not g:
            (heldout if rng.random() < held_out_fraction else train).append(i)
        elif g <= held:
            heldout.append(i)
        elif not g & held:
            train.append(i)
    return train, heldout


def _balanced(
    rows: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, cap: Optional[int] = None
) -> np.ndarray:
    pos = rows[y[rows]].numpy()
    neg = rows[~y[rows]].numpy()
    n = min(len(pos), len(neg), cap or len(pos))
    return np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])


def run_probes(
    acts: Activations,
    doc_groups: Sequence[set[str]],
    *,
    held_out_fraction: float = 0.3,
    seed: int = 0,
    pinned: Optional[int] = None,
    few_shot: int = 16,
    max_per_class: int = 4000,
    target: str = "pii",
) -> ProbeResult:
    """Logistic-regression probe per layer on balanced, people-disjoint train / held-out tokens."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = acts.labels[target].bool()
    doc = acts.labels["doc"]
    train_docs, held_docs = people_disjoint_split(doc_groups, held_out_fraction, seed)
    in_train = torch.isin(doc, torch.tensor(train_docs))
    in_held = torch.isin(doc, torch.tensor(held_docs))
    rng = np.random.default_rng(seed)
    train_rows = _balanced(in_train.nonzero().squeeze(1), y, rng, max_per_class)
    held_rows = _balanced(in_held.nonzero().squeeze(1), y, rng, max_per_class)
    if len(train_rows) < 4 or len(held_rows) < 4:
        raise ValueError(
            "too few PII tokens for a probe: need PII and non-PII tokens on both sides of the "
            "people-disjoint split; give more PII text (data.pii) or more people"
        )
    y_np = y.numpy()
    few_rows = [
        _balanced(torch.from_numpy(train_rows), y, np.random.default_rng(seed + r), few_shot)
        for r in range(5)
    ]
    layers = sorted(acts.acts)
    accuracy, auroc, few_loss = [], [], []
    for layer in layers:
        x = acts.acts[layer].float().numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
        clf.fit(x[train_rows], y_np[train_rows])
        p = clf.predict_proba(x[held_rows])[:, 1]
        accuracy.append(float(((p > 0.5) == y_np[held_rows]).mean()))
        auroc.append(float(roc_auc_score(y_np[held_rows], p)))
        losses = []
        for rows in few_rows:
            small = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
            small.fit(x[rows], y_np[rows])
            losses.append(
                log_loss(y_np[held_rows], small.predict_proba(x[held_rows])[:, 1], labels=[0, 1])
            )
        few_loss.append(float(np.mean(losses)))
    if pinned is not None:
        if pinned not in layers:
            raise IndexError(
                f"pinned probe layer {pinned} was not harvested; harvested layers: "
                f"{layers[0]}..{layers[-1]}"
            )
        chosen, criterion = pinned, "pinned"
    else:
        best = max(accuracy)
        tied = [i for i, a in enumerate(accuracy) if best - a <= SATURATION_GAP]
        if len(tied) > 1:
            # Saturated: many layers separate PII perfectly. Few-shot log-loss still ranks them by
            # how linearly (and how cheaply) PII is readable there.
            i = min(tied, key=lambda j: few_loss[j])
            chosen, criterion = layers[i], "few_shot_logloss"
        else:
            chosen, criterion = layers[tied[0]], "accuracy"
    return ProbeResult(
        layers,
        accuracy,
        auroc,
        few_loss,
        chosen,
        criterion,
        len(train_rows),
        len(held_rows),
        few_shot,
    )


def plot_probe(result: ProbeResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(result.layers, result.accuracy, marker="o", label="held-out accuracy")
    ax.plot(result.layers, result.auroc, marker=".", label="held-out AUROC")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("score")
    ax2 = ax.twinx()
    ax2.plot(
        result.layers,
        result.few_shot_logloss,
        color="tab:red",
        ls="--",
        label=f"{result.few_shot}-shot log-loss",
    )
    ax2.set_ylabel("few-shot log-loss")
    ax.axvline(result.chosen, color="gray", ls=":", label=f"chosen ({result.criterion})")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax.set_title("Linear probe: PII vs non-PII tokens per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_probe_report(result: ProbeResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.json").write_text(json.dumps(result.to_json(), indent=2))
    (folder / "probe.md").write_text(
        f"Chosen layer: **{result.chosen}** (criterion: {result.criterion}); {result.n_train} "
        f"train / {result.n_heldout} held-out tokens, people-disjoint, "
        "balanced.\n\n" + result.table() + "\n"
    )
    plot_probe(result, folder / "probe.png")
