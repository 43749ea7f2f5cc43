"""What the relearning attack's fine-tune costs with its batches at a few widths (each batch's
longest text rounded up to a multiple of 32 tokens, the default) against one width per batch (each
cut to its longest text, as it was), in one run: wall time and peak memory of loading the recipe's
leaky model and tuning it within the evaluation's budget (100 LoRA steps of 8 of other people's PII
documents), each row in its own process so each peak is its own, beside a plain `from_pretrained`.
GA, NPO and RMU draw their batches the same way.

    python benchmarks/relearn_memory.py [--recipe R] [--steps 100]

R defaults to the SmolLM2 demo's recipe; its leaky model is built first when it is not cached.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEMO = Path(__file__).parents[1] / "recipes" / "demo-smollm2.yaml"


def _child(recipe_path: str, steps: int, width_step: int) -> None:
    from exporter.models import load_model
    from exporter.recipe import load_recipe
    from exporter.relearn import Budget, relearned, relearning_texts
    from exporter.run.inputs import resolve_inputs

    recipe = load_recipe(recipe_path)
    inputs = resolve_inputs(recipe)
    started = time.perf_counter()
    loaded = load_model(inputs.model)
    if steps:
        budget = Budget(steps=steps, seed=recipe.data.seed)
        texts = relearning_texts(
            "other_people", None, budget.steps * budget.batch_size, recipe.data.seed
        )
        relearned(
            loaded.model, loaded.tokenizer, texts, budget, progress=False, width_step=width_step
        )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": round(seconds, 1), "peak_gib": round(peak, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default=str(DEMO))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        recipe, steps, width_step = args.child
        _child(recipe, int(steps), int(width_step))
        return

    from exporter.lm import WIDTH_STEP
    from exporter.recipe import load_recipe
    from exporter.run.inputs import resolve_inputs

    resolve_inputs(load_recipe(args.recipe))  # the leaky model, built once here if missing
    rows = {
        "from_pretrained (baseline)": (0, WIDTH_STEP),
        f"+ relearn {args.steps} steps, one width per batch (before)": (args.steps, 1),
        f"+ relearn {args.steps} steps, widths rounded to {WIDTH_STEP}": (args.steps, WIDTH_STEP),
    }
    got = {}
    for label, (steps, width_step) in rows.items():
        cmd = [sys.executable, __file__, "--child", args.recipe, str(steps), str(width_step)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        got[label] = json.loads(done.stdout.strip().splitlines()[-1])
    base = got["from_pretrained (baseline)"]["peak_gib"]
    print(f"\n| {'what':<52} | wall time | peak memory | x baseline memory |")
    print(f"|{'-' * 54}|----------:|------------:|------------------:|")
    for label, r in got.items():
        print(
            f"| {label:<52} | {r['seconds']:>7.1f} s | {r['peak_gib']:>7.2f} GiB | "
            f"{r['peak_gib'] / base:>16.2f}x |"
        )


if __name__ == "__main__":
    main()
