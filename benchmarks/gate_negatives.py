"""What the context gate learns from the benign text it is fitted against: the features pass's prose
paragraphs alone, or every window of the training split's benign text besides
(`intervention.context_negatives`). For a finished run, both gates refitted on the same pass at each
recall; for each, the tokens it opens on in held-out text no stage trained on (the held-out windows,
code and tables too; the final evaluation's prose paragraphs; the search's KL texts among them), and
at the run's own recall the KL of the run's chosen patch behind it there.

    python benchmarks/gate_negatives.py --recipe R --work W [--recalls 0.95 0.97 0.99]

W is the work folder of a run of R. Counts, rates and KL only: no text is printed.
"""

from __future__ import annotations

from pathlib import Path

from adversarial_search import run_choice
from run_args import run_args

from exporter.activations import harvest
from exporter.data.corpus import benign_texts
from exporter.evaluate.summary import markdown_table
from exporter.evaluate.utility import REFERENCE_BYTES, against_reference, reference
from exporter.patch import applied, context_scores, set_context
from exporter.recipe import load_recipe
from exporter.run.analysis import feature_latents, fit_context, gate_windows
from exporter.run.evaluation import utility_texts
from exporter.run.search import kl_texts


def held_out_texts(benign_path, tok, ppl_tokens: int) -> dict[str, list[str]]:
    """Benign text no stage trained on, by name: the held-out windows (code and tables too), the
    final evaluation's prose and the search's KL texts among it."""
    prose, _ = utility_texts(benign_path, tok, ppl_tokens)
    return {
        "held-out windows (code and tables too)": benign_texts(
            benign_path, split="heldout", mode="windows"
        ),
        "the evaluation's prose": prose,
        "the search's KL texts": kl_texts(benign_path),
    }


def held_out(model, tok, layer: int, held: dict[str, list[str]]) -> tuple[dict, dict]:
    """For each named list of held-out texts: its layer-`layer` activations (cut at 128 tokens),
    and the model's reference log-probs on it (for KL)."""
    acts = {
        name: harvest(model, tok, texts, [layer], max_length=128, progress=False).acts[layer]
        for name, texts in held.items()
    }
    refs = {
        name: reference(model, tok, texts, max_bytes=REFERENCE_BYTES)
        for name, texts in held.items()
    }
    return acts, refs


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--recalls", type=float, nargs="+", default=[0.95, 0.97, 0.99])
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    prep, cand, patch = run_choice(args.recipe, Path(args.work))
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    iv = recipe.intervention.model_copy(update={"context_negatives": "windows"})
    _, _, lat = feature_latents(
        recipe, prep.inputs, prep.loaded, prep.sae, layer, progress=False, keep_activations=True
    )
    windows = gate_windows(
        recipe.model_copy(update={"intervention": iv}), prep.inputs, prep.loaded, layer,
        progress=False,
    )  # fmt: skip
    held = held_out_texts(prep.inputs.benign_path, tok, recipe.eval.ppl_tokens)
    acts, refs = held_out(model, tok, layer, held)
    print(
        f"{cand.label}, layer {layer}; "
        + ", ".join(f"{n}: {len(a)} tokens" for n, a in acts.items())
    )
    rows = []
    for negatives in ("paragraphs", "windows"):
        for recall in args.recalls:
            fit_iv = iv.model_copy(update={"context_recall": recall})
            gate, stats = fit_context(lat, fit_iv, windows if negatives == "windows" else None)
            opened = {n: int((context_scores(gate, a) > 0).sum()) for n, a in acts.items()}
            kl = {}
            if recall == recipe.intervention.context_recall:
                set_context(patch, gate)
                for name, ref in refs.items():
                    got = against_reference(ref, model, lambda: applied(model, layer, patch))
                    kl[name] = f"{got['kl']:.4f}"
            rows.append(
                [negatives, f"{recall:g}", f"{100 * stats['open_other_pii_doc']:.2f}%"]
                + [f"{opened[n]} / {kl.get(n, '-')}" for n in held]
            )
    header = ["fitted against", "recall", "open: other tokens of PII documents"]
    header += [f"{n}: tokens open / KL" for n in held]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
