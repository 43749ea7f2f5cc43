"""The command line every benchmark on a finished run starts from: its recipe and work folder."""

from __future__ import annotations

import argparse


def run_args(doc: str) -> argparse.ArgumentParser:
    """A parser with the script's docstring as its help and `--recipe R --work W` (W the work
    folder of a run of R), for the script to add its own options to."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--work", required=True)
    return ap
