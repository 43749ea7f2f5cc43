"""A weight-editing unlearning method (RMU, GA/NPO, DEPN) as a whole run: its path scored on
validation people, the final evaluation on test people with a control, and a plain export with card
and report.

The same harness, people splits, targets and final evaluation as PrivacyScalpel's run, so their
numbers compare directly."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..data.corpus import benign_texts
from ..evaluate.tradeoff import PathPoint, Scored, Targets, meets, plot_front, validation_attacks
from ..evaluate.utility import against_reference, generation_diversity, reference
from ..methods import build, changed_tensors
from ..methods.depn import neuron_count, zero_neuron
from ..models import architecture_of, cast_copy, load_model
from .analysis import probe_stage
from .context import RunContext
from .evaluation import Variant, evaluate_variants, recipe_setting, relearned_variants
from .export import ExportResult, write_method_export
from .inputs import Inputs, check_attacks_fit, resolve_inputs
from .search import collapse_limit, search_prompts
from .stage import METHOD, METHOD_EVALUATE, method_stage


def scored(point: dict) -> Scored:
    """A point of the path (as search.json keeps it) as the trade-off's score."""
    return Scored.from_json(PathPoint(point["value"], point["label"]), point)


def _score_point(model, tok, ref, val, recipe, prompts: list[str], targets: Targets) -> dict:
    """KL, worst validation leakage and, for a point meeting the leakage targets, the collapse
    check."""
    attacker = cast_copy(model, recipe.eval.dtype)
    leakage, username, complete = validation_attacks(
        attacker,
        tok,
        val,
        targets,
        recipe.eval,
        recipe.data.seed,
        lazy=recipe.intervention.search == "lazy",
    )
    score = {
        **against_reference(ref, model),
        "leakage": leakage,
        "username": username,
        "complete": complete,
        "repetition": None,
    }
    if leakage <= targets.leakage and username <= targets.username and prompts:
        score["repetition"] = generation_diversity(attacker, tok, prompts)["repetition_4"]
    return score


def _walk(method, model, score, ctx: RunContext, targets: Targets) -> tuple[list[dict], dict]:
    """Score each point of the method's path (`score(model)`); stop at the first meeting the
    targets, else leave the model at the point with the least leakage, then least KL. (points,
    chosen point)"""
    points, best, best_state = [], None, None
    started = time.perf_counter()
    # LoRA adapters are injected into the model's modules: at each point the model is that point.
    for point in method.path():
        s = score(model)
        seconds = round(time.perf_counter() - started, 1)
        points.append(
            {"value": point.value, "label": point.label, **point.stats, **s, "seconds": seconds}
        )
        ctx.log(
            f"{point.label}: validation leakage {100 * s['leakage']:.0f}% exact / "
            f"{100 * s['username']:.0f}% username, KL {s['kl']:.4f}"
        )
        met = meets(scored(points[-1]), targets)
        rank = (s["leakage"], s["username"], s["kl"])
        if best is None or met or rank < (best["leakage"], best["username"], best["kl"]):
            best = points[-1]
            best_state = (
                None if met else {n: p.detach().clone() for n, p in model.named_parameters()}
            )
        if met:
            break
    if best_state is not None and best is not points[-1]:  # it went past its best point: go back
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(best_state[n])
    return points, best


def search_path(recipe, inputs: Inputs, loaded, layer: int, folder: Path, ctx: RunContext):
    """Walk the method's path, scoring each point on validation people; stop at the first meeting
    the targets (else keep the point with the least leakage, then least KL). Returns the edited
    model and the summary."""
    spec, iv = recipe.method, recipe.intervention
    model, tok = loaded.model, loaded.tokenizer
    val = inputs.validation(tok)
    ref = reference(model, tok, benign_texts(inputs.benign_path, split="heldout")[:24])  # unedited
    prompts = search_prompts(inputs.benign_path) if iv.collapse_tolerance is not None else []
    base_rep = folder / "base-repetition.json"
    limit = collapse_limit(
        recipe, base_rep, lambda: cast_copy(model, recipe.eval.dtype), tok, prompts
    )
    targets = Targets.of(iv, limit)
    # The originals are taken before a LoRA wraps the modules.
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    retain = benign_texts(inputs.benign_path, split="train")
    method = build(
        spec, model, tok, list(inputs.docs), retain, layer=layer, seed=recipe.data.seed,
        progress=ctx.progress,
    )  # fmt: skip
    originals = {n: t for n, t in originals.items() if n in set(method.tensors)}
    started = time.perf_counter()
    points, best = _walk(
        method,
        model,
        lambda m: _score_point(m, tok, ref, val, recipe, prompts, targets),
        ctx,
        targets,
    )
    edited = method.finish()
    changed = changed_tensors(edited, originals)
    params = dict(edited.named_parameters())
    summary = {
        "method": spec.name,
        "points": points,
        "chosen": best,
        "met": meets(scored(best), targets),
        "max_repetition": targets.max_repetition,
        "target": iv.leakage_target,
        "username_target": iv.username_target,
        "seconds": round(time.perf_counter() - started, 1),
        "changed_tensors": changed,
        "changed_parameters": int(sum(params[n].numel() for n in changed)),
    }
    return edited, summary


