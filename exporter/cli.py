"""The `scalpel` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import api
from .cli_console import console, err, fail, log
from .cli_eval import eval_cmd
from .cli_tables import (
    print_audit,
    print_detect,
    print_explain,
    print_export,
    print_leaky,
    print_plan,
    print_probe,
    print_push,
    print_run,
    print_sae,
)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Find the PII a causal language model memorised, remove it surgically, export a patched "
    "checkpoint.",
)


SET = typer.Option(
    None,
    "--set",
    metavar="KEY=VALUE",
    help="Set a recipe key over the recipe's own, VALUE read as YAML (repeatable): --set "
    "eval.samples=0 --set 'intervention.alpha=[0.2]'; `scalpel check --explain` lists the keys.",
)


def _demo_fixed(key: str) -> bool:
    """A recipe key a demo cannot take: its model and its PII data are the built-in leaky ones."""
    parts = key.split(".")
    if parts[0] == "model":
        return True
    return parts[:2] in (["data", "pii"], ["data", "people"]) and key != "data.pii.memorised"


@app.command("make-leaky")
def make_leaky_cmd(
    out: Optional[Path] = typer.Option(
        None, "--out", help="Also copy the leaky model folder here."
    ),
    model: str = typer.Option(
        "smollm2-135m", "--model", help="Built-in alias or a local HF folder to fine-tune."
    ),
    people: int = typer.Option(
        None, "--people", help="Memorised people (default from the built-in config)."
    ),
    never_seen: int = typer.Option(
        None, "--never-seen", help="Never-seen people for the guessing baseline."
    ),
    epochs: int = typer.Option(None, "--epochs", help="Fine-tune epochs."),
    seed: int = typer.Option(0, "--seed"),
    rebuild: bool = typer.Option(False, "--rebuild", help="Ignore the cache and fine-tune again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Fine-tune a model on a synthetic Enron-style PII corpus until it leaks, and measure the
    leak."""
    result = api.make_leaky(
        model,
        people=people,
        never_seen=never_seen,
        epochs=epochs,
        seed=seed,
        rebuild=rebuild,
        out=out,
        overwrite=overwrite,
        log=log,
    )
    print_leaky(console, result.report)
    if out is not None:
        console.print(f"copied to {out}")


@app.command()
def demo(
    out: Path = typer.Option(
        Path("scalpel-demo"), "--out", help="Folder for the patched checkpoint."
    ),
    work: Optional[Path] = typer.Option(
        None, "--work", help="Stage folder (default: in the user cache, reused)."
    ),
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Fine-tune the leaky model again instead of the cached one."
    ),
    model: str = typer.Option(
        "smollm2-135m", "--model", help="Built-in model: smollm2-135m or gemma3-270m."
    ),
    set_: Optional[list[str]] = SET,
) -> None:
    """End to end on a built-in model (SmolLM2 unless --model): make it leak (cached), then find,
    remove and export, with the evidence."""
    if model not in api.DEMO_RECIPES:
        fail(f"no demo for {model!r}; choose --model from {', '.join(api.DEMO_RECIPES)}")
    if out.exists() and not (out / "config.json").is_file():
        fail(f"{out} exists and is not an earlier export; choose another --out folder")
    # the leaky model the demo's recipe runs on (as many people as it memorises), and its leak
    overrides = api.parse_overrides(set_)
    fixed = [k for k in overrides if _demo_fixed(k)]
    if fixed:
        fail(
            f"--set {fixed[0]}: the demo runs on a built-in leaky model and its synthetic people "
            "(--model picks smollm2-135m or gemma3-270m; --set data.pii.memorised=N sizes them); "
            "for your own model or data write a recipe and run `scalpel run RECIPE --out DIR`"
        )
    recipe, _ = api.as_recipe(api.DEMO_RECIPES[model], overrides)
    make_leaky_cmd(
        out=None,
        model=model,
        people=recipe.data.pii.memorised,
        never_seen=None,
        epochs=None,
        seed=0,
        rebuild=rebuild,
        overwrite=False,
    )
    result = api.demo(out, model=model, work=work, overrides=overrides, log=log)
    print_run(console, result.report, out)


