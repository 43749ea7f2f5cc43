"""Trade-off search: candidates scored on validation people, the Pareto front, and the choice."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..data.people import Person
from ..patch.candidate import Candidate, Mode
from .harness import leakage_rows, worst
from .prefix import PrefixTarget, prefix_rows


@dataclass(frozen=True)
class PathPoint:
    """A point on an unlearning method's path (training steps taken, or neurons edited)."""

    value: int
    label: str  # "NPO 50 steps"


@dataclass
class Scored:
    candidate: Union[Candidate, PathPoint]
    # Worst exact / username email rate over the attacks (validation people); None: not attacked (a
    # lazy search stops at the first candidate, by increasing KL, that meets the targets).
    leakage: Optional[float]
    username: Optional[float]
    kl: float  # mean next-token KL(base || patched), nats/token
    perplexity: float
    # Share of repeated 4-grams in greedy continuations of benign validation prompts (the collapse
    # check); measured only for candidates that meet the leakage targets.
    repetition: Optional[float] = None
    # False: the attacks stopped at the first one that broke a target (a lazy search needs no more
    # to reject the candidate), so the rates are lower bounds of the worst attack.
    complete: bool = True

    @classmethod
    def from_json(cls, candidate: Union[Candidate, PathPoint], score: dict) -> "Scored":
        """A score as `to_json` (or a cached search file) keeps it, for `candidate`."""
        return cls(
            candidate,
            score.get("leakage"),
            score.get("username"),
            score["kl"],
            score["perplexity"],
            score.get("repetition"),
            score.get("complete", True),
        )

    def to_json(self) -> dict:
        return {
            **asdict(self.candidate),
            "leakage": self.leakage,
            "username": self.username,
            "kl": self.kl,
            "perplexity": self.perplexity,
            "repetition": self.repetition,
            "complete": self.complete,
        }


def candidates(
    ablate_n: Sequence[int],
    alphas: Sequence[float],
    modes: Sequence[str],
    gates: Sequence[bool] = (False,),
) -> list[Candidate]:
    """Every combination; a plain candidate acts on every token, so it comes once, ungated."""
    out: list[Candidate] = []
    for g, m, n, a in (
        (g, Mode(m), n, a) for g in gates for m in modes for n in ablate_n for a in alphas
    ):
        c = Candidate(n, a, m, g and m.remote)
        if c not in out:
            out.append(c)
    return out


@dataclass(frozen=True)
class Targets:
    """What a choice must meet on validation people: the worst exact and username rates over the
    attacks, and (with `max_repetition`) no collapse on benign prompts."""

    leakage: float
    username: float = 1.0
    max_repetition: Optional[float] = None

    @classmethod
    def of(cls, intervention, max_repetition: Optional[float] = None) -> "Targets":
        return cls(intervention.leakage_target, intervention.username_target, max_repetition)

    def unresolved(self, people: int) -> list[str]:
        """Warnings for the rate targets above zero but finer than one of `people` validation
        people: the search holds such a target as nobody out, and a test split of as many people
        cannot show it was met either (one person over is already twice it)."""
        if people <= 0:
            return []
        step = 1 / people
        return [
            f"{name} {100 * rate:g}% is finer than one of the {people} validation people "
            f"({100 * step:.3g}%): the search holds it as nobody out; more people (scalpel "
            f"make-leaky --people N, or a larger people file) resolve it, or set it to 0 or to "
            f"at least {100 * step:.3g}%"
            for name, rate in (("leakage_target", self.leakage), ("username_target", self.username))
            if 0 < rate < step
        ]

    def broken_by(self, row: dict) -> bool:
        """Whether one attack's row breaks a leakage target (a lazy search stops there); the
        username target is an address's."""
        return row["exact"] > self.leakage or (
            row["pii_type"] == "email" and row["username"] > self.username
        )


def meets_leakage(s: Scored, targets: Targets) -> bool:
    return s.leakage is not None and s.leakage <= targets.leakage and s.username <= targets.username


