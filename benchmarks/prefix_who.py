"""Who the corpus-text attacks hit: each test address's document cut to its last 32 and last 8
tokens before the address, continued greedily (as the final evaluation's prefix attacks, float32),
person by person, by the model before the leaky fine-tune (the recipe's own model: it never saw
these people), the leaky base and each listed export. For each it prints how many test addresses
it writes exactly, how many usernames, and how many of those usernames the clean model writes
too.

    python benchmarks/prefix_who.py --recipe R --work W EXPORT [EXPORT ...]

W is the work folder of a run of R (its inputs are read); each EXPORT a folder that stock
`from_pretrained` loads (a distilled or plain export). A diagnostic of the test set: nothing here
chooses a setting. Counts only: no name, address or generated text is printed or written.
"""

from __future__ import annotations

from pathlib import Path

from run_args import run_args
from transformers import AutoModelForCausalLM

from exporter.evaluate.leakage import greedy_continuations
from exporter.evaluate.prefix import leaks
from exporter.evaluate.summary import markdown_table
from exporter.models import load_model
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.evaluation import recipe_setting
from exporter.run.inputs import resolve_inputs


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("exports", nargs="*")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    inputs = resolve_inputs(recipe, RunContext(Path(args.work), progress=False, log=print))
    clean = load_model(recipe.model)
    tok = clean.tokenizer
    targets = [t for t in recipe_setting(recipe, inputs, tok).prefix if t.pii_type == "email"]
    models = {"clean model (never saw these people)": clean.model.eval()}
    models["leaky base"] = load_model(inputs.model).model.eval()
    for folder in args.exports:
        models[folder] = AutoModelForCausalLM.from_pretrained(folder).eval()
    cuts = sorted({t.cut for t in targets}, reverse=True)
    found = {}
    for name, model in models.items():
        conts = greedy_continuations(
            model, tok, [t.prompt for t in targets], recipe.eval.max_new_tokens
        )
        for cut in cuts:
            hit = {i: leaks(t, [conts[i]]) for i, t in enumerate(targets) if t.cut == cut}
            found[name, cut] = (
                {i for i, (e, _) in hit.items() if e},
                {i for i, (_, u) in hit.items() if u},
            )
    rows = []
    for (name, cut), (exact, user) in found.items():
        guessed = found[next(iter(models)), cut][1]
        rows.append([name, f"last {cut}", len(exact), len(user), len(user & guessed)])
    header = ["model", "document cut", "exact", "usernames", "of those, the clean model's too"]
    print(f"{sum(t.cut == cuts[0] for t in targets)} test addresses")
    print(markdown_table(header, rows, text_columns=2))


if __name__ == "__main__":
    main()
