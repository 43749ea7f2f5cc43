"""The PII patch, inserted at one decoder layer and applied to that layer's output hidden state.

    h' = h - sum_{i in A} z_i(h) d_i + s

with `z_i` the SAE latent `i` (exact: true TopK over all latents; folded: only the rows of `A`, each
behind a calibrated gate), `d_i` its decoder direction and `s` the folded steering vector. The SAE's
reconstruction error is kept: only the ablated directions and the steering move `h`. With a context
gate, the change applies only where a PII-context detector fires (linear, `w . h + b > 0`, or with
`context_hidden` > 0 one hidden layer of ReLU units, `v . relu(W h + c) + b > 0`), so text far from
any personal data passes through unchanged.

The patch is a pure function of the hidden state: it reads nothing of the generation machinery
(caches, positions, masks), which every transformers release passes differently, so a token is
patched the same way in a prompt, in a decode step, in a batch or alone. The attention-sink token
(the first one, whose residual norm is tens of times the rest) is left alone because of that norm,
not its position: it lies far outside what the SAE was trained on, and `sink_norm` records where
that range ends. A token whose norm cannot be compared (NaN) is patched: the rule fails safe.

Decoder layer `l` becomes a `ScalpelLayer`: a subclass of its own class whose forward runs the
original forward and applies the patch to the output, so `output_hidden_states` and every caller see
the patched stream, and its parameters keep their names.

This file ships inside exported checkpoints and is used in-process too, so there is one
implementation of the maths. It imports only torch and the standard library and does no I/O.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

MODES = ("exact", "folded")
# A context gate's tensors, in order: linear (the first two), or with a hidden layer (all four)
CONTEXT_BUFFERS = ("context_weight", "context_bias", "context_out", "context_out_bias")


def context_scores(context: tuple, x: torch.Tensor) -> torch.Tensor:
    """[...] a context gate's scores on activations `x`, open above 0, in float32: a linear gate
    `(w, b)`, `w . x + b`, or one with a hidden layer `(W, c, v, b)`, `v . relu(W x + c) + b`."""
    if len(context) == 2:
        w, b = context
        return x.float() @ w + b
    w, c, v, b = context
    return torch.relu(x.float() @ w.T + c) @ v + b


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(
        compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()
    )


class ScalpelPatch(nn.Module):
    """Patch tensors (buffers, saved under the module's prefix) and the maths that applies them."""

    def __init__(
        self,
        d_model: int,
        n_ablate: int,
        mode: str = "folded",
        d_sae: int = 0,
        k: int = 0,
        context_gate: bool = False,
        context_hidden: int = 0,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"scalpel patch mode {mode!r} is unknown; use one of {MODES}")
        if mode == "exact" and not 0 < k <= d_sae:
            raise ValueError(f"an exact patch needs 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        if context_hidden < 0:
            raise ValueError(f"a context gate's hidden width is 0 or more, got {context_hidden}")
        self.mode, self.k, self.context_gate = mode, k, bool(context_gate)
        self.context_hidden = int(context_hidden) if self.context_gate else 0
        n_enc = d_sae if mode == "exact" else n_ablate
        # d_i for i in A (raw space)
        self.register_buffer("directions", torch.zeros(n_ablate, d_model))
        self.register_buffer("steer", torch.zeros(d_model))  # s = -alpha * (scaled W_dec^T v)
        self.register_buffer("b_pre", torch.zeros(d_model))
        self.register_buffer("enc_weight", torch.zeros(n_enc, d_model))
        self.register_buffer("enc_bias", torch.zeros(n_enc))
        # Tokens with a larger residual norm (the attention sink) are left alone; inf: none are.
        self.register_buffer("sink_norm", torch.full((1,), float("inf")))
        if mode == "exact":
            self.register_buffer("ablate_index", torch.zeros(n_ablate, dtype=torch.long))
        else:
            self.register_buffer("gate", torch.zeros(n_ablate))
        if self.context_hidden:
            self.register_buffer("context_weight", torch.zeros(self.context_hidden, d_model))
            self.register_buffer("context_bias", torch.zeros(self.context_hidden))
            self.register_buffer("context_out", torch.zeros(self.context_hidden))
            self.register_buffer("context_out_bias", torch.zeros(1))
        elif self.context_gate:
            self.register_buffer("context_weight", torch.zeros(d_model))
            self.register_buffer("context_bias", torch.zeros(1))

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """z_i(x) for i in A, [..., |A|], in float32."""
        pre = torch.nn.functional.linear(x - self.b_pre, self.enc_weight, self.enc_bias)
        if self.mode == "exact":
            kth = pre.topk(self.k, dim=-1).values[..., -1:]
            # a bf16 load may store it as float32
            pre_a = pre.index_select(-1, self.ablate_index.long())
            return pre_a.relu() * (pre_a >= kth)
        return pre.relu() * (pre > self.gate)

    def acts_on(self, x: torch.Tensor) -> torch.Tensor:
        """[...] bool: the tokens the patch changes. Not the attention sink (`not` a comparison, so
        a NaN norm counts as patched), and only inside the context gate when there is one."""
        where = ~(x.norm(dim=-1) > self.sink_norm)
        if self.context_gate:
            where = where & self.context(x)
        return where

    def context(self, h: torch.Tensor) -> torch.Tensor:
        """[...] bool: where the context gate lets the patch act (everywhere without one)."""
        if not self.context_gate:
            return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
        tensors = CONTEXT_BUFFERS if self.context_hidden else CONTEXT_BUFFERS[:2]
        return context_scores(tuple(getattr(self, name) for name in tensors), h) > 0

    def _change(self, x: torch.Tensor) -> torch.Tensor:
        """s - sum_{i in A} z_i(x) d_i, ungated, float32."""
        if not self.directions.shape[0]:
            return self.steer.expand_as(x)
        z = self.latents(x)
        # One fused op (steer + (-1) z @ D) instead of a product and a subtraction: a decoding step
        # is short enough that the patch's op count, not its arithmetic, is its cost.
        return torch.addmm(
            self.steer, z.reshape(-1, z.shape[-1]), self.directions, alpha=-1
        ).view_as(x)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The change to `h` (float32): zero where the patch does not act."""
        x = h.float()
        return self._change(x) * self.acts_on(x).unsqueeze(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        where = self.acts_on(x)
        # Text far from personal data shuts the context gate on every token of a decoding step: then
        # the latents (for an exact patch, the whole encoder) are not computed at all. A branch on a
        # tensor's value, so it is taken only outside torch.compile; the compiled graph computes the
        # same result without it.
        if self.context_gate and not _compiling() and not bool(where.any()):
            return h
        return torch.addcmul(x, self._change(x), where.unsqueeze(-1)).to(h.dtype)


class ScalpelLayer:
    """Mixed into a decoder layer's own class (`scalpel_layer_class`): the layer's forward, then the
    patch on the hidden state it returns (a tensor, or the first item of a tuple or list)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.scalpel_patch(out[0]),) + tuple(out[1:])
        if isinstance(out, list):
            return [self.scalpel_patch(out[0])] + list(out[1:])
        return self.scalpel_patch(out)


_LAYER_CLASSES: dict = {}


def scalpel_layer_class(base: type) -> type:
    """`base` with the patch applied to its output; one class per base class, so isinstance checks
    and transformers' output recording by layer class see the patched layer as the base's kind."""
    if issubclass(base, ScalpelLayer):
        return base
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(
            f"Scalpel{base.__name__}", (ScalpelLayer, base), {"__module__": __name__}
        )
    return _LAYER_CLASSES[base]


def insert(layer: nn.Module, patch: ScalpelPatch) -> None:
    """Make `layer` apply `patch` to its output (its parameters keep their names; the patch's go
    under `<layer>.scalpel_patch.`)."""
    if isinstance(layer, ScalpelLayer):
        raise ValueError("this decoder layer already carries a scalpel patch; remove it first")
    layer.__class__ = scalpel_layer_class(type(layer))
    layer.scalpel_patch = patch


def remove(layer: nn.Module) -> None:
    """Undo `insert`: the layer's own class again, and no patch."""
    if isinstance(layer, ScalpelLayer):
        del layer.scalpel_patch
        layer.__class__ = next(
            c for c in type(layer).__mro__[1:] if not issubclass(c, ScalpelLayer)
        )


def storage(causal_lm_class: type) -> dict:
    """Where an export stores the base's tensors: {attribute of the causal LM: stored name}. The
    decoder stack (`base_model_prefix`: model, transformer, ...) goes under `scalpel_<prefix>`: no
    stock class looks for that name, so none loads the stack by itself. The output head (whatever
    this transformers release calls it: GPT-NeoX's was `embed_out`, now `lm_head`) under `lm_head`,
    where engines that build their own head around the patched stack (vLLM's Transformers backend)
    load it from; a stock class that finds it still stops at the stack's fail-closed marker."""
    body = causal_lm_class.base_model_prefix
    tied = causal_lm_class._tied_weights_keys
    head = next(iter(tied)).split(".")[0] if isinstance(tied, dict) and tied else "lm_head"
    return {body: f"scalpel_{body}", head: "lm_head"}


def stored_name(name: str, where: dict) -> str:
    """A tensor's name in the export, from its name in the causal LM (`where`: from `storage`)."""
    first, dot, rest = name.partition(".")
    return where.get(first, first) + dot + rest


def patch_of(model: nn.Module) -> ScalpelPatch:
    """The one ScalpelPatch inside `model`."""
    found = [m for m in model.modules() if isinstance(m, ScalpelPatch)]
    if len(found) != 1:
        raise ValueError(f"expected one scalpel patch in the model, found {len(found)}")
    return found[0]


def patch_digest(patch: ScalpelPatch) -> str:
    """sha256 over the patch tensors (name, shape, float32 bytes; the index as int64), whatever
    dtype they load in."""
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
    """Each remote-code file, as the import system loaded it (its source read back through the
    module's own loader: no other file is opened), must match the sha256 recorded for it in
    config.json."""
    import importlib

    if not expected:
        raise TamperedPatchError(
            "config.json records no sha256 of the remote-code files (scalpel_patch.code_sha256): "
            "the checkpoint was modified after export; re-export it or download it again"
        )
    for name, digest in sorted(expected.items()):
        module = importlib.import_module(f"{package}.{name[:-3]}")
        source = module.__loader__.get_source(module.__name__)
        if source is None or code_digest(source) != digest:
            raise TamperedPatchError(
                f"the remote-code file {name} does not match the sha256 recorded in config.json: "
                "the checkpoint was modified after export; re-export it or download it again from "
                "its source"
            )


def verify(patch: ScalpelPatch, expected: str) -> None:
    actual = patch_digest(patch)
    if actual != expected:
        raise TamperedPatchError(
            "the scalpel patch tensors do not match the sha256 recorded in config.json (expected "
            f"{expected[:16]}…, found {actual[:16]}…): the checkpoint was modified after export; "
            "re-export it or download it again from its source"
        )
