"""Crash safety: `scalpel export` killed with SIGKILL during SAE training and during the export's
writing; the re-run resumes (from the SAE checkpoint, from the cached stages) and writes the same
export, and no half-written folder is ever left under the output's name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_RECIPE as RECIPE
from safetensors.torch import load_file

# Runs the real command line in a child that SIGKILLs itself at a chosen point: after the SAE's
# second checkpoint is saved, or when the export has written its weights but not yet its extra
# files.
KILLER = """
import os, signal, sys
point = sys.argv[1]
if point == "sae":
    import torch
    saves = []
    real_save = torch.save
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if isinstance(obj, dict) and "opt" in obj:
            saves.append(obj["step"])
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
else:
    from exporter.patch import export
    export.write_files = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = ["scalpel", *sys.argv[2:]]
from exporter.cli import main
main()
"""


def _args(ws, out: str, work: str) -> list:
    return ["export", ws / "recipe.yaml", "--out", ws / out, "--work", ws / work, "--n", 2]


def _killed(ws, out: str, work: str, kill: str):
    """`scalpel export` in a child that SIGKILLs itself at `kill`."""
    return subprocess.run(
        [sys.executable, "-c", KILLER, kill, *map(str, _args(ws, out, work))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ws,
        env={**os.environ, "SCALPEL_CACHE_DIR": str(ws / "cache")},
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {
        k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()
    }


def test_killed_runs_resume_and_write_the_same_export(ws, scalpel):
    (ws / "recipe.yaml").write_text(
        RECIPE.replace("train_tokens: 5120", "train_tokens: 25600").replace(
            "dead_tokens: 2000}", "dead_tokens: 2000, checkpoint_every: 10}"
        )
    )
    # Killed during SAE training, just after the checkpoint of step 20 was written but before it
    # replaced the one of step 10: that one is intact and the stage is not marked done.
    killed = _killed(ws, "out", "work", kill="sae")
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = next((ws / "work" / "sae-checkpoint").glob("*/checkpoint.pt"))
    assert (
        torch.load(ckpt, weights_only=False)["step"] == 10
        and not (ws / "work" / "sae" / "key.txt").exists()
    )
    assert not (ws / "out").exists()
    # Resumed from that checkpoint, then killed while writing the export: only a temp folder beside
    # the name.
    killed = _killed(ws, "out", "work", kill="export")
    assert killed.returncode == -9, killed.stderr[-2000:]
    # training went on from step 10
    assert "| 10/100 [" in killed.stderr and "| 0/100 [" not in killed.stderr
    assert not (ws / "out").exists() and list(ws.glob(".tmp-out-*"))
    # The re-run and a clean run of the same recipe (never interrupted) need no kill: in this
    # process.
    resumed = scalpel(*_args(ws, "out", "work"))
    assert resumed.code == 0, resumed.err[-2000:]
    assert "SAE (cached)" in resumed.out and "features (cached)" in resumed.out
    assert not list(ws.glob(".tmp-out-*"))  # the stale temp folder was cleared
    clean = scalpel(*_args(ws, "clean", "clean-work"))
    assert clean.code == 0, clean.err[-2000:]
    a, b = _tensors(ws / "out"), _tensors(ws / "clean")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    blocks = [
        json.loads((ws / name / "config.json").read_text())["scalpel_patch"]
        for name in ("out", "clean")
    ]
    for block in blocks:
        block.pop("sha256"), block.pop("steer_norm")  # digests of the (float-close) tensors
    assert blocks[0] == blocks[1]
