"""The recipe: one YAML file that drives a whole run, validated before any model is loaded."""

from .base import BUILTIN_MODELS, DTYPES
from .exports import DistillSection, ExportSection
from .loading import (
    RecipeError,
    explain,
    load_recipe,
    parse_overrides,
    parse_recipe,
    read_recipe,
    recipe_yaml,
    with_overrides,
)
from .methods import DepnMethod, GradientAscentMethod, MethodSection, RmuMethod, ScalpelMethod
from .schema import (
    DataSection,
    EvalSection,
    HubSection,
    InterventionSection,
    ProbeSection,
    Recipe,
    SaeSection,
)
from .sources import BenignSource, ModelSpec, PeopleSource, PiiSource

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "BenignSource",
    "DataSection",
    "DepnMethod",
    "EvalSection",
    "DistillSection",
    "ExportSection",
    "GradientAscentMethod",
    "HubSection",
    "InterventionSection",
    "MethodSection",
    "ModelSpec",
    "PeopleSource",
    "PiiSource",
    "ProbeSection",
    "Recipe",
    "RecipeError",
    "RmuMethod",
    "SaeSection",
    "ScalpelMethod",
    "explain",
    "load_recipe",
    "parse_overrides",
    "parse_recipe",
    "read_recipe",
    "recipe_yaml",
    "with_overrides",
]
