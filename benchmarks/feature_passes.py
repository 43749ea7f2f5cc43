"""The features stages of a cross-fitted run, side by side: the run's own and one per part of the
validation split (`intervention.search_folds`), with the benign passes shared (the feature pass's
training prose and, with `context_negatives: windows`, the gate's windows, each computed once per
run) against each stage computing its own. For a finished run: the stages recomputed in scratch
copies of its work folder (its probe and SAE read there), wall time per stage and in all, and
whether both ways fitted the same features.

    python benchmarks/feature_passes.py --recipe R --work W [--set KEY=VALUE ...]

W is the work folder of a run of R (the same --set flags as that run). Times only: no text is
printed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from run_args import run_args

from exporter.evaluate.summary import markdown_table
from exporter.models import load_model
from exporter.recipe import load_recipe, parse_overrides
from exporter.run.analysis import BenignPasses, features_stage, probe_stage, sae_stage
from exporter.run.context import RunContext
from exporter.run.inputs import resolve_inputs
from exporter.run.search import part_count
from exporter.run.stage import PROBE, SAE, fold_stage


def stages(recipe, work: Path, *, share: bool) -> tuple[list[float], list]:
    """Each features stage of the run in a scratch copy of `work` (probe and SAE only): seconds
    and features, the run's own first, then each part's complement."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for stage in (PROBE, SAE):
            shutil.copytree(stage.folder(work), stage.folder(scratch))
        ctx = RunContext(scratch, progress=False, log=lambda _m: None)
        inputs = resolve_inputs(recipe, ctx)
        layer = probe_stage(recipe, inputs, ctx).chosen
        sae, _ = sae_stage(recipe, inputs, layer, ctx)
        loaded = load_model(inputs.model)
        k = part_count(recipe, inputs)
        folds = inputs.folds(k, recipe.data.seed)
        everyone = set().union(*folds)
        runs = [(inputs, {})] + [
            (inputs.keeping(everyone - fold), dict(stage=fold_stage(j), about=(("folds", k),)))
            for j, fold in enumerate(folds)
        ]
        shared = BenignPasses()
        seconds, found = [], []
        for part_inputs, where in runs:
            start = time.perf_counter()
            fs = features_stage(
                recipe,
                part_inputs,
                layer,
                sae,
                ctx,
                loaded=loaded,
                shared=shared if share else BenignPasses(),
                **where,
            )
            seconds.append(time.perf_counter() - start)
            found.append(fs)
        return seconds, found


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
    torch.manual_seed(0)
    alone, own = stages(recipe, Path(args.work), share=False)
    shared, theirs = stages(recipe, Path(args.work), share=True)
    names = ["the run's features"] + [f"part {j}'s complement" for j in range(len(alone) - 1)]
    rows = [[n, f"{a:.1f}", f"{s:.1f}"] for n, a, s in zip(names, alone, shared)]
    rows.append(["in all", f"{sum(alone):.1f}", f"{sum(shared):.1f}"])
    print(markdown_table(["features stage", "each its own benign pass (s)", "shared (s)"], rows))
    same = all(a.ranking == b.ranking for a, b in zip(own, theirs))
    print(f"same latent rankings both ways: {same}")


if __name__ == "__main__":
    main()
