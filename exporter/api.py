"""The Python API: every command-line operation as a function taking a recipe (object, mapping or YAML path)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .recipe import Recipe, load_recipe, parse_recipe, recipe_yaml

RecipeLike = Union[Recipe, dict, str, Path]
DEMO_RECIPE = Path(str(files("exporter") / "recipes" / "demo-smollm2.yaml"))


def as_recipe(recipe: RecipeLike) -> tuple[Recipe, str]:
    """A validated recipe and the text it came from (kept in the export and its card)."""
    if isinstance(recipe, Recipe):
        return recipe, recipe_yaml(recipe)
    if isinstance(recipe, dict):
        parsed = parse_recipe(recipe)
        return parsed, recipe_yaml(parsed)
    path = Path(recipe)
    return load_recipe(path), path.read_text(encoding="utf-8") if path.is_file() else ""


def run(recipe: RecipeLike, out: Union[str, Path], *, work: Union[str, Path] = "scalpel-work",
        overwrite: bool = False, from_stage: Optional[str] = None, progress: bool = True,
        log: Callable[[str], Any] = print):
    """All stages: probe → SAE → features → trade-off search → evaluation → export. Returns an
    `ExportResult` (`.path`, `.report` with the search and the before/after evaluation)."""
    from .pipeline import run_stage

    r, text = as_recipe(recipe)
    result = run_stage(r, text, Path(out), Path(work), overwrite=overwrite, progress=progress, log=log,
                       from_stage=from_stage)
    if r.hub.repo_id:
        from .push import PushError

        try:
            result.push = push(out, r.hub.repo_id, private=r.hub.private, revision=r.hub.revision,
                               create_pr=r.hub.create_pr, commit_message=r.hub.commit_message, log=log)
        except PushError as e:
            raise PushError(f"{e}. The export at {out} is complete: push it again with "
                            f"`scalpel push {out} --repo-id {r.hub.repo_id}`") from None
    return result


def push(folder: Union[str, Path], repo_id: str, *, private: bool = True, revision: Optional[str] = None,
         create_pr: bool = False, commit_message: Optional[str] = None, log: Callable[[str], Any] = print):
    """Upload an export folder to the Hub in one commit (token from HF_TOKEN or the login cache); returns a
    `PushResult` with the commit's URL, its hash and a loading snippet pinned to it."""
    from .push import push_export

    return push_export(Path(folder), repo_id, private=private, revision=revision, create_pr=create_pr,
                       commit_message=commit_message, log=log)


def export(recipe: RecipeLike, out: Union[str, Path], *, work: Union[str, Path] = "scalpel-work",
           n: Optional[int] = None, alpha: Optional[float] = None, mode: Optional[str] = None,
           gated: Optional[bool] = None, overwrite: bool = False, progress: bool = True,
           log: Callable[[str], Any] = print):
    """One candidate patch (default: the recipe's first ablation size, alpha and mode), exported."""
    from .pipeline import export_stage

    r, text = as_recipe(recipe)
    return export_stage(r, text, Path(out), Path(work), overwrite=overwrite, n=n, alpha=alpha, mode=mode,
                        gated=gated, progress=progress, log=log)


def compare(model: Union[str, Path], against: Union[str, Path], *, people: Optional[Union[str, Path]] = None,
             benign: Optional[Union[str, Path]] = None, groups: Optional[list[str]] = None,
             trust_remote_code: bool = False, attack_dtype: str = "float32", adversarial: bool = True,
             user_path: bool = True, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """The leakage / utility harness on any two models with the same tokenizer (folders, built-ins,
    `org/name[@revision]`): {"base": ..., "patched": ...}, each with "leakage" rows and "utility".
    `attack_dtype` is the precision of the extraction attacks' decoding (float32 or bfloat16); `user_path` adds
    rows from both models loaded in a fresh process with stock transformers, each prompt alone."""
    from .pipeline import eval_stage
    from .recipe import EvalSection

    return eval_stage(str(model), str(against), people=str(people) if people else None,
                      benign=str(benign) if benign else None, groups=groups, trust_remote_code=trust_remote_code,
                      eval_cfg=EvalSection(dtype=attack_dtype, adversarial=adversarial, user_path=user_path),
                      progress=progress, log=log)


def make_leaky(model: str = "smollm2-135m", *, rebuild: bool = False, progress: bool = True,
               log: Callable[[str], Any] = print):
    """The leaky benchmark model (fine-tuned on synthetic PII, cached): `.path`, `.report`, `.people`."""
    from .models import spec_for
    from .pipeline import make_leaky as build

    return build(spec_for(model), rebuild=rebuild, progress=progress, log=log)


def demo(out: Union[str, Path] = "scalpel-demo", *, work: Optional[Union[str, Path]] = None,
         overwrite: bool = False, progress: bool = True, log: Callable[[str], Any] = print):
    """make-leaky on the built-in SmolLM2, then `run` with the built-in demo recipe. The work folder
    defaults to the user cache, so a second demo reuses every finished stage."""
    import json

    from .cache import cache_root

    config = Path(out) / "config.json"
    if not overwrite and config.is_file() and "scalpel_patch" in json.loads(config.read_text()):
        log(f"{out} holds an earlier scalpel export; it will be replaced when the new one is complete")
        overwrite = True
    return run(DEMO_RECIPE, out, work=work or cache_root() / "demo-work", overwrite=overwrite, progress=progress,
               log=log)
