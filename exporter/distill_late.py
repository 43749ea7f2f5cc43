"""Defence in depth for a distilled export: LoRA adapters on the decoder layers after the patch's
(l+1..L-1) trained so that, fed the base's own layer-l output on PII text, they give the patched
model's next-token distribution, and on benign prose the base's.

Why: distillation alone (`distill.py`) changes the layers up to l so that the layer-l output is the
patched one; the later layers still turn the base's layer-l features into the memorised values. A
short fine-tune on other people's PII documents brings those features back, and with them part of
what the patch hid (on the demo 8% of the test addresses, against 2% for a model that never saw
those people). Here the later layers learn to answer the restored features as the patched model
answers their absence. Trained on the base, before the early layers change: the two phases touch
disjoint layers, and each one's targets come from the untouched base and patch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from .distill import accumulate, adapted_modules, autocast_for, lora_steps, with_adapters
from .models import architecture_of
from .patch import applied
from .precision import device_of


def late_modules(model, layer: int) -> list[str]:
    """Every linear map of the decoder layers after `layer`, by full name."""
    early = set(adapted_modules(model, layer))
    last = len(architecture_of(model).decoder_layers(model)) - 1
    return [n for n in adapted_modules(model, last) if n not in early]


def token_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, count: int):
    """KL(teacher ‖ student) of the next-token distributions, summed over the real tokens (the
    first one's prediction too) and divided by `count` (the whole batch's real tokens)."""
    keep = mask.bool().to(student.device)
    log_s = torch.log_softmax(student[keep].float(), -1)
    log_t = torch.log_softmax(teacher[keep].float().to(student.device), -1)
    return (log_t.exp() * (log_t - log_s)).sum() / max(count, 1)


def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _kl_loss(net, model, layer: int, patch, batch, patched: bool, cast):
    """A chunk's loss for `accumulate`: the target (the base without adapters, the patch inserted
    on PII text) and the student's KL from it."""
    ids, mask = batch
    device = device_of(model)

    def loss(rows, count):
        i, m = ids[rows].to(device), mask[rows].to(device)
        hooked = applied(model, layer, patch) if patched else nullcontext()
        with torch.no_grad(), net.disable_adapter(), hooked:
            target = _logits(model, i, m)
        with cast():
            return token_kl(_logits(model, i, m), target, m, count)

    return loss


def heldout_kl(net, model, layer, patch, batches, patched: bool, adapters: bool) -> float:
    """Mean KL per real token from the target (as in training) to the model with or without its
    late adapters, on held-out batches."""
    total, count = 0.0, 0
    device = device_of(model)
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        n = int(mask.sum())
        hooked = applied(model, layer, patch) if patched else nullcontext()
        with torch.no_grad():
            with net.disable_adapter(), hooked:
                target = _logits(model, ids, mask)
            with nullcontext() if adapters else net.disable_adapter():
                got = _logits(model, ids, mask)
        total += float(token_kl(got, target, mask, 1))
        count += n
    return total / max(count, 1)


def train_late(
    model, layer: int, patch, pii: list, benign: list, cfg, *, heldout: dict,
    progress: bool = True,
) -> tuple[nn.Module, dict]:  # fmt: skip
    """Train LoRA on layers `layer`+1.. of `model` (the base) for `cfg.late_steps` steps; return
    the merged model and what the phase did: {"curve", "heldout_kl" (to the targets, before and
    after, on the {"pii", "benign"} batches of `heldout`), "seconds", "tokens",
    "adapter_parameters"}."""
    started = time.perf_counter()
    net = with_adapters(model, late_modules(model, layer), cfg.rank, cfg.seed + 2)
    adapter = sum(p.numel() for p in net.parameters() if p.requires_grad)
    kls = {"before": {}, "after": {}}
    sets = {"pii": (heldout.get("pii", []), True), "benign": (heldout.get("benign", []), False)}
    for name, (batches, patched) in sets.items():
        if batches:
            kls["before"][name] = heldout_kl(net, model, layer, patch, batches, patched, False)
    cast = autocast_for(cfg, model)

    def step_on(batches, weight, patched):
        return lambda i: accumulate(
            batches[i], weight, cfg.micro_batch,
            _kl_loss(net, model, layer, patch, batches[i], patched, cast),
        )  # fmt: skip

    benign_step = (
        step_on(benign, cfg.benign_weight, False) if benign and cfg.benign_weight > 0 else None
    )
    curve, tokens = lora_steps(
        net, cfg.late_steps, cfg.lr, step_on(pii, 1.0, True), benign_step,
        (len(pii), len(benign)), cfg.seed + 2, "distil (later layers)", progress,
    )  # fmt: skip
    net.eval()
    for name, (batches, patched) in sets.items():
        if batches:
            kls["after"][name] = heldout_kl(net, model, layer, patch, batches, patched, True)
    merged = net.merge_and_unload()
    seconds = round(time.perf_counter() - started, 1)
    return merged, {
        "curve": curve,
        "heldout_kl": kls,
        "seconds": seconds,
        "tokens": tokens,
        "adapter_parameters": adapter,
    }


def late_names(model, layer: int) -> Sequence[str]:
    """The weights the late phase's merge rewrites."""
    return [f"{n}.weight" for n in late_modules(model, layer)]
