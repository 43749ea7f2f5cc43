"""What every stage of a run shares: where it works, whether it may replace outputs, how it
reports."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable


def _silent(_message: str) -> None:
    return None


@dataclass(frozen=True)
class RunContext:
    """The work folder (stage outputs, the stage cache), overwrite permission, progress bars and the
    log."""

    work: Path = Path("scalpel-work")
    overwrite: bool = False
    progress: bool = True
    log: Callable[[str], Any] = print

    def __post_init__(self) -> None:
        object.__setattr__(self, "work", Path(self.work))

    def quiet(self) -> "RunContext":
        """The same run with the log silenced (data-parallel ranks other than 0, inner helpers)."""
        return replace(self, log=_silent)

    def refuse_existing(self, out: Path) -> None:
        """Fail before hours of work, not after, when `out` exists and may not be replaced."""
        if Path(out).exists() and not self.overwrite:
            raise FileExistsError(
                f"{out} already exists; choose another output folder or pass --overwrite"
            )
