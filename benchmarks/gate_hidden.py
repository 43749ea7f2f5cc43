"""A linear context gate beside gates with a hidden layer of ReLU units
(`intervention.context_hidden`), all fitted on the same tokens: the features stage's pass and the
training split's benign windows, with every fifth document of the pass held out so that each
gate's recall is also measured on PII documents it never saw. For each gate: its recall, how often
it opens on benign and other PII-document tokens, the tokens it opens on in held-out text no stage
trained on (held-out windows, code and tables too; the final evaluation's prose; the search's KL
texts), and with `--kl` the KL one patch costs there behind it (a few minutes per gate).

    python benchmarks/gate_hidden.py --recipe R --work W [--candidate N:alpha] [--hidden 16 64]
                                     [--linear scaled standardised] [--kl]

W is the work folder of a run of R (its cached probe, SAE and features are read). The patch is the
search's choice, or `--candidate` (folded, gated) when the search has not run. Counts, rates and KL
only: no text is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from adversarial_search import run_choice
from gate_negatives import held_out, held_out_texts
from run_args import run_args
from who_leaks import parse_candidate

from exporter.evaluate.summary import markdown_table
from exporter.evaluate.utility import against_reference
from exporter.features import context_positives
from exporter.patch import applied, context_scores, fit_context_gate, fit_context_mlp
from exporter.recipe import load_recipe
from exporter.run.analysis import feature_latents, gate_windows
from exporter.run.context import RunContext
from exporter.run.scalpel import prepare


def rate(opened: torch.Tensor, rows: torch.Tensor) -> str:
    return f"{100 * float(opened[rows].float().mean()):.2f}%"


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--candidate", help="N:alpha instead of the search's choice")
    ap.add_argument("--hidden", type=int, nargs="+", default=[16, 64])
    ap.add_argument(
        "--linear", nargs="*", default=["scaled", "standardised"], help="linear fits to compare"
    )
    ap.add_argument("--kl", action="store_true", help="also the patch's KL behind each gate")
    ap.add_argument("--json")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    if args.candidate:
        prep = prepare(recipe, RunContext(work, progress=False, log=print))
        cand = parse_candidate(args.candidate)
        patch = prep.patch(cand)
    else:
        prep, cand, patch = run_choice(args.recipe, work)
    iv = recipe.intervention
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    _, _, lat = feature_latents(
        recipe, prep.inputs, prep.loaded, prep.sae, layer, progress=False, keep_activations=True
    )
    windows = gate_windows(recipe, prep.inputs, prep.loaded, layer, progress=False)
    windows = torch.zeros(0, lat.acts.shape[1]) if windows is None else windows
    held = held_out_texts(prep.inputs.benign_path, tok, recipe.eval.ppl_tokens)
    acts, refs = held_out(model, tok, layer, held)

    pos = context_positives(lat.labels, iv.context_window)
    benign, hold = lat.benign, lat.labels["doc"] % 5 == 0
    x = torch.cat([lat.acts.float(), windows.float()])
    y = torch.cat([pos, torch.zeros(len(windows), dtype=torch.bool)])
    fit = torch.cat([~hold, torch.ones(len(windows), dtype=torch.bool)])
    # the linear fits the features stage chooses between (`intervention.context_fit`)
    gates = {
        f"linear ({name})": fit_context_gate(x[fit], y[fit], iv.context_recall, standardise=std)
        for name, std in (("scaled", False), ("standardised", True))
        if name in args.linear
    }
    for h in args.hidden:
        gates[f"hidden layer of {h}"] = fit_context_mlp(x[fit], y[fit], iv.context_recall, h)

    print(
        f"{cand.label}, layer {layer}; {int(pos.sum())} PII-context tokens, "
        + ", ".join(f"{n}: {len(a)} tokens" for n, a in acts.items())
    )
    rows, out = [], {}
    for name, gate in gates.items():
        opened = context_scores(gate, lat.acts) > 0
        patch.context = lambda h, gate=gate: context_scores(gate, h) > 0
        kl = {
            n: against_reference(ref, model, lambda: applied(model, layer, patch))["kl"]
            for n, ref in refs.items()
            if args.kl
        }
        counts = {n: int((context_scores(gate, a) > 0).sum()) for n, a in acts.items()}
        rows.append(
            [
                name,
                rate(opened, pos & ~hold),
                rate(opened, pos & hold),
                rate(opened, benign & hold),
                rate(opened, ~pos & ~benign),
            ]
            + [f"{counts[n]}" + (f" / {kl[n]:.4f}" if args.kl else "") for n in held]
        )
        out[name] = {"counts": counts, "kl": kl}
        print(" | ".join(rows[-1]), flush=True)
    header = [
        "gate",
        "recall (documents fitted on)",
        "recall (held-out documents)",
        "open: held-out benign paragraphs",
        "open: other tokens of PII documents",
    ] + [f"{n}: tokens open" + (" / KL" if args.kl else "") for n in held]
    print(markdown_table(header, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
