"""PrivacyScalpel as a method: inputs → probe → SAE → features (prepared once), the trade-off search
on validation people, the final evaluation on test people beside a control, and the export; or one
candidate exported as is."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..evaluate.harness import zero_shot_table
from ..models import cast_copy, load_model
from ..patch import GateBank, applied
from ..patch.candidate import Candidate, ExportKind, Mode, control_for, patch_for
from ..threat import WEIGHTS_ALONE
from ..timing import timed
from .analysis import BenignPasses, features_stage, probe_stage, sae_stage
from .context import RunContext
from .distilled import distill_key, distilled_model
from .evaluation import Variant, evaluate_variants, recipe_setting, relearned_variants
from .export import ExportResult, write_patched
from .inputs import Inputs, calibration_activations, check_attacks_fit, resolve_inputs
from .search import plain_key, search_stage
from .stage import DISTILL, EVALUATE, FEATURES, PROBE, SAE, SEARCH

KEPT = ("teacher", WEIGHTS_ALONE)  # variants every final evaluation of such an export measures


@dataclass
class Prepared:
    """Everything the patch is built from: the stages up to the features, and the model in
    memory."""

    inputs: Inputs
    layer: int
    sae: object
    sae_metrics: dict
    features: object
    loaded: object
    calibration: GateBank  # over the SAE's training activations (the folded gates are fitted there)
    # the benign passes the features stage made, for the search's cross-fitted ones to reuse
    benign: BenignPasses = field(default_factory=BenignPasses)

    def patch(self, cand: Candidate, plain_from: int = 0):
        return patch_for(self.sae, self.features, cand, self.calibration, plain_from)


def prepare(recipe, ctx: RunContext) -> Prepared:
    """inputs → probe → SAE → features (each cached in the work folder), the model loaded, the gate
    calibration."""
    inputs = resolve_inputs(recipe, ctx)
    check_attacks_fit(inputs, recipe.eval.max_new_tokens)
    with timed(ctx.work, PROBE.name, PROBE):
        layer = probe_stage(recipe, inputs, ctx).chosen
    with timed(ctx.work, SAE.name, SAE):
        sae, sae_metrics = sae_stage(recipe, inputs, layer, ctx)
    loaded, benign = load_model(inputs.model), BenignPasses()
    with timed(ctx.work, FEATURES.name, FEATURES):
        fs = features_stage(recipe, inputs, layer, sae, ctx, loaded=loaded, shared=benign)
    calib = calibration_activations(recipe, inputs, loaded, layer, ctx)
    bank = GateBank(sae, calib, recipe.sae.outlier_factor)
    return Prepared(inputs, layer, sae, sae_metrics, fs, loaded, bank, benign)


def final_evaluation(
    recipe,
    prep: Prepared,
    cand: Candidate,
    patch,
    ctx: RunContext,
    variants: tuple[str, ...] = ("base", "patched", "control", "relearned"),
    student: Optional[tuple] = None,
    kept: Optional[Path] = None,
) -> dict:
    """The leaky base, the chosen `patch` and its control (random latents matched on firing
    frequency plus a random direction of the steering vector's norm) on **test** and never-seen
    people, with utility. For a distilled export, `patched` and `control` are the two patches learnt
    into the weights (loaded as they are, no patch: what anyone with the files has) and the patch
    itself is the `teacher`; for a remote-code export over distilled weights (`export.base`), the
    patches run over their students and the student alone is `weights alone`. `student`: the
    patch's (model, summary) when the caller has it; `kept`: where each finished variant's results
    are kept while the evaluation runs (an interrupted one resumes there)."""
    control, n_control = control_for(
        prep.sae,
        prep.features,
        cand,
        patch,
        prep.calibration,
        recipe.data.seed,
        recipe.intervention.plain_from,
    )
    if recipe.export.distils:
        student, summary = student or distilled_model(recipe, prep, cand, patch, ctx)
        control_student, control_summary = distilled_model(
            recipe, prep, cand, control, ctx, control=True
        )
    if recipe.export.mode == ExportKind.DISTILLED:
        wanted = [
            Variant("base"),
            Variant("teacher", patch),
            Variant("patched", model=student),
            Variant("control", model=control_student),
        ]
        attacked = {"model": student}
    elif recipe.export.distils:  # the patch over the distilled weights, and those weights alone
        wanted = [
            Variant("base"),
            Variant("patched", patch, student),
            Variant("control", control, control_student),
            Variant(WEIGHTS_ALONE, model=student),
        ]
        attacked = {"model": student, "layer": prep.layer, "patch": patch}
    else:
        wanted = [Variant("base"), Variant("patched", patch), Variant("control", control)]
        attacked = {"model": prep.loaded.model, "layer": prep.layer, "patch": patch}
    tok = prep.loaded.tokenizer
    if "relearned" in variants:
        wanted += relearned_variants(recipe, prep.inputs, tokenizer=tok, ctx=ctx, **attacked)
    setting = recipe_setting(recipe, prep.inputs, tok)
    out = evaluate_variants(
        prep.loaded.model,
        tok,
        [v for v in wanted if v.name.split()[0] in variants or v.name in KEPT],
        setting,
        layer=prep.layer,
        ctx=ctx,
        kept=kept,
    )
    out["control_latents"] = n_control
    if recipe.export.distils:
        out["distill"] = {"patched": summary, "control": control_summary}
    return out


def run(recipe, recipe_text: str, out: Path, ctx: RunContext) -> ExportResult:
    """prepare → trade-off search (validation people) → final evaluation (test people) → export."""
    prep = prepare(recipe, ctx)
    with timed(ctx.work, SEARCH.name, SEARCH):
        chosen, search = search_stage(recipe, prep, ctx)
    cand = chosen.candidate
    patch = prep.patch(cand, recipe.intervention.plain_from)
    key = EVALUATE.key(
        FEATURES.stored_key(ctx.work),
        vars(cand),
        recipe.eval.model_dump(),
        recipe.data.seed,
        *plain_key(cand.mode, recipe),
        *distill_key(recipe),
    )
    # a distilled export's student (or a remote-code export's distilled base): evaluated (unless
    # cached) and written
    student = None
    if recipe.export.distils:
        with timed(ctx.work, DISTILL.name, DISTILL):
            student = distilled_model(recipe, prep, cand, patch, ctx)
    folder = EVALUATE.cached(ctx.work, key)
    if folder:
        ctx.log(f"evaluation (cached): {folder}")
        final = json.loads((folder / "evaluation.json").read_text())
    else:
        kept = EVALUATE.partial(ctx.work, key)
        with timed(ctx.work, EVALUATE.name):
            final = final_evaluation(recipe, prep, cand, patch, ctx, student=student, kept=kept)
            with EVALUATE.saving(ctx.work, key) as tmp:
                (tmp / "evaluation.json").write_text(json.dumps(final, indent=2))
    with timed(ctx.work, "export"):
        report = write_patched(
            prep,
            recipe,
            recipe_text,
            out,
            cand,
            patch,
            ctx,
            extra={"search": search, "evaluation": final},
            user_path_key=key,
            student=student,
        )
    return ExportResult(Path(out), report)


def one_candidate(
    recipe, n: Optional[int], alpha: Optional[float], mode: Optional[str], gated: Optional[bool]
) -> tuple[object, Candidate]:
    """The candidate `export` writes (default: the recipe's first of each) and the recipe adjusted
    to carry it: the candidate's mode decides the export's kind (a plain candidate cannot become
    remote code)."""
    iv = recipe.intervention
    if mode is None:
        mode = (
            Mode.PLAIN
            if recipe.export.mode == ExportKind.PLAIN
            else next(Mode(m) for m in iv.patch if m != Mode.PLAIN)
        )
    cand = Candidate(
        iv.ablate_n[0] if n is None else n, iv.alpha[0] if alpha is None else alpha, Mode(mode)
    )
    kind = ExportKind.of(cand.mode)
    if kind != ExportKind(recipe.export.mode):
        export = recipe.export.model_copy(
            update={
                "mode": str(kind),
                "dtype": None if kind is ExportKind.PLAIN else recipe.export.dtype,
            }
        )
        recipe = recipe.model_copy(update={"export": export})
    gated = (iv.context_gate[0] if gated is None else gated) and cand.mode.remote
    if gated and not any(iv.context_gate):
        recipe = recipe.model_copy(
            update={"intervention": iv.model_copy(update={"context_gate": [True]})}
        )
    return recipe, Candidate(cand.n, cand.alpha, cand.mode, gated)


def validation_table(recipe, prep: Prepared, patch, ctx: RunContext) -> dict:
    """Greedy zero-shot extraction on validation people, before → after the patch."""
    val = {"validation": prep.inputs.split("validation")}
    attacker = cast_copy(prep.loaded.model, recipe.eval.dtype)
    table = {}
    for name, p in (("before", None), ("after", patch)):
        with applied(attacker, prep.layer, p) if p is not None else nullcontext():
            found = zero_shot_table(
                attacker,
                prep.loaded.tokenizer,
                val,
                max_new_tokens=recipe.eval.max_new_tokens,
                progress=ctx.progress,
            )
        table[name] = {
            t: {k: v for k, v in row.items() if k != "n"}
            for t, row in found.get("validation", {}).items()
        }
    return table


def export_one(
    recipe,
    recipe_text: str,
    out: Path,
    ctx: RunContext,
    *,
    n: Optional[int] = None,
    alpha: Optional[float] = None,
    mode: Optional[str] = None,
    gated: Optional[bool] = None,
) -> ExportResult:
    """probe → SAE → features → patch → export of one candidate (default: the recipe's first ones),
    with extraction on validation people before → after in the report."""
    ctx.refuse_existing(out)
    recipe, cand = one_candidate(recipe, n, alpha, mode, gated)
    prep = prepare(recipe, ctx)
    patch = prep.patch(cand, recipe.intervention.plain_from)
    extra = (
        {"validation_leakage": validation_table(recipe, prep, patch, ctx)}
        if prep.inputs.people
        else {}
    )
    report = write_patched(prep, recipe, recipe_text, out, cand, patch, ctx, extra=extra)
    return ExportResult(Path(out), report)
