"""What a distilled export costs beside what it replaces, in one run: wall time and peak memory of
(a) loading the base and saving it again (`from_pretrained` + `save_pretrained`: the floor of any
export that writes new weights) and (b) loading it, distilling the chosen patch into it and writing
the distilled checkpoint; each in its own process, so each peak is its own. The leaky fine-tune's
time (from the leaky model's report) is printed beside them.

    python benchmarks/distill.py --work W [--steps 300]

W is the work folder of `scalpel demo --work W` (or of a run of the demo recipe): its cached stages
give the chosen patch, which is handed to the distilling process as a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEMO = Path(__file__).parents[1] / "recipes" / "demo-smollm2-distilled.yaml"


def _child(kind: str, recipe_path: str, patch_file: str, layer: int, steps: int, out: str) -> None:
    from exporter.distill import distil
    from exporter.models import load_model
    from exporter.patch.export import write_stock
    from exporter.recipe import load_recipe
    from exporter.run.distilled import config_of, distill_texts
    from exporter.run.inputs import resolve_inputs

    recipe = load_recipe(recipe_path)
    inputs = resolve_inputs(recipe)
    started = time.perf_counter()
    loaded = load_model(inputs.model)
    if kind == "save":
        loaded.model.save_pretrained(out)
    else:
        texts = distill_texts(recipe, inputs)
        cfg = config_of(recipe)
        cfg = dataclasses.replace(cfg, steps=steps)
        patch = torch.load(patch_file, weights_only=False)
        got = distil(
            loaded.model, loaded.tokenizer, layer, patch, texts["pii"], texts["benign"], cfg,
            progress=False,
        )  # fmt: skip
        write_stock(
            got.model,
            loaded.tokenizer,
            Path(out),
            config_block=("scalpel_distilled", {"layer": layer}),
        )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": round(seconds, 1), "peak_gib": round(peak, 2)}))


def _measure(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default=str(DEMO))
    ap.add_argument("--work")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, recipe, patch, layer, steps, out = args.child
        _child(kind, recipe, patch, int(layer), int(steps), out)
        return
    if not args.work:
        ap.error("--work is required")

    from exporter.recipe import load_recipe
    from exporter.run.context import RunContext
    from exporter.run.scalpel import prepare
    from exporter.run.search import search_stage

    recipe = load_recipe(args.recipe)
    ctx = RunContext(Path(args.work), progress=False, log=lambda m: None)
    prep = prepare(recipe, ctx)
    chosen, _ = search_stage(recipe, prep, ctx)
    patch, layer = prep.patch(chosen.candidate), prep.layer
    steps = args.steps or recipe.export.distill.steps
    leaky = json.loads((Path(prep.inputs.model.path) / "report.json").read_text())
    del prep
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(patch, f"{tmp}/patch.pt")
        rows = {}
        for kind, label in (("save", "from_pretrained + save_pretrained (baseline)"),
                            ("distil", f"load + distil ({steps} steps) + write")):  # fmt: skip
            out = Path(tmp) / kind
            rows[label] = _measure(
                kind, args.recipe, f"{tmp}/patch.pt", layer, steps, out,
            )  # fmt: skip
    base = rows["from_pretrained + save_pretrained (baseline)"]
    print(f"\n| {'what':<48} | wall time | peak memory | x baseline memory |")
    print(f"|{'-' * 50}|----------:|------------:|------------------:|")
    for label, r in rows.items():
        print(
            f"| {label:<48} | {r['seconds']:>7.1f} s | {r['peak_gib']:>7.2f} GiB | "
            f"{r['peak_gib'] / base['peak_gib']:>16.2f}x |"
        )
    fine_tune = leaky.get("wall_seconds")
    if fine_tune:
        label = "the leaky fine-tune (its report)"
        print(f"| {label:<48} | {fine_tune:>7.1f} s | {'-':>11} | {'-':>17} |")


if __name__ == "__main__":
    main()
