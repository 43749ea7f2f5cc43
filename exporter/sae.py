"""TopK sparse autoencoder with the AuxK dead-latent loss (Gao et al. 2024), trainer and SAELens
I/O.

    z     = ReLU(TopK_k(W_enc (s·x - b_pre) + b_enc))
    x_hat = (W_dec^T z + b_pre) / s

`s` is a scalar input normalisation (mean input norm -> sqrt(d_in)); after training it is folded
into the weights (`fold_scale`), so the saved SAE and every patch work on raw activations exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .recipe import SaeSection


class SAETrainingError(RuntimeError):
    """Training cannot go on (divergence, bad activations); the message says what to change."""


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, norm_scale: float = 1.0):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be between 1 and the number of latents ({d_sae})")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.tensor(float(norm_scale)))
        nn.init.normal_(self.W_dec)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec)  # encoder initialised as the decoder's transpose

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.norm_scale - self.b_pre, self.W_enc, self.b_enc)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the k active latents per row (values >= 0)."""
        values, indices = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.topk(x)
        return torch.zeros(*x.shape[:-1], self.d_sae, dtype=values.dtype, device=x.device).scatter_(
            -1, indices, values
        )

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decode from the k active latents only (gathers k decoder rows, never a dense z)."""
        shape = values.shape[:-1]
        out = F.embedding_bag(
            indices.reshape(-1, self.k),
            self.W_dec,
            per_sample_weights=values.reshape(-1, self.k),
            mode="sum",
        )
        return ((out + self.b_pre) / self.norm_scale).reshape(*shape, self.d_in)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W_dec + self.b_pre) / self.norm_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.topk(x))

    @torch.no_grad()
    def fold_scale(self) -> None:
        """Fold the input normalisation into the weights; outputs are unchanged, norm_scale becomes
        1."""
        s = float(self.norm_scale)
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_pre.div_(s)
        self.norm_scale.fill_(1.0)


# ---------------------------------------------------------------- training


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


def _loss(
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
            f"SAE training diverged at step {step}: loss={loss.item()}; "
            f"lower sae.lr (now {lr}) or check the activations for NaN/inf"
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


def train_sae(
    batches: Iterator[torch.Tensor],
    sample: torch.Tensor,
    cfg: SaeSection,
    *,
    workdir: Optional[Path] = None,
    progress: bool = True,
) -> TrainResult:
    """Train on an iterator of [B, d] batches (each rank of a data-parallel run sees the same
    iterator and takes its own slice). `sample` (a few thousand rows) sets b_pre and the scale;
    `cfg` is the recipe's SAE section.

    With `workdir`, a checkpoint is written every `checkpoint_every` steps and a run that finds one
    resumes from it (the batch iterator is fast-forwarded to the same place).
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
    # Fused: one pass over each parameter instead of a dozen elementwise ops (Adam took over a
    # quarter of a CPU step).
    opt = torch.optim.Adam(
        sae.parameters(), lr=cfg.lr, eps=6.25e-10, fused=sae.W_enc.device.type in ("cpu", "cuda")
    )
    total = max(1, cfg.train_tokens // cfg.batch_size)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    step, dropped, losses = 0, 0, []
    ckpt = Path(workdir) / "checkpoint.pt" if workdir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired, step, dropped, losses = (
            state["since_fired"],
            state["step"],
            state["dropped"],
            state["losses"],
        )
        for _ in range(step):
            next(batches)
    start = time.perf_counter()
    first_loss = None
    bar = tqdm(total=total, initial=step, desc="train SAE", disable=not progress or rank != 0)
    while step < total:
        batch = next(batches).float()
        batch = batch.chunk(size)[rank] if size > 1 else batch
        ok = outlier_mask(batch, cfg.outlier_factor)
        dropped += int((~ok).sum())
        dead = since_fired >= cfg.dead_tokens
        loss, mse, indices, values = _loss(
            sae, batch[ok], dead, cfg.k_aux, cfg.aux_coef, cfg.bf16_encoder
        )
        first_loss = _check_loss(loss, first_loss, step, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        fired = _synced_fired(sae, indices, values, size)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, total, cfg)
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        since_fired += cfg.batch_size
        since_fired[fired] = 0
        step += 1
        losses.append(mse.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", dead=f"{float(dead.float().mean()):.3f}")
        if ckpt is not None and rank == 0 and (step % cfg.checkpoint_every == 0 or step == total):
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "sae": sae.state_dict(),
                    "opt": opt.state_dict(),
                    "since_fired": since_fired,
                    "step": step,
                    "dropped": dropped,
                    "losses": losses,
                },
                tmp,
            )
            os.replace(tmp, ckpt)
    bar.close()
    dead_fraction = float((since_fired >= cfg.dead_tokens).float().mean())
    sae.fold_scale()
    return TrainResult(
        sae,
        step,
        step * cfg.batch_size,
        time.perf_counter() - start,
        dead_fraction,
        scale,
        dropped,
        losses,
    )


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def reconstruction_metrics(sae: TopKSAE, x: torch.Tensor, batch_size: int = 8192) -> dict:
    """FVU (fraction of variance unexplained) and L0 on held-out activations."""
    x = x.float()
    resid = total = 0.0
    l0 = 0.0
    mean = x.mean(0)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        values, indices = sae.topk(xb)
        xh = sae.decode_sparse(values, indices)
        resid += (xb - xh).pow(2).sum().item()
        total += (xb - mean).pow(2).sum().item()
        l0 += (values > 0).sum().item()
    return {"fvu": resid / total, "l0": l0 / len(x), "tokens": len(x)}


