"""One stage cache: a stage's outputs live in `work/<folder>` beside a `key.txt` naming the content
they were computed from; a stage whose key and outputs are there is reused, otherwise it is computed
into a temporary folder renamed onto its own only when complete (an interrupted run leaves nothing
half-written)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..cache import atomic_dir, content_key

KEY_FILE = "key.txt"


@dataclass(frozen=True)
class Stage:
    """A cached step of a run. `version` is bumped when its behaviour changes, so stale outputs are
    not reused; `scratch` names work folders it resumes from (checkpoints), forgotten with it."""

    name: str
    version: int
    outputs: tuple[str, ...] = ()
    about: str = ""
    scratch: tuple[str, ...] = ()
    folder_name: Optional[str] = None  # default: the stage's name
    per_method: bool = False  # one folder per unlearning method: method-<name>[-evaluate]
    # files every run rewrites from the cached scores (a summary, a plot): writing them is no work
    summaries: tuple[str, ...] = ()

    def folder(self, work: Path) -> Path:
        return Path(work) / (self.folder_name or self.name)

    def key(self, *parts: Any) -> str:
        """The content key of this stage's inputs (`parts`: JSON-serialisable)."""
        return content_key(f"{self.name}-v{self.version}", *parts)

    def stored_key(self, work: Path) -> str:
        """The key of what the stage folder holds now ("" when nothing finished there)."""
        path = self.folder(work) / KEY_FILE
        return path.read_text() if path.exists() else ""

    def cached(self, work: Path, key: str) -> Optional[Path]:
        """The stage folder when it holds every output computed from `key`, else None."""
        folder = self.folder(work)
        if self.stored_key(work) == key and all((folder / o).exists() for o in self.outputs):
            return folder
        return None

    @contextmanager
    def saving(self, work: Path, key: str) -> Iterator[Path]:
        """A temporary folder to write the outputs into; on success it replaces the stage folder,
        with `key`."""
        with atomic_dir(self.folder(work), overwrite=True) as tmp:
            yield tmp
            (tmp / KEY_FILE).write_text(key)

    def partial(self, work: Path, key: str) -> Path:
        """Where a long stage keeps the parts it finished while it runs (one file each), so a run
        interrupted half-way resumes there with the same key. It lies inside the stage folder:
        saving the stage replaces it, and a new key drops what an older one kept."""
        folder = self.folder(work) / f"partial-{key}"
        for stale in self.folder(work).glob("partial-*"):
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def folders(self, work: Path) -> list[Path]:
        """Every folder this stage keeps in `work`: its own and its scratch, or for a method's
        stage, one per method run there."""
        if not self.per_method:
            return [self.folder(work), *(Path(work) / name for name in self.scratch)]
        suffix = self.name.removeprefix("method")  # "" or "-evaluate"
        found = Path(work).glob(f"method-*{suffix}")
        return [f for f in found if f.name.endswith("-evaluate") == bool(suffix)]

    def forget(self, work: Path) -> None:
        """Remove the stage's outputs and scratch, so the next run computes them again."""
        for folder in self.folders(work):
            shutil.rmtree(folder, ignore_errors=True)


# The registry: every cached stage of a run, in order. `--from`, `--dry-run` and the CLI's help read
# it.
PROBE = Stage("probe", 1, ("probe.json", "probe.png"), "linear probe per layer, layer choice")
SAE = Stage(
    "sae",
    2,
    ("cfg.json", "sae_weights.safetensors", "metrics.json"),
    "TopK SAE at the chosen layer",
    scratch=("sae-checkpoint",),
)
FEATURES = Stage(
    "features", 8, ("features.json", "features.safetensors"), "PII latents, steering, context gate"
)
SEARCH = Stage(
    "search",
    4,
    (),
    "candidates scored on validation people and values (one cached score each)",
    summaries=("front.png", "search.json"),
)
DISTILL = Stage(
    "distill",
    3,
    ("student.safetensors", "distill.json", "curve.png"),
    "the chosen patch and its control learnt into the weights (export.mode: distilled)",
    scratch=("distill-control", "distill-neurons"),
)
EVALUATE = Stage("evaluate", 3, ("evaluation.json",), "final evaluation on test people")
METHOD = Stage(
    "method",
    2,
    ("edited.safetensors", "search.json"),
    "an unlearning method's path, the chosen edit",
    per_method=True,
)
METHOD_EVALUATE = Stage(
    "method-evaluate", 2, ("evaluation.json",), "the method's final evaluation", per_method=True
)

STAGES: tuple[Stage, ...] = (
    PROBE,
    SAE,
    FEATURES,
    SEARCH,
    DISTILL,
    EVALUATE,
    METHOD,
    METHOD_EVALUATE,
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def fold_stage(k: int) -> Stage:
    """The features fitted without the k-th part of the validation split (the search attacks that
    part with them), kept in the search's folder and forgotten with it."""
    return Stage(
        f"features-fold{k}",
        FEATURES.version,
        FEATURES.outputs,
        f"PII latents, steering, context gate fitted without validation part {k}",
        folder_name=f"{SEARCH.name}/fold{k}",
    )


def method_stage(stage: Stage, method: str) -> Stage:
    """`stage` in the folder of one unlearning method (`method-rmu`, `method-rmu-evaluate`)."""
    return Stage(
        stage.name,
        stage.version,
        stage.outputs,
        stage.about,
        folder_name=stage.name.replace("method", f"method-{method}", 1),
    )


def invalidate(work: Path, from_stage: str) -> list[str]:
    """Forget the cached results of `from_stage` and every later stage, so the next run recomputes
    them. (The leaky model and harvested activations live in the user cache, keyed by content, and
    stay.)"""
    if from_stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage {from_stage!r}; stages in order: {', '.join(STAGE_NAMES)}")
    forgotten = STAGES[STAGE_NAMES.index(from_stage) :]
    for stage in forgotten:
        stage.forget(work)
    return [s.name for s in forgotten]
