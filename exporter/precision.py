"""Where bfloat16 pays: the settings that ask for it (attack decoding, the activation harvest, the
SAE's encoder, the leaky, distillation and relearning fine-tunes) ask for speed, and a CPU without
native bfloat16 arithmetic emulates it. On an AVX2-only EPYC (torch 2.13, 2 threads) a bfloat16
matmul ran at 1.2 GFLOP/s against float32's 88 (`benchmarks/bf16.py`): the leaky fine-tune went
from 12 minutes to hours. There these settings run in float32, which is slower nowhere."""

from __future__ import annotations

from functools import cache

import torch


@cache
def fast_bfloat16(device: str = "cpu") -> bool:
    """Whether `device` computes bfloat16 natively: x86 CPUs with AVX512-BF16 or AMX, other CPUs
    that report a bfloat16 extension, CUDA devices that support it, any other accelerator."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return True
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture") == "x86_64":
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return any(v is True for k, v in caps.items() if "bf16" in k)


def compute_dtype(name: str, device: str = "cpu") -> str:
    """The precision a speed setting of `name` runs in on `device`: bfloat16 only where it is
    native, else float32."""
    return "float32" if name == "bfloat16" and not fast_bfloat16(device) else name


def device_of(model) -> str:
    return next(model.parameters()).device.type


def recipe_device(device: str) -> str:
    """The device type a recipe's `model.device` (cpu, cuda, auto) computes on."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def precision_note(device: str = "cpu") -> str | None:
    """A line for the run's log where bfloat16 settings fall back to float32, else None."""
    if fast_bfloat16(device):
        return None
    return (
        f"bfloat16 is emulated on this {device.upper()} (no AVX512-BF16 or AMX): the settings that "
        "ask for it for speed (attack decoding, activation harvest, fine-tunes) run in float32"
    )
