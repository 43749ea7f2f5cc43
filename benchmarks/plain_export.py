"""Plain export vs what a user would otherwise write (load the model, edit, save_pretrained): wall
time and peak memory, each in its own fresh process, in one run.

    python benchmarks/plain_export.py [--model DIR] [--layer 13] [--n 150] [--repeats 3]

--model is an HF folder with safetensors weights (default: the demo's leaky SmolLM2, built if
missing). The edit projects --n random directions out of the writers through --layer and adds a
steering bias: the content of the directions does not change the cost. The baseline loads the
whole model with `from_pretrained`, applies the same projection in memory and saves with
`save_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time, torch
from pathlib import Path
kind, src, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
layer, n = int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
start = time.perf_counter()
if kind == "plain":
    from transformers import AutoConfig
    d = AutoConfig.from_pretrained(src).hidden_size
    from exporter.patch.plain import write_plain
    write_plain(src, out, torch.randn(n, d, generator=g), layer, steer=torch.randn(d, generator=g))
else:
    from transformers import AutoModelForCausalLM
    from exporter.patch import projected
    from exporter.patch.plain import orthonormal_basis
    from exporter.models import architecture_of
    model = AutoModelForCausalLM.from_pretrained(src)
    d = model.config.hidden_size
    q = orthonormal_basis(torch.randn(n, d, generator=g))
    if model.config.tie_word_embeddings:  # the LM head keeps the original embedding
        tied = model.get_input_embeddings().weight.detach().clone()
        model.get_output_embeddings().weight = torch.nn.Parameter(tied)
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        for name, module in architecture_of(model).residual_writers(model, upto=layer):
            w = module.weight
            rows = isinstance(module, torch.nn.Embedding)
            w.copy_(w - (w @ q) @ q.T if rows else w - q @ (q.T @ w))
    model.save_pretrained(out)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak}))
"""


def _run(kind: str, src: Path, layer: int, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                kind,
                str(src),
                str(Path(tmp) / "out"),
                str(layer),
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--layer", type=int, default=13)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--json", help="also write the medians here (benchmarks/performance.py reads it)"
    )
    args = ap.parse_args()
    if args.model is None:
        from exporter.recipe import ModelSpec
        from exporter.run.context import RunContext
        from exporter.run.leaky import make_leaky

        quiet = RunContext(log=lambda m: None)
        src = make_leaky(ModelSpec(builtin="smollm2-135m"), ctx=quiet).path
    else:
        src = Path(args.model)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20
    runs: dict[str, list[dict]] = {"save_pretrained (baseline)": [], "plain export": []}
    for _ in range(args.repeats):  # interleaved: this machine's run-to-run noise is about ±10%
        runs["save_pretrained (baseline)"].append(_run("baseline", src, args.layer, args.n))
        runs["plain export"].append(_run("plain", src, args.layer, args.n))
    print(
        f"# plain export: {src.name} ({size:.0f} MiB of safetensors), layer {args.layer}, "
        f"|A|={args.n}, median of {args.repeats} interleaved fresh processes, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("| run | wall s | peak RSS MiB | vs baseline (time) | vs baseline (memory) |")
    print("|---|---:|---:|---:|---:|")
    base = runs["save_pretrained (baseline)"]
    t0, m0 = (
        statistics.median(r["seconds"] for r in base),
        statistics.median(r["peak_mib"] for r in base),
    )
    medians = {}
    for name, rs in runs.items():
        t, m = (
            statistics.median(r["seconds"] for r in rs),
            statistics.median(r["peak_mib"] for r in rs),
        )
        medians[name] = {"seconds": t, "peak_mib": m}
        print(f"| {name} | {t:.1f} | {m:.0f} | {t / t0:.2f}x | {m / m0:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(medians))


if __name__ == "__main__":
    main()
