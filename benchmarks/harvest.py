"""Harvest throughput vs the bare full forward pass and vs what users write by hand (a full forward
with `output_hidden_states=True`, the layer's rows gathered without BOS and pads), on the same
batches.

    python benchmarks/harvest.py [--layer 15] [--tokens 8000] [--model smollm2-135m]

Harvesting runs only layers 0..l and skips the LM head, so at layer l of L it should reach at
least 0.9 × L/(l+1) of the full forward's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from exporter.activations import layer_outputs, token_batches
from exporter.data.corpus import benign_texts
from exporter.models import load_model
from exporter.recipe import ModelSpec


def token_sample(tok, tokens: int):
    """Batches (ids, mask) of the benign training windows up to `tokens` real tokens, and their
    count."""
    batches, total = [], 0
    for ids, mask, _ in token_batches(
        tok, benign_texts(split="train", mode="windows"), max_length=256, batch_tokens=4096
    ):
        batches.append((ids, mask))
        total += int(mask.sum())
        if total >= tokens:
            break
    return batches, total


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--json", help="also write the speeds here (benchmarks/performance.py reads it)"
    )
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model(ModelSpec(builtin=args.model))
    model, tok = loaded.model, loaded.tokenizer
    n_layers = loaded.arch.num_layers(model)
    batches, total = token_sample(tok, args.tokens)

    def full():
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def harvest():
        for ids, mask in batches:
            layer_outputs(model, ids, mask, [args.layer])

    def by_hand():
        with torch.no_grad():
            for ids, mask in batches:
                hs = model(
                    input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True
                ).hidden_states
                keep = mask.bool().clone()
                keep[:, 0] = False
                hs[args.layer + 1][keep].clone()

    full()  # warm-up
    times = {
        "full forward": [],
        f"harvest (layers 0..{args.layer})": [],
        "output_hidden_states=True (by hand)": [],
    }
    for _ in range(args.repeats):  # interleaved, so drift hits them alike
        for name, fn in zip(times, (full, harvest, by_hand)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    speeds = {k: total / statistics.median(v) for k, v in times.items()}
    base = speeds["full forward"]
    ideal = n_layers / (args.layer + 1)
    print(
        f"# harvest benchmark: {args.model}, {n_layers} layers, layer {args.layer}, {total} tokens "
        f"x {args.repeats} (median), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print("| run | tokens/s | vs full forward |")
    print("|---|---:|---:|")
    for name, speed in speeds.items():
        print(f"| {name} | {speed:,.0f} | {speed / base:.2f}x |")
    ours, hand = speeds[list(speeds)[1]], speeds[list(speeds)[2]]
    print(
        f"\nL/(l+1) = {ideal:.2f}; target >= 0.9 x that = {0.9 * ideal:.2f}x; measured "
        f"{ours / base:.2f}x; vs output_hidden_states by hand: {ours / hand:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "tokens_per_s": speeds,
                    "vs_full": ours / base,
                    "vs_by_hand": ours / hand,
                    "ideal": ideal,
                }
            )
        )


if __name__ == "__main__":
    main()
