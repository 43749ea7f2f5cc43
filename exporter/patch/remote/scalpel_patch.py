"""The PII patch applied to the residual stream after one decoder layer.

    h' = h - sum_{i in A} z_i(h) d_i + s

with `z_i` the SAE latent `i` (exact: true TopK over all latents; folded: only the rows of `A`, each
behind a calibrated gate), `d_i` its decoder direction and `s` the folded steering vector. The SAE's
reconstruction error is kept: only the ablated directions and the steering move `h`. The first real
token of each sequence (BOS / attention sink) and pad tokens are never patched. With a context gate,
the change applies only where a linear PII-context detector fires (`w . h + b > 0`), so text far from
any personal data passes through unchanged.

This file ships inside exported checkpoints and is used in-process too, so there is one
implementation of the maths. It imports only torch and the standard library and does no I/O.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

MODES = ("exact", "folded")


class ScalpelPatch(nn.Module):
    """Patch tensors (buffers, saved under the module's prefix) and the maths that applies them."""

    def __init__(self, d_model: int, n_ablate: int, mode: str = "folded", d_sae: int = 0, k: int = 0,
                 context_gate: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"scalpel patch mode {mode!r} is unknown; use one of {MODES}")
        if mode == "exact" and not 0 < k <= d_sae:
            raise ValueError(f"an exact patch needs 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        self.mode, self.k, self.context_gate = mode, k, bool(context_gate)
        n_enc = d_sae if mode == "exact" else n_ablate
        self.register_buffer("directions", torch.zeros(n_ablate, d_model))  # d_i for i in A (raw space)
        self.register_buffer("steer", torch.zeros(d_model))  # s = -alpha * (scaled W_dec^T v)
        self.register_buffer("b_pre", torch.zeros(d_model))
        self.register_buffer("enc_weight", torch.zeros(n_enc, d_model))
        self.register_buffer("enc_bias", torch.zeros(n_enc))
        if mode == "exact":
            self.register_buffer("ablate_index", torch.zeros(n_ablate, dtype=torch.long))
        else:
            self.register_buffer("gate", torch.zeros(n_ablate))
        if self.context_gate:
            self.register_buffer("context_weight", torch.zeros(d_model))
            self.register_buffer("context_bias", torch.zeros(1))
        self.keep: torch.Tensor | None = None  # [B, T] bool of the current call, set by the model pre-hook

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """z_i(x) for i in A, [..., |A|], in float32."""
        pre = torch.nn.functional.linear(x - self.b_pre, self.enc_weight, self.enc_bias)
        if self.mode == "exact":
            kth = pre.topk(self.k, dim=-1).values[..., -1:]
            pre_a = pre.index_select(-1, self.ablate_index.long())  # a bf16 load may store it as float32
            return pre_a.relu() * (pre_a >= kth)
        return pre.relu() * (pre > self.gate)

    def delta(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The change to `h` (float32), behind the context gate and the keep mask when given."""
        x = h.float()
        where = self._where(x, keep)
        d = self._change(x)
        return d if where is None else d * where.unsqueeze(-1)

    def _where(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
        """[...] bool: the tokens the patch acts on (kept and inside the context gate); None for all of them."""
        where = keep.to(x.device) if keep is not None and keep.shape == x.shape[:-1] else None
        if self.context_gate:
            where = self.context(x) if where is None else where & self.context(x)
        return where

    def _change(self, x: torch.Tensor) -> torch.Tensor:
        """s - sum_{i in A} z_i(x) d_i, ungated, float32."""
        if not self.directions.shape[0]:
            return self.steer.expand_as(x)
        z = self.latents(x)
        # One fused op (steer + (-1) z @ D) instead of a product and a subtraction: a decoding step is short
        # enough that the patch's op count, not its arithmetic, is its cost.
        return torch.addmm(self.steer, z.reshape(-1, z.shape[-1]), self.directions, alpha=-1).view_as(x)

    def context(self, h: torch.Tensor) -> torch.Tensor:
        """[...] bool: where the patch may act (everywhere without a context gate)."""
        if not self.context_gate:
            return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
        return h.float() @ self.context_weight + self.context_bias > 0

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            keep = self.keep
        if self.directions.shape[0] == 0 and not bool(self.steer.any()):
            return h
        x = h.float()
        where = self._where(x, keep)
        # Text far from personal data shuts the gate on every token of a decoding step: then the latents are not
        # computed at all, and the step costs one dot product per token.
        if where is not None and not bool(where.any()):
            return h
        d = self._change(x)
        if where is None:
            return h + d.to(h.dtype)
        return torch.addcmul(x, d, where.unsqueeze(-1)).to(h.dtype)


def keep_mask(batch: int, length: int, device, attention_mask: torch.Tensor | None = None,
              past_length: int = 0) -> torch.Tensor:
    """[batch, length] bool: True where the patch applies (real tokens after each row's first one)."""
    positions = torch.arange(past_length, past_length + length, device=device)
    if attention_mask is None or attention_mask.dim() != 2:
        return (positions != 0).unsqueeze(0).expand(batch, length)
    mask = attention_mask.to(device).bool()
    first = mask.int().argmax(dim=1, keepdim=True)  # column of each row's first real token
    return mask[:, -length:] & (positions.unsqueeze(0) != first)


def _past_length(kwargs: dict, attention_mask, length: int) -> int:
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.shape[1] - length
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return 0


def attach(model: nn.Module, layer_module: nn.Module, patch: ScalpelPatch) -> list:
    """Hook `patch` onto the output of `layer_module`; a pre-hook on `model` records which tokens to keep.

    Returns the hook handles (call `.remove()` on each to detach).
    """

    def before_model(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            patch.keep = None
            return None
        batch, length = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        patch.keep = keep_mask(batch, length, ref.device, mask, _past_length(kwargs, mask, length))
        return None

    def after_layer(_module, _args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        new = patch(hidden)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        if isinstance(output, list):
            return [new] + list(output[1:])
        return new

    return [model.register_forward_pre_hook(before_model, with_kwargs=True),
            layer_module.register_forward_hook(after_layer)]


def patch_digest(patch: ScalpelPatch) -> str:
    """sha256 over the patch tensors (name, shape, float32 bytes; the index as int64), whatever dtype they load in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(patch.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        t = t.long() if name == "ablate_index" else t.float()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class TamperedPatchError(RuntimeError):
    pass


def code_digest(source: str) -> str:
    """sha256 of a remote-code file's text (newlines normalised, as the import system reads it)."""
    return hashlib.sha256(source.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def verify_code(expected, package: str) -> None:
    """Each remote-code file, as the import system loaded it (its source read back through the module's own
    loader: no other file is opened), must match the sha256 recorded for it in config.json."""
    import importlib

    if not expected:
        raise TamperedPatchError("config.json records no sha256 of the remote-code files (scalpel_patch.code_sha256): "
                                 "the checkpoint was modified after export; re-export it or download it again")
    for name, digest in sorted(expected.items()):
        module = importlib.import_module(f"{package}.{name[:-3]}")
        source = module.__loader__.get_source(module.__name__)
        if source is None or code_digest(source) != digest:
            raise TamperedPatchError(
                f"the remote-code file {name} does not match the sha256 recorded in config.json: the checkpoint was "
                "modified after export; re-export it or download it again from its source")


def verify(patch: ScalpelPatch, expected: str) -> None:
    actual = patch_digest(patch)
    if actual != expected:
        raise TamperedPatchError(
            f"the scalpel patch tensors do not match the sha256 recorded in config.json "
            f"(expected {expected[:16]}…, found {actual[:16]}…): the checkpoint was modified after export; "
            f"re-export it or download it again from its source")
