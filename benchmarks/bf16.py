"""Whether bfloat16 pays on this machine: a matmul at SmolLM2's width and one training step of its
MLP block, in float32 and in bfloat16, beside the precision the speed settings resolve to
(`exporter.precision`).

    python benchmarks/bf16.py [--repeats 5]

On a CPU with AVX512-BF16 or AMX bfloat16 is about twice as fast; on an AVX2-only CPU it is emulated
and many times slower, and the settings that ask for it run in float32 instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from exporter.precision import compute_dtype, fast_bfloat16


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up: the first call picks kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul(dtype: torch.dtype, n: int = 576, rows: int = 2048):
    a, b = torch.randn(rows, n, dtype=dtype), torch.randn(n, 4 * n, dtype=dtype)
    return lambda: a @ b, 2 * rows * n * 4 * n


def mlp_step(dtype: torch.dtype, n: int = 576, rows: int = 2048):
    """Forward and backward of a SwiGLU MLP of SmolLM2's shape on `rows` tokens."""
    up = torch.nn.Linear(n, 2 * 1536, bias=False).to(dtype)
    down = torch.nn.Linear(1536, n, bias=False).to(dtype)
    x = torch.randn(rows, n, dtype=dtype)

    def step():
        gate, val = up(x).chunk(2, dim=-1)
        down(torch.nn.functional.silu(gate) * val).square().mean().backward()

    return step, 3 * 2 * rows * (n * 2 * 1536 + 1536 * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print("| work | float32 GFLOP/s | bfloat16 GFLOP/s | bfloat16 / float32 |")
    print("|---|---:|---:|---:|")
    for name, make in (("matmul 2048x576 @ 576x2304", matmul), ("MLP step (fwd+bwd)", mlp_step)):
        rates = []
        for dtype in (torch.float32, torch.bfloat16):
            fn, flops = make(dtype)
            rates.append(flops / seconds(fn, args.repeats) / 1e9)
        print(f"| {name} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |")
    print(f"\nnative bfloat16 here: {fast_bfloat16('cpu')}; a bfloat16 speed setting runs in "
          f"{compute_dtype('bfloat16', 'cpu')}")  # fmt: skip


if __name__ == "__main__":
    main()
