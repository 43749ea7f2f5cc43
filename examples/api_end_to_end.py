"""Drive scalpel-exporter from Python: recipe → run (probe, SAE, features, search, evaluation,
export) → numbers.

python examples/api_end_to_end.py                       # the built-in demo recipe
python examples/api_end_to_end.py my-recipe.yaml --out patched
"""

import argparse

import exporter
from exporter.evaluate.summary import comparison_rows, markdown_table


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("recipe", nargs="?", default=str(exporter.DEMO_RECIPE))
    ap.add_argument("--out", default="patched")
    ap.add_argument("--work", default="scalpel-work")
    args = ap.parse_args()

    # validated; a bad key fails here, before any model loads
    recipe = exporter.load_recipe(args.recipe)
    print(
        f"patching {recipe.model.describe()}; candidates: N={recipe.intervention.ablate_n}, "
        f"alpha={recipe.intervention.alpha}"
    )
    result = exporter.run(recipe, args.out, work=args.work, overwrite=True)
    chosen = result.report["search"]["chosen"]
    print(
        f"chosen on validation people: N={chosen['n']} alpha={chosen['alpha']} ({chosen['mode']})"
    )
    print(markdown_table(*comparison_rows(result.report["evaluation"])))
    print(f"export: {result.path}")


if __name__ == "__main__":
    main()
