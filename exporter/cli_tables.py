"""What the commands print: rich tables and lines built from the results `exporter.api` returns."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import api

SAE_METRICS = (
    "fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero", "ce_increase_fraction",
    "train_tokens", "train_seconds", "tokens_per_s", "outliers_dropped", "heldout_outliers",
)  # fmt: skip


def rich_table(title: str, header, rows, *, text_columns: int = 1) -> Table:
    """A table whose first `text_columns` columns are left-aligned text and the rest right-aligned
    numbers."""
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < text_columns else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_leaky(console: Console, report: dict) -> None:
    """What the leaky model leaks per template, and what the fine-tune cost."""
    rows = [
        [
            group,
            template,
            str(row["n"]),
            *(f"{100 * row[c]:.1f}%" for c in ("exact", "username", "domain")),
        ]
        for group, by_template in report["extraction"].items()
        for template, row in by_template.items()
    ]
    console.print(
        rich_table(
            "Template extraction (greedy, regex) - leaky model",
            ["people", "template", "n", "exact", "username", "domain"],
            rows,
            text_columns=2,
        )
    )
    ppl, train = report["perplexity"], report["train"]
    console.print(
        f"benign perplexity: base {ppl['base']:.2f} -> leaky {ppl['leaky']:.2f} "
        f"({100 * ppl['change']:+.1f}%)"
    )
    console.print(
        f"fine-tune: {train['steps']} steps, {train['tokens']} tokens, {train['seconds']:.0f} s "
        f"({train['tokens_per_s']:.0f} tokens/s); build wall time {report['wall_seconds']:.0f} s"
    )


def print_probe(console: Console, result, work: Path) -> None:
    table = Table(title="Linear probe per layer (held-out, people-disjoint, balanced)")
    for col in ("layer", "accuracy", "AUROC", f"{result.few_shot}-shot log-loss"):
        table.add_column(col, justify="right")
    for layer, acc, auroc, loss in zip(
        result.layers, result.accuracy, result.auroc, result.few_shot_logloss
    ):
        style = "bold green" if layer == result.chosen else None
        table.add_row(str(layer), f"{acc:.4f}", f"{auroc:.4f}", f"{loss:.4f}", style=style)
    console.print(table)
    console.print(
        f"chosen layer {result.chosen} (criterion: {result.criterion}); plot: "
        f"{work / 'probe' / 'probe.png'}"
    )


def print_sae(console: Console, layer: int, metrics: dict) -> None:
    rows = [
        [n, f"{metrics[n]:.4f}" if isinstance(metrics[n], float) else str(metrics[n])]
        for n in SAE_METRICS
        if n in metrics  # a folder written before a metric was added
    ]
    console.print(rich_table(f"TopK SAE at layer {layer} (held-out)", ["metric", "value"], rows))


def print_export(console: Console, report: dict, out: Path) -> None:
    """Validation extraction before → after the patch, and how to load the export."""
    leak = report.get("validation_leakage")
    if leak:
        rows = [
            [
                template,
                *(
                    f"{100 * before[c]:.0f}% → {100 * leak['after'][template][c]:.0f}%"
                    for c in ("exact", "username", "domain")
                ),
            ]
            for template, before in leak["before"].items()
        ]
        console.print(
            rich_table(
                "Email extraction on validation people (greedy): before → after the patch",
                ["template", "exact", "username", "domain"],
                rows,
            )
        )
    remote = report["mode"] != "plain"
    console.print(
        f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}"
        + (", trust_remote_code=True)" if remote else ")  # no remote code"),
        highlight=False,
        markup=False,
    )


def print_evaluation(console: Console, evaluation: dict, title: str) -> None:
    console.print(
        rich_table(
            f"{title}: every attack, exact / username rate",
            *api.attack_rows(evaluation),
            text_columns=4,
        )
    )
    console.print(rich_table(f"{title}: summary", *api.comparison_rows(evaluation)))


def print_run(console: Console, report: dict, out: Path) -> None:
    chosen = report["search"]["chosen"]
    label = chosen.get("label") or (
        f"N={chosen['n']} alpha={chosen['alpha']:g} "
        f"{chosen['mode']}{' gated' if chosen.get('gated') else ''}"
    )
    console.print(
        f"chosen on validation people and values: {label} (worst exact "
        f"{100 * chosen['leakage']:.0f}%, username {100 * (chosen.get('username') or 0):.0f}%, KL "
        f"{chosen['kl']:.4f})"
        + ("" if report["search"]["met"] else "; no candidate met the targets")
    )
    print_evaluation(
        console,
        report["evaluation"],
        "Test people and values (never used for selection): leaky base vs patched vs control",
    )
    console.print(f"export: {out}  (model card: {out / 'README.md'})")


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_plan(console: Console, recipe_path: Path, overrides: dict | None = None) -> None:
    r, plan = api.plan(recipe_path, overrides)
    console.print(
        f"plan for {recipe_path} (dry run: nothing is loaded or written)", highlight=False
    )
    console.print(
        f"model {plan.model}: {plan.params / 1e9:.2f}B parameters, d={plan.d_model}, "
        f"{plan.n_layers} layers (shape from {plan.config_source}); layer {plan.layer}; "
        + (f"SAE {plan.d_sae:,} latents" if plan.d_sae else f"method {r.method.name}"),
        highlight=False,
    )
    rows = [[name, what, _duration(plan.seconds.get(name))] for name, what in plan.stages]
    if plan.seconds:
        rows.append(["total", "", _duration(sum(plan.seconds.values()))])
    console.print(rich_table("stages", ["stage", "work", "time (est.)"], rows, text_columns=2))
    if plan.seconds:
        console.print(
            f"times: each stage's FLOPs at the rate it reached in the SmolLM2 demo on a 2-core "
            f"CPU, scaled by this device's matrix rate ({plan.gflops:,.0f} GFLOP/s, "
            f"{'measured here' if plan.measured else 'nominal: none here to measure'}); "
            "on a GPU, decoding is floored by its latency per step and each stage keeps the "
            "host's share measured on an H200",
            highlight=False,
        )
    console.print(
        rich_table(
            "memory (estimated)",
            ["what", "GiB"],
            [[w, f"{g:.2f}"] for w, g in plan.memory] + [["peak", f"{plan.peak_gib:.2f}"]],
        )
    )
    for m in plan.missing:
        console.print(f"missing here (needed to run): {m}", highlight=False)


def print_push(console: Console, result) -> None:
    console.print(f"pushed: {result.commit_url}", highlight=False, markup=False)
    if result.pr_url:
        console.print(f"pull request: {result.pr_url}", highlight=False, markup=False)
    console.print(f"revision: {result.revision}", highlight=False, markup=False)
    console.print(
        "load exactly this commit with:\n\n" + result.snippet + "\n", highlight=False, markup=False
    )


def print_explain(console: Console, fields) -> None:
    """One recipe field per line: readable at any terminal width, and greppable."""
    for key, default, text in fields:
        line = f"{key} = {default}: {text}" if default else f"{key}: {text}"
        console.print(line, highlight=False, markup=False)


def print_detect(console: Console, path: Path, counts, documents: int, lines) -> None:
    for where, line in lines:
        console.print(f"{where}: {line}", highlight=False, markup=False)
    rows = [[kind, str(n)] for kind, n in sorted(counts.items())]
    console.print(
        rich_table(f"PII in {path.name} ({documents} documents)", ["type", "spans"], rows)
    )


def print_audit(console: Console, report: dict, out) -> None:
    title = f"PII completed from the corpus's own text ({report['documents']} documents)"
    console.print(rich_table(title, *api.audit_table(report["rows"]), text_columns=3))
    if out is not None:
        console.print(f"report: {out / 'report.md'}")
