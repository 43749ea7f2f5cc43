"""How much of a relearning result is its seed: the distilled export attacked by the relearning
attack once per seed (the LoRA's initialisation and which other people's documents it tunes on),
every other setting the harness's.

The relearning target is a rate over 50 test people, so one person is 2 points and a single run
draws one tuning among many. This distils the run's chosen patch into the base as the export
does (cached in W/relearn/, shared with relearn_noise.py), then for each `--seeds` value (also
spelt `--relearn-seeds`, as the other relearning benchmarks spell it) tunes a copy with the
recipe's relearning budget (100 LoRA steps of 8 of other people's PII documents where the recipe
leaves relearning out) and attacks the validation and test people with the final evaluation's
template attacks (greedy, k-shot, sampled). It prints the people written exactly per
seed and split (under any attack; the worst single attack in brackets), and over the seeds the
mean, the range and the pooled rate with its two-sided 95% Clopper-Pearson interval.

    python benchmarks/relearn_seeds.py --recipe R --work W [--candidate 100:0.2] [--seeds 0 1 2]
        [--json OUT]

W is a work folder of a run of R (its cached probe, SAE and features are read). Counts only: no
name, address or generated text is printed or written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from relearn_noise import bench_args, leaked, pooled, relearned_leaks, setup_of, student_of

from exporter.evaluate.summary import markdown_table


def main() -> None:
    ap = bench_args(__doc__)
    ap.set_defaults(relearn_seeds=[0, 1, 2])
    args = ap.parse_args()
    setup = setup_of(args)
    student, seconds = student_of(setup, args)
    print(f"student: {setup.cand}, distilled in {seconds:.0f} s")
    ev, seed, tok, splits = setup.recipe.eval, setup.recipe.data.seed, setup.tok, setup.splits
    as_is = leaked(student, tok, splits, ev, seed)
    rows = [["as it is", "-"] + [f"{as_is[s][0]} ({as_is[s][1]})" for s in splits]]
    found = {"as_is": as_is, "relearned": {}}
    for s in setup.seeds:
        started = time.perf_counter()
        after = relearned_leaks(student, setup, s)
        found["relearned"][s] = after
        seconds = time.perf_counter() - started
        rows.append(
            [f"relearned, seed {s}", f"{seconds:.0f}"]
            + [f"{after[k][0]} ({after[k][1]})" for k in splits]
        )
    header = ["student", "seconds"] + [f"{k}: any attack (worst one)" for k in splits]
    print(f"people written exactly (of {len(splits['test'])} per split)")
    print(markdown_table(header, rows))
    summary = []
    for k, people in splits.items():
        counts = [found["relearned"][s][k][0] for s in setup.seeds]
        summary.append(
            [k, f"{sum(counts) / len(counts):.1f}", f"{min(counts)}-{max(counts)}",
             pooled(counts, len(people))]
        )  # fmt: skip
    print(f"over {len(setup.seeds)} seeds")
    print(
        markdown_table(
            ["split", "mean people", "range", "pooled rate (95% interval)"], summary, text_columns=1
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
