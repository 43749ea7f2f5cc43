"""Leakage and utility of the patch modes side by side on the test people: the remote-code patch as folded
and as exact, and the plain export (weights edited, no remote code), each with its control.

    python benchmarks/modes.py --work W --plain-work P [--recipe recipes/demo-smollm2.yaml]

W is the work folder of `scalpel run` (or `scalpel demo --work W`) with the recipe as given, P that of a run
with `export.mode: plain` (its own search chose the plain candidate on validation people). Their final
evaluations are read from the stage cache; the exact patch at W's chosen candidate is evaluated here with
the same harness, people, texts and seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exporter.evaluate.summary import comparison_rows, markdown_table
from exporter.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(Path(__file__).parents[1] / "recipes" / "demo-smollm2.yaml"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--plain-work", required=True)
    args = ap.parse_args()

    from exporter.evaluate.tradeoff import Candidate, Scored
    from exporter.pipeline import final_evaluation, patch_for, prepare

    recipe = load_recipe(args.recipe)
    work, plain_work = Path(args.work), Path(args.plain_work)
    folded = json.loads((work / "evaluate" / "evaluation.json").read_text())
    plain = json.loads((plain_work / "evaluate" / "evaluation.json").read_text())
    chosen = json.loads((work / "search" / "search.json").read_text())["chosen"]
    plain_chosen = json.loads((plain_work / "search" / "search.json").read_text())["chosen"]
    prep = prepare(recipe, work, log=print)
    c = Candidate(chosen["n"], chosen["alpha"], "exact", chosen.get("gated", False))
    patch = patch_for(prep.sae, prep.features, c.n, c.alpha, "exact", prep.calibration, gated=c.gated)
    exact = final_evaluation(recipe, prep, Scored(c, None, None, 0.0, 0.0), patch, variants=("patched", "control"))
    table = {"base": folded["base"], "folded": folded["patched"], "exact": exact["patched"], "plain": plain["patched"],
             "folded control": folded["control"], "exact control": exact["control"], "plain control": plain["control"]}
    print(f"# patch modes on the test people: folded / exact at N={c.n} alpha {c.alpha:g}"
          f"{' gated' if c.gated else ''} (chosen on validation), plain at N={plain_chosen['n']} "
          f"alpha {plain_chosen['alpha']:g} (chosen on validation by a plain run)")
    print(markdown_table(*comparison_rows(table)))


if __name__ == "__main__":
    main()