WORK = typer.Option(
    Path("scalpel-work"), "--work", help="Folder for stage outputs and the stage cache."
)


@app.command()
def probe(
    recipe: Path = typer.Argument(..., help="A YAML recipe."),
    work: Path = WORK,
    layer: Optional[int] = typer.Option(
        None, "--layer", help="Pin the layer (overrides probe.layer)."
    ),
) -> None:
    """Probe every layer for PII vs non-PII separation and choose the layer (table + plot)."""
    result = api.probe(recipe, work=work, layer=layer, log=log)
    print_probe(console, result, work)


@app.command("train-sae")
def train_sae_cmd(
    recipe: Path = typer.Argument(..., help="A YAML recipe."),
    work: Path = WORK,
    layer: Optional[int] = typer.Option(
        None, "--layer", help="Train at this layer instead of the probe's choice."
    ),
) -> None:
    """Train the TopK SAE (AuxK) at the chosen layer; save it in SAELens format with its metrics.
    Under torchrun the harvest and training run data-parallel."""
    chosen, _sae, metrics = api.train_sae(recipe, work=work, layer=layer, log=log)
    if metrics:  # a data-parallel rank other than 0 returns none: rank 0 reports
        print_sae(console, chosen, metrics)


@app.command("export")
def export_cmd(
    recipe: Path = typer.Argument(..., help="A YAML recipe."),
    out: Path = typer.Option(..., "--out", help="Folder to write the patched checkpoint to."),
    work: Path = WORK,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    n: Optional[int] = typer.Option(
        None, "--n", help="Ablation size (default: the recipe's first ablate_n)."
    ),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", help="Steering strength, fraction of the mean norm."
    ),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="exact, folded or plain (default: the recipe's first)."
    ),
    plain: bool = typer.Option(
        False,
        "--plain",
        help="Bake the linear part into ordinary weights: a checkpoint of the base's own type, no "
        "remote code (same as --mode plain).",
    ),
    gated: Optional[bool] = typer.Option(
        None,
        "--gated/--ungated",
        help="Behind the PII-context gate or not (default: the recipe's first context_gate).",
    ),
) -> None:
    """probe → SAE → features → patch, then write the patched checkpoint (loads with
    trust_remote_code=True, or with --plain as a plain checkpoint of the base's type)."""
    if mode not in (None, "exact", "folded", "plain"):
        fail(f"--mode {mode!r} is unknown; use exact, folded or plain")
    if plain and mode not in (None, "plain"):
        fail(f"--plain and --mode {mode} contradict each other; give one")
    mode = "plain" if plain else mode
    result = api.export(
        recipe,
        out,
        work=work,
        overwrite=overwrite,
        n=n,
        alpha=alpha,
        mode=mode,
        gated=gated,
        log=log,
    )
    print_export(console, result.report, out)


STAGE_HELP = "; ".join(f"{s.name}: {s.about}" for s in api.STAGES)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="A YAML recipe."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder to write the patched checkpoint to."
    ),
    work: Path = WORK,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    from_stage: Optional[str] = typer.Option(
        None, "--from", help=f"Recompute from this stage on ({STAGE_HELP})."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan, tokens and estimated memory; run nothing."
    ),
    set_: Optional[list[str]] = SET,
) -> None:
    """All stages: probe → SAE → features → trade-off search (validation) → evaluation (test) →
    export."""
    overrides = api.parse_overrides(set_)
    if dry_run:
        print_plan(console, recipe, overrides)
        return
    if out is None:
        fail("--out is required: the folder to write the patched checkpoint to")
    result = api.run(
        recipe,
        out,
        work=work,
        overwrite=overwrite,
        from_stage=from_stage,
        overrides=overrides,
        log=log,
    )
    print_run(console, result.report, out)
    if result.push is not None:
        print_push(console, result.push)


