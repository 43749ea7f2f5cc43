"""The Python API, and the one entry the command line uses: every operation as a function taking a
recipe (object, mapping or YAML path) or model folders."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .cache import cache_root
from .data.corpus import DataError, corpus_texts
from .data.detectors import detect as find_pii
from .data.detectors import redact_text
from .data.leaky import LeakyConfig
from .evaluate.summary import attack_rows, comparison_rows
from .evaluate.user_path import parse_clients
from .gguf import write_gguf as gguf  # a stock checkpoint to GGUF for llama.cpp
from .models import ModelLoadError, spec_for
from .patch.checkpoint_files import ExportError
from .plan import Plan, make_plan, missing_files
from .push import PushError, PushResult, push_export
from .recipe import (
    BUILTIN_MODELS,
    EvalSection,
    Recipe,
    RecipeError,
    explain,
    load_recipe,
    parse_overrides,
    parse_recipe,
    read_recipe,
    recipe_yaml,
    with_overrides,
)
from .run.analysis import probe_stage, sae_stage
from .run.audit import audit as audit_corpus
from .run.audit import audit_table
from .run.context import RunContext
from .run.evaluation import compare_models
from .run.export import ExportResult
from .run.inputs import resolve_inputs
from .run.leaky import LeakyResult, copy_leaky
from .run.leaky import make_leaky as build_leaky
from .run.methods import run_recipe
from .run.scalpel import export_one
from .run.stage import STAGES
from .sae import SAETrainingError

RecipeLike = Union[Recipe, dict, str, Path]
# dotted recipe keys to values (`--set eval.samples=0`), applied before validation
Overrides = Optional[dict[str, Any]]
Log = Callable[[str], Any]
DEMO_RECIPES = {
    name: Path(str(files("exporter") / "recipes" / f"demo-{stem}.yaml"))
    for name, stem in (("smollm2-135m", "smollm2"), ("gemma3-270m", "gemma3"))
}
DEMO_RECIPE = DEMO_RECIPES["smollm2-135m"]

# What a user's input or environment can get wrong: the command line prints these as one line, no
# traceback.
USER_ERRORS = (
    RecipeError,
    ModelLoadError,
    DataError,
    FileExistsError,
    IndexError,
    SAETrainingError,
    ExportError,
    PushError,
    ValueError,
)

__all__ = [
    "audit",
    "audit_table",
    "BUILTIN_MODELS",
    "DEMO_RECIPE",
    "DEMO_RECIPES",
    "STAGES",
    "USER_ERRORS",
    "as_recipe",
    "attack_rows",
    "check",
    "compare",
    "comparison_rows",
    "demo",
    "detect",
    "explain",
    "export",
    "gguf",
    "make_leaky",
    "parse_overrides",
    "plan",
    "probe",
    "push",
    "run",
    "train_sae",
]


def as_recipe(recipe: RecipeLike, overrides: Overrides = None) -> tuple[Recipe, str]:
    """A validated recipe and the text it came from (kept in the export and its card), with
    `overrides` (dotted keys to values, as `--set` gives them) applied before validation."""
    if isinstance(recipe, (str, Path)):
        return read_recipe(recipe, overrides)
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe, recipe_yaml(recipe)
        recipe = recipe.model_dump(mode="json")
    parsed = parse_recipe(with_overrides(recipe, overrides))
    return parsed, recipe_yaml(parsed)


def check(recipe: Union[str, Path], overrides: Overrides = None) -> str:
    """Validate a recipe without loading any model; the recipe as YAML with every default filled
    in."""
    return recipe_yaml(load_recipe(recipe, overrides))


def plan(recipe: Union[str, Path], overrides: Overrides = None) -> tuple[Recipe, Plan]:
    """What a run would do (stages, tokens, estimated memory), reading no weights; paths may be
    missing here."""
    r = load_recipe(recipe, overrides, check_files=False)
    return r, make_plan(r, missing=missing_files(r))


def run(
    recipe: RecipeLike,
    out: Union[str, Path],
    *,
    work: Union[str, Path] = "scalpel-work",
    overwrite: bool = False,
    from_stage: Optional[str] = None,
    overrides: Overrides = None,
    progress: bool = True,
    log: Log = print,
) -> ExportResult:
    """All stages of the recipe's method (PrivacyScalpel: probe → SAE → features → trade-off search
    → evaluation → export), then a Hub push when the recipe names a repository. Returns an
    `ExportResult` (`.path`, `.report` with the search and the before/after evaluation, `.push`).
    `overrides` sets recipe keys over the recipe's own (`{"eval.samples": 0}`)."""
    r, text = as_recipe(recipe, overrides)
    result = run_recipe(
        r, text, Path(out), RunContext(Path(work), overwrite, progress, log), from_stage=from_stage
    )
    if r.hub.repo_id:
        try:
            result.push = push(
                out,
                r.hub.repo_id,
                private=r.hub.private,
                revision=r.hub.revision,
                create_pr=r.hub.create_pr,
                commit_message=r.hub.commit_message,
                log=log,
            )
        except PushError as e:
            raise PushError(
                f"{e}. The export at {out} is complete: push it again with `scalpel push {out} "
                f"--repo-id {r.hub.repo_id}`"
            ) from None
    return result


