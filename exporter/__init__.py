"""scalpel-exporter: find the PII a causal LM memorised, remove it surgically, export a patched model.

    from exporter import load_recipe, run, evaluate
    result = run("recipes/demo-smollm2.yaml", out="patched")
    print(result.report["evaluation"]["patched"]["utility"])
"""

from .api import DEMO_RECIPE, as_recipe, demo, evaluate, export, make_leaky, run
from .recipe import Recipe, RecipeError, load_recipe, parse_recipe

__version__ = "0.1.0"
__all__ = ["DEMO_RECIPE", "Recipe", "RecipeError", "as_recipe", "demo", "evaluate", "export", "load_recipe",
           "make_leaky", "parse_recipe", "run", "__version__"]
