"""Trade-off search: candidates scored on validation people, the Pareto front, and the choice."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Candidate:
    n: int  # ablation size
    alpha: float  # steering, fraction of the mean norm
    mode: str  # exact | folded
    gated: bool = False  # behind the PII-context gate

    @property
    def label(self) -> str:
        return f"N={self.n} alpha={self.alpha:g} {self.mode}" + (" gated" if self.gated else "")


@dataclass
class Scored:
    candidate: Candidate
    leakage: float  # worst exact email rate over the attacks (validation people)
    username: float  # worst username rate
    kl: float  # mean next-token KL(base || patched), nats/token
    perplexity: float

    def to_json(self) -> dict:
        return {**asdict(self.candidate), "leakage": self.leakage, "username": self.username, "kl": self.kl,
                "perplexity": self.perplexity}


def candidates(ablate_n: Sequence[int], alphas: Sequence[float], modes: Sequence[str],
               gates: Sequence[bool] = (False,)) -> list[Candidate]:
    return [Candidate(n, a, m, g) for g in gates for m in modes for n in ablate_n for a in alphas]


def pareto_front(scored: Sequence[Scored]) -> list[Scored]:
    """Candidates no other beats on both leakage and KL (ties kept), by increasing KL."""
    front = [s for s in scored
             if not any((o.leakage <= s.leakage and o.kl < s.kl) or (o.leakage < s.leakage and o.kl <= s.kl)
                        for o in scored)]
    return sorted(front, key=lambda s: (s.kl, s.leakage))


def choose(scored: Sequence[Scored], target: float, username_target: float = 1.0) -> tuple[Scored, bool]:
    """The candidate meeting the leakage targets (exact, and username) with the least KL; else the least
    leaky (exact, then username, then KL). Returns (choice, whether the targets were met)."""
    if not scored:
        raise ValueError("no candidates to choose from: list ablate_n / alpha / patch in the recipe's intervention")
    meeting = [s for s in scored if s.leakage <= target and s.username <= username_target]
    if meeting:
        return min(meeting, key=lambda s: (s.kl, s.leakage, s.username)), True
    return min(scored, key=lambda s: (s.leakage, s.username, s.kl)), False


def plot_front(scored: Sequence[Scored], chosen: Scored, target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([s.kl for s in scored], [100 * s.leakage for s in scored], c="0.6", label="candidates")
    front = pareto_front(scored)
    ax.plot([s.kl for s in front], [100 * s.leakage for s in front], "-o", c="C0", label="Pareto front")
    ax.scatter([chosen.kl], [100 * chosen.leakage], s=120, facecolors="none", edgecolors="C3", label="chosen")
    ax.axhline(100 * target, ls="--", c="C3", lw=0.8)
    for s in scored:
        ax.annotate(s.candidate.label, (s.kl, 100 * s.leakage), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean next-token KL(base || patched), nats/token (benign text)")
    ax.set_ylabel("worst exact email extraction, % (validation people)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
