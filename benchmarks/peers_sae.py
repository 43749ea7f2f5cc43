"""SAE training against what users would otherwise run, on identical inputs in one run: ours
(`exporter.sae.train_sae`: AuxK, sparse backward, bf16 encoder matmul), EleutherAI's sparsify
(`eai-sparsify`: its SparseCoder forward and backward, its default optimizer, schedule-free signum
at its default learning rate, the decoder kept unit-norm as its trainer does) and SAELens
(`sae-lens`: TopKTrainingSAE's own training_forward_pass with its AuxK loss, Adam at its default
learning rate with its gradient clipping). Each trainer takes its own step on the same shuffled
batches of the demo's harvested activations, in its own process (so peak RSS is its own); FVU is
taken by each SAE's own encode/decode on the same held-out tokens.

    pip install -e ".[bench]"      # eai-sparsify, sae-lens
    python benchmarks/peers_sae.py [--tokens 2000000] [--batch 4096] [--k 32] [--expansion 8]

The activations are the demo recipe's layer-13 training activations of the leaky SmolLM2 (harvested
and cached by `scalpel demo`), the held-out ones its held-out text, harvested here.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
name, data, tokens, batch = sys.argv[1], torch.load(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
k, expansion = int(sys.argv[6]), int(sys.argv[7])
x, held = data["train"], data["held"]
d, n_lat = x.shape[1], x.shape[1] * expansion
steps = tokens // batch
g = torch.Generator().manual_seed(0)

def batches():
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            yield x[perm[i:i + batch]]

stream = batches()
out = {"trainer": name}
if name == "ours":
    from exporter.recipe import SaeSection
from exporter.sae import train_sae
    cfg = SaeSection(
        k=k, expansion=expansion, batch_size=batch, train_tokens=tokens, checkpoint_every=10**9
    )
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:20000]]
    start = time.perf_counter()
    result = train_sae(stream, sample, cfg, progress=False)
    seconds = time.perf_counter() - start
    sae = result.sae
    with torch.no_grad():
        values, indices = sae.topk(held)
        recon = sae.decode_sparse(values, indices)
        fired = torch.zeros(n_lat, dtype=torch.bool); fired[indices[values > 0]] = True
    out["version"] = "this tree"
elif name == "sparsify":
    import importlib.metadata
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n_lat, k=k))
    lr = 5e-3 / (n_lat / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]),
                              momentum=0.95)
    opt.train()
    start = time.perf_counter()
    for step in range(steps):
        xb = next(stream)
        if step == 0:
            sae.b_dec.data = xb.mean(0)  # as its trainer does on the first batch
        sae.set_decoder_norm_to_unit_norm()
        fwd = sae(xb)
        fwd.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step(); opt.zero_grad()
    seconds = time.perf_counter() - start
    opt.eval()  # schedule-free: evaluate at the averaged weights
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(held)
        recon = sae.decode(top_acts, top_indices)
        fired = torch.zeros(n_lat, dtype=torch.bool); fired[top_indices[top_acts > 0]] = True
    out["version"] = importlib.metadata.version("eai-sparsify")
elif name == "sae-lens":
    import importlib.metadata
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    config = TopKTrainingSAEConfig(d_in=d, d_sae=n_lat, k=k, dtype="float32", device="cpu")
    sae = TopKTrainingSAE(config)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))  # its runner's defaults
    since_fired = torch.zeros(n_lat)
    coefficients = {key: getattr(v, "value", v) for key, v in sae.get_coefficients().items()}
    start = time.perf_counter()
    for step in range(steps):
        xb = next(stream)
        step_out = sae.training_forward_pass(TrainStepInput(
            sae_in=xb, coefficients=coefficients, dead_neuron_mask=since_fired > 1000,
            n_training_steps=step,
            is_logging_step=False))
        with torch.no_grad():
            since_fired += 1
            since_fired[step_out.feature_acts.bool().any(0)] = 0
        step_out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step(); opt.zero_grad()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acts = sae.encode(held)
        recon = sae.decode(acts)
        fired = (acts > 0).any(0)
    out["version"] = importlib.metadata.version("sae-lens")
else:
    raise SystemExit(f"unknown trainer {name}")
with torch.no_grad():
    fvu = float((held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
dead = float(1 - fired.float().mean())
out.update(seconds=seconds, steps=steps, tokens=steps * batch, fvu=fvu, dead=dead,
           peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trainers", nargs="*", default=["ours", "sparsify", "sae-lens"])
    ap.add_argument("--json", help="also write the rows here (benchmarks/performance.py reads it)")
    args = ap.parse_args()

    from exporter.models import load_model
    from exporter.recipe import load_recipe
    from exporter.run.context import RunContext
    from exporter.run.inputs import heldout_activations, resolve_inputs, training_activations

    recipe = load_recipe(Path(__file__).parents[1] / "exporter" / "recipes" / "demo-smollm2.yaml")
    inputs = resolve_inputs(recipe, RunContext(progress=False, log=lambda m: None))
    layer = 13
    loaded = load_model(inputs.model)
    train = training_activations(recipe, inputs, loaded, layer, RunContext()).float()
    # the few huge-norm tokens, for all alike
    train = train[train.norm(dim=1) <= 20 * train.norm(dim=1).median()]
    held = heldout_activations(recipe, inputs, loaded, layer, progress=False).float()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "acts.pt"
        torch.save({"train": train, "held": held}, data)
        for name in args.trainers:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    name,
                    str(data),
                    str(args.tokens),
                    str(args.batch),
                    str(args.threads),
                    str(args.k),
                    str(args.expansion),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or "RESULT " not in proc.stdout:
                why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"trainer": name, "error": why})
                continue
            rows.append(json.loads(proc.stdout.rsplit("RESULT ", 1)[1]))
    ok = [r for r in rows if "error" not in r]
    ours = next((r for r in ok if r["trainer"] == "ours"), None)
    print(
        f"# SAE training: d={train.shape[1]}, {train.shape[1] * args.expansion} latents, "
        f"k={args.k}, batch {args.batch}, {args.tokens:,} tokens of the leaky SmolLM2's "
        f"layer-{layer} activations ({len(train):,} unique), held-out FVU on {len(held):,} tokens; "
        f"{args.threads} threads, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, python {platform.python_version()}"
    )
    print(
        "| trainer | version | steps/s | tokens/s | ours vs it (tokens/s) | held-out FVU | dead "
        "(held-out) | peak RSS MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['trainer']} | not run: {r['error']} | | | | | | |")
            continue
        rate = r["tokens"] / r["seconds"]
        ratio = f"{(ours['tokens'] / ours['seconds']) / rate:.2f}x" if ours else "-"
        print(
            f"| {r['trainer']} | {r['version']} | {r['steps'] / r['seconds']:.2f} | {rate:,.0f} | "
            f"{ratio} | {r['fvu']:.4f} | {100 * r['dead']:.1f}% | {r['peak_rss_mib']:,.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
