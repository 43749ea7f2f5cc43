"""Extraction as a user gets it, through the engines people deploy with: model folders loaded in a
fresh process (stock transformers, vLLM or llama.cpp), each test person's prompt generated alone,
greedy; the three templates, and each engine's speed on the same prompts (the patch's cost there).

    python benchmarks/user_path.py BASE [EXPORT ...] [--people people.jsonl] [--group test]
        [--client NAME[=PYTHON] ...]

BASE is the leaky model folder (`people.jsonl` beside it, as `scalpel make-leaky` writes it); every
EXPORT is scored beside it. Each `--client` (transformers, the default; vllm; llama_cpp) runs them
all in one fresh process of PYTHON (the venv it is installed in; default this interpreter).
llama.cpp runs each folder's GGUF (`scalpel gguf`), converting one into a temporary folder with
$LLAMA_CPP_DIR's converter when there is none, and cannot run a remote-code export (said in its
column). Prints, per engine, the exact / username rates per template and model, how many people an
engine's greedy answer differs on from transformers', and generated tokens per second (generation
alone, without loading; vLLM takes every prompt at once as a server would, the others one by one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from exporter.data.people import read_people
from exporter.evaluate.leakage import EMAIL_TEMPLATES
from exporter.evaluate.user_path import parse_clients, user_path_rows
from exporter.gguf import GGUFError, refuse_remote_code


def _rate(found: dict, name: str, template: str) -> str:
    if name not in found:
        return "-"
    r = next(r for r in found[name]["leakage"] if r["attack"] == template)
    return f"{100 * r['exact']:.0f}% / {100 * r['username']:.0f}%"


def _speed(found: dict, name: str) -> str:
    timing = found.get(name, {}).get("timing")
    if not timing:
        return "-"
    return f"{timing['tokens'] / timing['seconds']:.0f}"


def _run(client, python, folders, people, group, max_new_tokens) -> dict:
    """One engine on every folder it can run; a remote-code export llama.cpp refuses is left out
    with the reason."""
    refused = {}
    if client == "llama_cpp":
        for name, folder in folders.items():
            try:
                refuse_remote_code(folder)
            except GGUFError:
                refused[name] = "llama.cpp cannot run a remote-code export's patch"
    start = time.perf_counter()
    found = user_path_rows(
        {k: v for k, v in folders.items() if k not in refused},
        {group: people},
        max_new_tokens=max_new_tokens,
        client=client,
        python=python,
    )
    return {**found, "seconds": time.perf_counter() - start, "refused": refused}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base")
    ap.add_argument("exports", nargs="*")
    ap.add_argument("--people")
    ap.add_argument("--group", default="test")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--client", action="append", help="NAME or NAME=PYTHON; repeat for several")
    args = ap.parse_args()
    clients = parse_clients(args.client or ["transformers"])
    people = [
        p
        for p in read_people(args.people or Path(args.base) / "people.jsonl")
        if p.split == args.group
    ]
    folders = {"leaky base": Path(args.base), **{Path(e).name: Path(e) for e in args.exports}}
    print(
        f"# user's path: {len(people)} {args.group} people, each prompt alone, greedy, "
        f"{args.max_new_tokens} new tokens at most; exact / username"
    )
    # transformers first, so every other engine's table can say how far it is from it
    order = sorted(clients, key=lambda c: c != "transformers")
    runs: dict = {}
    for client in order:
        runs[client] = _run(client, clients[client], folders, people, args.group,
                            args.max_new_tokens)  # fmt: skip
        _print_engine(client, runs[client], folders, runs.get("transformers"))


def _print_engine(client: str, found: dict, folders: dict, reference: Optional[dict]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in found["versions"].items())
    print(f"\n## {client} ({versions}; {found['seconds']:.0f} s with loading)")
    print("| template | " + " | ".join(folders) + " |")
    print("|---|" + "---:|" * len(folders))
    for template in EMAIL_TEMPLATES:
        cells = [_rate(found, name, template) for name in folders]
        print(f"| {EMAIL_TEMPLATES[template]!r} | " + " | ".join(cells) + " |")
    print("| dtype | " + " | ".join(found.get(n, {}).get("dtype", "-") for n in folders) + " |")
    print("| generated tokens / s | " + " | ".join(_speed(found, n) for n in folders) + " |")
    if reference is not None and client != "transformers":
        apart = [_differ(reference, found, n) for n in folders]
        print("| most people apart from transformers | " + " | ".join(apart) + " |")
    for name, why in found["refused"].items():
        print(f"\n{name}: not run ({why})")
    sys.stdout.flush()


def _differ(reference: dict, found: dict, name: str) -> str:
    """The largest difference, over the templates, in how many people's address / username an
    engine's greedy answers give beside transformers' (the rows hold rates, never who)."""
    if name not in found or name not in reference:
        return "-"
    pairs = list(zip(reference[name]["leakage"], found[name]["leakage"]))
    exact = max(abs(round((a["exact"] - b["exact"]) * a["n"])) for a, b in pairs)
    username = max(abs(round((a["username"] - b["username"]) * a["n"])) for a, b in pairs)
    return f"{exact} / {username}"


if __name__ == "__main__":
    main()
