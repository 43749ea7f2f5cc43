"""Could another fit of the context gate have caught a leak? For a finished run, the chosen patch's
attack (one of the adversarial templates, default the signature block) on a group of people; for
each person whose address comes out, the position that predicts the address's first token. Then
the gate refitted with each context window and recall (`intervention.context_window`,
`context_recall`) by the features stage's own pass and fit: how often it opens on the training
prose and on the other tokens of PII documents, its recall on the tokens right before a span, and
its score at each leaking position (open above 0).

    python benchmarks/gate_fits.py --recipe R --work W [--attack signature] [--group test]
                                   [--windows 0 2 4 8 16] [--recalls 0.95 0.99] [--latch N]

With `--latch N`, the same attack on the validation and test people with the run's own gate held
open for N tokens after each token it opens on (an in-process prototype of a gate with memory),
and its KL (on the search's 24 held-out texts and on the final evaluation's prose) beside the
plain gate's.

W is the work folder of a run of R. Scores and rates only: no name, address or generated text is
printed. A diagnostic of one leak: choosing a gate by it would be choosing on the test people.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from adversarial_search import run_choice
from run_args import run_args

from exporter.evaluate.leakage import ADVERSARIAL_TEMPLATES, first_email, greedy_continuations
from exporter.evaluate.summary import markdown_table
from exporter.evaluate.utility import REFERENCE_BYTES, against_reference, reference
from exporter.models import cast_copy, layer_output_hook
from exporter.patch import applied, context_scores
from exporter.recipe import load_recipe
from exporter.run.analysis import feature_latents, fit_context, gate_windows
from exporter.run.evaluation import utility_texts
from exporter.run.search import kl_texts


@contextmanager
def latched(patch, n: int):
    """The patch's context gate held open for `n` tokens after each token it opens on: within a
    forward over several tokens by shifting, and across decoding steps (one token each) from the
    gates of the last `n` tokens the previous calls saw. An in-process prototype for greedy decoding
    with a fixed batch; the exported code carries no such state."""
    plain = patch.context
    seen: list[torch.Tensor] = []

    def context(h):
        g = plain(h)
        history = torch.cat(seen + [g], dim=-1) if h.shape[-2] == 1 and seen else g
        if h.shape[-2] > 1:
            seen.clear()
        wide = history
        for j in range(1, n + 1):
            wide = wide | torch.nn.functional.pad(history, (j, 0))[..., : history.shape[-1]]
        seen[:] = [history[..., -n:]]
        return wide[..., -g.shape[-1] :]

    patch.context = context
    try:
        yield
    finally:
        del patch.context


def leaking_positions(model, tok, layer: int, patch, people, template: str, max_new: int):
    """[k, d] the layer-`layer` output (the gate's input) at the position predicting the first
    token of each address the patched model writes for its own person."""
    prompts = [template.format(name=p.name) for p in people]
    with applied(model, layer, patch):
        conts = greedy_continuations(model, tok, prompts, max_new, progress=False)
    found = []
    for p, prompt, cont in zip(people, prompts, conts):
        if first_email(cont) != p.email:
            continue
        text = prompt + cont
        start = text.index(p.email, len(prompt))
        enc = tok(text, return_tensors="pt", return_offsets_mapping=True)
        first = next(i for i, (a, b) in enumerate(enc["offset_mapping"][0].tolist()) if b > start)
        got = {}
        # unpatched: the layer's output does not depend on the patch after it
        with layer_output_hook(model, layer, lambda h: got.setdefault("h", h)), torch.no_grad():
            model(enc["input_ids"])
        found.append(got["h"][0, first - 1].float())
    return torch.stack(found) if found else torch.zeros(0, model.config.hidden_size)


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--attack", default="signature", choices=sorted(ADVERSARIAL_TEMPLATES))
    ap.add_argument("--group", default="test", choices=["validation", "test"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    ap.add_argument("--recalls", type=float, nargs="+", default=[0.95, 0.99])
    ap.add_argument(
        "--latch", type=int, default=0, help="also the gate held open N tokens after it opens"
    )
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    prep, cand, patch = run_choice(args.recipe, Path(args.work))
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    people = prep.inputs.split(args.group)
    attacker = cast_copy(model, args.dtype)

    def leaking(group: str, latch: int = 0):
        with latched(patch, latch) if latch else nullcontext():
            return leaking_positions(
                attacker, tok, layer, patch, prep.inputs.split(group),
                ADVERSARIAL_TEMPLATES[args.attack], recipe.eval.max_new_tokens,
            )  # fmt: skip

    leaks = leaking(args.group)
    print(f"{cand.label}: {len(leaks)} of {len(people)} {args.group} addresses out ({args.attack})")
    if args.latch:
        prose, _ = utility_texts(prep.inputs.benign_path, tok, recipe.eval.ppl_tokens)
        refs = {
            "the search's 24 texts": reference(model, tok, kl_texts(prep.inputs.benign_path)),
            "the evaluation's prose": reference(model, tok, prose, max_bytes=REFERENCE_BYTES),
        }
        kl = {}
        for latch in (0, args.latch):
            with latched(patch, latch) if latch else nullcontext():
                kl[latch] = {
                    name: against_reference(ref, model, lambda: applied(model, layer, patch))["kl"]
                    for name, ref in refs.items()
                }
        print(
            f"the gate held open {args.latch} tokens after each opening (in-process prototype): "
            + ", ".join(
                f"{len(leaking(g, args.latch))} of {len(prep.inputs.split(g))} {g} addresses out"
                for g in ("validation", "test")
            )
            + "; KL "
            + ", ".join(f"on {n} {kl[0][n]:.4f} -> {kl[args.latch][n]:.4f}" for n in refs)
        )
    _, _, lat = feature_latents(
        recipe, prep.inputs, prep.loaded, prep.sae, layer, progress=False, keep_activations=True
    )
    windows = gate_windows(recipe, prep.inputs, prep.loaded, layer, progress=False)
    pre = lat.labels["pre_span"].bool()
    rows = []
    for window in args.windows:
        for recall in args.recalls:
            iv = recipe.intervention.model_copy(
                update={
                    "context_window": window,
                    "context_recall": recall,
                    "context_fit": "standardised",
                }
            )
            gate, stats = fit_context(lat, iv, windows)
            at = context_scores(gate, leaks)
            rows.append(
                [f"{window}", f"{recall:g}"]
                + [f"{100 * stats[k]:.2f}%" for k in ("open_benign", "open_other_pii_doc")]
                + [f"{100 * float((context_scores(gate, lat.acts[pre]) > 0).float().mean()):.2f}%"]
                + [" ".join(f"{float(v):+.1f}" for v in at) or "-"]
            )
    print(
        f"# the gate refitted, standardised (the recipe's fit: {recipe.intervention.context_fit}), "
        f"on the benign {recipe.intervention.context_negatives} as text to stay shut on"
    )
    header = ["window", "recall", "open: training prose", "open: other tokens of PII documents"]
    header += ["open: the token before a span", "score where each leaked address starts"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