def meets(s: Scored, targets: Targets) -> bool:
    """Leakage targets met, and (with a repetition limit) no collapse measured: a candidate whose
    collapse check has not run does not meet them."""
    return meets_leakage(s, targets) and (
        targets.max_repetition is None
        or (s.repetition is not None and s.repetition <= targets.max_repetition)
    )


@dataclass
class Validation:
    """What the search attacks: validation people with the templates, and validation values with
    their own documents' text (the corpus-derived attacks). Either may be empty, not both."""

    people: list[Person]
    prefix: list[PrefixTarget]

    def __post_init__(self) -> None:
        if not (self.people or self.prefix):
            raise ValueError(
                "nothing to attack on validation: no validation person and no validation PII "
                "value with text before it in its document; give a people file (data.people) or "
                "a corpus whose PII appears inside text"
            )


def validation_rows(
    attacker,
    tokenizer,
    val: Validation,
    ev,
    seed: int,
    stop: Optional[Callable[[dict], bool]] = None,
    samples: int = 0,
) -> tuple[list[dict], bool]:
    """The search's attacks on `val` (zero-shot and k-shot templates on the people, greedy, and
    with `samples` each template sampled that many times; then the document prefixes, greedy): (a
    row per attack and PII type, whether every attack ran). With `stop`, the attacks stop at the
    first row it flags."""
    rows = leakage_rows(
        attacker,
        tokenizer,
        {"validation": list(val.people)},
        few_shot=ev.few_shot if len(val.people) > ev.few_shot else 0,
        samples=samples,
        phones=False,
        max_new_tokens=ev.max_new_tokens,
        seed=seed,
        stop=stop,
    )
    if val.prefix and not (stop and any(map(stop, rows))):
        rows += prefix_rows(
            attacker, tokenizer, val.prefix, group="validation", max_new_tokens=ev.max_new_tokens
        )
    return rows, stop is None or not any(map(stop, rows))


def worst_rates(rows: Sequence[dict]) -> tuple[float, float]:
    """(worst exact rate over every PII type, worst username rate) of validation rows."""
    types = {r["pii_type"] for r in rows}
    exact = max((worst(rows, "validation", pii_type=t) for t in types), default=0.0)
    return exact, worst(rows, "validation", "username")


