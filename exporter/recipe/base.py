"""What every recipe section shares: frozen, no unknown keys; paths resolved against the recipe's
folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationInfo

BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m")
DTYPES = ("float32", "bfloat16")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def in_recipe_folder(value: str, info: ValidationInfo) -> Path:
    """A path as a recipe gives it: relative ones are relative to the recipe's folder."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    return Path((info.context or {}).get("base_dir", ".")) / path


def existing_file(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    """Resolve a path against the recipe's folder and insist that it exists."""
    if value is None:
        return None
    path = in_recipe_folder(value, info)
    if not path.exists() and (info.context or {}).get("check_files", True):
        raise ValueError(
            f"file not found: {str(path)!r} (paths are relative to the recipe's folder)"
        )
    return str(path.resolve())
