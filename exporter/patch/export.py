"""Write a patched checkpoint that loads with stock transformers (`trust_remote_code=True`).

Layout: the base weights in their own shard files, the tensor data byte-for-byte (streamed, never
re-serialised when the base is safetensors whose names are the model's): the decoder stack under
`scalpel_<prefix>.` (`model.layers.0...` -> `scalpel_model.layers.0...`: the base's own class finds
none of it), the head under `lm_head.`; the patch tensors in their own shard under the patched
layer's `scalpel_patch.`, with the fail-closed markers; one index mapping both; `config.json` with
the base's model_type, `auto_map` (AutoModel, AutoModelForCausalLM) and the `scalpel_patch` block;
the remote-code files; the tokenizer; and whatever the caller adds (recipe, report, card, SAE).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..cache import atomic_dir
from ..models import LoadedModel, architecture_of
from .checkpoint_files import (
    ExportError,
    Files,
    base_weight_files,
    copy_renamed,
    tensor_names,
    write_files,
    write_index,
)
from .remote.scalpel_patch import ScalpelPatch, code_digest, patch_digest, storage, stored_name

REMOTE_DIR = Path(__file__).parent / "remote"
CODE_FILES = ("modeling_scalpel.py", "scalpel_patch.py")
# What a stock class finds under its own names (see modeling_scalpel.py): a one-number tensor where
# it expects its input embeddings (a size mismatch: it stops), and a name that says what to do.
NEEDS_REMOTE_CODE = "scalpel.load_with_trust_remote_code_True"
PATCH_FILE = "scalpel_patch.safetensors"
# 2: the patch inserted at its layer, a pure function of the hidden state; base tensors under
# scalpel_<prefix>. 3: the head under `lm_head.` (vLLM's Transformers backend loads it from there).
FORMAT_VERSION = 3


def base_classes(model_type: str) -> tuple[str, str]:
    """(causal-LM class, decoder-stack class) names transformers exports for `model_type`."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type not in MODEL_MAPPING_NAMES:
        raise ExportError(
            f"transformers has no causal-LM class for model_type {model_type!r}; cannot export it"
        )
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], MODEL_MAPPING_NAMES[model_type]


def render_code(model_type: str) -> dict[str, str]:
    """The remote-code files with the base architecture's classes written in."""
    model_cls, body_cls = base_classes(model_type)
    subs = {
        "scalpel:base-model": (
            r"import \w+ as BaseForCausalLM",
            f"import {model_cls} as BaseForCausalLM",
        ),
        "scalpel:base-body": (r"import \w+ as BaseModel", f"import {body_cls} as BaseModel"),
    }
    out = {}
    for name in CODE_FILES:
        lines = []
        for line in (REMOTE_DIR / name).read_text().splitlines(keepends=True):
            for marker, (pattern, repl) in subs.items():
                if f"# {marker}" in line:
                    line = re.sub(pattern, repl, line).replace(f"  # {marker}", "")
            lines.append(line)
        out[name] = "".join(lines)
    return out


def _tied(model) -> set[str]:
    """Names of the model's tensors that are tied to another (saved once, under the other's
    name)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def _copyable(files: Optional[list[Path]], model) -> bool:
    """Whether the base's files hold exactly the model's tensors under the model's own names (a
    folder saved by this transformers with no name conversion); otherwise (older or converted names,
    another layout) the export writes the model's tensors itself."""
    if not files:
        return False
    names = {n for f in files for n in tensor_names(f)}
    state = set(model.state_dict())
    return names <= state and not (state - names - _tied(model))


def _write_state(
    model, folder: Path, rename, dtype: Optional[str], shard_bytes: int = 2 << 30
) -> dict[str, str]:
    """The model's own tensors (tied ones once), cast to `dtype` one at a time, renamed, written in
    shards of about `shard_bytes` as each fills; returns the weight map. save_pretrained is not
    used: it may convert names back to an older checkpoint format, and the remote code loads by the
    module names."""
    tied, cast = _tied(model), getattr(torch, dtype) if dtype else None
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[Path] = []
    size = 0

    def flush() -> None:
        files.append(folder / f"model-base-{len(files) + 1:05d}.safetensors")
        save_file(shard, str(files[-1]), metadata={"format": "pt"})
        weight_map.update({k: files[-1].name for k in shard})
        shard.clear()

    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        t = tensor.detach().to(
            "cpu", cast if cast is not None and tensor.is_floating_point() else tensor.dtype
        )
        if shard and size + t.nbytes > shard_bytes:
            flush()
            size = 0
        shard[rename(name)] = t.contiguous()
        size += t.nbytes
    flush()
    if len(files) == 1:  # one shard: the name a single-file base gets too
        files[0].rename(folder / "model-base.safetensors")
        weight_map = {k: "model-base.safetensors" for k in weight_map}
    return weight_map