@torch.no_grad()
def spliced_ce(
    model, tokenizer, sae: TopKSAE, layer: int, texts, *, max_length: int = 128, batch_size: int = 8
) -> dict:
    """Next-token CE with layer `layer`'s output replaced by the SAE reconstruction, against the
    clean model and against zero-ablation of that output (position 0 left as is in both)."""
    from .lm import next_token_nll, right_padded
    from .models import layer_output_hook

    def run(fn) -> float:
        nll = count = 0.0
        for enc in right_padded(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            if fn is None:
                logits = model(**enc).logits
            else:
                with layer_output_hook(model, layer, fn):
                    logits = model(**enc).logits
            batch_nll, n = next_token_nll(logits, enc)
            nll += batch_nll
            count += n
        return nll / count

    def splice(h):
        out = sae(h.float()).to(h.dtype)
        out[:, 0] = h[:, 0]
        return out

    def zero(h):
        out = torch.zeros_like(h)
        out[:, 0] = h[:, 0]
        return out

    clean, spliced, zeroed = run(None), run(splice), run(zero)
    return {
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero": zeroed,
        "ce_increase_fraction": (spliced - clean) / max(zeroed - clean, 1e-9),
    }


# ---------------------------------------------------------------- SAELens format


def save_sae(
    sae: TopKSAE,
    path: Path,
    *,
    layer: int,
    model_name: str,
    hook_name: Optional[str] = None,
    extra: Optional[dict] = None,
) -> Path:
    """SAELens on-disk format: cfg.json + sae_weights.safetensors (W_enc is [d_in, d_sae])."""
    if float(sae.norm_scale) != 1.0:
        raise ValueError(
            "fold the input scale (sae.fold_scale()) before saving, so the file works on raw activations"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "W_enc": sae.W_enc.detach().T.contiguous(),
            "b_enc": sae.b_enc.detach().contiguous(),
            "W_dec": sae.W_dec.detach().contiguous(),
            "b_dec": sae.b_pre.detach().contiguous(),
        },
        str(path / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_name or f"model.layers.{layer}",
            "hook_layer": layer,
            "sae_lens_training_version": None,
        },
        "scalpel": extra or {},
    }
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return path


def load_sae(path: Path) -> tuple[TopKSAE, dict]:
    path = Path(path)
    cfg_file, weights = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise FileNotFoundError(
            f"{path} is not an SAE folder: it needs cfg.json and sae_weights.safetensors"
        )
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("architecture") != "topk":
        raise ValueError(
            f"{path}: architecture {cfg.get('architecture')!r} is not supported; only 'topk'"
        )
    tensors = load_file(str(weights))
    sae = TopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"].T)
        sae.b_enc.copy_(tensors["b_enc"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_pre.copy_(tensors["b_dec"])
    return sae.eval(), cfg
