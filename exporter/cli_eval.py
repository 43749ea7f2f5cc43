"""`scalpel eval`: the leakage / utility harness on any two models, with the user's-path rows from
the engines people deploy with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import api
from .cli_console import console, log
from .cli_tables import print_evaluation


def eval_cmd(
    model: str = typer.Argument(
        ..., help="The model to test: a folder (e.g. an export), built-in, or org/name@rev."
    ),
    against: str = typer.Option(
        ..., "--against", help="The model to compare with (e.g. the base it was patched from)."
    ),
    people: Optional[Path] = typer.Option(
        None,
        "--people",
        help="JSONL of name, email, phone, split (default: people.jsonl beside --against).",
    ),
    benign: Optional[Path] = typer.Option(
        None, "--benign", help="Benign text for perplexity/KL (default: pydoc)."
    ),
    group: Optional[list[str]] = typer.Option(
        None, "--group", help="People split(s) to attack (default: test and never_seen, else all)."
    ),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the full results here."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run remote code of non-scalpel models."
    ),
    attack_dtype: str = typer.Option(
        "float32",
        "--attack-dtype",
        help="Precision of the attacks' decoding: float32 or bfloat16 (about twice as fast on "
        "CPU).",
    ),
    adversarial: bool = typer.Option(
        True,
        "--adversarial/--no-adversarial",
        help="Also the adversarial attacks: paraphrases, JSON / table / signature formats, prefix, "
        "32 samples.",
    ),
    user_path: bool = typer.Option(
        True,
        "--user-path/--no-user-path",
        help="Also both models loaded in a fresh process by each --client, each prompt generated "
        "alone (local folders).",
    ),
    client: Optional[list[str]] = typer.Option(
        None,
        "--client",
        help="The engine of the user's-path rows: transformers (default), vllm or llama_cpp, as "
        "NAME or NAME=PYTHON (the interpreter of the venv it is installed in); repeat it for "
        "rows from several engines side by side. llama_cpp runs each folder's .gguf, or converts "
        "one with llama.cpp's converter from LLAMA_CPP_DIR.",
    ),
) -> None:
    """The leakage / utility harness on any two models with the same tokenizer, side by side."""
    result = api.compare(
        model,
        against,
        people=people,
        benign=benign,
        groups=group or None,
        trust_remote_code=trust_remote_code,
        attack_dtype=attack_dtype,
        adversarial=adversarial,
        user_path=user_path,
        clients=client or None,
        log=log,
    )
    print_evaluation(console, result, f"{model} (patched) vs {against} (base)")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"results: {json_out}")
