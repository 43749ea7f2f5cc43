"""Build the patch from an SAE, an ablation set and a steering vector; calibrate and check folded
gates."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from ..sae import TopKSAE
from .plain import PlainEdit
from .remote.scalpel_patch import CONTEXT_BUFFERS, ScalpelPatch


def _raw_space(sae: TopKSAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_enc, b_enc, b_pre, W_dec) acting on raw activations: the input scale folded in."""
    s = float(sae.norm_scale)
    return (
        sae.W_enc.detach() * s,
        sae.b_enc.detach(),
        sae.b_pre.detach() / s,
        sae.W_dec.detach() / s,
    )


@torch.no_grad()
def topk_membership(sae: TopKSAE, x: torch.Tensor, ablate: Sequence[int], batch_size: int = 8192):
    """(pre-activations of the `ablate` latents, whether each is in the row's TopK), both [N,
    |A|]."""
    index = torch.as_tensor(list(ablate), dtype=torch.long)
    pres, members = [], []
    for chunk in x.split(batch_size):
        pre = sae.pre_acts(chunk.float())
        kth = pre.topk(sae.k, dim=-1).values[:, -1:]
        pre_a = pre.index_select(1, index)
        pres.append(pre_a)
        members.append(pre_a >= kth)
    return torch.cat(pres), torch.cat(members)


@torch.no_grad()
def calibrate_gates(sae: TopKSAE, x: torch.Tensor, ablate: Sequence[int]) -> torch.Tensor:
    """Per-latent thresholds making `pre > gate` agree with TopK membership on `x`.

    A disagreement costs the latent's activation (what the patch removes or fails to remove), so the
    chosen gate minimises the activation mass gated wrongly, not the count of wrong tokens.
    """
    if not len(ablate):
        return torch.zeros(0)
    pre, member = topk_membership(sae, x, ablate)
    order = pre.argsort(dim=0, descending=True)
    p = pre.gather(0, order)
    y = member.gather(0, order).float()
    w = p.relu()
    # Gate open for the top j tokens (j = 0..N): cost = mass opened wrongly + mass closed wrongly.
    opened_wrong = torch.cat([torch.zeros(1, p.shape[1]), (w * (1 - y)).cumsum(0)])
    closed_wrong = torch.cat([torch.zeros(1, p.shape[1]), (w * y).cumsum(0)])
    cost = opened_wrong + (closed_wrong[-1] - closed_wrong)
    j = cost.argmin(dim=0)
    # lowest opened value (or above all)
    upper = torch.cat([p[:1] + 1.0, p]).gather(0, j.unsqueeze(0))[0]
    lower = torch.cat([p, p[-1:] - 1.0]).gather(0, j.unsqueeze(0))[0]  # highest closed value
    return (upper + lower) / 2


def sink_norm(x: torch.Tensor, outlier_factor: float) -> float:
    """The residual norm above which the patch leaves a token alone: `outlier_factor` x the median
    norm of `x` (a sample of the SAE's training activations), the range SAE training keeps
    (sae.outlier_mask), so the patch acts exactly where its SAE is valid. SmolLM2's attention sink
    sits far beyond it (100-200x the median, every other token below 2x); inf when the factor is 0
    (training kept every token: none is left alone)."""
    if outlier_factor <= 0 or not len(x):
        return float("inf")
    return float(outlier_factor * x.float().norm(dim=1).median())


class GateBank:
    """Folded gates of one SAE on one calibration set, remembered per latent. A latent's gate
    depends only on its own activations and TopK membership, not on which other latents are ablated,
    so the candidates of a search (nested ablation sets) share one pass over the calibration
    activations. It also holds the patches' sink norm, taken on the same sample."""

    def __init__(self, sae: TopKSAE, calibration: torch.Tensor, outlier_factor: float = 20.0):
        self.sae, self.calibration = sae, calibration
        self.sink_norm = sink_norm(calibration, outlier_factor)
        self._gates: dict[int, float] = {}

    def warm(self, latents: Sequence[int]) -> None:
        missing = sorted({int(i) for i in latents} - self._gates.keys())
        if missing:
            self._gates.update(
                zip(missing, calibrate_gates(self.sae, self.calibration, missing).tolist())
            )

    def __call__(self, ablate: Sequence[int]) -> torch.Tensor:
        self.warm(ablate)
        return torch.tensor([self._gates[int(i)] for i in ablate], dtype=torch.float32)


def steering_vector(sae: TopKSAE, v: torch.Tensor, alpha: float, mean_norm: float) -> torch.Tensor:
    """s = -alpha * mean_norm * u / |u| with u = W_dec^T v: alpha is a fraction of the layer's mean
    norm."""
    _, _, _, w_dec = _raw_space(sae)
    u = v.float() @ w_dec
    if alpha == 0 or float(u.norm()) == 0:
        return torch.zeros(sae.d_in)
    return -alpha * mean_norm * u / u.norm()