@app.command()
def push(
    folder: Path = typer.Argument(
        ..., help="An export folder (written by `scalpel run` or `scalpel export`)."
    ),
    repo_id: str = typer.Option(
        ..., "--repo-id", help="OWNER/NAME on the Hub (created when missing)."
    ),
    private: bool = typer.Option(
        True,
        "--private/--public",
        help="Visibility of a repository created now (an existing one keeps its own).",
    ),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Branch to commit to (created when missing)."
    ),
    create_pr: bool = typer.Option(
        False, "--create-pr", help="Open a pull request instead of committing."
    ),
    commit_message: Optional[str] = typer.Option(
        None, "--commit-message", help="The commit's summary line."
    ),
) -> None:
    """Upload an export to the Hugging Face Hub in one commit; print the commit and how to load it
    pinned to it. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks another
    Hub."""
    print_push(
        console,
        api.push(
            folder,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            log=log,
        ),
    )


@app.command()
def gguf(
    folder: Path = typer.Argument(
        ..., help="A stock checkpoint: a distilled or plain export, or a base."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="The GGUF file (default: model-OUTTYPE.gguf inside the folder)."
    ),
    llama_cpp: Optional[Path] = typer.Option(
        None,
        "--llama-cpp",
        help="A llama.cpp source tree, whose convert_hf_to_gguf.py runs (default: $LLAMA_CPP_DIR).",
    ),
    outtype: str = typer.Option("f32", "--outtype", help="f32, f16, bf16 or q8_0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing GGUF."),
) -> None:
    """Write a GGUF of an export for llama.cpp and the stacks built on it (llama.cpp's own
    converter); a remote-code export is refused: llama.cpp cannot run its patch."""
    written = api.gguf(folder, out, llama_cpp=llama_cpp, outtype=outtype, overwrite=overwrite)
    console.print(
        f"GGUF: {written}  (llama.cpp: llama-cli -m {written}; Python: "
        f"llama_cpp.Llama(model_path={str(written)!r}))"
    )


app.command("eval")(eval_cmd)


@app.command()
def check(
    recipe: Optional[Path] = typer.Argument(None, help="A YAML recipe (optional with --explain)."),
    explain: bool = typer.Option(
        False, "--explain", help="Also list every recipe field: its default and what it does."
    ),
    set_: Optional[list[str]] = SET,
) -> None:
    """Validate a recipe without loading any model, and print it with every default filled in."""
    if recipe is None and not explain:
        fail("give a recipe to check, or --explain to list every recipe field")
    if recipe is not None:
        console.print(api.check(recipe, api.parse_overrides(set_)), highlight=False, markup=False)
    if explain:
        print_explain(console, api.explain())


@app.command()
def detect(
    path: Path = typer.Argument(
        ..., help="A corpus: text, JSONL, .mbox, .eml or a maildir folder."
    ),
    show: bool = typer.Option(False, "--show", help="Print the redacted lines that hold PII."),
) -> None:
    """Count PII spans (email, phone, SSN, card, IP) per type in a corpus before any model loads;
    values are always redacted."""
    print_detect(console, path, *api.detect(path, show=show))


@app.command()
def audit(
    model: str = typer.Argument(..., help="The model: a folder, a built-in, or org/name@revision."),
    data: Path = typer.Option(..., "--data", help="Its corpus: text, JSONL, .mbox, .eml, maildir."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the report and its plot."),
    max_values: int = typer.Option(200, "--max-values", help="PII values prompted (seeded)."),
    samples: int = typer.Option(0, "--samples", help="Also K sampled continuations per prompt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """How much of a corpus's PII a model completes from the text before each value, per type,
    exactly and partly; nothing is patched."""
    report = api.audit(model, data, out=out, max_values=max_values, samples=samples,
                       overwrite=overwrite, log=log)  # fmt: skip
    print_audit(console, report, out)


def main() -> None:
    try:
        app()
    except api.USER_ERRORS as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(2)
    except OSError as exc:  # the disk, not the input: full, read-only, a path that vanished
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(
            f"error: {exc.strerror or exc}{where}; free space or choose another folder and run "
            "again: outputs are written atomically (nothing half-written is left under their "
            "names) and finished stages are reused",
            highlight=False,
            markup=False,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
