"""A run's export: the checkpoint (remote-code patch, plain projection or an edited model) with its
report, model card, redacted recipe, plots and SAE, and the user's-path rows measured on the export
as written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import transformers

from ..cache import content_key
from ..card import base_metadata, render_card
from ..data.detectors import redact_text
from ..evaluate.user_path import merge, user_path_rows
from ..method_card import render_method_card
from ..patch import agreement
from ..patch.candidate import Candidate, Mode, patch_for
from ..patch.export import write_export, write_stock
from ..patch.plain import PlainExportError, write_plain
from .context import RunContext
from .inputs import heldout_activations
from .stage import DISTILL, EVALUATE, FEATURES, PROBE, SAE, SEARCH


@dataclass
class ExportResult:
    path: Path
    report: dict
    push: Optional[object] = (
        None  # a push.PushResult when the recipe's hub section pushed the export
    )


def _report(prep, cand: Candidate, patch, recipe, ctx: RunContext, extra: Optional[dict]) -> dict:
    """The report's head: what was patched, where, how, with the SAE's metrics and folded-vs-exact
    agreement."""
    fs = prep.features
    report = {
        "layer": prep.layer,
        "mode": str(cand.mode),
        "ablate_n": cand.n,
        "alpha": cand.alpha,
        "rule": fs.rule,
        "score": fs.score,
        "context_gate": patch.context_gate,
        "sae": prep.sae_metrics,
        **(extra or {}),
    }
    if cand.mode is Mode.PLAIN:
        report["plain_from"] = patch.first_layer
    gate_stats = FEATURES.folder(ctx.work) / "context_gate.json"
    if patch.context_gate and gate_stats.exists():
        report["context_gate_stats"] = json.loads(gate_stats.read_text())
    if cand.mode is Mode.FOLDED:
        exact = patch_for(
            prep.sae, fs, Candidate(cand.n, cand.alpha, Mode.EXACT, cand.gated), prep.calibration
        )
        held = heldout_activations(
            recipe, prep.inputs, prep.loaded, prep.layer, progress=ctx.progress
        )
        report["folded_vs_exact"] = agreement(exact, patch, held)
        ctx.log(
            "folded vs exact on held-out text: gates agree on "
            f"{100 * report['folded_vs_exact']['gate_agreement']:.2f}% of (token, latent) pairs, "
            f"{100 * report['folded_vs_exact']['token_agreement']:.2f}% of tokens"
        )
    report["k"] = prep.sae.k
    return report


@dataclass
class _Extras:
    """What an export carries beside its weights: card, report, redacted recipe, plots, SAE. Called
    with the (not yet published) export folder once its model is complete, so the user's-path rows
    (with `user_path_key`) are measured on the export as a user will load it."""

    prep: object
    recipe: object
    recipe_text: str
    report: dict
    ctx: RunContext
    user_path_key: Optional[str] = None

    def plots(self) -> dict[str, Path]:
        work = self.ctx.work
        sources = {
            "probe.png": PROBE.folder(work) / "probe.png",
            "front.png": SEARCH.folder(work) / "front.png",
            "distill.png": DISTILL.folder(work) / "curve.png",
        }
        return {
            f"plots/{name}": src
            for name, src in sources.items()
            if src.exists()
            and ("search" in self.report or name == "probe.png")
            and ("distill" in self.report or name != "distill.png")
        }

    def __call__(self, folder: Path) -> dict:
        if self.user_path_key is not None:
            add_user_path(self.recipe, self.prep, folder, self.report, self.user_path_key, self.ctx)
        plots = self.plots()
        card = render_card(
            self.report,
            self.recipe_text,
            base=base_metadata(self.recipe.model),
            model_type=self.prep.loaded.model.config.model_type,
            plots=tuple(plots),
        )
        # The recipe travels with the export (how it was made), but a comment or a path in it may
        # hold PII.
        written = {
            "scalpel_recipe.yaml": redact_text(self.recipe_text),
            "scalpel_report.json": json.dumps(self.report, indent=2),
            "README.md": str(card),
            **{name: src.read_bytes() for name, src in plots.items()},
        }
        if self.recipe.export.save_sae:  # SAELens format: others can inspect the latents used
            sae = SAE.folder(self.ctx.work)
            written.update({f"sae/{n}": (sae / n).read_bytes() for n in SAE.outputs[:2]})
        return written


def _without_curves(summary: dict) -> dict:
    """A distillation's summary without its loss curves (each phase's: the work folder keeps them,
    plotted), as the report, the card and the checkpoint's config carry it."""
    return {
        k: _without_curves(v) if isinstance(v, dict) else v
        for k, v in summary.items()
        if k != "curve"
    }