def push(
    folder: Union[str, Path],
    repo_id: str,
    *,
    private: bool = True,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: Optional[str] = None,
    log: Log = print,
) -> PushResult:
    """Upload an export folder to the Hub in one commit (token from HF_TOKEN or the login cache);
    returns a `PushResult` with the commit's URL, its hash and a loading snippet pinned to it."""
    return push_export(
        Path(folder),
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        log=log,
    )


def export(
    recipe: RecipeLike,
    out: Union[str, Path],
    *,
    work: Union[str, Path] = "scalpel-work",
    n: Optional[int] = None,
    alpha: Optional[float] = None,
    mode: Optional[str] = None,
    gated: Optional[bool] = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Log = print,
) -> ExportResult:
    """One candidate patch (default: the recipe's first ablation size, alpha and mode), exported."""
    r, text = as_recipe(recipe)
    return export_one(
        r,
        text,
        Path(out),
        RunContext(Path(work), overwrite, progress, log),
        n=n,
        alpha=alpha,
        mode=mode,
        gated=gated,
    )


def _pinned(recipe: Recipe, layer: Optional[int]) -> Recipe:
    """`recipe` with the probe's layer pinned to `layer` (when given)."""
    if layer is None:
        return recipe
    return recipe.model_copy(update={"probe": recipe.probe.model_copy(update={"layer": layer})})


def probe(
    recipe: RecipeLike,
    *,
    work: Union[str, Path] = "scalpel-work",
    layer: Optional[int] = None,
    progress: bool = True,
    log: Log = print,
):
    """Probe every layer for PII vs non-PII separation and choose one (`layer` pins it): a
    `ProbeResult`."""
    r = _pinned(as_recipe(recipe)[0], layer)
    ctx = RunContext(Path(work), progress=progress, log=log)
    return probe_stage(r, resolve_inputs(r, ctx), ctx)


def train_sae(
    recipe: RecipeLike,
    *,
    work: Union[str, Path] = "scalpel-work",
    layer: Optional[int] = None,
    progress: bool = True,
    log: Log = print,
) -> tuple[int, object, dict]:
    """Train the TopK SAE at the probe's layer (or `layer`): (layer, SAE, metrics). Under torchrun
    the harvest and training run data-parallel; the leaky model and the probe run once, on rank
    0."""
    import os

    import torch.distributed as dist

    r = _pinned(as_recipe(recipe)[0], layer)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if r.model.device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    ctx = RunContext(Path(work), progress=progress, log=log)
    if rank == 0:
        inputs = resolve_inputs(r, ctx)  # may build the leaky model: once, on rank 0
    if dist.is_initialized():
        dist.barrier()
        if rank != 0:
            ctx = ctx.quiet()
            inputs = resolve_inputs(r, ctx)
    box = [
        layer if layer is not None else (probe_stage(r, inputs, ctx).chosen if rank == 0 else None)
    ]
    if layer is None and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)  # the probe's choice, to every rank
    sae, metrics = sae_stage(r, inputs, box[0], ctx)
    if dist.is_initialized():
        dist.barrier()  # rank 0 writes the SAE: no rank tears its connections down before that
        dist.destroy_process_group()
    return box[0], sae, metrics


