"""Greedy generation speed of the base model vs the folded and exact patches, in one interleaved run
per batch size.

    python benchmarks/patched_generation.py [--recipe recipes/demo-smollm2.yaml]
        [--work scalpel-work] [--n 50] [--batch 8 1] [--new-tokens 64] [--repeats 5] [--gated]

Uses the recipe's stages (cached in --work: the leaky model, probe, SAE and features are built if
missing). The patches run as an export runs them: inserted at their decoder layer. Runs are
interleaved (base, folded, exact, base, ...) and medians reported, because this machine's run-to-run
noise is about ±10%. Targets: folded >= 0.98x base at every batch size, exact >= 0.95x, folded patch
<= 0.2% of the base parameters. With --gated, the rows "no shortcut" run the same patches without
the branch that returns a decoding step untouched when the context gate is shut on all of its tokens
(what torch.compile runs): they show whether that branch pays. The last row is what users would
otherwise write: a forward hook that runs the whole SAE on every token.
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
from exporter.models import layer_output_hook
from exporter.patch import attached
from exporter.patch.candidate import Candidate
from exporter.patch.remote import scalpel_patch
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.scalpel import prepare


def demo_patches(recipe_path: str, work: str, n: int, alpha: float, gated: bool):
    """The recipe's model and its folded and exact patches of |A|=n, alpha (stages cached in `work`,
    built if missing): (loaded model, layer, sae, features, calibration sample, {"folded": patch,
    "exact": patch})."""
    prep = prepare(
        load_recipe(recipe_path), RunContext(Path(work), progress=False, log=lambda _m: None)
    )
    patches = {mode: prep.patch(Candidate(n, alpha, mode, gated)) for mode in ("folded", "exact")}
    return prep.loaded, prep.layer, prep.sae, prep.features, prep.calibration, patches


def prompts(tok, batch: int):
    """`batch` left-padded prompts of 24 words of held-out prose (one alone: no padding), and the
    pad id."""
    tok.padding_side = "left"
    texts = [" ".join(t.split()[:24]) for t in benign_texts(split="heldout")[:batch]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return tok(texts, return_tensors="pt", padding=True), pad


def speeds(
    model, layer: int, runs: dict, enc, pad, new_tokens: int, repeats: int
) -> dict[str, float]:
    """New tokens/s of each run (a patch, "hook", or None for the base), median of `repeats`
    interleaved rounds."""

    def generate(patch):
        shortcut = True
        # (patch, "no shortcut"): as under torch.compile, where the branch is not taken
        if isinstance(patch, tuple):
            patch, shortcut = patch[0], False
        hook = (
            layer_output_hook(model, layer, patch)
            if callable(patch) and not isinstance(patch, torch.nn.Module)
            else None
        )
        ctx = hook or (attached(model, layer, patch) if patch is not None else nullcontext())
        compiling = scalpel_patch._compiling
        scalpel_patch._compiling = compiling if shortcut else (lambda: True)
        try:
            with torch.no_grad(), ctx:
                return model.generate(
                    **enc,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
        finally:
            scalpel_patch._compiling = compiling

    generate(None)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, patch in runs.items():
            start = time.perf_counter()
            generate(patch)
            times[name].append(time.perf_counter() - start)
    return {
        k: enc["input_ids"].shape[0] * new_tokens / statistics.median(v) for k, v in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--recipe", default=str(Path(__file__).parents[1] / "recipes" / "demo-smollm2.yaml")
    )
    ap.add_argument("--work", default="scalpel-work")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--gated", action="store_true", help="behind the PII-context gate (as the demo exports it)"
    )
    ap.add_argument(
        "--json", help="also write the speeds here (benchmarks/performance.py reads it)"
    )
    args = ap.parse_args()

    loaded, layer, sae, fs, _calib, patches = demo_patches(
        args.recipe, args.work, args.n, args.alpha, args.gated
    )
    model, tok = loaded.model, loaded.tokenizer
    ablate = torch.as_tensor(fs.ablation_set(args.n))

    def runtime_hook(h):
        """A pyvene-style intervention: the full SAE recomputed on every token at every step (dense
        codes), the ablated latents' contribution removed, the reconstruction error kept."""
        z = sae.encode(h.float())
        return (h.float() - z[..., ablate] @ sae.W_dec[ablate] / sae.norm_scale).to(h.dtype)

    runs: dict = {"base": None, "folded": patches["folded"], "exact": patches["exact"]}
    if args.gated:
        runs.update(
            {
                "folded, no shortcut": (patches["folded"], "no shortcut"),
                "exact, no shortcut": (patches["exact"], "no shortcut"),
            }
        )
    runs["runtime SAE hook (pyvene-style)"] = runtime_hook
    base_params = sum(p.numel() for p in model.parameters())
    print(
        f"# patched generation: {load_recipe(args.recipe).model.describe()} (leaky), layer "
        f"{layer}, |A|={args.n}, alpha {args.alpha}{', context-gated' if args.gated else ''}, "
        f"{args.new_tokens} new tokens, median of {args.repeats} interleaved runs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    results = {}
    for batch in args.batch:
        enc, pad = prompts(tok, batch)
        speed = speeds(model, layer, runs, enc, pad, args.new_tokens, args.repeats)
        results[batch] = speed
        print(f"\nbatch {batch}:\n")
        print("| run | new tokens/s | vs base | patch parameters | % of base |")
        print("|---|---:|---:|---:|---:|")
        for name, patch in runs.items():
            p = patch[0] if isinstance(patch, tuple) else patch
            n_params = (
                sum(t.numel() for t in p.state_dict().values())
                if isinstance(p, torch.nn.Module)
                else sum(q.numel() for q in sae.parameters())
                if p is runtime_hook
                else 0
            )
            print(
                f"| {name} | {speed[name]:,.1f} | {speed[name] / speed['base']:.3f}x | "
                f"{n_params:,} | {100 * n_params / base_params:.3f}% |"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    str(b): {"tokens_per_s": v, "vs_base": {k: x / v["base"] for k, x in v.items()}}
                    for b, v in results.items()
                }
            )
        )


if __name__ == "__main__":
    main()
