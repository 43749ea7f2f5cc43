"""scalpel-exporter: find the PII a causal LM memorised, remove it surgically, export a patched model."""

from .recipe import Recipe, RecipeError, load_recipe, parse_recipe

__version__ = "0.1.0"
__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_recipe", "__version__"]
