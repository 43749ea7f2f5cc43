"""Training a TopK SAE with the AuxK dead-latent loss: data-parallel, resumable from checkpoints."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..precision import fast_bfloat16
from ..recipe import SaeSection
from .model import SAETrainingError, TopKSAE


@dataclass
class TrainResult:
    sae: TopKSAE
    steps: int
    tokens: int
    seconds: float
    dead_fraction: float
    norm_scale: float
    outliers_dropped: int
    losses: list[float] = field(default_factory=list)


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    median = x.mean(0)
    for _ in range(iters):
        dist_ = (x - median).norm(dim=1).clamp_min(eps)
        w = 1 / dist_
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() < eps * max(median.norm().item(), 1.0):
            return new
        median = new
    return median


def outlier_mask(x: torch.Tensor, factor: float) -> torch.Tensor:
    """True for rows whose norm is within `factor` × the median norm (all rows when factor <= 0)."""
    if factor <= 0:
        return torch.ones(len(x), dtype=torch.bool, device=x.device)
    norms = x.norm(dim=1)
    return norms <= factor * norms.median()


def world() -> tuple[int, int]:
    """(rank, world size) of a data-parallel run; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_factor(step: int, total: int, cfg: SaeSection) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step >= decay_start:
        return max(0.0, (total - step) / max(total - decay_start, 1))
    return 1.0


class _SelectedPreActs(torch.autograd.Function):
    """The pre-activations at the selected (row, latent) pairs, with a sparse backward.

    The forward takes values already computed by the dense encoder pass (run without a graph); the
    backward touches only the selected latents: dW_enc = Gᵀ·x_c as a sparse × dense product,
    dx_c = Σ g·W_enc[i] as an embedding bag. Autograd through the dense pass would instead form two
    dense [batch × latents] products, though k of the latents' gradients are nonzero per row."""

    @staticmethod
    def forward(ctx, xc, w_enc, b_enc, indices, values):
        ctx.save_for_backward(xc, w_enc, indices)
        return values

    @staticmethod
    def backward(ctx, grad):
        xc, w_enc, indices = ctx.saved_tensors
        rows, n = indices.shape
        grad = grad.contiguous().to(w_enc.dtype)
        flat = indices.reshape(-1)
        g_bias = torch.zeros(w_enc.shape[0], dtype=w_enc.dtype, device=w_enc.device).index_add_(
            0, flat, grad.reshape(-1)
        )
        g_xc = F.embedding_bag(indices, w_enc, per_sample_weights=grad, mode="sum")
        owner = torch.arange(rows, device=xc.device).repeat_interleave(n)
        sparse = torch.sparse_coo_tensor(
            torch.stack([flat, owner]),
            grad.reshape(-1),
            (w_enc.shape[0], rows),
            check_invariants=False,
        )
        g_w = torch.sparse.mm(sparse, xc.detach().to(w_enc.dtype))
        return g_xc, g_w, g_bias, None, None


def sae_loss(
    sae: TopKSAE,
    x: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    aux_coef: float,
    bf16: bool = False,
):
    """MSE (per input dimension, in normalised input space) + aux_coef × AuxK loss.

    The dense encoder pass runs without a graph (in bfloat16 with `bf16`); gradients flow only
    through the selected latents (`_SelectedPreActs`) and the gathered decoder rows."""
    xn = x * sae.norm_scale
    xc = xn - sae.b_pre
    with torch.no_grad():
        if bf16:
            # Kept in bfloat16: selecting from it needs no float copy of the [batch × latents]
            # matrix.
            pre = F.linear(xc.bfloat16(), sae.W_enc.bfloat16(), sae.b_enc.bfloat16())
        else:
            pre = F.linear(xc, sae.W_enc, sae.b_enc)
    _, indices = pre.topk(sae.k, dim=-1, sorted=False)
    values = _SelectedPreActs.apply(
        xc, sae.W_enc, sae.b_enc, indices, pre.gather(1, indices).float()
    ).relu()
    recon = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_pre
    err = xn - recon
    mse = err.pow(2).sum(-1).mean() / sae.d_in
    aux = torch.zeros((), dtype=x.dtype)
    dead_idx = dead.nonzero().squeeze(1)
    if k_aux > 0 and len(dead_idx) > 0:
        # AuxK: the top k_aux dead latents model the residual, so dead latents get a gradient.
        a_raw, a_pos = pre[:, dead_idx].topk(min(k_aux, len(dead_idx)), dim=-1, sorted=False)
        a_idx = dead_idx[a_pos]
        a_vals = _SelectedPreActs.apply(xc, sae.W_enc, sae.b_enc, a_idx, a_raw.float()).relu()
        e_aux = F.embedding_bag(a_idx, sae.W_dec, per_sample_weights=a_vals, mode="sum")
        # Normalised by the residual's own energy (as in the reference implementation): the residual
        # shrinks as training goes on, and an unnormalised AuxK term would fade with it.
        target = err.detach()
        energy = target.pow(2).sum(-1).mean()
        _rank, size = world()
        if size > 1:
            dist.all_reduce(energy)
            energy = energy / size
        aux = (target - e_aux).pow(2).sum(-1).mean() / energy.clamp_min(1e-12)
    return mse + aux_coef * aux, mse, indices, values.detach()


