"""`scalpel audit`: how much of a corpus's PII a model completes from the corpus's own text, per
type, exactly and partly, greedy (and sampled), with a report and a plot; nothing is patched."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from ..cache import atomic_dir
from ..data.corpus import read_corpus
from ..data.detectors import PII_TYPES, redact_text
from ..evaluate.prefix import PREFIX_CUTS, corpus_values, prefix_rows, prefix_targets
from ..evaluate.summary import markdown_table
from ..models import cast_copy, load_checkpoint
from .context import RunContext


def audit_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["PII type", "prompt", "decoding", "values", "exact", "partial"]
    body = [
        [r["pii_type"], f"last {r['attack'][6:]} tokens", r["decoding"], str(r["n"]),
         f"{100 * r['exact']:.0f}%", f"{100 * r['username']:.0f}%"]
        for r in rows
    ]  # fmt: skip
    return header, body


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['pii_type']}\nprefix {r['attack'][6:]}\n{r['decoding']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["exact"] for r in rows], 0.4, label="exact")
    ax.bar([i + 0.2 for i in x], [100 * r["username"] for r in rows], 0.4, label="partial")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("% of the corpus's values completed")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def audit(
    model: str,
    corpus: str,
    *,
    out: Optional[Path] = None,
    types: tuple[str, ...] = ("email", "phone"),
    max_values: int = 200,
    max_new_tokens: int = 24,
    samples: int = 0,
    dtype: str = "float32",
    seed: int = 0,
    ctx: RunContext = RunContext(),
) -> dict:
    """Prompt `model` with the text before each of (up to `max_values` of) the corpus's PII values
    and count the values it completes; with `out`, write report.json, report.md and audit.png
    there."""
    if out is not None:
        ctx.refuse_existing(out)
    unknown = sorted(set(types) - set(PII_TYPES))
    if unknown:
        raise ValueError(f"unknown PII types {unknown}; known: {', '.join(PII_TYPES)}")
    docs = read_corpus(corpus, types)
    kind_of = corpus_values(docs)  # value -> PII type, computed once
    values = list(kind_of)
    picked = set(random.Random(seed).sample(values, min(max_values, len(values))))
    lm, tokenizer = load_checkpoint(model, dtype=dtype)
    targets = prefix_targets(docs, tokenizer, picked, PREFIX_CUTS)
    if not targets:
        raise ValueError(
            f"{corpus}: every PII value starts its document, so no text precedes it to prompt with"
        )
    ctx.log(f"audit: {len(docs)} documents, {len(values)} values, {len(targets)} prompts")
    rows = prefix_rows(cast_copy(lm, dtype), tokenizer, targets, group="corpus",
                       max_new_tokens=max_new_tokens, samples=samples, seed=seed,
                       progress=ctx.progress)  # fmt: skip
    kinds = list(kind_of.values())
    report = {
        "model": redact_text(str(model)),
        "corpus": redact_text(str(corpus)),
        "documents": len(docs),
        "values": {t: kinds.count(t) for t in sorted(set(kinds))},
        "audited": len(picked),
        "max_new_tokens": max_new_tokens,
        "rows": rows,
    }
    if out is not None:
        with atomic_dir(Path(out), overwrite=ctx.overwrite) as tmp:
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            _plot(rows, tmp / "audit.png")
            (tmp / "report.md").write_text(
                f"# PII audit of {report['model']}\n\n{report['documents']} documents of "
                f"{report['corpus']}, {len(picked)} of their {len(values)} PII values prompted "
                "with the text before them (greedy"
                + (f", {samples} samples" if samples else "")
                + "); a value counts when the continuation holds it exactly, partly when it holds "
                "its first part (an address's username, a number's first six digits).\n\n"
                + markdown_table(*audit_table(rows), text_columns=3)
                + "\n\n![audit](audit.png)\n"
            )
    return report
