"""The safetensors files of a checkpoint, read and written without loading a model: which files hold
the weights, their headers, a tensor overwritten in place, a file copied with its tensors renamed,
the index. Both export writers (remote code and plain) use these, so a checkpoint is edited one
way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
COPY_CHUNK = 64 << 20


class ExportError(RuntimeError):
    pass


def base_weight_files(folder: Optional[Path]) -> Optional[list[Path]]:
    """The base's safetensors files when they can be copied as they are, else None."""
    if folder is None:
        return None
    index = folder / INDEX_FILE
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() else None


def tensor_names(path: Path) -> list[str]:
    """The tensor names a safetensors file holds (its header only is read)."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def copy_renamed(src: Path, dst: Path, rename) -> list[str]:
    """Copy a safetensors file with its tensors renamed: a new header, then the data section
    streamed byte for byte (offsets are relative to the data, so they stay valid). Returns the new
    names."""
    header, start = safetensors_header(src)
    renamed = {(k if k == "__metadata__" else rename(k)): v for k, v in header.items()}
    text = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
    # the data section starts 8-byte aligned, as safetensors writes it
    text += b" " * (-len(text) % 8)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(len(text).to_bytes(8, "little"))
        fout.write(text)
        fin.seek(start)
        shutil.copyfileobj(fin, fout, COPY_CHUNK)
    return [k for k in renamed if k != "__metadata__"]


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file; ValueError when the header cannot be
    one."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100 << 20:
            raise ValueError(f"its header length ({n} bytes) is invalid")
        return json.loads(f.read(n)), 8 + n


Files = Optional[dict[str, str | bytes] | Callable[[Path], dict[str, str | bytes]]]


def write_files(folder: Path, files: Files) -> None:
    """Extra content of an export (relative name -> text or bytes): card, report, recipe, plots,
    SAE. A callable is called with the (not yet published) export folder once the model in it is
    complete, so what it returns can report on the export as a user will load it."""
    if callable(files):
        files = files(folder)
    for name, data in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def overwrite_tensor(path: Path, start: int, entry: dict, t: torch.Tensor) -> None:
    """Write `t` over one tensor's bytes in a safetensors file (header `entry`, data from `start`):
    an edit that keeps dtype and shape leaves every offset valid and every other tensor
    byte-identical."""
    begin, end = entry["data_offsets"]
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    if raw.nbytes != end - begin:
        raise ExportError(
            f"edited tensor has {raw.nbytes} bytes where the shard holds {end - begin}"
        )
    with open(path, "r+b") as f:
        f.seek(start + begin)
        f.write(memoryview(raw))


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    """The sharded-checkpoint index over the files in `folder` that `weight_map` names."""
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / INDEX_FILE).write_text(
        json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2,
        )
    )
