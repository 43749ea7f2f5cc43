"""The TopK sparse autoencoder (Gao et al. 2024) and its SAELens on-disk format.

    z     = ReLU(TopK_k(W_enc (s·x - b_pre) + b_enc))
    x_hat = (W_dec^T z + b_pre) / s

`s` is a scalar input normalisation (mean input norm -> sqrt(d_in)); after training it is folded
into the weights (`fold_scale`), so the saved SAE and every patch work on raw activations exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

SAELENS_FORMAT = "6.0.0"  # the SAELens release whose on-disk layout save_sae writes


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
            "fold the input scale (sae.fold_scale()) before saving, so the file works on raw "
            "activations"
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
        # SAELens reads a file whose metadata has no sae_lens_version as its pre-6.0 format and
        # drops the model and hook names; ours is the 6.x layout
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT,
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