def patch_block(model, layer: int, patch: ScalpelPatch, **meta) -> dict:
    import transformers

    arch = architecture_of(model)
    return {
        "format_version": FORMAT_VERSION,
        "base_model_type": model.config.model_type,
        "layers_path": arch.layers,
        "layer": layer,
        "mode": patch.mode,
        "d_model": patch.directions.shape[1],
        "n_ablate": patch.directions.shape[0],
        "d_sae": patch.enc_weight.shape[0] if patch.mode == "exact" else 0,
        "k": patch.k,
        "steer_norm": float(patch.steer.norm()),
        "context_gate": patch.context_gate,
        **({"context_hidden": patch.context_hidden} if patch.context_hidden else {}),
        "sink_norm": float(patch.sink_norm),
        "transformers_version": transformers.__version__,
        **meta,
        "sha256": patch_digest(patch),
    }


def write_export(
    loaded: LoadedModel,
    patch: ScalpelPatch,
    layer: int,
    out: Path,
    *,
    overwrite: bool = False,
    dtype: Optional[str] = None,
    meta: Optional[dict] = None,
    files: Files = None,
    weights: Optional[nn.Module] = None,
) -> Path:
    """Write the export atomically to `out`; `files` is extra content (see write_files).
    `weights`: a model of the base's architecture whose tensors go under the patch instead of the
    base's (e.g. the base with the patch distilled into it)."""
    model = loaded.model if weights is None else weights
    model_type = model.config.model_type
    code = render_code(model_type)
    block = patch_block(model, layer, patch, **(meta or {}))
    block["code_sha256"] = {name: code_digest(text) for name, text in sorted(code.items())}
    where = storage(type(model))
    rename = lambda name: stored_name(name, where)  # noqa: E731
    base_folder = Path(loaded.path) if loaded.path else None
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        copied = None if dtype or weights is not None else base_weight_files(base_folder)
        if _copyable(copied, model):
            for src in copied:
                name = "model-base.safetensors" if src.name == "model.safetensors" else src.name
                weight_map.update({k: name for k in copy_renamed(src, tmp / name, rename)})
        else:
            weight_map.update(_write_state(model, tmp, rename, dtype))
        config = (
            json.loads((base_folder / "config.json").read_text())
            if base_folder is not None and (base_folder / "config.json").exists()
            else json.loads(model.config.to_json_string(use_diff=True))
        )
        if dtype:
            config["dtype"] = dtype
        prefix = f"{rename(architecture_of(model).layers)}.{layer}.scalpel_patch."
        tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in patch.state_dict().items()}
        embeddings = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        tensors.update({f"{embeddings}.weight": torch.zeros(1), NEEDS_REMOTE_CODE: torch.zeros(1)})
        save_file(tensors, str(tmp / PATCH_FILE), metadata={"format": "pt"})
        weight_map.update({k: PATCH_FILE for k in tensors})
        write_index(tmp, weight_map)
        # The base's own model_type: its config class loads with no remote code (so does the
        # tokenizer, which reads the config first); the model classes come from auto_map, and a
        # stock class stops at the markers above.
        config.update(
            {
                "model_type": model_type,
                "architectures": ["ScalpelForCausalLM"],
                "auto_map": {
                    "AutoModel": "modeling_scalpel.ScalpelModel",
                    "AutoModelForCausalLM": "modeling_scalpel.ScalpelForCausalLM",
                },
                "scalpel_patch": block,
            }
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in code.items():
            (tmp / name).write_text(text)
        if base_folder is not None and (base_folder / "generation_config.json").exists():
            shutil.copyfile(base_folder / "generation_config.json", tmp / "generation_config.json")
        elif getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        write_files(tmp, files)
    return Path(out)


def write_stock(
    model,
    tokenizer,
    out: Path,
    *,
    config_block: Optional[tuple[str, dict]] = None,
    files: Files = None,
    overwrite: bool = False,
) -> Path:
    """A model whose own weights changed (distilled, edited by an unlearning method) as a stock
    checkpoint of its `model_type` (no remote code), with `config_block` (name, content) added to
    its config.json, and `files`; written atomically."""
    config = model.config
    if config_block is not None:
        setattr(config, *config_block)
    try:
        with atomic_dir(Path(out), overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_files(tmp, files)
    finally:
        if config_block is not None:
            delattr(config, config_block[0])
    return Path(out)
