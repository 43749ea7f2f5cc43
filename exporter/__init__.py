"""scalpel-exporter: find the PII a causal LM memorised, remove it surgically, export a patched
model.

from exporter import load_recipe, run, compare
result = run("recipes/demo-smollm2.yaml", out="patched")
print(result.report["evaluation"]["patched"]["utility"])
"""

from .api import DEMO_RECIPE, as_recipe, compare, demo, export, make_leaky, run
from .recipe import Recipe, RecipeError, load_recipe, parse_recipe

# The evaluation harness is the subpackage `exporter.evaluate`; the function that runs it on a pair
# is `compare`, so importing a submodule can never rebind the public name.
__version__ = "0.1.0"
__all__ = [
    "DEMO_RECIPE",
    "Recipe",
    "RecipeError",
    "as_recipe",
    "compare",
    "demo",
    "export",
    "load_recipe",
    "make_leaky",
    "parse_recipe",
    "run",
    "__version__",
]
