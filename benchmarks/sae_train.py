"""SAE training throughput and peak memory: ours (AuxK, sparse backward) vs a plain dense TopK loop.

    python benchmarks/sae_train.py [--steps 20] [--batch 4096] [--d 576] [--expansion 8] [--k 32]
    python benchmarks/sae_train.py --dead 0 0.0125 0.2 [--d 640]

Each variant runs in its own process so peak RSS is its own. Inputs are cached real activations
when `--acts DIR` points at harvested shards, else Gaussian rows of the same width.

With `--dead`, ours alone, with that fraction of the latents held dead: the AuxK term decodes the
top `k_aux` of them per token (all of them when fewer), and its sparse backward costs more than the
k live latents' (`--k-aux`, 256 by default). A short run has no dead latents of its own (a latent
dies after `dead_tokens` without firing), so the step is timed on a fixed mask.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _data(args) -> torch.Tensor:
    if args.acts:
        from pathlib import Path

        from exporter.activations import load_shards

        acts = load_shards(sorted(Path(args.acts).glob("*shard-*.safetensors")))
        return next(iter(acts.acts.values()))
    return torch.randn(
        max(args.batch * 4, 20_000), args.d, generator=torch.Generator().manual_seed(0)
    )


def run_ours(args, x: torch.Tensor) -> dict:
    from exporter.activations import shuffled_batches
    from exporter.recipe import SaeSection
    from exporter.sae import train_sae

    cfg = SaeSection(
        k=args.k,
        expansion=args.expansion,
        batch_size=args.batch,
        train_tokens=args.batch * args.steps,
        warmup_steps=2,
    )
    result = train_sae(shuffled_batches(x, args.batch, seed=0), x[:8192], cfg, progress=False)
    return {"seconds": result.seconds, "steps": result.steps}


def run_plain(args, x: torch.Tensor) -> dict:
    """What a user writes by hand: dense latents, dense decode, no AuxK."""
    d, m = x.shape[1], x.shape[1] * args.expansion
    w_enc = torch.nn.Parameter(torch.randn(m, d) / d**0.5)
    w_dec = torch.nn.Parameter(w_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(m))
    b_pre = torch.nn.Parameter(x[:8192].mean(0).clone())
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_pre], lr=5e-4)
    perm = torch.randperm(len(x))
    start = time.perf_counter()
    for step in range(args.steps):
        idx = perm[(step * args.batch) % (len(x) - args.batch) :][: args.batch]
        xb = x[idx]
        pre = F.linear(xb - b_pre, w_enc, b_enc)
        vals, inds = pre.topk(args.k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, inds, vals.relu())
        loss = (z @ w_dec + b_pre - xb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True)
    return {"seconds": time.perf_counter() - start, "steps": args.steps}


def run_dead(args, x: torch.Tensor) -> dict:
    """Our training step (`_train_step`, as `train_sae` takes it) with a fixed fraction of the
    latents dead: their tokens-since-fired reset to `dead_tokens` before each step."""
    from exporter.recipe import SaeSection
    from exporter.sae.train import _initial_sae, _State, _train_step

    cfg = SaeSection(k=args.k, expansion=args.expansion, k_aux=args.k_aux, batch_size=args.batch)
    sae, _ = _initial_sae(x[:8192], cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=6.25e-10, fused=True)
    order = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(0))
    dead = order[: round(args.variant_dead * sae.d_sae)]
    state = _State(torch.zeros(sae.d_sae, dtype=torch.long))
    batches = [x[i * args.batch : (i + 1) * args.batch] for i in range(len(x) // args.batch)]
    started, first = None, None
    for step in range(args.steps + 2):
        if step == 2:  # two warm-up steps: thread pool, allocator
            started = time.perf_counter()
        state.since_fired.zero_()
        state.since_fired[dead] = cfg.dead_tokens
        batch = batches[step % len(batches)]
        _, _, first = _train_step(sae, opt, batch, state, cfg, args.steps + 2, first)
    return {"seconds": time.perf_counter() - started, "steps": args.steps}


def _child(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant] + argv
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def _header(args, what: str) -> str:
    return (
        f"# {what}: d={args.d}, {args.d * args.expansion} latents, k={args.k}, batch "
        f"{args.batch}, {args.steps} steps, "
        f"{'real activations' if args.acts else 'Gaussian inputs'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )


def dead_table(args) -> None:
    """Step time against the dead fraction; the baseline is the step with none dead."""
    rest = [
        *("--steps", str(args.steps), "--batch", str(args.batch), "--d", str(args.d)),
        *("--expansion", str(args.expansion), "--k", str(args.k), "--k-aux", str(args.k_aux)),
        *(("--acts", args.acts) if args.acts else ()),
    ]
    rows = {f: _child("dead", rest + ["--variant-dead", str(f)]) for f in [0.0, *args.dead]}
    base = rows[0.0]["seconds"] / rows[0.0]["steps"]
    print(_header(args, f"SAE training step against dead latents (k_aux={args.k_aux})"))
    print("| dead latents | AuxK latents per token | s/step | vs none dead | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|")
    m = args.d * args.expansion
    for f, r in rows.items():
        per = r["seconds"] / r["steps"]
        aux = min(args.k_aux, round(f * m))
        print(
            f"| {100 * f:.1f}% ({round(f * m):,}) | {aux} | {per:.3f} | {per / base:.2f}x | "
            f"{r['peak_rss_mb']:,.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--acts", default=None)
    ap.add_argument("--k-aux", type=int, default=256)
    ap.add_argument("--dead", type=float, nargs="+", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant-dead", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        x = _data(args)
        out = {"ours": run_ours, "plain": run_plain, "dead": run_dead}[args.variant](args, x)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    if args.dead:
        dead_table(args)
        return
    rows = {variant: _child(variant, sys.argv[1:]) for variant in ("plain", "ours")}
    base = rows["plain"]["steps"] / rows["plain"]["seconds"]
    print(_header(args, "SAE training"))
    print("| trainer | steps/s | tokens/s | vs plain | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    names = {
        "plain": "plain dense TopK (no AuxK)",
        "ours": "scalpel TopK + AuxK (sparse backward and decoder)",
    }
    for variant, r in rows.items():
        sps = r["steps"] / r["seconds"]
        print(
            f"| {names[variant]} | {sps:.2f} | {sps * args.batch:,.0f} | {sps / base:.2f}x | "
            f"{r['peak_rss_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
