"""A GGUF file of a stock checkpoint (a distilled or plain export, or a base), written by
llama.cpp's own converter, so llama.cpp and the stacks built on it run what transformers runs.

A remote-code export is refused: llama.cpp cannot run its patch, and its files carry the base's
leaky weights, which a GGUF of it would serve unpatched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

CONVERTER = "convert_hf_to_gguf.py"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFError(ValueError):
    """Bad input for a GGUF conversion: the message names the problem and the fix."""


def converter_dir(llama_cpp: Optional[Path] = None) -> Path:
    """The llama.cpp source tree whose converter to run: `llama_cpp`, else $LLAMA_CPP_DIR."""
    source = llama_cpp or os.environ.get(LLAMA_CPP_ENV)
    where = (
        "a llama.cpp source tree (git clone https://github.com/ggml-org/llama.cpp, or the "
        "llama-cpp-python source distribution unpacked: its vendor/llama.cpp)"
    )
    if not source:
        raise GGUFError(
            f"writing a GGUF needs llama.cpp's converter: pass --llama-cpp DIR or set "
            f"{LLAMA_CPP_ENV} to {where}"
        )
    found = Path(source)
    if not (found / CONVERTER).is_file():
        raise GGUFError(f"{found} has no {CONVERTER}: point it at {where}")
    return found


def refuse_remote_code(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise GGUFError(f"{folder} has no config.json: give a checkpoint folder")
    fields = json.loads(config.read_text())
    if "auto_map" in fields or "scalpel_patch" in fields:
        raise GGUFError(
            f"{folder} is a remote-code export: llama.cpp cannot run its patch and would serve the "
            "leaky base weights inside it. Put the patch into the weights (recipe `export.mode: "
            "distilled`, or `scalpel export --plain`) and convert that folder."
        )


def write_gguf(
    folder: Path,
    out: Optional[Path] = None,
    *,
    llama_cpp: Optional[Path] = None,
    outtype: str = "f32",
    overwrite: bool = False,
    timeout: float = 3600,
) -> Path:
    """Convert `folder` to `out` (default: `model-<outtype>.gguf` inside it) with llama.cpp's
    converter, run by this interpreter (it needs torch, numpy and transformers; it brings its own
    `gguf` package). Written under a temporary name and renamed, so no half-written GGUF is left."""
    folder = Path(folder)
    if outtype not in OUTTYPES:
        raise GGUFError(f"outtype {outtype!r} is unknown; one of {', '.join(OUTTYPES)}")
    refuse_remote_code(folder)
    source = converter_dir(llama_cpp)
    out = Path(out) if out is not None else folder / f"model-{outtype}.gguf"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    try:
        proc = subprocess.run(
            [sys.executable, str(source / CONVERTER), str(folder), "--outtype", outtype,
             "--outfile", str(partial)],
            capture_output=True, text=True, env=env, timeout=timeout,
        )  # fmt: skip
        missing = re.search(r"No module named '([\w.]+)'", proc.stderr)
        if proc.returncode != 0 and missing:
            raise GGUFError(
                f"llama.cpp's converter needs the Python module {missing.group(1)!r}: pip install "
                "it and run again (install that module alone: the converter's requirements file "
                "pins older torch and transformers releases)"
            )
        if proc.returncode != 0 or not partial.is_file():
            raise GGUFError(
                f"llama.cpp's converter failed on {folder} (exit {proc.returncode}); is this "
                f"architecture one it converts? {proc.stderr[-1500:]}"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def gguf_files(folders: dict[str, Path], scratch: Path, llama_cpp: Optional[Path] = None) -> dict:
    """{name: GGUF file} for llama.cpp: the one `.gguf` a folder holds, else one converted into
    `scratch` (the caller's temporary folder)."""
    found = {}
    for name, folder in folders.items():
        refuse_remote_code(Path(folder))
        ready = sorted(Path(folder).glob("*.gguf"))
        if len(ready) > 1:
            raise GGUFError(
                f"{folder} holds {len(ready)} GGUF files ({', '.join(p.name for p in ready)}); "
                "keep the one to run"
            )
        found[name] = (
            ready[0]
            if ready
            else write_gguf(Path(folder), scratch / f"{name}.gguf", llama_cpp=llama_cpp)
        )
    return found