def write_patched(
    prep,
    recipe,
    recipe_text: str,
    out: Path,
    cand: Candidate,
    patch,
    ctx: RunContext,
    *,
    extra: Optional[dict] = None,
    user_path_key: Optional[str] = None,
    student: Optional[tuple] = None,
) -> dict:
    """Write the export of candidate `cand` (its built `patch`), with folded vs exact measured for a
    folded one; with `user_path_key` (a final evaluation in `extra`), add the user's-path rows
    measured on the export itself. `student`: (the model the patch was distilled into, its summary)
    for a distilled export, or the weights under a remote-code one (`export.base: distilled`)."""
    report = _report(prep, cand, patch, recipe, ctx, extra)
    report["export"] = str(recipe.export.mode)
    if recipe.export.base != "original":
        report["export_base"] = recipe.export.base
    if student is not None:
        report["distill"] = _without_curves(student[1])
    files = _Extras(prep, recipe, recipe_text, report, ctx, user_path_key)
    meta = {
        "alpha": cand.alpha,
        "rule": prep.features.rule,
        "score": prep.features.score,
        "sae_norm_scale": float(prep.sae.norm_scale),
        "mean_norm": prep.features.mean_norm,
    }
    if student is not None and recipe.export.mode == "distilled":
        block = {**meta, "layer": prep.layer, "teacher": cand.label, **report["distill"]}
        write_stock(
            student[0],
            prep.loaded.tokenizer,
            out,
            config_block=("scalpel_distilled", block),
            files=files,
            overwrite=ctx.overwrite,
        )
    elif cand.mode is Mode.PLAIN:
        if not prep.loaded.path:
            raise PlainExportError(
                f"a plain export edits the base's safetensors files, and {prep.loaded.source} has "
                "no local folder; save it with save_pretrained and point model.path at it"
            )
        write_plain(
            Path(prep.loaded.path),
            out,
            patch.directions,
            prep.layer,
            steer=patch.steer,
            first_layer=patch.first_layer,
            tokenizer=prep.loaded.tokenizer,
            overwrite=ctx.overwrite,
            meta=meta,
            files=files,
        )
    else:
        write_export(
            prep.loaded,
            patch,
            prep.layer,
            out,
            overwrite=ctx.overwrite,
            dtype=recipe.export.dtype,
            meta=meta,
            files=files,
            weights=student[0] if student is not None else None,
        )
    ctx.log(f"export: {out}")
    return report


def _user_path_caches(
    prep, key: str, test: list, max_new_tokens: int, ctx: RunContext
) -> dict[str, Path]:
    common = (transformers.__version__, max_new_tokens, [(p.name, p.email) for p in test])
    if prep.inputs.model.device != "cpu":  # decoded where the recipe's model runs
        common += (prep.inputs.model.device,)
    keys = {
        "base": content_key("user-path-base", prep.inputs.model_id, *common),
        "patched": content_key("user-path", key, *common),
    }
    return {v: EVALUATE.folder(ctx.work) / f"user-path-{k}.json" for v, k in keys.items()}


def add_user_path(recipe, prep, folder: Path, report: dict, key: str, ctx: RunContext) -> None:
    """The export in `folder` and the base, each loaded in a fresh process with stock transformers,
    each test person's prompt generated alone: rows of their own in the report's evaluation. Cached
    in work/evaluate, the base's rows apart from the patch's (a new patch does not decode the base
    again)."""
    evaluation = report.get("evaluation")
    if not (recipe.eval.user_path and evaluation and prep.inputs.people and prep.loaded.path):
        return
    test = prep.inputs.split("test")
    caches = _user_path_caches(prep, key, test, recipe.eval.max_new_tokens, ctx)
    found = {v: json.loads(c.read_text()) for v, c in caches.items() if c.exists()}
    missing = {
        v: f for v, f in (("base", Path(prep.loaded.path)), ("patched", folder)) if v not in found
    }
    if missing:
        new = user_path_rows(
            missing,
            {"test": test},
            max_new_tokens=recipe.eval.max_new_tokens,
            device=prep.inputs.model.device,  # the device its cache key names
        )
        for v in missing:
            found[v] = {**new[v], "transformers": new["transformers"]}
            caches[v].parent.mkdir(parents=True, exist_ok=True)
            caches[v].write_text(json.dumps(found[v]))
    if len(missing) < 2:
        ctx.log(
            f"user's path (cached): {', '.join(str(caches[v]) for v in caches if v not in missing)}"
        )
    merge(evaluation, {**found, "transformers": found["patched"]["transformers"]})
    worst = {
        v: (
            max(r["exact"] for r in found[v]["leakage"]),
            max(r["username"] for r in found[v]["leakage"]),
        )
        for v in ("base", "patched")
    }
    ctx.log(
        f"user's path (fresh process, stock transformers {found['patched']['transformers']}, "
        f"{found['patched']['dtype']}, each test person's prompt alone, worst template): exact "
        f"{100 * worst['base'][0]:.0f}% -> {100 * worst['patched'][0]:.0f}%, username "
        f"{100 * worst['base'][1]:.0f}% -> {100 * worst['patched'][1]:.0f}%"
    )


def write_method_export(
    model, loaded, recipe, recipe_text: str, report: dict, out: Path, front: Path, ctx: RunContext
) -> Path:
    """A plain checkpoint (the base architecture, no remote code) with card, report and redacted
    recipe."""
    card = render_method_card(
        report,
        recipe_text,
        base=base_metadata(recipe.model),
        model_type=model.config.model_type,
        plots=("plots/front.png",) if front.exists() else (),
    )
    files = {
        "README.md": str(card),
        "scalpel_report.json": json.dumps(report, indent=2),
        "scalpel_recipe.yaml": redact_text(recipe_text),
        **({"plots/front.png": front.read_bytes()} if front.exists() else {}),
    }
    return write_stock(model, loaded.tokenizer, out, files=files, overwrite=ctx.overwrite)