def _initial_sae(sample: torch.Tensor, cfg: SaeSection) -> tuple[TopKSAE, float]:
    """A fresh SAE for inputs like `sample` (outliers left out): input scale to mean norm sqrt(d),
    b_pre from it."""
    clean = sample[outlier_mask(sample, cfg.outlier_factor)].float()
    d_in = clean.shape[1]
    scale = math.sqrt(d_in) / clean.norm(dim=1).mean().item()
    sae = TopKSAE(d_in, d_in * cfg.expansion, cfg.k, norm_scale=scale)
    with torch.no_grad():
        centre = (
            geometric_median(clean * scale)
            if cfg.b_pre == "geometric_median"
            else (clean * scale).mean(0)
        )
        sae.b_pre.copy_(centre)
    return sae, scale


def _check_loss(loss: torch.Tensor, first: Optional[float], step: int, lr: float) -> float:
    """The first loss seen; SAETrainingError when this one diverged (not finite, or 1000x the
    first)."""
    if not torch.isfinite(loss):
        raise SAETrainingError(
            f"SAE training diverged at step {step}: loss={loss.item()}; lower sae.lr (now {lr}) or "
            "check the activations for NaN/inf"
        )
    first = first or loss.item()
    if loss.item() > 1e3 * first:
        raise SAETrainingError(
            f"SAE training diverged at step {step}: loss grew from {first:.3g} to "
            f"{loss.item():.3g}; lower sae.lr (now {lr})"
        )
    return first


def _synced_fired(
    sae: TopKSAE, indices: torch.Tensor, values: torch.Tensor, size: int
) -> torch.Tensor:
    """Which latents fired on the batch (on any rank); gradients averaged across ranks and each
    decoder row's gradient component along the row removed (the rows stay on the unit sphere)."""
    fired = torch.zeros(sae.d_sae, dtype=torch.long)
    fired[indices[values > 0].unique()] = 1
    if size > 1:
        for p in sae.parameters():
            dist.all_reduce(p.grad)
            p.grad /= size
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    with torch.no_grad():
        w = sae.W_dec
        w.grad -= (w.grad * w).sum(-1, keepdim=True) * w
    return fired.bool()


@dataclass
class _State:
    """Where training stands: what a checkpoint holds besides the SAE and the optimiser."""

    since_fired: torch.Tensor  # per latent: training tokens since it last fired
    step: int = 0
    dropped: int = 0  # outlier tokens left out
    losses: list = field(default_factory=list)

    def save(self, ckpt: Path, sae: TopKSAE, opt) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"sae": sae.state_dict(), "opt": opt.state_dict(), **vars(self)}, tmp)
        os.replace(tmp, ckpt)  # a killed run leaves the previous checkpoint whole

    @classmethod
    def resume(cls, ckpt: Path, sae: TopKSAE, opt, batches: Iterator) -> "_State":
        """The state a checkpoint holds, loaded into `sae` and `opt` (on the SAE's device);
        `batches` fast-forwarded to it."""
        saved = torch.load(ckpt, weights_only=False, map_location=sae.W_enc.device)
        sae.load_state_dict(saved.pop("sae"))
        opt.load_state_dict(saved.pop("opt"))
        state = cls(**saved)
        for _ in range(state.step):
            next(batches)
        return state