def control(recipe, base, summary: dict):
    """What the method's edit would do without aiming at PII: DEPN zeroes as many random neurons of
    the same layers; the training methods have no cheap control (it would be a second training run
    on other text)."""
    if recipe.method.name != "depn":
        return None
    model = copy.deepcopy(base)
    arch = architecture_of(model)
    n = summary["chosen"].get("neurons", summary["chosen"]["value"])
    layers = (
        recipe.method.layers
        if recipe.method.layers is not None
        else list(range(arch.num_layers(model)))
    )
    outs = [model.get_submodule(f"{arch.layers}.{i}.{arch.mlp_out}") for i in layers]
    width = neuron_count(outs[0])
    pick = torch.randperm(
        len(layers) * width, generator=torch.Generator().manual_seed(recipe.data.seed)
    )[:n]
    for flat in pick.tolist():
        zero_neuron(outs[flat // width], flat % width)
    return model


def final_evaluation(
    recipe, inputs: Inputs, base, edited, control_model, tok, ctx: RunContext, kept=None
) -> dict:
    """The base, the edited model and (when the method has one) its control on test and never-seen
    people (`kept`: where finished variants are kept, as `evaluate_variants` says)."""
    variants = [Variant("base"), Variant("patched", model=edited)]
    if control_model is not None:
        variants.append(Variant("control", model=control_model))
    variants += relearned_variants(recipe, inputs, edited, tok, ctx)
    setting = recipe_setting(recipe, inputs, tok)
    return evaluate_variants(base, tok, variants, setting, ctx=ctx, kept=kept)


def edited_model(
    recipe, inputs: Inputs, loaded, layer: int, ctx: RunContext, name: Optional[str] = None
):
    """(the edited model, the path's summary, the stage key): from work/method-<name> when
    cached (`name`: the method's by default; GA and NPO share one)."""
    spec, iv, ev = recipe.method, recipe.intervention, recipe.eval
    stage = method_stage(METHOD, name or spec.name)
    key = stage.key(
        inputs.model_id,
        spec.model_dump(),
        recipe.data.model_dump(),
        layer,
        ev.max_new_tokens,
        ev.few_shot,
        ev.dtype,
        iv.leakage_target,
        iv.username_target,
        iv.collapse_tolerance,
        iv.search,
    )
    folder = stage.cached(ctx.work, key)
    if folder:
        ctx.log(f"{spec.name} (cached): {folder}")
        loaded.model.load_state_dict(load_file(folder / "edited.safetensors"), strict=False)
        return loaded.model, json.loads((folder / "search.json").read_text()), key
    scratch = stage.folder(ctx.work)
    scratch.mkdir(parents=True, exist_ok=True)
    edited, summary = search_path(recipe, inputs, loaded, layer, scratch, ctx)
    plot_front(
        [scored(p) for p in summary["points"]],
        scored(summary["chosen"]),
        Targets.of(iv),
        scratch / "front.png",
    )
    params = dict(edited.named_parameters())
    with stage.saving(ctx.work, key) as tmp:
        save_file(
            {n: params[n].detach().contiguous() for n in summary["changed_tensors"]},
            tmp / "edited.safetensors",
        )
        (tmp / "search.json").write_text(json.dumps(summary, indent=2))
        (tmp / "front.png").write_bytes((scratch / "front.png").read_bytes())
    return edited, summary, key


def run(recipe, recipe_text: str, out: Path, ctx: RunContext) -> ExportResult:
    """The recipe's unlearning method end to end: path search (validation) → evaluation (test) →
    plain export. The edited tensors and the evaluation are cached in the work folder, so a re-run
    only writes the export."""
    spec = recipe.method
    inputs = resolve_inputs(recipe, ctx)
    check_attacks_fit(inputs, recipe.eval.max_new_tokens)
    layer = 0
    if spec.name == "rmu":
        layer = spec.layer if spec.layer is not None else probe_stage(recipe, inputs, ctx).chosen
    loaded = load_model(inputs.model)
    edited, summary, key = edited_model(recipe, inputs, loaded, layer, ctx)
    edited = edited.eval()
    stage = method_stage(METHOD_EVALUATE, spec.name)
    ev_key = stage.key(key, recipe.eval.model_dump())
    folder = stage.cached(ctx.work, ev_key)
    if folder:
        ctx.log(f"evaluation (cached): {folder}")
        final = json.loads((folder / "evaluation.json").read_text())
    else:
        base = load_model(inputs.model).model
        final = final_evaluation(
            recipe, inputs, base, edited, control(recipe, base, summary), loaded.tokenizer, ctx,
            kept=stage.partial(ctx.work, ev_key),
        )  # fmt: skip
        with stage.saving(ctx.work, ev_key) as tmp:
            (tmp / "evaluation.json").write_text(json.dumps(final, indent=2))
    report = {
        "method": spec.name,
        "settings": spec.model_dump(),
        "layer": layer if spec.name == "rmu" else None,
        "search": summary,
        "evaluation": final,
    }
    write_method_export(
        edited,
        loaded,
        recipe,
        recipe_text,
        report,
        out,
        method_stage(METHOD, spec.name).folder(ctx.work) / "front.png",
        ctx,
    )
    ctx.log(f"export: {out}")
    return ExportResult(Path(out), report)
