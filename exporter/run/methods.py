"""Every method a recipe can name, run the same way: PrivacyScalpel beside the weight-editing
baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from . import scalpel, unlearning
from .context import RunContext
from .export import ExportResult
from .stage import invalidate

# recipe.method.name -> the run: (recipe, recipe text, output folder, context) -> ExportResult
METHODS: dict[str, Callable[..., ExportResult]] = {
    "scalpel": scalpel.run,
    "rmu": unlearning.run,
    "gradient_ascent": unlearning.run,
    "depn": unlearning.run,
}


def run_recipe(
    recipe, recipe_text: str, out: Path, ctx: RunContext, *, from_stage: Optional[str] = None
) -> ExportResult:
    """The recipe's method end to end: its stages (reused from the work folder when finished;
    `from_stage` and every later one computed again), the search on validation people, the final
    evaluation, the export."""
    ctx.refuse_existing(out)
    if from_stage is not None:
        ctx.log(
            f"recomputing from stage {from_stage}: " + ", ".join(invalidate(ctx.work, from_stage))
        )
    return METHODS[recipe.method.name](recipe, recipe_text, Path(out), ctx)
