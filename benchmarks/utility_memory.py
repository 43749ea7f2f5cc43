"""Peak memory and time of the utility metrics (the base's reference log-probs, then KL and
perplexity of a perturbed model against them), with the logits budget (`LOGITS_BYTES`) and without
it (16 texts per forward), and with the reference recomputed batch by batch instead of kept (what
`REFERENCE_BYTES` makes of Gemma's 3.2 GB), each in a fresh process so its peak is its own.

    python benchmarks/utility_memory.py [--model gemma3-270m] [--texts 24]

The perturbed model scales one decoder layer's output by 1.01: deterministic and the same whatever
the batching, so both settings must give the same KL and perplexity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import contextlib, json, sys, time
from exporter.data.corpus import benign_texts
from exporter import lm
from exporter.evaluate import utility
from exporter.models import ModelSpec, load_model
from exporter.timing import PeakMemory

budget, model_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if budget == "none":
    lm.LOGITS_BYTES = 1 << 62
loaded = load_model(ModelSpec(builtin=model_name))
model, tok = loaded.model, loaded.tokenizer
texts = benign_texts(split="heldout")[:n]
layer = loaded.arch.decoder_layers(model)[loaded.arch.num_layers(model) // 2]

def scale(module, args, out):
    return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01

@contextlib.contextmanager
def scaled():
    handle = layer.register_forward_hook(scale)
    try:
        yield
    finally:
        handle.remove()

t = time.perf_counter()
with PeakMemory(interval=0.05) as mem:
    ref = utility.reference(model, tok, texts, max_bytes=0 if budget == "recomputed" else None)
    out = utility.against_reference(ref, model, scaled)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_gib": mem.peak_bytes / 2**30,
                  "model_gib": mem.start_bytes / 2**30, **out}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--texts", type=int, default=24)
    args = ap.parse_args()
    rows = {}
    modes = (
        ("none", "none (16 texts per forward), reference kept"),
        ("default", "LOGITS_BYTES, reference kept"),
        ("recomputed", "LOGITS_BYTES, reference recomputed"),
    )
    for budget, _ in modes:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, budget, args.model, str(args.texts)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[budget] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{args.model}: reference log-probs + KL and perplexity of a perturbed model, "
          f"{args.texts} held-out texts")  # fmt: skip
    print("| logits budget, reference | peak RSS, GiB | model loaded, GiB | seconds | KL | "
          "perplexity |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in modes:
        r = rows[name]
        print(f"| {label} | {r['peak_gib']:.2f} | {r['model_gib']:.2f} | {r['seconds']:.1f} | "
              f"{r['kl']:.6f} | {r['perplexity']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
