"""Should the context gate also learn the extraction prompts' forms? For a finished run, the run's
gate (refitted the same way) beside one fitted with the last token of each validation person's
extraction prompts (every email template, zero-shot and k-shot) among the tokens to open on. For
each gate: on how many test people's prompts it is open at the last token (the token that predicts
the address's first token), the tokens it opens on in held-out text no stage trained on, and the
run's chosen patch's KL behind it there; with `--leak`, the test people the patch lets out behind
it under the final evaluation's template attacks (float32, a few minutes per gate).

    python benchmarks/gate_prompts.py --recipe R --work W [--leak]

W is the work folder of a run of R. The test people's prompts are a diagnostic: nothing here is
fitted on them. Counts, rates and KL only: no text is printed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from adversarial_search import run_choice
from gate_negatives import held_out
from run_args import run_args
from who_leaks import hits, prompt_ends, prompts_of

from exporter.data.corpus import benign_texts
from exporter.evaluate.summary import markdown_table
from exporter.evaluate.utility import against_reference
from exporter.patch import applied, context_scores, set_context
from exporter.recipe import load_recipe
from exporter.run.analysis import feature_latents, fit_context, gate_windows
from exporter.run.evaluation import utility_texts


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--leak", action="store_true")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    iv, ev, seed = recipe.intervention, recipe.eval, recipe.data.seed
    prep, cand, patch = run_choice(args.recipe, Path(args.work))
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    _, _, lat = feature_latents(
        recipe, prep.inputs, prep.loaded, prep.sae, layer, progress=False, keep_activations=True
    )
    windows = gate_windows(recipe, prep.inputs, prep.loaded, layer, progress=False)
    ends = {
        group: {
            form: prompt_ends(model, tok, layer, patch, prompts)
            for form, prompts in prompts_of(prep.inputs.split(group), ev, seed).items()
        }
        for group in ("validation", "test")
    }
    asked = torch.cat(list(ends["validation"].values()))
    prose, _ = utility_texts(prep.inputs.benign_path, tok, ev.ppl_tokens)
    held = {
        "held-out windows (code and tables too)": benign_texts(
            prep.inputs.benign_path, split="heldout", mode="windows"
        ),
        "the evaluation's prose": prose,
    }
    acts, refs = held_out(model, tok, layer, held)
    test_people = prep.inputs.split("test")
    rows = []
    for label, extra in (("the run's gate", None), ("+ validation prompts' last tokens", asked)):
        gate, stats = fit_context(lat, iv, windows, extra)
        set_context(patch, gate)
        is_open = {f: context_scores(gate, e) > 0 for f, e in ends["test"].items()}
        row = [label, f"{100 * stats['recall']:.1f}%", f"{100 * stats['open_other_pii_doc']:.2f}%"]
        row += [f"{int(o.sum())} / {len(o)}" for o in is_open.values()]
        for name, ref in refs.items():
            got = against_reference(ref, model, lambda: applied(model, layer, patch))
            opened = int((context_scores(gate, acts[name]) > 0).sum())
            row.append(f"{opened} / {got['kl']:.4f}")
        if args.leak:
            with applied(model, layer, patch):
                found = hits(model, tok, test_people, ev, seed)
            worst = max(found, key=lambda a: len(found[a]))
            anyone = set().union(*found.values())
            row.append(f"{len(anyone)} ({worst}: {len(found[worst])})")
        rows.append(row)
    print(f"{cand.label}, layer {layer}; {len(asked)} validation prompts among the positives")
    header = ["gate", "recall (PII context)", "open: other tokens of PII documents"]
    header += [f"test {f}: open at the last token" for f in ends["test"]]
    header += [f"{n}: tokens open / KL" for n in held]
    header += ["test people out, any template attack (worst)"] if args.leak else []
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
