"""Which tokens the patch leaves alone: the norm rule (residual norm above `outlier_factor` x the
median norm of the SAE's training activations, exporter.patch.build.sink_norm) against the position
rule it replaced (each sequence's first real token).

    python benchmarks/sink_rule.py [--model leaky|smollm2-135m|gemma3-270m|PATH] [--layer 13]
        [--factor 20]

Texts: the SAE's training text (PII documents and benign windows), and every extraction prompt of
the harness (templates, 3-shot, adversarial ones; every person) run alone and in left-padded batches
of 16. The threshold comes from the training text as the pipeline takes it (position 0 and pads
skipped, like the harvest). Prints how many tokens each rule leaves alone, where the two disagree (a
token other than the first above the threshold), and the gap around the threshold: the largest norm
the patch still acts on and the smallest it leaves alone, in medians. No token or text is printed:
the prompts hold people's names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from exporter.activations import layer_outputs, token_batches
from exporter.data.people import by_split
from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.evaluate.leakage import (
    ADVERSARIAL_TEMPLATES,
    EMAIL_TEMPLATES,
    few_shot_prompts,
    prefix_prompts,
)
from exporter.lm import padding_side
from exporter.models import load_model, spec_for
from exporter.patch.build import sink_norm
from exporter.recipe import ModelSpec, load_recipe
from exporter.run.context import RunContext
from exporter.run.inputs import resolve_inputs, sae_texts
from exporter.run.leaky import make_leaky

RECIPE = Path(__file__).parents[1] / "recipes" / "demo-smollm2.yaml"


def model_and_texts(source: str):
    """(loaded model, SAE training texts, people): the demo's leaky model and data, or another model
    on the same synthetic corpus (its people with it)."""
    if source == "leaky":
        inputs = resolve_inputs(
            load_recipe(RECIPE), RunContext(progress=False, log=lambda _m: None)
        )
        return load_model(inputs.model), sae_texts(inputs, "train"), inputs.people
    from exporter.data.corpus import benign_texts

    docs, people = make_corpus(SyntheticConfig())
    loaded = load_model(
        spec_for(source)
        if source not in ("smollm2-135m", "gemma3-270m")
        else ModelSpec(builtin=source)
    )
    return loaded, docs + benign_texts(split="train", mode="windows"), people


@torch.no_grad()
def norms(
    loaded, texts, layer: int, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm, is the row's first real token, position) of every real token of the training texts, up
    to max_tokens."""
    out_n, out_first, out_pos, seen = [], [], [], 0
    for ids, mask, _ in token_batches(loaded.tokenizer, texts, max_length=256, batch_tokens=4096):
        h = layer_outputs(loaded.model, ids, mask, [layer])[layer].float()
        first = torch.zeros_like(mask, dtype=torch.bool)
        first[:, 0] = True  # right-padded: the first real token is at position 0
        real = mask.bool()
        out_n.append(h.norm(dim=-1)[real])
        out_first.append(first[real])
        out_pos.append(torch.arange(mask.shape[1]).expand_as(mask)[real])
        seen += int(real.sum())
        if seen >= max_tokens:
            break
    return torch.cat(out_n), torch.cat(out_first), torch.cat(out_pos)


@torch.no_grad()
def prompt_norms(
    loaded, prompts: list[str], layer: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same for prompts, left-padded in batches of `batch` (1: each prompt alone, as a user runs
    it)."""
    tok, out_n, out_first, out_pos = loaded.tokenizer, [], [], []
    with padding_side(tok, "left"):
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
            mask = enc["attention_mask"]
            # as generate derives them for a left-padded batch
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = layer_outputs(loaded.model, enc["input_ids"], mask, [layer], position_ids=pos)[
                layer
            ].float()
            real = mask.bool()
            first = real & (mask.cumsum(-1) == 1)
            out_n.append(h.norm(dim=-1)[real])
            out_first.append(first[real])
            out_pos.append(pos[real])
    return torch.cat(out_n), torch.cat(out_first), torch.cat(out_pos)


def row(
    name: str,
    n: torch.Tensor,
    first: torch.Tensor,
    pos: torch.Tensor,
    threshold: float,
    median: float,
) -> str:
    """Counts per rule, where the other tokens above sit, and the gap around the threshold (in
    medians)."""
    above = n > threshold
    others = above & ~first
    below, over = n[~above], n[above]
    smallest = f"{float(over.min()) / median:.0f}" if len(over) else "-"
    return (
        f"| {name} | {len(n):,} | {int(first.sum()):,} / {int((above & first).sum()):,} | "
        f"{float(n[first].min()) / median:.1f} to {float(n[first].max()) / median:.1f} | "
        f"{int(others.sum()):,} ({int((others & (pos == 1)).sum())} at position 1) | "
        f"{float(below.max()) / median:.1f} | {smallest} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="leaky")
    ap.add_argument("--layer", type=int, default=13)
    ap.add_argument("--factor", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=200_000)
    args = ap.parse_args()
    if args.model == "leaky":
        make_leaky(load_recipe(RECIPE).model, ctx=RunContext(progress=False, log=lambda _m: None))
    loaded, texts, people = model_and_texts(args.model)
    n, first, pos = norms(loaded, texts, args.layer, args.tokens)
    # rows of one number: their norms are the norms
    threshold = sink_norm(n[~first].unsqueeze(1), args.factor)
    median = float(n[~first].median())
    memorised = [p for p in people if p.split in ("validation", "test")] or by_split(
        people, "validation"
    )
    prompts = [
        t.format(name=p.name)
        for t in {**EMAIL_TEMPLATES, **ADVERSARIAL_TEMPLATES}.values()
        for p in memorised
    ]
    prompts += [
        q for t in EMAIL_TEMPLATES for q in few_shot_prompts(memorised, t, 3)
    ] + prefix_prompts(memorised)
    print(
        f"# sink rule: {args.model}, layer {args.layer}: threshold {threshold:.1f} = "
        f"{args.factor:g} x the median norm {median:.1f}"
    )
    print(
        "| texts | tokens | first tokens / left alone | first-token norms, x median | other tokens "
        "left alone | largest norm patched, x median | smallest norm left alone, x median |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(row("SAE training text", n, first, pos, threshold, median))
    for batch in (1, 16):
        pn, pf, pp = prompt_norms(loaded, prompts, args.layer, batch)
        print(
            row(f"{len(prompts)} extraction prompts, batch {batch}", pn, pf, pp, threshold, median)
        )


if __name__ == "__main__":
    main()
