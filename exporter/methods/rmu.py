"""RMU, representation misdirection for unlearning (Li et al. 2024, WMDP).

Only the MLP output projections of layers l-2..l train. On forget text (the PII corpus) the layer-l
residual stream is pushed towards `c * u`, a fixed random unit vector scaled up; on retain text
(benign prose) it is held to the frozen model's. Loss: `mse(h_l(forget), c u) + alpha *
mse(h_l(retain), h_l^frozen(retain))`, pad tokens masked, AdamW.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..activations import layer_outputs
from ..models import architecture_of, unfrozen
from ..precision import device_of
from .base import Method, Point
from .batches import cycle, encode


def _masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    keep[:, 0] = False  # BOS: its residual stream is an outlier that no text changes
    return ((h[keep].float() - target[keep].float()) ** 2).mean()


def rmu(
    spec, model, tokenizer, forget, retain, *, layer: int, seed: int, progress: bool = True
) -> Method:
    arch = architecture_of(model)
    if layer < 0 or layer >= arch.num_layers(model):
        raise IndexError(
            f"RMU layer {layer} is out of range: the model has layers "
            f"0..{arch.num_layers(model) - 1}"
        )
    names = [
        f"{arch.layers}.{i}.{arch.mlp_out}.weight" for i in range(max(0, layer - 2), layer + 1)
    ]

    def path():
        torch.manual_seed(seed)
        frozen = copy.deepcopy(model).eval()
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        trained = [params[n] for n in names]
        for p in trained:
            p.requires_grad_(True)
        d = arch.hidden_size(model)
        u = torch.rand(d, generator=torch.Generator().manual_seed(seed))
        device = device_of(model)
        control = (spec.c * u / u.norm()).to(device)
        opt = torch.optim.AdamW(
            trained, lr=spec.lr, fused=trained[0].device.type in ("cpu", "cuda")
        )
        f_batches = cycle(
            *encode(tokenizer, forget, spec.max_length, device), spec.batch_size, seed
        )
        r_batches = cycle(
            *encode(tokenizer, retain, spec.max_length, device), spec.batch_size, seed + 1
        )
        bar = tqdm(total=max(spec.steps), desc="RMU", disable=not progress)
        step = 0
        try:
            for stop in sorted(spec.steps):
                while step < stop:
                    fi, fm = next(f_batches)
                    ri, rm = next(r_batches)
                    h_f = layer_outputs(model, fi, fm, [layer], grad=True)[layer]
                    forget_loss = _masked_mse(h_f, control.to(h_f.dtype).expand_as(h_f), fm)
                    h_r = layer_outputs(model, ri, rm, [layer], grad=True)[layer]
                    with torch.no_grad():
                        h_r0 = layer_outputs(frozen, ri, rm, [layer])[layer]
                    retain_loss = _masked_mse(h_r, h_r0, rm)
                    loss = forget_loss + spec.alpha * retain_loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix(
                        forget=f"{forget_loss.item():.3f}", retain=f"{retain_loss.item():.2e}"
                    )
                yield Point(
                    step,
                    f"RMU {step} steps",
                    {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()},
                )
        finally:
            bar.close()
            unfrozen(model)

    return Method("rmu", names, path, finish=lambda: model)
