"""Wall time and peak memory per stage of finished runs, beside the dry run's estimate for each.

    python benchmarks/stages.py --run RECIPE=WORK [--run RECIPE=WORK ...] [--json OUT]

Each WORK is the work folder a `scalpel run RECIPE` (or `scalpel demo`) computed its stages in from
empty: `timings.json` there holds each stage's wall time and peak resident memory; the leaky
fine-tune's come from its own report in the user cache. The estimate is `scalpel run RECIPE
--dry-run`'s, with this machine's matrix rate measured now: run it with nothing else running, as
the runs themselves were. Prints one table per run and the ratio measured / estimated per stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exporter.cache import cache_root
from exporter.data.leaky import LeakyConfig
from exporter.models import resolve_local_path
from exporter.plan import make_plan
from exporter.recipe import load_recipe
from exporter.run.leaky import leaky_key
from exporter.timing import read_timings


def measured(recipe, work: Path) -> dict:
    """{stage: {"seconds", "peak_rss_gib"}} of one run, the leaky fine-tune included when the
    recipe builds one."""
    found = dict(read_timings(work))
    if recipe.data.pii.builtin == "synthetic":
        key = leaky_key(recipe.model, resolve_local_path(recipe.model), LeakyConfig())
        report = cache_root() / "leaky" / key / "report.json"
        if report.is_file():
            found["leaky"] = {"seconds": json.loads(report.read_text())["wall_seconds"]}
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="RECIPE=WORK")
    ap.add_argument("--json", help="write every run's measured and estimated seconds here")
    args = ap.parse_args()
    out = {}
    for item in args.run:
        recipe_path, _, work = item.partition("=")
        recipe = load_recipe(recipe_path)
        plan = make_plan(recipe)
        got = measured(recipe, Path(work))
        print(f"\n{recipe.model.describe()} ({recipe_path}; machine {plan.gflops:.0f} GFLOP/s)")
        print("| stage | measured | peak RSS, GiB | estimated | measured / estimated |")
        print("|---|---:|---:|---:|---:|")
        rows = {}
        for stage, _ in plan.stages:
            m, e = got.get(stage, {}), plan.seconds.get(stage)
            s = m.get("seconds")
            peak = m.get("peak_rss_gib")
            ratio = f"{s / e:.2f}" if s and e else "-"
            print(
                f"| {stage} | {f'{s:.0f} s' if s else '-'} | {peak if peak else '-'} | "
                f"{f'{e:.0f} s' if e else '-'} | {ratio} |"
            )
            rows[stage] = {"measured": s, "peak_rss_gib": peak, "estimated": e}
        total_m = sum(v["measured"] or 0 for v in rows.values())
        total_e = sum(v["estimated"] or 0 for v in rows.values() if v["measured"])
        print(f"| total (measured stages) | {total_m:.0f} s | | {total_e:.0f} s | "
              f"{total_m / max(total_e, 1e-9):.2f} |")  # fmt: skip
        out[recipe_path] = {"gflops": plan.gflops, "stages": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
