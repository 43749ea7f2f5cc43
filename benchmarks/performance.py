"""The four performance comparisons in one run, one table each, under one header naming the
hardware, the versions and the settings, and a last table checking each against its target.

    # eai-sparsify and sae-lens, the SAE-training peers (without them their rows say why)
    pip install -e ".[bench]"
    python benchmarks/performance.py --work W [--only sae harvest generation export]
        [--out performance.md]

W is the work folder of `scalpel demo --work W`: the generation comparison uses the patch its search
chose (N, alpha, context gate) and its cached stages. Each comparison is its own script
(peers_sae.py, harvest.py, patched_generation.py, plain_export.py), run here in a fresh process one
after the other, so one's memory peak or crash does not touch the next; each measures its ratios
within its own run on identical inputs. Nothing else should run meanwhile: on 2 cores a second job
slows everything 3-5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).parent
PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "huggingface-hub",
    "eai-sparsify",
    "sae-lens",
    "scalpel-exporter",
)


def hardware() -> str:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        )
        flags = set(
            next(
                line.split(":", 1)[1].split()
                for line in info.splitlines()
                if line.startswith("flags")
            )
        )
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    isa = (
        ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        or "unknown"
    )
    return f"{cpu}; {os.cpu_count()} logical cores; {memory:.0f} GiB; {isa}; {platform.platform()}"


def versions() -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"python {platform.python_version()}, " + ", ".join(
        f"{p} {version(p)}" for p in PACKAGES
    )


def comparisons(args, chosen: dict) -> dict[str, list[str]]:
    """name -> the script's command line (after `python benchmarks/`)."""
    gen = [
        "patched_generation.py",
        "--work",
        args.work,
        "--n",
        str(chosen["n"]),
        "--alpha",
        str(chosen["alpha"]),
    ]
    return {
        "sae": ["peers_sae.py", "--tokens", str(args.sae_tokens)],
        "harvest": ["harvest.py", "--layer", str(chosen["layer"])],
        "generation": gen + (["--gated"] if chosen.get("gated") else []),
        "export": ["plain_export.py", "--layer", str(chosen["layer"])],
    }


def verdicts(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(comparison, target, measured, met) for each comparison that ran."""
    rows = []
    if "sae" in results:
        ok = {r["trainer"]: r for r in results["sae"] if "error" not in r}
        ours, peers = ok.get("ours"), [r for name, r in ok.items() if name != "ours"]
        if ours and peers:
            best = max(peers, key=lambda r: r["tokens"] / r["seconds"])
            ratio = (ours["tokens"] / ours["seconds"]) / (best["tokens"] / best["seconds"])
            rows.append(
                (
                    "SAE training",
                    ">= 1.5x the fastest peer's tokens/s at equal or better held-out FVU",
                    f"{ratio:.2f}x {best['trainer']}, FVU {ours['fvu']:.4f} vs {best['fvu']:.4f}",
                    "yes" if ratio >= 1.5 and ours["fvu"] <= best["fvu"] else "no",
                )
            )
        else:
            rows.append(
                (
                    "SAE training",
                    ">= 1.5x the fastest peer",
                    "no peer ran (pip install -e '.[bench]')",
                    "-",
                )
            )
    if "harvest" in results:
        r = results["harvest"]
        rows.append(
            (
                "harvesting",
                ">= 2x a full forward with output_hidden_states=True",
                f"{r['vs_by_hand']:.2f}x (vs the bare full forward {r['vs_full']:.2f}x)",
                "yes" if r["vs_by_hand"] >= 2 else "no",
            )
        )
    if "generation" in results:
        r = {b: v["vs_base"] for b, v in results["generation"].items()}
        rows.append(
            (
                "patched generation",
                "folded >= 0.98x base tokens/s at batch 8 and at batch 1",
                "; ".join(
                    f"batch {b}: folded {v['folded']:.3f}x, exact {v['exact']:.3f}x"
                    for b, v in r.items()
                ),
                "yes" if all(v["folded"] >= 0.98 for v in r.values()) else "no",
            )
        )
    if "export" in results:
        base, ours = (
            results["export"]["save_pretrained (baseline)"],
            results["export"]["plain export"],
        )
        t, m = ours["seconds"] / base["seconds"], ours["peak_mib"] / base["peak_mib"]
        rows.append(
            (
                "plain export",
                "below from_pretrained + save_pretrained in time and peak memory",
                f"{t:.2f}x time, {m:.2f}x memory",
                "yes" if t < 1 and m < 1 else "no",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", required=True, help="work folder of `scalpel demo --work W`")
    ap.add_argument("--only", nargs="*", choices=["sae", "harvest", "generation", "export"])
    ap.add_argument(
        "--sae-tokens", type=int, default=2_000_000, help="training tokens per SAE trainer"
    )
    ap.add_argument("--out", help="also write the report (markdown) here")
    args = ap.parse_args()

    search = Path(args.work) / "search" / "search.json"
    if not search.exists():
        sys.exit(
            f"{search} is missing: run `scalpel demo --work {args.work}` first (its search picks "
            "the patch the generation comparison measures)"
        )
    chosen = json.loads(search.read_text())["chosen"]
    chosen["layer"] = json.loads((Path(args.work) / "probe" / "probe.json").read_text())["chosen"]
    lines = [
        f"# scalpel-exporter performance, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"- hardware: {hardware()}",
        f"- versions: {versions()}",
        f"- settings: the demo's leaky SmolLM2, layer {chosen['layer']}; patch N={chosen['n']}, "
        f"alpha {chosen['alpha']:g}{', context-gated' if chosen.get('gated') else ''}; SAE peers "
        f"on {args.sae_tokens:,} tokens; each table's own line gives the rest",
        "",
    ]
    print("\n".join(lines), flush=True)
    results = {}
    runs = {
        name: cmd
        for name, cmd in comparisons(args, chosen).items()
        if not args.only or name in args.only
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in runs.items():
            out = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(HERE / cmd[0]), *cmd[1:], "--json", str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            took = time.perf_counter() - start
            section = [f"## {name}: `python benchmarks/{' '.join(cmd)}` ({took:.0f} s)", ""]
            if proc.returncode != 0 or not out.exists():
                tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
                section += [f"failed (exit status {proc.returncode}):", "```", tail, "```"]
            else:
                results[name] = json.loads(out.read_text())
                section += [proc.stdout.strip()]
            lines += section + [""]
            print("\n".join(section) + "\n", flush=True)
    summary = [
        "## targets",
        "",
        "| comparison | target | measured | met |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in verdicts(results)),
    ]
    lines += summary
    print("\n".join(summary))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if len(results) < len(runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
