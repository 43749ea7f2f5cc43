"""Plain export: the linear part of a patch baked into the base architecture's own weights (no
remote code).

Every module that writes into the residual stream at layers 0..l (token and position embeddings,
attention and MLP output projections, with their biases) has the ablated directions projected out of
what it writes, so every stream up to layer l's output lies in the complement of A's span: layer l
hands on `(I - P_A) h + s`, with `P_A` the orthogonal projector onto span{d_i : i in A} and the
steering constant `s` carried as the bias of layer l's MLP output projection (where the architecture
has one or can switch one on). Unlike the remote-code patch this acts on every token and keeps no
encoder: it is a different intervention, evaluated on its own row.

With `first_layer` f > 0 only the writers of layers f..l are projected: what layers before f wrote
along A stays, so layer l hands on `h - P_A (h_l - h_{f-1}) + s` (with `h_{f-1}` the stream entering
layer f). The early layers of some models (SmolLM2) carry large constant components that the late
layers read, and projecting those out breaks the model; this keeps them.

Only the tensors that change are read (memory-mapped) and rewritten, one at a time, into a byte copy
of their shard: an edit keeps a tensor's dtype and shape, so every offset in the safetensors header
stays valid and the untouched tensors stay byte-identical (mergekit-style; peak memory is one
tensor, not the model).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..cache import atomic_dir
from ..models import architecture_for, architecture_of
from .checkpoint_files import (
    INDEX_FILE,
    ExportError,
    Files,
    base_weight_files,
    overwrite_tensor,
    safetensors_header,
    tensor_names,
    write_files,
    write_index,
)
from .modes import Mode

EXTRA_FILE = "model-scalpel-plain.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


class PlainExportError(ExportError):
    pass


@dataclass
class PlainEdit:
    """A plain intervention: project the span of `directions` ([n, d], the ablated latents' decoder
    rows in the model's space) out of every residual writer through the layer, and add `steer`
    there. It has the attributes of a ScalpelPatch that callers read, so the two travel the same way
    through the pipeline."""

    directions: torch.Tensor
    steer: torch.Tensor
    first_layer: int = (
        0  # the first decoder layer whose writers are projected (0: the embeddings too)
    )
    mode: Mode = Mode.PLAIN
    context_gate: bool = False


def orthonormal_basis(directions: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """[d, r] orthonormal basis (float32) of the span of the rows of `directions` ([n, d]); r is its
    rank."""
    if directions.numel() == 0:
        return torch.zeros(directions.shape[-1], 0)
    u, s, _ = torch.linalg.svd(directions.double().T, full_matrices=False)
    rank = int((s > s.max() * rtol).sum())
    return u[:, :rank].float()


@dataclass
class PlainPlan:
    """What a plain export changes: tensor name -> how it is edited, new tensors, config updates."""

    # "out": W - Q(Q^T W); "rows": W - (W Q)Q^T; "bias"
    edits: dict[str, str] = field(default_factory=dict)
    steer_tensor: Optional[str] = None  # the bias that receives s (edited or new)
    # name -> (shape, copy of)
    new: dict[str, tuple[tuple[int, ...], Optional[str]]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _key(name: str, keys: set[str]) -> str:
    """The checkpoint key of parameter `name` (some checkpoints drop the base-model prefix, e.g.
    GPT-2's `h.0...`)."""
    for candidate in (name, name.split(".", 1)[-1]):
        if candidate in keys:
            return candidate
    raise PlainExportError(
        f"the checkpoint has no tensor {name!r}; is it the model its config.json describes?"
    )


def plan_plain(config, keys: set[str], layer: int, steer: bool, first_layer: int = 0) -> PlainPlan:
    """Which tensors of a checkpoint (config + tensor `keys`) a plain export at `layer` edits or
    adds: the residual writers of decoder layers `first_layer`..`layer` (and the embeddings when
    `first_layer` is 0)."""
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(config, "model_type", None)
    arch = architecture_for(model_type)
    if arch.post_norms:
        raise PlainExportError(
            f"{model_type} normalises each writer's output ({', '.join(arch.post_norms)}) with "
            "per-channel weights before it reaches the residual stream, so no edit of the weights "
            "can project a direction out of the stream; use the remote-code export (export.mode: "
            "remote_code), which patches the stream itself"
        )
    model = _meta_model(config)
    n_layers = arch.num_layers(model)
    if not 0 <= layer < n_layers:
        raise PlainExportError(
            f"layer {layer} is out of range: the model has decoder layers 0..{n_layers - 1}"
        )
    if not 0 <= first_layer <= layer:
        raise PlainExportError(
            f"intervention.plain_from is {first_layer}, but the projected layers must run from it "
            f"to the patch's layer {layer}: set it between 0 and {layer}"
        )
    plan = PlainPlan()
    d = arch.hidden_size(model)
    for name, module in arch.residual_writers(model, upto=layer, start=first_layer):
        if isinstance(module, nn.Embedding) or isinstance(module, Conv1D):
            kind = "rows"  # [*, d]: each row is written to the stream
        elif isinstance(module, nn.Linear) and module.out_features == d:
            kind = "out"
        else:
            raise PlainExportError(
                f"{name} ({type(module).__name__}) does not write a {d}-wide residual stream"
            )
        plan.edits[_key(f"{name}.weight", keys)] = kind
        if getattr(module, "bias", None) is not None:
            plan.edits[_key(f"{name}.bias", keys)] = "bias"
    # A tied LM head reads the embedding matrix: projecting the embedding must not change it, so it
    # is untied and stored as the original embedding.
    out_emb = model.get_output_embeddings()
    if out_emb is not None and getattr(config, "tie_word_embeddings", False):
        out_name = next(n for n, m in model.named_modules() if m is out_emb) + ".weight"
        in_name = (
            next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
            + ".weight"
        )
        if not {out_name, out_name.split(".", 1)[-1]} & keys and _key(in_name, keys) in plan.edits:
            plan.new[out_name] = (tuple(out_emb.weight.shape), _key(in_name, keys))
            plan.config["tie_word_embeddings"] = False
    if steer:
        target = f"{arch.layers}.{layer}.{arch.mlp_out}"
        if getattr(model.get_submodule(target), "bias", None) is not None:
            plan.steer_tensor = _key(f"{target}.bias", keys)
        elif hasattr(config, "mlp_bias"):
            # Switching the MLP biases on adds them to every layer; all are zero but layer l's
            # output bias.
            switched = config.__class__.from_dict({**config.to_dict(), "mlp_bias": True})
            before = set(model.state_dict())
            for name, t in _meta_model(switched).state_dict().items():
                if name not in before:
                    plan.new[name] = (tuple(t.shape), None)
            plan.config["mlp_bias"] = True
            plan.steer_tensor = f"{target}.bias"
        else:
            raise PlainExportError(
                f"{model_type} has no bias on layer {layer}'s MLP output projection and no config "
                "switch to add one, so a plain export cannot carry the steering vector; export the "
                "ablation alone (alpha 0) or use the remote-code export, which carries it"
            )
    return plan


def _edited(t: torch.Tensor, kind: str, q: torch.Tensor) -> torch.Tensor:
    w = t.float()
    # "out" weights and biases: columns
    return w - (w @ q) @ q.T if kind == "rows" else w - q @ (q.T @ w)


def _edit_shards(
    shards: list[Path], tmp: Path, plan: PlainPlan, q: torch.Tensor, steer
) -> tuple[dict, dict]:
    """Byte copies of the base's shards in `tmp` with the planned tensors edited in place; the
    tensors the checkpoint gains. Returns (weight map, new tensors)."""
    weight_map, new_tensors, dtype = (
        {},
        {},
        None,
    )  # dtype: the checkpoint's, for the tensors it gains
    # transformers reads a lone model.safetensors and ignores any index: with tensors added, it is
    # renamed.
    single = len(shards) == 1 and shards[0].name == "model.safetensors" and plan.new
    for shard in shards:
        dst = tmp / ("model-base.safetensors" if single else shard.name)
        shutil.copyfile(shard, dst)
        header, start = safetensors_header(dst)
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = dst.name
                kind = plan.edits.get(name)
                if kind is None and name != plan.steer_tensor:
                    continue
                t = f.get_tensor(name)
                dtype = dtype or t.dtype
                new_tensors.update(
                    {c: t.clone() for c, (_, src) in plan.new.items() if src == name}
                )
                w = _edited(t, kind, q) if kind else t.float()
                if name == plan.steer_tensor:
                    w = w + steer.float()
                overwrite_tensor(dst, start, header[name], w.to(t.dtype))
    for name, (shape, _src) in plan.new.items():
        if name not in new_tensors:
            new_tensors[name] = torch.zeros(shape, dtype=dtype)
        if name == plan.steer_tensor:
            new_tensors[name] = (new_tensors[name].float() + steer.float()).to(dtype)
    return weight_map, new_tensors


def write_plain(
    source: Path,
    out: Path,
    directions: torch.Tensor,
    layer: int,
    *,
    steer: Optional[torch.Tensor] = None,
    first_layer: int = 0,
    tokenizer=None,
    overwrite: bool = False,
    meta: Optional[dict] = None,
    files: Files = None,
) -> Path:
    """Write the plain export of `source` (an HF folder with safetensors weights) to `out`,
    atomically."""
    from transformers import AutoConfig

    source = Path(source)
    shards = base_weight_files(source)
    if not shards:
        raise PlainExportError(
            f"{source} holds no safetensors weights; save the model with save_pretrained(..., "
            "safe_serialization=True) first"
        )
    # the edit is made on the CPU, where the files' tensors are read (the patch may sit on a GPU)
    directions = directions.detach().cpu()
    steer = steer.detach().cpu() if steer is not None else None
    q = orthonormal_basis(directions)
    carry_steer = steer is not None and float(steer.norm()) > 0
    keys = {k for shard in shards for k in tensor_names(shard)}
    plan = plan_plain(AutoConfig.from_pretrained(source), keys, layer, carry_steer, first_layer)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        weight_map, new_tensors = _edit_shards(shards, tmp, plan, q, steer)
        if new_tensors:
            extra = {k: v.contiguous() for k, v in new_tensors.items()}
            save_file(extra, str(tmp / EXTRA_FILE), metadata={"format": "pt"})
            weight_map.update({k: EXTRA_FILE for k in new_tensors})
        if len(set(weight_map.values())) > 1 or (source / INDEX_FILE).exists():
            write_index(tmp, weight_map)
        cfg = json.loads((source / "config.json").read_text())
        cfg.update(plan.config)
        cfg["scalpel_plain"] = {
            "layer": layer,
            "first_layer": first_layer,
            "n_directions": int(directions.shape[0]),
            "rank": int(q.shape[1]),
            "steer_norm": float(steer.norm()) if carry_steer else 0.0,
            "edited": sorted(plan.edits),
            "added": sorted(plan.new),
            **(meta or {}),
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (source / name).exists() and not (tmp / name).exists():
                shutil.copyfile(source / name, tmp / name)
        write_files(tmp, files)
    return Path(out)


@contextmanager
def projected(
    model,
    layer: int,
    directions: torch.Tensor,
    steer: Optional[torch.Tensor] = None,
    first_layer: int = 0,
) -> Iterator[None]:
    """The in-process twin of a plain export: every residual writer of layers `first_layer`..`layer`
    has its output projected off the span of `directions`, and `steer` is added to layer `layer`'s
    MLP output (hooks removed after)."""
    arch = architecture_of(model)
    param = next(model.parameters())
    q = orthonormal_basis(directions).to(param.device)
    writers = arch.residual_writers(model, upto=layer, start=first_layer)
    last = f"{arch.layers}.{layer}.{arch.mlp_out}"

    def hook(name):
        def fn(_module, _args, out):
            h = _edited(out, "rows", q)  # the same projection the export bakes into the writers
            if steer is not None and name == last:
                h = h + steer.to(h.device, torch.float32)
            return h.to(out.dtype)

        return fn

    handles = [module.register_forward_hook(hook(name)) for name, module in writers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
