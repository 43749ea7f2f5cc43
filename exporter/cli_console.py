"""Where the `scalpel` commands print: the console for results, stderr for errors, and the progress
log with the wall time since the command started."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line with the wall time since the command started (so a slow stage shows
    itself); the message is plain text ("[mailto:" in one is not markup)."""
    seconds = int(time.monotonic() - _STARTED)
    console.print(f"[dim]{seconds // 60:3d}:{seconds % 60:02d}[/dim]", escape(message))


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)
