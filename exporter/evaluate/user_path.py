"""The user's path: extraction from model folders loaded in a fresh process with stock transformers,
each prompt generated alone, greedy, in the dtype `from_pretrained` gives by default
(user_path_worker.py).

The in-process harness decodes many prompts at once with a patch attached; this is what someone who
downloads the export and calls `generate` on one prompt gets, on whatever transformers is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..data.people import Person
from .harness import attack_row
from .leakage import EMAIL_TEMPLATES, first_email, score_emails

DECODING = "greedy, one prompt, fresh process"
# {client: (the script that generates, the decoding its rows are labelled with)}
CLIENTS = {
    "transformers": (Path(__file__).with_name("user_path_worker.py"), DECODING),
    "vllm": (Path(__file__).with_name("vllm_worker.py"), "greedy, vLLM"),
}


class UserPathError(RuntimeError):
    pass


def continuations(
    folders: dict[str, Path],
    prompts: Sequence[str],
    max_new_tokens: int,
    timeout: float = 7200,
    python: Optional[str] = None,
    client: str = "transformers",
) -> dict:
    """{"continuations": {name: [text per prompt]}, "transformers": version, "dtype": {name: dtype}}
    from one fresh process (`python`: another interpreter, e.g. a venv with another transformers,
    or with vLLM for `client="vllm"`). The prompts go in and the texts come back through pipes:
    nothing is written to disk."""
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")
    request = {
        "models": {k: str(v) for k, v in folders.items()},
        "prompts": list(prompts),
        "max_new_tokens": max_new_tokens,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [python or sys.executable, str(CLIENTS[client][0])],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        # stderr is transformers' own output (loading reports, tracebacks): no prompt or
        # continuation is in it.
        raise UserPathError(
            f"the fresh-process generation ({client}) failed (exit {proc.returncode}): "
            f"{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def user_path_rows(
    folders: dict[str, Path],
    groups: dict[str, Sequence[Person]],
    *,
    max_new_tokens: int = 24,
    templates: dict[str, str] = EMAIL_TEMPLATES,
    python: Optional[str] = None,
    client: str = "transformers",
) -> dict:
    """{name: {"leakage": rows, "dtype": ...}, "transformers": version}: the zero-shot email
    templates on each group of people, every prompt alone, for every model folder in `folders` (one
    fresh process of `client`)."""
    groups = {g: list(people) for g, people in groups.items() if people}
    order = [(t, g) for t in templates for g in groups]
    prompts = [templates[t].format(name=p.name) for t, g in order for p in groups[g]]
    result = continuations(folders, prompts, max_new_tokens, python=python, client=client)
    decoding = CLIENTS[client][1]
    out: dict = {"transformers": result["transformers"]}
    for name, texts in result["continuations"].items():
        found = iter(first_email(text) for text in texts)  # in the order the prompts were made
        rows = [
            attack_row(g, t, decoding, score_emails(groups[g], [next(found) for _ in groups[g]], t))
            for t, g in order
        ]
        out[name] = {"leakage": rows, "dtype": result["dtype"][name]}
    return out


def merge(evaluation: dict, found: dict) -> None:
    """Put user_path_rows' rows into an evaluation ({variant: {"leakage": rows, ...}}), replacing
    earlier rows of the user's path, and record the transformers version and dtypes they were
    measured with."""
    variants = [v for v in found if v != "transformers" and v in evaluation]
    for v in variants:
        evaluation[v]["leakage"] = [
            r for r in evaluation[v]["leakage"] if r["decoding"] != DECODING
        ]
        evaluation[v]["leakage"] += found[v]["leakage"]
    evaluation["user_path"] = {
        "transformers": found["transformers"],
        "dtype": {v: found[v]["dtype"] for v in variants},
    }