def _train_step(
    sae: TopKSAE,
    opt,
    batch: torch.Tensor,
    state: _State,
    cfg: SaeSection,
    total: int,
    first_loss: Optional[float],
) -> tuple[float, torch.Tensor, float]:
    """One optimiser step on this rank's share of `batch`: (its MSE, the dead mask, the first
    loss)."""
    rank, size = world()
    batch = batch.to(sae.W_enc.device, torch.float32, non_blocking=True)
    batch = batch.chunk(size)[rank] if size > 1 else batch
    ok = outlier_mask(batch, cfg.outlier_factor)
    state.dropped += int((~ok).sum())
    dead = state.since_fired >= cfg.dead_tokens
    loss, mse, indices, values = sae_loss(
        sae, batch[ok], dead, cfg.k_aux, cfg.aux_coef,
        cfg.bf16_encoder and fast_bfloat16(batch.device.type),
    )  # fmt: skip
    first_loss = _check_loss(loss, first_loss, state.step, cfg.lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    fired = _synced_fired(sae, indices, values, size)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * _lr_factor(state.step, total, cfg)
    opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    state.since_fired += cfg.batch_size
    state.since_fired[fired] = 0
    state.step += 1
    state.losses.append(mse.item())
    return mse.item(), dead, first_loss


def train_sae(
    batches: Iterator[torch.Tensor],
    sample: torch.Tensor,
    cfg: SaeSection,
    *,
    workdir: Optional[Path] = None,
    progress: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """Train on an iterator of [B, d] batches (each rank of a data-parallel run sees the same
    iterator and takes its own slice). `sample` (a few thousand rows) sets b_pre and the scale;
    `cfg` is the recipe's SAE section.

    With `workdir`, a checkpoint is written every `checkpoint_every` steps and a run that finds one
    resumes from it (the batch iterator is fast-forwarded to the same place).

    Trained on `device` (the batches move there one at a time; a data-parallel run on cuda takes
    its local GPU); the initialisation is computed on the CPU and the SAE comes back on the CPU.
    """
    rank, size = world()
    if cfg.batch_size % size:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly across {size} processes")
    if not torch.isfinite(sample).all():
        raise SAETrainingError(
            "the activation sample holds NaN or inf values; check the model's dtype and inputs"
        )
    torch.manual_seed(cfg.seed)
    sae, scale = _initial_sae(sample, cfg)
    if device == "cuda" and size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    sae.to(device)
    # Fused: one pass over each parameter instead of a dozen elementwise ops (Adam took over a
    # quarter of a CPU step).
    opt = torch.optim.Adam(
        sae.parameters(), lr=cfg.lr, eps=6.25e-10, fused=sae.W_enc.device.type in ("cpu", "cuda")
    )
    total = max(1, cfg.train_tokens // cfg.batch_size)
    ckpt = Path(workdir) / "checkpoint.pt" if workdir else None
    state = _State(torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_enc.device))
    if ckpt is not None and ckpt.exists():
        state = _State.resume(ckpt, sae, opt, batches)
    start = time.perf_counter()
    first_loss = None
    bar = tqdm(total=total, initial=state.step, desc="train SAE", disable=not progress or rank != 0)
    while state.step < total:
        mse, dead, first_loss = _train_step(sae, opt, next(batches), state, cfg, total, first_loss)
        bar.update(1)
        if state.step % 20 == 0:
            bar.set_postfix(mse=f"{mse:.4f}", dead=f"{float(dead.float().mean()):.3f}")
        if (
            ckpt is not None
            and rank == 0
            and (state.step % cfg.checkpoint_every == 0 or state.step == total)
        ):
            state.save(ckpt, sae, opt)
    bar.close()
    dead_fraction = float((state.since_fired >= cfg.dead_tokens).float().mean())
    sae.fold_scale()
    sae.cpu()
    seconds = time.perf_counter() - start
    return TrainResult(
        sae,
        state.step,
        state.step * cfg.batch_size,
        seconds,
        dead_fraction,
        scale,
        state.dropped,
        state.losses,
    )
