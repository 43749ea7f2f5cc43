"""The before/after comparison as rows of text, shared by the terminal table, the markdown report
and the card."""

from __future__ import annotations

from typing import Sequence

VARIANTS = ("base", "patched", "control")
UTILITY = (
    ("perplexity", "perplexity", "{:.2f}"),
    ("kl", "KL(base ‖ model), nats/token", "{:.4f}"),
    ("distinct_2", "distinct-2 of generations", "{:.3f}"),
    ("repetition_4", "repeated 4-grams", "{:.3f}"),
    ("tokens_per_s", "tokens/s (generation)", "{:.1f}"),
)


def memorisation_label(key: str) -> str:
    """'ma' → 'memorisation accuracy MA', 's_el_3' → 'span extraction likelihood S-EL_3'."""
    span, base = key.startswith("s_"), key.removeprefix("s_")
    name = (
        "memorisation accuracy MA"
        if base == "ma"
        else f"extraction likelihood EL_{base.removeprefix('el_')}"
    )
    return ("span " + name.replace(" MA", " S-MA").replace(" EL_", " S-EL_")) if span else name


def _rate(rows: Sequence[dict], group: str, pii: str, decoding: str, key: str):
    vals = [
        r[key]
        for r in rows
        if r["group"] == group and r["pii_type"] == pii and r["decoding"] == decoding
    ]
    return max(vals) if vals else None


def comparison_rows(evaluation: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the worst rate over the attacks of each family per people group, then
    utility, one column per evaluated variant (base, patched, control: whichever are present)."""
    variants = [v for v in VARIANTS if v in evaluation] + [
        v
        for v in evaluation
        if v not in VARIANTS and isinstance(evaluation[v], dict) and "leakage" in evaluation[v]
    ]
    first = evaluation[variants[0]]
    groups = list(dict.fromkeys(r["group"] for r in first["leakage"]))
    decodings = list(dict.fromkeys(r["decoding"] for r in first["leakage"]))
    rows = []
    for group in groups:
        for pii, keys in (("email", ("exact", "username")), ("phone", ("exact",))):
            for decoding in decodings:
                for key in keys:
                    vals = [
                        _rate(evaluation[v]["leakage"], group, pii, decoding, key) for v in variants
                    ]
                    if vals[0] is not None:
                        rows.append(
                            [
                                f"{group.replace('_', '-')} {pii} {key} ({decoding}, worst attack)",
                                *(f"{100 * v:.0f}%" if v is not None else "-" for v in vals),
                            ]
                        )
    for group, metrics in first.get("memorisation", {}).items():
        for key, value in metrics.items():
            if key != "documents" and value is not None:
                vals = [
                    evaluation[v].get("memorisation", {}).get(group, {}).get(key) for v in variants
                ]
                rows.append(
                    [
                        f"{group.replace('_', '-')} PII documents: {memorisation_label(key)}",
                        *(f"{v:.3f}" if v is not None else "-" for v in vals),
                    ]
                )
    for key, label, fmt in UTILITY:
        if key in first["utility"]:
            rows.append([label, *(fmt.format(evaluation[v]["utility"][key]) for v in variants)])
    return ["metric", *variants], rows


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1
) -> str:
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def attack_rows(evaluation: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every attack on every people group, exact (and username for emails) per
    variant."""
    variants = [v for v in VARIANTS if v in evaluation]
    first = evaluation[variants[0]]["leakage"]

    def find(rows, ref):
        for r in rows:
            if all(r[k] == ref[k] for k in ("group", "attack", "decoding", "pii_type")):
                return r
        return None

    out = []
    for ref in first:
        found = [find(evaluation[v]["leakage"], ref) for v in variants]
        cells = []
        for r in found:
            if r is None:
                cells.append("-")
            elif ref["pii_type"] == "email":
                cells.append(f"{100 * r['exact']:.0f}% / {100 * r['username']:.0f}%")
            else:
                cells.append(f"{100 * r['exact']:.0f}%")
        out.append(
            [
                ref["group"].replace("_", "-"),
                ref["pii_type"],
                ref["attack"],
                ref["decoding"],
                str(ref["n"]),
                *cells,
            ]
        )
    return ["people", "PII", "attack", "decoding", "n", *variants], out
