"""Extraction as a user gets it: model folders loaded in a fresh process with stock transformers,
each test person's prompt generated alone, greedy, in the dtype `from_pretrained` gives by default;
the three templates.

    python benchmarks/user_path.py BASE [EXPORT ...] [--people people.jsonl] [--group test]
        [--python PY]

BASE is the leaky model folder (`people.jsonl` beside it, as `scalpel make-leaky` writes it); every
EXPORT is scored beside it in one fresh process. `--python` runs that process with another
interpreter (a venv with another transformers). Prints one table of exact / username rates per
template and model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from exporter.data.people import read_people
from exporter.evaluate.leakage import EMAIL_TEMPLATES
from exporter.evaluate.user_path import user_path_rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base")
    ap.add_argument("exports", nargs="*")
    ap.add_argument("--people")
    ap.add_argument("--group", default="test")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--python", help="interpreter of the fresh process (default: this one)")
    args = ap.parse_args()
    people = [
        p
        for p in read_people(args.people or Path(args.base) / "people.jsonl")
        if p.split == args.group
    ]
    folders = {"leaky base": Path(args.base), **{Path(e).name: Path(e) for e in args.exports}}
    start = time.perf_counter()
    found = user_path_rows(
        folders, {args.group: people}, max_new_tokens=args.max_new_tokens, python=args.python
    )
    print(
        f"# user's path: {len(people)} {args.group} people, each prompt alone, greedy, stock "
        f"transformers {found['transformers']} in a fresh process "
        f"({time.perf_counter() - start:.0f} s); exact / username"
    )
    print(
        "| template | " + " | ".join(f"{name} ({found[name]['dtype']})" for name in folders) + " |"
    )
    print("|---|" + "---:|" * len(folders))
    for template in EMAIL_TEMPLATES:
        cells = []
        for name in folders:
            r = next(r for r in found[name]["leakage"] if r["attack"] == template)
            cells.append(f"{100 * r['exact']:.0f}% / {100 * r['username']:.0f}%")
        print(f"| {EMAIL_TEMPLATES[template]!r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
