"""Wall time and peak memory of each stage a run computes, kept in `work/timings.json`: what a
`--dry-run` estimate is checked against, and what the README's per-stage tables come from."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import torch

from .cache import write_atomic

TIMINGS = "timings.json"
GIB = 1024**3


class PeakMemory:
    """The process's largest resident set while it runs (sampled every `interval` s on a thread:
    the kernel's own high-water mark covers the whole process life, not one stage)."""

    def __init__(self, interval: float = 0.2) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_bytes = self._proc.memory_info().rss
        self.peak_bytes = self.start_bytes
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)


def read_timings(work: Path) -> dict:
    path = Path(work) / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def _written(folder: Path, summaries: tuple[str, ...] = ()) -> frozenset:
    """Every file under `folder` with its modification time, but the `summaries` a cached run
    rewrites too: what a stage that computed writes."""
    if not folder.is_dir():
        return frozenset()
    files = [f for f in folder.rglob("*") if f.is_file() and f.name not in summaries]
    return frozenset((str(f), f.stat().st_mtime_ns) for f in files)


@contextmanager
def timed(work: Path, name: str, stage=None) -> Iterator[None]:
    """Measure the block as stage `name` and record it in `work/timings.json`. With `stage` (a
    Stage), only a block that wrote into the stage's folder is recorded: a cached load (the
    trade-off search's too, which keeps one file per candidate and rewrites its summary and plot)
    would otherwise replace the real measurement with the time it took to read the files."""
    summaries = getattr(stage, "summaries", ())
    before = _written(stage.folder(work), summaries) if stage is not None else None
    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        yield
    seconds = time.perf_counter() - started
    if stage is not None and _written(stage.folder(work), summaries) == before:
        return
    found = read_timings(work)
    found[name] = {
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(mem.peak_bytes / GIB, 2),
        "rss_before_gib": round(mem.start_bytes / GIB, 2),
    }
    if gpu:  # what the stage held on the GPU at most (tensors; the allocator's cache aside)
        found[name]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    Path(work).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(work) / TIMINGS, json.dumps(found, indent=2))