def random_direction(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The control for a steering vector: a random direction with the same norm."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(like.shape, generator=g)
    return r / r.norm() * like.norm()


def _gate_labels(positive: torch.Tensor, recall: float) -> torch.Tensor:
    """The labels a context gate fits (float), once `recall` and the two classes are checked."""
    if not 0 < recall <= 1:
        raise ValueError(f"context gate recall must be in (0, 1], got {recall}")
    y = positive.float()
    if not 0 < int(y.sum()) < len(y):
        raise ValueError("the context gate needs both PII-context and other tokens to fit on")
    return y


def fit_context_gate(
    x: torch.Tensor,
    positive: torch.Tensor,
    recall: float = 0.99,
    l2: float = 1e-4,
    standardise: bool = False,
) -> tuple[torch.Tensor, float]:
    """A linear PII-context detector on raw activations `x` [N, d]: (w, b) such that `x @ w + b > 0`
    holds on a fraction `recall` of the `positive` rows. Logistic regression (classes balanced) on
    the activations scaled by their mean norm, or with `standardise` on each dimension
    standardised; then the bias is moved so the threshold sits at the positives' (1 - recall)
    quantile: recall is what privacy needs, and the detector's precision is what keeps benign text
    untouched. Standardising matters where a few dimensions carry most of the norm (Gemma's
    massive activations): scaled, the fit on Gemma-3-270M opened on 42% of benign tokens at layer
    4, standardised on 0.6%."""
    y = _gate_labels(positive, recall)
    xf = x.float()
    if standardise:
        mean, std = xf.mean(0), xf.std(0).clamp_min(1e-6)
    else:  # unit-free, so the same l2 suits any model width
        mean, std = (
            torch.zeros_like(xf[0]),
            torch.full_like(xf[0], float(xf.norm(dim=1).mean()) or 1.0),
        )
    z = (xf - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    pos_weight = (1 - y).sum() / y.sum()

    def closure():
        opt.zero_grad()
        loss = (
            F.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight)
            + l2 * (w * w).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        # the same detector on raw activations: z @ w + b = x @ (w / std) + b - (mean / std) @ w
        w_raw = w / std
        b_raw = float(b) - float((mean / std) @ w)
        score = xf @ w_raw + b_raw
        threshold = float(torch.quantile(score[positive.bool()], 1 - recall))
        return w_raw.detach(), b_raw - threshold + 1e-6  # the quantile row itself stays open


def fit_context_mlp(
    x: torch.Tensor,
    positive: torch.Tensor,
    recall: float = 0.99,
    hidden: int = 16,
    weight_decay: float = 1e-3,
    steps: int = 3500,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A PII-context detector with one hidden layer of `hidden` ReLU units on raw activations `x`:
    (W [H, d], c [H], v [H], b) such that `v . relu(W x + c) + b > 0` holds on a fraction `recall`
    of the `positive` rows. Trained (AdamW, classes balanced, each dimension standardised, folded
    back into W and c) for `steps` batches; then b moved so the threshold sits at the positives' (1
    - recall) quantile, as for the linear gate. A linear gate must cut one half-space, so the
    benign text that shares a direction with PII context (code, addresses in prose) sets its
    threshold; a few units can carve the PII context out of it. Seeded: the same rows give the
    same gate."""
    if hidden < 1:
        raise ValueError(f"a hidden-layer context gate needs at least one unit, got {hidden}")
    y = _gate_labels(positive, recall)
    xf = x.float()
    mean, std = xf.mean(0), xf.std(0).clamp_min(1e-6)
    z = (xf - mean) / std
    g = torch.Generator().manual_seed(seed)
    first = torch.nn.Linear(x.shape[1], hidden)
    out = torch.nn.Linear(hidden, 1)
    with torch.no_grad():  # seeded initialisation (PyTorch's default bounds), not the global RNG
        for layer in (first, out):
            bound = layer.in_features**-0.5
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 * bound - bound)
    net = torch.nn.Sequential(first, torch.nn.ReLU(), out)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=weight_decay)
    pos_weight = (1 - y).sum() / y.sum()
    # batches of 2,048 rows (a features pass and its windows: 100k rows and more); a few thousand
    # rows get smaller ones, so that `steps` stays many passes without costing as many seconds
    batch_size = min(2048, max(64, len(z) // 32))
    done = 0
    while done < steps:  # whole shuffled passes, the last one cut at `steps`
        order = torch.randperm(len(z), generator=g)
        for rows in order.split(batch_size)[: steps - done]:
            loss = F.binary_cross_entropy_with_logits(
                net(z[rows]).squeeze(-1), y[rows], pos_weight=pos_weight
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    with torch.no_grad():
        # W z + c = (W / std) x + c - W (mean / std)
        w_raw = first.weight / std
        c_raw = first.bias - first.weight @ (mean / std)
        v, b = out.weight[0].clone(), float(out.bias)
        score = torch.relu(xf @ w_raw.T + c_raw) @ v + b
        threshold = float(torch.quantile(score[positive.bool()], 1 - recall))
        return w_raw, c_raw, v, b - threshold + 1e-6


@torch.no_grad()
def set_context(patch: ScalpelPatch, context: tuple) -> None:
    """Put a fitted context gate of the patch's kind (linear `(w, b)`, or `(W, c, v, b)` for a
    patch built with a hidden layer of that width) into `patch`."""
    if len(context) != (4 if patch.context_hidden else 2):
        raise ValueError("the gate's kind (linear or hidden layer) differs from the patch's")
    for name, value in zip(CONTEXT_BUFFERS, context):
        getattr(patch, name).copy_(torch.as_tensor(value).reshape(getattr(patch, name).shape))


def plain_edit(
    sae: TopKSAE, ablate: Sequence[int], steer: torch.Tensor | None = None, first_layer: int = 0
):
    """The plain (weight-level, every-token) counterpart of a patch: A's decoder rows and the
    steering constant, projected out of the residual writers from decoder layer `first_layer` on."""

    w_dec = _raw_space(sae)[3]
    index = torch.as_tensor(list(ablate), dtype=torch.long)
    return PlainEdit(
        w_dec[index].clone(),
        torch.zeros(sae.d_in) if steer is None else steer.detach().clone(),
        first_layer,
    )


def build_patch(
    sae: TopKSAE,
    ablate: Sequence[int],
    steer: torch.Tensor | None = None,
    *,
    mode: str = "folded",
    gates: torch.Tensor | None = None,
    context: tuple | None = None,
    sink: float = float("inf"),
) -> ScalpelPatch:
    """A ScalpelPatch holding exactly what `mode` needs (exact: the whole encoder; folded: rows of A
    + gates), behind the context gate when one is given (linear `(w, b)`, or with a hidden layer
    `(W, c, v, b)`: `fit_context_mlp`), leaving tokens with a norm above `sink` alone."""
    index = torch.as_tensor(list(ablate), dtype=torch.long)
    if len(set(index.tolist())) != len(index):
        raise ValueError("the ablation set has repeated latents")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= sae.d_sae):
        raise ValueError(f"ablation latents must be in 0..{sae.d_sae - 1}")
    w_enc, b_enc, b_pre, w_dec = _raw_space(sae)
    hidden = len(context[0]) if context is not None and len(context) == 4 else 0
    patch = ScalpelPatch(
        sae.d_in,
        len(index),
        mode,
        d_sae=sae.d_sae,
        k=sae.k,
        context_gate=context is not None,
        context_hidden=hidden,
    )
    with torch.no_grad():
        if context is not None:
            set_context(patch, context)
        patch.directions.copy_(w_dec[index])
        patch.b_pre.copy_(b_pre)
        patch.sink_norm.fill_(sink)
        if steer is not None:
            patch.steer.copy_(steer)
        if mode == "exact":
            patch.enc_weight.copy_(w_enc)
            patch.enc_bias.copy_(b_enc)
            patch.ablate_index.copy_(index)
        else:
            if gates is None:
                raise ValueError(
                    "a folded patch needs gates: calibrate them with calibrate_gates(sae, acts, "
                    "ablate)"
                )
            patch.enc_weight.copy_(w_enc[index])
            patch.enc_bias.copy_(b_enc[index])
            patch.gate.copy_(gates)
    return patch


@torch.no_grad()
def agreement(
    exact: ScalpelPatch, folded: ScalpelPatch, x: torch.Tensor, batch_size: int = 8192
) -> dict:
    """How closely the folded patch follows the exact one on activations `x` ([N, d]), on the
    folded patch's device (the model's, once attached)."""
    device = folded.directions.device
    exact = copy.deepcopy(exact).to(device)
    same_tokens, same_pairs, max_diff, max_rel, n = 0, 0, 0.0, 0.0, 0
    for chunk in x.split(batch_size):
        chunk = chunk.to(device, torch.float32)
        ze, zf = exact.latents(chunk), folded.latents(chunk)
        on_e, on_f = ze > 0, zf > 0
        same_tokens += int((on_e == on_f).all(dim=1).sum())
        same_pairs += int((on_e == on_f).sum())
        diff = (exact(chunk) - folded(chunk)).norm(dim=1)
        max_diff = max(max_diff, float(diff.max()))
        max_rel = max(max_rel, float((diff / chunk.norm(dim=1).clamp_min(1e-6)).max()))
        n += len(chunk)
    pairs = n * max(exact.directions.shape[0], 1)
    return {
        "tokens": n,
        "token_agreement": same_tokens / max(n, 1),
        "gate_agreement": same_pairs / max(pairs, 1),
        "max_residual_diff": max_diff,
        "max_relative_diff": max_rel,
    }
