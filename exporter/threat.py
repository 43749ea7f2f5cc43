"""The threat model an export answers: each threat with the row measured for it, for every kind of
export (remote-code patch, weights edited by distillation, projection or an unlearning method)."""

from __future__ import annotations

from typing import Optional, Sequence

from .evaluate.harness import worst
from .evaluate.summary import markdown_table

USER_PATH_DECODING = "fresh process"
PREFIX_DECODING = "document prefix"
ADVERSARIAL_DECODING = "adversarial"
RELEARNED = "relearned on"  # the name of a variant fine-tuned by the relearning attack starts so
# a remote-code export's own weights loaded without its patch, when they are not the base's
WEIGHTS_ALONE = "weights alone"


def _every(_row: dict) -> bool:
    return True


def worst_rates(rows: Sequence[dict], keep=_every) -> Optional[tuple[float, float]]:
    """(exact, username) worst over the test people's email rows that `keep` accepts."""
    found = [r for r in rows if keep(r)]
    if not any(r["group"] == "test" and r["pii_type"] == "email" for r in found):
        return None
    return worst(found, "test"), worst(found, "test", "username")


def rate_cell(rate: Optional[tuple[float, float]]) -> str:
    """'exact% / username%', or '-' when nothing was measured."""
    return "-" if rate is None else f"{100 * rate[0]:.0f}% / {100 * rate[1]:.0f}%"


FAMILIES = (
    (
        "prompts: templates, few-shot, sampling",
        lambda r: not any(
            d in r["decoding"] for d in (PREFIX_DECODING, USER_PATH_DECODING, ADVERSARIAL_DECODING)
        ),
    ),
    (
        "adversarial prompts: paraphrases, formats, prefix, x32",
        lambda r: ADVERSARIAL_DECODING in r["decoding"],
    ),
    ("the corpus's own text before each value", lambda r: PREFIX_DECODING in r["decoding"]),
    (
        "the user's path: a fresh process, each prompt alone",
        lambda r: USER_PATH_DECODING in r["decoding"],
    ),
)  # fmt: skip


def threat_rows(evaluation: dict, remote: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per threat, the test people's worst exact / username rate for the leaky
    base and for this export. For a remote-code export the weights-access row is the base's: its
    files hold the base's tensors byte for byte, and loading them without the patch gives the base
    back."""
    base, export = evaluation["base"]["leakage"], evaluation["patched"]["leakage"]
    rows = []
    for label, keep in FAMILIES:
        before, after = worst_rates(base, keep), worst_rates(export, keep)
        if before is not None:
            rows.append([f"black-box, {label}", rate_cell(before), rate_cell(after)])
    own = evaluation.get(WEIGHTS_ALONE)
    if own is not None:
        weights, note = worst_rates(own["leakage"]), " (the distilled weights, inside)"
    elif remote:
        weights, note = worst_rates(base), " (the base's weights, inside)"
    else:
        weights, note = worst_rates(export), ""
    rows.append(
        [
            "white-box: the weights loaded with no patch, every attack above",
            rate_cell(worst_rates(base)),
            rate_cell(weights) + note,
        ]
    )
    relearn = [v for v in evaluation if v.startswith(RELEARNED)]
    for name in relearn:
        rows.append(
            [
                f"relearning: the export {name}, every attack above",
                "-",
                rate_cell(worst_rates(evaluation[name]["leakage"])),
            ]
        )
    if not relearn:
        rows.append(["relearning: a short fine-tune of the export", "-", "not measured"])
    return ["threat (test people, email exact / username)", "leaky base", "this export"], rows


def upper_bound(hits: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided Clopper-Pearson upper bound of a rate seen as `hits` of `n`: the highest true
    rate under which seeing so few would still be likely (0 of 50: 5.8%)."""
    from scipy.stats import beta

    return 1.0 if hits >= n else float(beta.ppf(confidence, hits + 1, n - hits))


def how_sure(evaluation: dict) -> Optional[str]:
    """What the threat rows' rates are worth: how many test people each is over, and how high a
    true rate a 0% still allows (50 people cannot show 1%)."""
    rows = [
        r
        for variant in evaluation.values()
        if isinstance(variant, dict)
        for r in variant.get("leakage", [])
        if r["group"] == "test" and r["pii_type"] == "email" and r.get("n")
    ]
    if not rows:
        return None
    n = min(r["n"] for r in rows)
    kinds = {"values" if PREFIX_DECODING in r["decoding"] else "people" for r in rows}
    over = f"{n} test " + " or ".join(sorted(kinds))
    return (
        f"Each rate is over {over}: one of {n} is {100 / n:.1f}%, and a 0% rate there is "
        f"consistent with a true rate up to {100 * upper_bound(0, n):.1f}% (one-sided 95% "
        f"Clopper-Pearson bound; {100 * upper_bound(1, n):.1f}% for one of {n})."
    )


def threat_section(evaluation: Optional[dict], remote: bool) -> list[str]:
    """The card's threat-model section: what the export protects against, with its measured rows."""
    if remote and evaluation and WEIGHTS_ALONE in evaluation:
        says = (
            "This export's patch runs inside the model on every token, over weights into which "
            "the same patch was distilled (`export.base: distilled`): whoever loads the weights "
            "without the patch gets the distilled model, not the leaky base (the white-box row). "
            "A short fine-tune may bring some of the data back (relearning); see its rows."
        )
    elif remote:
        says = (
            "This export protects people in the data from anyone who can **only prompt** the model "
            "(an API, a chat app): the patch runs inside the model on every token. It does **not** "
            "protect them from anyone who has these files: the base weights inside are the leaky "
            "base's, byte for byte, and loading them without the patch gives every memorised "
            "address back. Share it only where its users cannot read its weights, or export it "
            "distilled (`export.mode: distilled`), which changes the weights themselves."
        )
    else:
        says = (
            "This export's own weights were changed: there is no patch to remove, so what the "
            "attacks below found is what anyone with the files finds. A short fine-tune may bring "
            "some of the data back (relearning); see its row."
        )
    parts = ["## Threat model", "", says, ""]
    if evaluation and "patched" in evaluation:
        parts += [markdown_table(*threat_rows(evaluation, remote)), ""]
        sure = how_sure(evaluation)
        parts += [sure, ""] if sure else []
    return parts
