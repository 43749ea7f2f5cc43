"""Where a gated patch's KL comes from: on the held-out prose the trade-off search scores KL on, the
tokens the chosen patch acts on (each text's first token apart: the attention sink) beside its KL.
The patch changes no other token, so every nat of its KL enters through these and the residual
they hand on to the tokens after them.

    python benchmarks/gate_kl.py --recipe R --work W

W is the work folder of a run of R (its cached probe, SAE, features and search are read; nothing is
recomputed). No text or token is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from run_args import run_args

from exporter.evaluate.utility import REFERENCE_BYTES, against_reference, reference
from exporter.lm import right_padded
from exporter.patch import applied
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.scalpel import prepare
from exporter.run.search import kl_texts, search_stage
from exporter.run.stage import FEATURES


@torch.no_grad()
def where_it_acts(model, tok, layer: int, patch, texts: list[str]) -> dict:
    """Counts of the tokens `patch` acts on, first tokens apart, and the first tokens' norms."""
    first = other = n_other = texts_hit = 0
    norms = []
    for enc in right_padded(tok, texts, max_length=128, batch_size=8):
        h = model(**enc, output_hidden_states=True).hidden_states[layer + 1].float()
        acts = patch.acts_on(h) & enc["attention_mask"].bool()
        first += int(acts[:, 0].sum())
        other += int(acts[:, 1:].sum())
        n_other += int(enc["attention_mask"][:, 1:].sum())
        texts_hit += int(acts.any(1).sum())
        norms += h[:, 0].norm(dim=-1).tolist()
    return {"first": first, "other": other, "n_other": n_other, "texts_hit": texts_hit,
            "first_norms": (min(norms), max(norms))}  # fmt: skip


def main() -> None:
    ap = run_args(__doc__)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    ctx = RunContext(Path(args.work), progress=False, log=lambda m: None)
    prep = prepare(recipe, ctx)
    chosen, _ = search_stage(recipe, prep, ctx)
    patch = prep.patch(chosen.candidate)
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    texts = kl_texts(prep.inputs.benign_path)
    got = where_it_acts(model, tok, layer, patch, texts)
    ref = reference(model, tok, texts, max_bytes=REFERENCE_BYTES)
    kl = against_reference(ref, model, lambda: applied(model, layer, patch))
    low, high = got["first_norms"]
    gate_file = FEATURES.folder(ctx.work) / "context_gate.json"
    trained = json.loads(gate_file.read_text())["open_benign"] if gate_file.exists() else None
    rows = [
        ("patch", f"{chosen.candidate.label}, layer {layer}"),
        ("held-out prose texts / with a token patched", f"{len(texts)} / {got['texts_hit']}"),
        ("first tokens patched", f"{got['first']} of {len(texts)}"),
        ("first tokens' residual norm / the sink threshold",
         f"{low:,.0f}-{high:,.0f} / {float(patch.sink_norm):,.0f}"),
        ("other tokens patched",
         f"{got['other']} of {got['n_other']:,} ({100 * got['other'] / got['n_other']:.2f}%)"),
        ("the gate on the training prose (features stage)",
         "-" if trained is None else f"{100 * trained:.2f}% of tokens"),
        ("KL(base ‖ patched), nats/token / perplexity", f"{kl['kl']:.4f} / {kl['perplexity']:.2f}"),
    ]  # fmt: skip
    print(f"\n| {'what':<50} | value |\n|{'-' * 52}|---|")
    for label, value in rows:
        print(f"| {label:<50} | {value} |")


if __name__ == "__main__":
    main()