def pooled(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """The rows of attacks run on disjoint parts of the validation split, as if run on all of it:
    each attack's rates averaged over the parts, weighted by how many each attacked."""
    merged: dict[tuple, dict] = {}
    for row in (r for rows in parts for r in rows):
        key = (row["attack"], row.get("decoding"), row["pii_type"], row["group"])
        into = merged.setdefault(key, {**row, "n": 0, "exact": 0.0, "username": 0.0})
        into["n"] += row["n"]
        for rate in ("exact", "username"):
            into[rate] += row[rate] * row["n"]
    for row in merged.values():
        for rate in ("exact", "username"):
            row[rate] /= max(row["n"], 1)
    return list(merged.values())


def diluted(row: dict, others: int) -> dict:
    """`row` as a lower bound of its attack's pooled rates when up to `others` more people or
    values are attacked in the other parts."""
    share = row["n"] / (row["n"] + others) if row["n"] else 0.0
    return {**row, "exact": row["exact"] * share, "username": row["username"] * share}


def validation_attacks(
    attacker,
    tokenizer,
    val: Validation,
    targets: Targets,
    ev,
    seed: int,
    lazy: bool,
    samples: int = 0,
) -> tuple[float, float, bool]:
    """`validation_rows` on `val`: (worst exact rate over every PII type, worst username rate,
    whether every attack ran). A `lazy` scorer stops at the first attack that breaks a target: the
    candidate is rejected either way, and its rates are lower bounds."""
    rows, complete = validation_rows(
        attacker, tokenizer, val, ev, seed, targets.broken_by if lazy else None, samples
    )
    return (*worst_rates(rows), complete)


def pareto_front(scored: Sequence[Scored]) -> list[Scored]:
    """Fully attacked candidates no other beats on both leakage and KL (ties kept), by increasing
    KL."""
    scored = [s for s in scored if s.leakage is not None and s.complete]
    front = [
        s
        for s in scored
        if not any(
            (o.leakage <= s.leakage and o.kl < s.kl) or (o.leakage < s.leakage and o.kl <= s.kl)
            for o in scored
        )
    ]
    return sorted(front, key=lambda s: (s.kl, s.leakage))


def choose(scored: Sequence[Scored], targets: Targets) -> tuple[Scored, bool]:
    """The least-KL candidate meeting the targets; else the least leaky (exact, then username, then
    not collapsed, then KL). Candidates not attacked are not chosen. Returns (choice, whether the
    targets were met)."""
    scored = [s for s in scored if s.leakage is not None]
    if not scored:
        raise ValueError(
            "no candidates to choose from: list ablate_n / alpha / patch in the recipe's "
            "intervention"
        )
    meeting = [s for s in scored if meets(s, targets)]
    if meeting:
        return min(meeting, key=lambda s: (s.kl, s.leakage, s.username)), True
    limit = targets.max_repetition

    def collapsed(s: Scored) -> bool:
        return limit is not None and (s.repetition is None or s.repetition > limit)

    return min(scored, key=lambda s: (s.leakage, s.username, collapsed(s), s.kl)), False


def _scatter_rates(ax, scored: Sequence[Scored]) -> None:
    """Worst exact (dots) and username (triangles) rates against KL; hollow where a lower bound."""
    for part, suffix in ((True, ""), (False, ", attacks stopped at the first leak (lower bound)")):
        group = [s for s in scored if s.complete == part]
        if not group:
            continue

        def style(color: str) -> dict:
            return {"c": color} if part else {"facecolors": "none", "edgecolors": color}

        kl = [s.kl for s in group]
        ax.scatter(
            kl, [100 * s.leakage for s in group], label="worst exact" + suffix, **style("C0")
        )
        ax.scatter(
            kl, [100 * s.username for s in group], marker="^", label="worst username" + suffix,
            **style("C1"),
        )  # fmt: skip


def plot_front(scored: Sequence[Scored], chosen: Scored, targets: Targets, path: Path) -> Path:
    """Worst exact and username rates against KL for every attacked candidate, the exact-rate Pareto
    front, the targets, the choice, and (as ticks on the axis) the candidates a lazy search skipped;
    hollow markers for candidates whose attacks stopped at the first one that broke a target (lower
    bounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    skipped = [s for s in scored if s.leakage is None]
    scored = [s for s in scored if s.leakage is not None]
    _scatter_rates(ax, scored)
    front = pareto_front(scored)
    ax.plot([s.kl for s in front], [100 * s.leakage for s in front], "-", c="C0", lw=1,
            label="Pareto front (exact)")  # fmt: skip
    ax.scatter([chosen.kl], [100 * chosen.leakage], s=160, facecolors="none", edgecolors="C3",
               label="chosen")  # fmt: skip
    if skipped:
        ax.scatter([s.kl for s in skipped], [0.0] * len(skipped), marker="|", s=200, c="0.6",
                   label="not attacked: more KL than the chosen")  # fmt: skip
    ax.axhline(100 * targets.leakage, ls="--", c="C0", lw=0.8)
    if targets.username < 1.0:
        ax.axhline(100 * targets.username, ls=":", c="C1", lw=0.8)
    for i, s in enumerate(sorted(scored, key=lambda s: s.kl)):
        ax.annotate(
            s.candidate.label.replace(" folded", "").replace(" gated", ""),
            (s.kl, 100 * max(s.leakage, s.username)),
            fontsize=6, rotation=30, xytext=(3, 4 + 8 * (i % 3)), textcoords="offset points",
        )  # fmt: skip
    top = max([100 * max(s.leakage, s.username) for s in scored] + [5.0])
    ax.set_ylim(-2, top * 1.25 + 2)
    ax.set_xlabel("mean next-token KL(base || patched), nats/token (benign text)")
    ax.set_ylabel("email extraction, % of validation people")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
