"""Leakage and utility of the patch modes side by side on the test people: the remote-code patch as
folded and as exact, and the plain export (weights edited, no remote code) projected from each layer
given, each with its control (random latents matched on firing frequency, a random steering
direction).

    python benchmarks/modes.py --work W [--plain-from 0 13] [--plain-work P] [--recipe R]
        [--json OUT]

W is the work folder of `scalpel run` (or `scalpel demo --work W`) with the recipe as given; every
mode is evaluated at the candidate W's search chose on validation people, with the same harness,
people, texts and seed (the folded row and the base are read from W's final evaluation). P,
optionally, is the work folder of a run with `export.mode: plain`: its own choice among plain
candidates is shown as one more column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exporter.evaluate.summary import comparison_rows, markdown_table
from exporter.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--recipe",
        default=str(Path(__file__).parents[1] / "exporter" / "recipes" / "demo-smollm2.yaml"),
    )
    ap.add_argument("--work", required=True)
    ap.add_argument(
        "--plain-from",
        type=int,
        nargs="*",
        default=[0],
        help="first projected layer of each plain column (0: the embeddings too)",
    )
    ap.add_argument("--plain-work")
    ap.add_argument("--json", help="also write the evaluations here")
    args = ap.parse_args()

    from exporter.patch.candidate import Candidate
    from exporter.run.context import RunContext
    from exporter.run.scalpel import final_evaluation, prepare

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    folded = json.loads((work / "evaluate" / "evaluation.json").read_text())
    chosen = json.loads((work / "search" / "search.json").read_text())["chosen"]
    ctx = RunContext(work, log=print)
    prep = prepare(recipe, ctx)
    table = {"base": folded["base"], "folded": folded["patched"]}
    controls = {"folded control": folded["control"]}

    def evaluate(mode: str, plain_from: int = 0) -> dict:
        c = Candidate(
            chosen["n"], chosen["alpha"], mode, chosen.get("gated", False) and mode != "plain"
        )
        iv = recipe.intervention.model_copy(update={"plain_from": plain_from})
        r = recipe.model_copy(update={"intervention": iv})
        patch = prep.patch(c, plain_from)
        return final_evaluation(r, prep, c, patch, ctx, variants=("patched", "control"))

    exact = evaluate("exact")
    table["exact"], controls["exact control"] = exact["patched"], exact["control"]
    for first in args.plain_from:
        plain = evaluate("plain", first)
        name = f"plain from {first}"
        table[name], controls[f"{name} control"] = plain["patched"], plain["control"]
    if args.plain_work:
        own = json.loads((Path(args.plain_work) / "evaluate" / "evaluation.json").read_text())
        c = json.loads((Path(args.plain_work) / "search" / "search.json").read_text())["chosen"]
        name = f"plain (own search: N={c['n']} alpha {c['alpha']:g})"
        table[name], controls[f"{name} control"] = own["patched"], own["control"]
    table.update(controls)
    print(
        f"# patch modes on the test people at N={chosen['n']} alpha {chosen['alpha']:g} (chosen on "
        "validation; the folded and exact "
        f"patches{' behind the context gate' if chosen.get('gated') else ''}); plain from f: the "
        f"writers of layers f..{prep.layer} projected"
    )
    print(markdown_table(*comparison_rows(table)))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
