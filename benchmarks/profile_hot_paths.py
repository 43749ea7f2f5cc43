"""Where the time goes on the hot paths, by torch.profiler: SAE training steps, harvesting a middle
layer, and greedy decoding with the folded patch. Each prints its top ops by self CPU time; decoding
also times the patch's own work per step (its forward, and the keep mask the model pre-hook builds)
alone at a decoding step's shapes, beside the base model's step.

    python benchmarks/profile_hot_paths.py --work W [--paths sae harvest decode] [--rows 12]

W is the work folder of `scalpel demo --work W` (its SAE-training activations, its chosen patch).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from harvest import token_sample
from patched_generation import demo_patches, prompts
from torch.profiler import ProfilerActivity, profile, record_function


@contextmanager
def profiled(title: str, rows: int):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        yield prof
        wall = time.perf_counter() - start
    print(f"\n## {title}: {wall:.2f} s under the profiler; top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(calls // 10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def sae_steps(x: torch.Tensor, rows: int, steps: int = 12) -> None:
    from exporter.activations import shuffled_batches
    from exporter.recipe import SaeSection
    from exporter.sae import train_sae

    cfg = SaeSection(k=32, expansion=8, batch_size=4096, train_tokens=4096 * steps, warmup_steps=2)
    train_sae(shuffled_batches(x, 4096, seed=0), x[:8192], cfg, progress=False)  # warm-up
    with profiled(
        f"SAE training, {steps} steps of batch 4096 (d={x.shape[1]}, {x.shape[1] * 8} latents, "
        "k=32)",
        rows,
    ):
        train_sae(shuffled_batches(x, 4096, seed=0), x[:8192], cfg, progress=False)


def harvesting(loaded, layer: int, rows: int, tokens: int = 4000) -> None:
    from exporter.activations import layer_outputs

    batches, total = token_sample(loaded.tokenizer, tokens)
    layer_outputs(loaded.model, *batches[0], [layer])  # warm-up
    with profiled(f"harvesting layer {layer}, {total:,} tokens", rows):
        for ids, mask in batches:
            layer_outputs(loaded.model, ids, mask, [layer])


def decoding(loaded, layer: int, patch, rows: int, batch: int = 8, new_tokens: int = 32) -> None:
    from exporter.patch import attached

    model, tok = loaded.model, loaded.tokenizer
    enc, pad = prompts(tok, batch)

    def generate():
        with torch.no_grad():
            model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    forward = patch.forward

    def labelled(*a, **kw):  # the patch's ops grouped under one label in the profile
        with record_function("scalpel patch forward"):
            return forward(*a, **kw)

    generate()  # warm-up
    with profiled(f"greedy decoding, base, batch {batch} x {new_tokens} new tokens", rows):
        generate()
    patch.forward = labelled
    try:
        with attached(model, layer, patch):
            # The first patched generation under a profiler runs its KV-cache concatenations 4-5x
            # slower (not so unprofiled, where the folded patch runs within 1% of the base): profile
            # the second.
            with profile(activities=[ProfilerActivity.CPU]):
                generate()
            with profiled(f"greedy decoding, folded patch after layer {layer}", rows) as prof:
                generate()
        mine = next((e for e in prof.key_averages() if e.key == "scalpel patch forward"), None)
        if mine is not None:
            print(
                f"inside the patch's forward: {mine.cpu_time_total / 1000:.1f} ms in {mine.count} "
                "calls"
            )
    finally:
        del patch.forward
    h = torch.randn(batch, 1, patch.steer.shape[-1])
    with torch.no_grad():
        step = per_call_us(lambda: model(input_ids=enc["input_ids"][:, :1]), 50)
        print(
            f"\none decoding step of batch {batch}, timed alone: patch forward "
            f"{per_call_us(lambda: patch(h)):.1f} us; a base forward of one token (no cache) "
            f"{step / 1000:.2f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--recipe", default=str(Path(__file__).parents[1] / "recipes" / "demo-smollm2.yaml")
    )
    ap.add_argument("--work", required=True)
    ap.add_argument(
        "--paths",
        nargs="*",
        default=["sae", "harvest", "decode"],
        choices=["sae", "harvest", "decode"],
    )
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    chosen = json.loads((Path(args.work) / "search" / "search.json").read_text())["chosen"]
    loaded, layer, _sae, _fs, calib, patches = demo_patches(
        args.recipe, args.work, chosen["n"], chosen["alpha"], chosen.get("gated", False)
    )
    print(
        f"# hot paths: torch {torch.__version__}, {torch.get_num_threads()} threads; the demo's "
        f"leaky SmolLM2, layer {layer}, patch N={chosen['n']} alpha {chosen['alpha']:g}"
    )
    if "sae" in args.paths:  # the calibration sample: 50,000 of the SAE's own training activations
        sae_steps(calib.calibration, args.rows)
    if "harvest" in args.paths:
        harvesting(loaded, layer, args.rows)
    if "decode" in args.paths:
        decoding(loaded, layer, patches["folded"], args.rows)


if __name__ == "__main__":
    main()
