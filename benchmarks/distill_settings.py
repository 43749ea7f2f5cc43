"""Which distillation settings should a distilled export use? The chosen patch of a finished search
distilled with each variant of `export.distill` (e.g. `benign_weight=8`, `documents=validation`,
`steps=600,benign_weight=8`), each student's KL and perplexity on the final evaluation's held-out
prose (and on the search's 24 texts), and its leakage on the **validation** people: the search's
attacks (templates, k-shot, each validation value's own document text) and the adversarial attacks
that decode greedily. The least-KL variant meeting the recipe's targets on validation people is the
choice; test people are never attacked here.

    python benchmarks/distill_settings.py --recipe R --work W --variants "" benign_weight=8
                                          [--dtype bfloat16] [--json OUT]

("" is the recipe's own settings.) W is the work folder of a run of R (its cached probe, SAE,
features and search are read). Each student is cached in W as the run's distill stage caches it,
so `scalpel run` of R with the chosen settings reuses it. Rates only: no name, address or generated
text is printed or written.
"""

from __future__ import annotations

import json
from pathlib import Path

from adversarial_search import attacked, candidate_of, worst_cell
from run_args import run_args

from exporter.evaluate.summary import markdown_table
from exporter.evaluate.tradeoff import Targets, validation_attacks
from exporter.evaluate.utility import REFERENCE_BYTES, against_reference, reference
from exporter.models import cast_copy
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.distilled import distilled_model
from exporter.run.evaluation import utility_texts
from exporter.run.scalpel import prepare
from exporter.run.search import kl_texts


def settings_of(variant: str) -> dict:
    """A variant's settings: 'benign_weight=8,steps=600' gives {'benign_weight': '8', 'steps':
    '600'}, which pydantic validates and converts."""
    pairs = [p.split("=", 1) for p in variant.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--variants: {variant!r} is not KEY=VALUE[,KEY=VALUE]")
    return {k.strip(): v.strip() for k, v in pairs}


def with_settings(recipe, settings: dict):
    """The recipe as a distilled export with `export.distill` updated (pydantic validates it)."""
    distill = type(recipe.export.distill).model_validate(
        {**recipe.export.distill.model_dump(), **settings}
    )
    export = recipe.export.model_copy(update={"mode": "distilled", "distill": distill})
    return recipe.model_copy(update={"export": export})


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--variants", nargs="+", default=[""], help="KEY=VALUE[,KEY=VALUE] each")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    ctx = RunContext(work, progress=True, log=print)
    prep = prepare(recipe, ctx)
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    cand = candidate_of(json.loads((work / "search" / "search.json").read_text())["chosen"])
    patch = prep.patch(cand)
    prose, _ = utility_texts(prep.inputs.benign_path, tok, recipe.eval.ppl_tokens)
    refs = {
        "evaluation": reference(model, tok, prose, max_bytes=REFERENCE_BYTES),
        "search": reference(model, tok, kl_texts(prep.inputs.benign_path)),
    }
    val = prep.inputs.validation(tok)
    targets = Targets.of(recipe.intervention)

    header = [
        "export.distill", "KL, search's 24 texts", "KL, evaluation's prose", "perplexity",
        "validation: search's attacks, exact / username", "validation: adversarial greedy",
        "meets the targets", "distillation",
    ]  # fmt: skip
    base_ppl = against_reference(refs["evaluation"])["perplexity"]
    table = [["base", "0", "0", f"{base_ppl:.2f}", "-", "-", "-", "-"]]
    out: dict = {"candidate": cand.label, "base_perplexity": base_ppl, "variants": {}}
    for variant in args.variants:
        settings = settings_of(variant)
        student, summary = distilled_model(with_settings(recipe, settings), prep, cand, patch, ctx)
        kl = {name: against_reference(ref, student) for name, ref in refs.items()}
        attacker = cast_copy(student, args.dtype)
        exact, username, _ = validation_attacks(
            attacker, tok, val, targets, recipe.eval, recipe.data.seed, lazy=False
        )
        rows = attacked(
            attacker, tok, layer, None, {"validation": list(val.people)}, recipe.eval.max_new_tokens
        )
        meets = (
            exact <= targets.leakage
            and username <= targets.username
            and not any(map(targets.broken_by, rows))
        )
        out["variants"][variant or "recipe"] = {
            "kl": kl,
            "validation": {"exact": exact, "username": username},
            "adversarial": rows,
            "meets": meets,
            "seconds": summary["seconds"],
        }
        table.append(
            [
                variant or "the recipe's",
                f"{kl['search']['kl']:.4f}",
                f"{kl['evaluation']['kl']:.4f}",
                f"{kl['evaluation']['perplexity']:.2f}",
                f"{100 * exact:.0f}% / {100 * username:.0f}%",
                worst_cell(rows, "validation"),
                "yes" if meets else "no",
                f"{summary['seconds']:.0f} s",
            ]
        )
        print(" | ".join(table[-1]), flush=True)
        del student, attacker
    runs = out["variants"]
    meeting = [v for v in runs if runs[v]["meets"]]
    choice = min(meeting, key=lambda v: runs[v]["kl"]["evaluation"]["kl"], default=None)
    out["choice"] = choice
    print(f"# {cand.label} distilled with each setting ({args.dtype} decoding; validation)")
    print(markdown_table(header, table))
    print(
        f"choice: {choice}"
        if choice is not None
        else "no variant meets the targets on validation people"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
