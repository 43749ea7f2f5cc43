"""Write a patched checkpoint that loads with stock transformers (`trust_remote_code=True`).

Layout: the base weights byte-for-byte in their own shard files (copied, never re-serialised when
the base is safetensors), the patch tensors in their own shard under `scalpel_patch.`, one index
mapping both, `config.json` with a `scalpel_*` model_type, `auto_map` and the `scalpel_patch` block,
the remote-code files, the tokenizer, and whatever the caller adds (recipe, report, card, SAE).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import atomic_dir
from ..models import LoadedModel
from .remote.scalpel_patch import ScalpelPatch, code_digest, patch_digest

REMOTE_DIR = Path(__file__).parent / "remote"
CODE_FILES = ("configuration_scalpel.py", "modeling_scalpel.py", "scalpel_patch.py")
PATCH_FILE = "scalpel_patch.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_VERSION = 1


class ExportError(RuntimeError):
    pass


def base_classes(model_type: str) -> tuple[str, str]:
    """(config class, causal-LM class) names transformers exports for `model_type`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"transformers has no causal-LM class for model_type {model_type!r}; cannot export it")
    return CONFIG_MAPPING_NAMES[model_type], MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def render_code(model_type: str) -> dict[str, str]:
    """The remote-code files with the base architecture's classes written in."""
    config_cls, model_cls = base_classes(model_type)
    subs = {
        "scalpel:base-config": (r"import \w+ as BaseConfig", f"import {config_cls} as BaseConfig"),
        "scalpel:base-model": (r"import \w+ as BaseForCausalLM", f"import {model_cls} as BaseForCausalLM"),
        "scalpel:model-type": (r'model_type = "[^"]*"', f'model_type = "scalpel_{model_type}"'),
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


def _base_weight_files(folder: Optional[Path]) -> Optional[list[Path]]:
    """The base's safetensors files when they can be copied as they are, else None."""
    if folder is None:
        return None
    index = folder / INDEX_FILE
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() else None


def _tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file; ValueError when the header cannot be one."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100 << 20:
            raise ValueError(f"its header length ({n} bytes) is invalid")
        return json.loads(f.read(n)), 8 + n


def write_files(folder: Path, files: Optional[dict[str, str | bytes]]) -> None:
    """Extra content of an export (relative name -> text or bytes): card, report, recipe, plots, SAE."""
    for name, data in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def patch_block(model, layer: int, patch: ScalpelPatch, **meta) -> dict:
    from ..models import architecture_of

    arch = architecture_of(model)
    return {"format_version": FORMAT_VERSION, "base_model_type": model.config.model_type,
            "layers_path": arch.layers, "layer": layer, "mode": patch.mode,
            "d_model": patch.directions.shape[1], "n_ablate": patch.directions.shape[0],
            "d_sae": patch.enc_weight.shape[0] if patch.mode == "exact" else 0, "k": patch.k,
            "steer_norm": float(patch.steer.norm()), "context_gate": patch.context_gate, **meta,
            "sha256": patch_digest(patch)}


def write_export(loaded: LoadedModel, patch: ScalpelPatch, layer: int, out: Path, *, overwrite: bool = False,
                 dtype: Optional[str] = None, meta: Optional[dict] = None,
                 files: Optional[dict[str, str | bytes]] = None) -> Path:
    """Write the export atomically to `out`; `files` is extra content (relative name -> text or bytes)."""
    model = loaded.model
    model_type = model.config.model_type
    code = render_code(model_type)
    block = patch_block(model, layer, patch, **(meta or {}))
    block["code_sha256"] = {name: code_digest(text) for name, text in sorted(code.items())}
    base_folder = Path(loaded.path) if loaded.path else None
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        copied = None if dtype else _base_weight_files(base_folder)
        if copied:
            for src in copied:
                name = "model-base.safetensors" if src.name == "model.safetensors" else src.name
                shutil.copyfile(src, tmp / name)
                weight_map.update({k: name for k in _tensor_names(tmp / name)})
            config = json.loads((base_folder / "config.json").read_text())
        else:
            staging = tmp / ".base"
            target = model.to(getattr(torch, dtype)) if dtype else model
            target.save_pretrained(staging, safe_serialization=True)
            for src in _base_weight_files(staging):
                name = "model-base.safetensors" if src.name == "model.safetensors" else src.name
                src.rename(tmp / name)
                weight_map.update({k: name for k in _tensor_names(tmp / name)})
            config = json.loads((staging / "config.json").read_text())
            shutil.rmtree(staging)
        tensors = {f"scalpel_patch.{k}": v.detach().cpu().contiguous() for k, v in patch.state_dict().items()}
        save_file(tensors, str(tmp / PATCH_FILE), metadata={"format": "pt"})
        weight_map.update({k: PATCH_FILE for k in tensors})
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config.update({
            "model_type": f"scalpel_{model_type}",
            "architectures": ["ScalpelForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_scalpel.ScalpelConfig",
                         "AutoModelForCausalLM": "modeling_scalpel.ScalpelForCausalLM"},
            "scalpel_patch": block,
        })
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
