"""Greedy generation speed of the base model vs the folded and exact patches, in one interleaved run.

    python benchmarks/patched_generation.py [--recipe recipes/demo-smollm2.yaml] [--work scalpel-work]
                                            [--n 50] [--batch 8] [--new-tokens 64] [--repeats 5]

Uses the recipe's stages (cached in --work: the leaky model, probe, SAE and features are built if
missing). Runs are interleaved (base, folded, exact, base, ...) and medians reported, because this
machine's run-to-run noise is about ±10%. Targets: folded >= 0.98x base, exact >= 0.95x, folded patch
<= 0.2% of the base parameters. The last row is what users would otherwise write: a forward hook that runs
the whole SAE on every token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from exporter.data.corpus import benign_texts
from exporter.models import layer_output_hook, load_model
from exporter.patch import attached
from exporter.pipeline import (calibration_activations, features_stage, patch_for, probe_stage, resolve_inputs,
                               sae_stage)
from exporter.recipe import load_recipe


def demo_patches(recipe_path: str, work: str, n: int, alpha: float, gated: bool):
    """The recipe's model and its folded and exact patches of |A|=n, alpha (stages cached in `work`, built if
    missing): (loaded model, layer, sae, features, calibration sample, {"folded": patch, "exact": patch})."""
    recipe = load_recipe(recipe_path)
    quiet = lambda _m: None  # noqa: E731
    inputs = resolve_inputs(recipe, progress=False, log=quiet)
    layer = probe_stage(recipe, Path(work), progress=False, log=quiet, inputs=inputs).chosen
    sae, _ = sae_stage(recipe, Path(work), layer, progress=False, log=quiet, inputs=inputs)
    fs = features_stage(recipe, Path(work), layer, sae, inputs=inputs, progress=False, log=quiet)
    loaded = load_model(inputs.model)
    calib = calibration_activations(recipe, inputs, layer, loaded, progress=False)
    return loaded, layer, sae, fs, calib, {mode: patch_for(sae, fs, n, alpha, mode, calib, gated=gated)
                                           for mode in ("folded", "exact")}


def prompts(tok, batch: int):
    """`batch` left-padded prompts of 24 words of held-out prose, and the pad id for generate."""
    tok.padding_side = "left"
    texts = [" ".join(t.split()[:24]) for t in benign_texts(split="heldout")[:batch]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return tok(texts, return_tensors="pt", padding=True), pad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(Path(__file__).parents[1] / "recipes" / "demo-smollm2.yaml"))
    ap.add_argument("--work", default="scalpel-work")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gated", action="store_true", help="behind the PII-context gate (as the demo exports it)")
    ap.add_argument("--json", help="also write the speeds here (benchmarks/performance.py reads it)")
    args = ap.parse_args()

    loaded, layer, sae, fs, _calib, patches = demo_patches(args.recipe, args.work, args.n, args.alpha, args.gated)
    model, tok = loaded.model, loaded.tokenizer
    enc, pad = prompts(tok, args.batch)
    ablate = torch.as_tensor(fs.ablation_set(args.n))

    def runtime_hook(h):
        """A pyvene-style intervention: the full SAE recomputed on every token at every step (dense codes),
        the ablated latents' contribution removed, the reconstruction error kept."""
        z = sae.encode(h.float())
        return (h.float() - z[..., ablate] @ sae.W_dec[ablate] / sae.norm_scale).to(h.dtype)

    def generate(patch):
        hook = layer_output_hook(model, layer, runtime_hook) if patch == "hook" else None
        ctx = hook or (attached(model, layer, patch) if patch is not None else nullcontext())
        with torch.no_grad(), ctx:
            return model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=pad)

    runs = {"base": None, **patches, "runtime SAE hook (pyvene-style)": "hook"}
    generate(None)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, patch in runs.items():
            start = time.perf_counter()
            generate(patch)
            times[name].append(time.perf_counter() - start)
    new_tokens = args.batch * args.new_tokens
    speed = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    base_params = sum(p.numel() for p in model.parameters())
    print(f"# patched generation: {load_recipe(args.recipe).model.describe()} (leaky), layer {layer}, |A|={args.n}, alpha {args.alpha}"
          f"{', context-gated' if args.gated else ''}, "
          f"batch {args.batch} x {args.new_tokens} new tokens, median of {args.repeats} interleaved runs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| run | new tokens/s | vs base | patch parameters | % of base |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        n_params = (sum(t.numel() for t in patches[name].state_dict().values()) if name in patches else
                    sum(p.numel() for p in sae.parameters()) if runs[name] == "hook" else 0)
        print(f"| {name} | {speed[name]:,.1f} | {speed[name] / speed['base']:.3f}x | {n_params:,} | "
              f"{100 * n_params / base_params:.3f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens_per_s": speed, "vs_base": {k: v / speed["base"]
                                                                               for k, v in speed.items()}}))


if __name__ == "__main__":
    main()
