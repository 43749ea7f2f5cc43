"""The user's path: extraction from model folders loaded in a fresh process with stock transformers, each
prompt generated alone, greedy, in the dtype `from_pretrained` gives by default (user_path_worker.py).

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
from .leakage import EMAIL_TEMPLATES, first_email, score_emails

DECODING = "greedy, one prompt, fresh process"
WORKER = Path(__file__).with_name("user_path_worker.py")


class UserPathError(RuntimeError):
    pass


def continuations(folders: dict[str, Path], prompts: Sequence[str], max_new_tokens: int,
                  timeout: float = 7200, python: Optional[str] = None) -> dict:
    """{"continuations": {name: [text per prompt]}, "transformers": version, "dtype": {name: dtype}} from one
    fresh process (`python`: another interpreter, e.g. a venv with another transformers). The prompts go in and
    the texts come back through pipes: nothing is written to disk."""
    request = {"models": {k: str(v) for k, v in folders.items()}, "prompts": list(prompts),
               "max_new_tokens": max_new_tokens}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([python or sys.executable, str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        # stderr is transformers' own output (loading reports, tracebacks): no prompt or continuation is in it.
        raise UserPathError(f"the fresh-process generation failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def user_path_rows(folders: dict[str, Path], groups: dict[str, Sequence[Person]], *, max_new_tokens: int = 24,
                   templates: dict[str, str] = EMAIL_TEMPLATES, python: Optional[str] = None) -> dict:
    """{name: {"leakage": rows, "dtype": ...}, "transformers": version}: the zero-shot email templates on each
    group of people, every prompt alone, for every model folder in `folders` (one fresh process)."""
    groups = {g: list(people) for g, people in groups.items() if people}
    jobs = [(g, t, p) for t in templates for g, people in groups.items() for p in people]
    result = continuations(folders, [templates[t].format(name=p.name) for _g, t, p in jobs], max_new_tokens,
                           python=python)
    out: dict = {"transformers": result["transformers"]}
    for name, texts in result["continuations"].items():
        rows = []
        for t in templates:
            for g, people in groups.items():
                found = [first_email(text) for (jg, jt, _p), text in zip(jobs, texts) if (jg, jt) == (g, t)]
                s = score_emails(people, found, t)
                rows.append({"group": g, "attack": t, "decoding": DECODING, "pii_type": s.pii_type, "n": s.n,
                             "exact": s.exact, "username": s.username, "domain": s.domain})
        out[name] = {"leakage": rows, "dtype": result["dtype"][name]}
    return out
