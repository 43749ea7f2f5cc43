"""Trade-off search: candidates scored on validation people, the Pareto front, and the choice."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass(frozen=True)
class Candidate:
    n: int  # ablation size
    alpha: float  # steering, fraction of the mean norm
    mode: str  # exact | folded (the remote-code patch) | plain (baked into the weights)
    gated: bool = False  # behind the PII-context gate
    name: str = ""  # a point on an unlearning method's path ("NPO 50 steps"), labelled by its method

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"N={self.n} alpha={self.alpha:g} {self.mode}" + (" gated" if self.gated else "")


@dataclass
class Scored:
    candidate: Candidate
    # Worst exact / username email rate over the attacks (validation people); None: not attacked (a lazy
    # search stops at the first candidate, by increasing KL, that meets the targets).
    leakage: Optional[float]
    username: Optional[float]
    kl: float  # mean next-token KL(base || patched), nats/token
    perplexity: float
    # Share of repeated 4-grams in greedy continuations of benign validation prompts (the collapse check);
    # measured only for candidates that meet the leakage targets.
    repetition: Optional[float] = None
    # False: the attacks stopped at the first one that broke a target (a lazy search needs no more to
    # reject the candidate), so the rates are lower bounds of the worst attack.
    complete: bool = True

    def to_json(self) -> dict:
        return {**asdict(self.candidate), "leakage": self.leakage, "username": self.username, "kl": self.kl,
                "perplexity": self.perplexity, "repetition": self.repetition, "complete": self.complete}


def candidates(ablate_n: Sequence[int], alphas: Sequence[float], modes: Sequence[str],
               gates: Sequence[bool] = (False,)) -> list[Candidate]:
    """Every combination; a plain candidate acts on every token, so it comes once, ungated."""
    out: list[Candidate] = []
    for c in (Candidate(n, a, m, g and m != "plain") for g in gates for m in modes for n in ablate_n for a in alphas):
        if c not in out:
            out.append(c)
    return out


def exportable(c: Candidate, export_mode: str) -> bool:
    """Whether an export of `export_mode` carries candidate `c` (plain ones only in plain exports)."""
    return (c.mode == "plain") == (export_mode == "plain")


def meets_leakage(s: Scored, target: float, username_target: float = 1.0) -> bool:
    return s.leakage is not None and s.leakage <= target and s.username <= username_target


def meets(s: Scored, target: float, username_target: float = 1.0, max_repetition: Optional[float] = None) -> bool:
    """Leakage targets met, and (with `max_repetition`) no collapse measured."""
    return meets_leakage(s, target, username_target) and (
        max_repetition is None or (s.repetition is not None and s.repetition <= max_repetition))


def pareto_front(scored: Sequence[Scored]) -> list[Scored]:
    """Fully attacked candidates no other beats on both leakage and KL (ties kept), by increasing KL."""
    scored = [s for s in scored if s.leakage is not None and s.complete]
    front = [s for s in scored
             if not any((o.leakage <= s.leakage and o.kl < s.kl) or (o.leakage < s.leakage and o.kl <= s.kl)
                        for o in scored)]
    return sorted(front, key=lambda s: (s.kl, s.leakage))


def choose(scored: Sequence[Scored], target: float, username_target: float = 1.0,
           max_repetition: Optional[float] = None) -> tuple[Scored, bool]:
    """The least-KL candidate meeting the leakage targets (exact, and username) and the collapse check; else
    the least leaky (exact, then username, then not collapsed, then KL). Candidates not attacked are not
    chosen. Returns (choice, whether the targets were met)."""
    scored = [s for s in scored if s.leakage is not None]
    if not scored:
        raise ValueError("no candidates to choose from: list ablate_n / alpha / patch in the recipe's intervention")
    meeting = [s for s in scored if meets(s, target, username_target, max_repetition)]
    if meeting:
        return min(meeting, key=lambda s: (s.kl, s.leakage, s.username)), True
    collapsed = lambda s: max_repetition is not None and (s.repetition is None or s.repetition > max_repetition)  # noqa: E731
    return min(scored, key=lambda s: (s.leakage, s.username, collapsed(s), s.kl)), False


def plot_front(scored: Sequence[Scored], chosen: Scored, target: float, path: Path,
               username_target: Optional[float] = None) -> Path:
    """Worst exact and username rates against KL for every attacked candidate, the exact-rate Pareto
    front, the targets, the choice, and (as ticks on the axis) the candidates a lazy search skipped; hollow
    markers for candidates whose attacks stopped at the first one that broke a target (lower bounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    skipped = [s for s in scored if s.leakage is None]
    scored = [s for s in scored if s.leakage is not None]
    for part, suffix in ((True, ""), (False, ", attacks stopped at the first leak (lower bound)")):
        group = [s for s in scored if s.complete == part]
        if not group:
            continue
        style = (lambda color: {"c": color}) if part else (lambda color: {"facecolors": "none", "edgecolors": color})
        ax.scatter([s.kl for s in group], [100 * s.leakage for s in group], label="worst exact" + suffix,
                   **style("C0"))
        ax.scatter([s.kl for s in group], [100 * s.username for s in group], marker="^",
                   label="worst username" + suffix, **style("C1"))
    front = pareto_front(scored)
    ax.plot([s.kl for s in front], [100 * s.leakage for s in front], "-", c="C0", lw=1, label="Pareto front (exact)")
    ax.scatter([chosen.kl], [100 * chosen.leakage], s=160, facecolors="none", edgecolors="C3", label="chosen")
    if skipped:
        ax.scatter([s.kl for s in skipped], [0.0] * len(skipped), marker="|", s=200, c="0.6",
                   label="not attacked: more KL than the chosen")
    ax.axhline(100 * target, ls="--", c="C0", lw=0.8)
    if username_target is not None and username_target < 1.0:
        ax.axhline(100 * username_target, ls=":", c="C1", lw=0.8)
    for i, s in enumerate(sorted(scored, key=lambda s: s.kl)):
        ax.annotate(s.candidate.label.replace(" folded", "").replace(" gated", ""),
                    (s.kl, 100 * max(s.leakage, s.username)), fontsize=6, rotation=30,
                    xytext=(3, 4 + 8 * (i % 3)), textcoords="offset points")
    top = max([100 * max(s.leakage, s.username) for s in scored] + [5.0])
    ax.set_ylim(-2, top * 1.25 + 2)
    ax.set_xlabel("mean next-token KL(base || patched), nats/token (benign text)")
    ax.set_ylabel("email extraction, % of validation people")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