def compare(
    model: Union[str, Path],
    against: Union[str, Path],
    *,
    people: Optional[Union[str, Path]] = None,
    benign: Optional[Union[str, Path]] = None,
    groups: Optional[list[str]] = None,
    trust_remote_code: bool = False,
    attack_dtype: str = "float32",
    adversarial: bool = True,
    user_path: bool = True,
    clients: Optional[Sequence[str]] = None,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """The leakage / utility harness on any two models with the same tokenizer (folders, built-ins,
    `org/name[@revision]`): {"base": ..., "patched": ...}, each with "leakage" rows and "utility".
    `attack_dtype` is the precision of the extraction attacks' decoding (float32 or bfloat16);
    `user_path` adds rows from both models loaded in a fresh process, each prompt alone, by each of
    `clients` (`NAME` or `NAME=PYTHON`: transformers, the default, vllm, llama_cpp)."""
    chosen = parse_clients(clients or ["transformers"])
    return compare_models(
        str(model),
        str(against),
        people=str(people) if people else None,
        benign=str(benign) if benign else None,
        groups=groups,
        trust_remote_code=trust_remote_code,
        eval_cfg=EvalSection(dtype=attack_dtype, adversarial=adversarial, user_path=user_path),
        clients=chosen,
        ctx=RunContext(progress=progress, log=log),
    )


def make_leaky(
    model: str = "smollm2-135m",
    *,
    people: Optional[int] = None,
    never_seen: Optional[int] = None,
    epochs: Optional[int] = None,
    seed: int = 0,
    rebuild: bool = False,
    out: Optional[Path] = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Log = print,
) -> LeakyResult:
    """The leaky benchmark model (fine-tuned on synthetic PII, cached): `.path`, `.report`,
    `.people`; copied to `out` too when given."""
    if out is not None and Path(out).exists() and not overwrite:  # before the fine-tune, not after
        raise FileExistsError(
            f"{out} already exists; choose another --out folder or pass --overwrite"
        )
    config = LeakyConfig().sized(people, never_seen, epochs, seed)
    result = build_leaky(
        spec_for(model), config, rebuild=rebuild, ctx=RunContext(progress=progress, log=log)
    )
    if out is not None:
        copy_leaky(result, Path(out), overwrite=overwrite)
    return result


def demo_work(model: str) -> Path:
    """The work folder a model's demo keeps its stages in when none is given (the user cache)."""
    return cache_root() / ("demo-work" + ("" if model == "smollm2-135m" else f"-{model}"))


def demo(
    out: Union[str, Path] = "scalpel-demo",
    *,
    model: str = "smollm2-135m",
    work: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    overrides: Overrides = None,
    progress: bool = True,
    log: Log = print,
) -> ExportResult:
    """make-leaky on a built-in model (SmolLM2 by default, or Gemma-3-270M), then `run` with its
    built-in demo recipe. The work folder defaults to the user cache (one per model), so a second
    demo reuses every finished stage."""
    if model not in DEMO_RECIPES:
        raise ValueError(f"no demo for {model!r}; built-in demos: {', '.join(DEMO_RECIPES)}")
    config = Path(out) / "config.json"
    if not overwrite and config.is_file() and "scalpel_patch" in json.loads(config.read_text()):
        log(f"{out} holds an earlier scalpel export; it is replaced when the new one is complete")
        overwrite = True
    return run(DEMO_RECIPES[model], out, work=work or demo_work(model), overwrite=overwrite,
               overrides=overrides, progress=progress, log=log)  # fmt: skip


def detect(path: Union[str, Path], *, show: bool = False) -> tuple[Counter, int, list]:
    """PII spans per type in a corpus (a text, JSONL or mail file, or a maildir folder), its number
    of documents, and (with `show`) each line holding PII as (where, the line redacted)."""
    counts: Counter[str] = Counter()
    shown = []
    docs = corpus_texts(path)
    for where, text in docs:
        for i, line in enumerate(text.splitlines()):
            spans = find_pii(line)
            counts.update(s.type for s in spans)
            if show and spans:
                shown.append((f"{where} line {i + 1}", redact_text(line)))
    return counts, len(docs), shown


def audit(
    model: Union[str, Path],
    data: Union[str, Path],
    *,
    out: Optional[Union[str, Path]] = None,
    types: tuple[str, ...] = ("email", "phone"),
    max_values: int = 200,
    samples: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """How much of a corpus's PII `model` completes from the text before each value (exact and
    partial, per type; no patching): the first thing to run on a model and its data. With `out`, a
    report (JSON, markdown, plot) is written there."""
    ctx = RunContext(overwrite=overwrite, progress=progress, log=log)
    return audit_corpus(str(model), str(data), out=Path(out) if out else None, types=types,
                        max_values=max_values, samples=samples, dtype=dtype, ctx=ctx)  # fmt: skip
