"""A weight-editing unlearning method (RMU, GA/NPO, DEPN) as a whole run: its path scored on validation
people, the final evaluation on test people with a control, and a plain export with card and report.

The same harness, people splits and targets as PrivacyScalpel's run, so their numbers compare directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from .cache import atomic_dir, content_key
from .data.corpus import benign_texts
from .models import cast_copy, load_model
from .pipeline import (ExportResult, Inputs, _base_repetition, _people, _refuse_existing, _stage_cached, probe_stage,
                       resolve_inputs, search_prompts, test_documents, utility_texts)


def _score_point(method_model, attacker, tok, ref, val, recipe, prompts, max_rep, lazy: bool):
    """KL, worst validation leakage (attacks stop at the first that breaks a target when `lazy`) and, for a
    point meeting the leakage targets, the collapse check."""
    from .evaluate.harness import leakage_rows, worst
    from .evaluate.utility import against_reference, generation_diversity

    iv, ev = recipe.intervention, recipe.eval
    util = against_reference(ref, method_model)
    breaks = (lambda row: row["exact"] > iv.leakage_target or row["username"] > iv.username_target) if lazy else None
    rows = leakage_rows(attacker, tok, {"validation": val}, few_shot=ev.few_shot, phones=False,
                        max_new_tokens=ev.max_new_tokens, seed=recipe.data.seed, stop=breaks)
    score = {**util, "leakage": worst(rows, "validation"), "username": worst(rows, "validation", "username"),
             "complete": breaks is None or not any(breaks(r) for r in rows), "repetition": None}
    if score["leakage"] <= iv.leakage_target and score["username"] <= iv.username_target and prompts:
        score["repetition"] = generation_diversity(attacker, tok, prompts)["repetition_4"]
    return score


def _meets(score: dict, recipe, max_rep: Optional[float]) -> bool:
    iv = recipe.intervention
    return (score["leakage"] <= iv.leakage_target and score["username"] <= iv.username_target
            and (max_rep is None or score["repetition"] is None or score["repetition"] <= max_rep))


def search_path(recipe, inputs: Inputs, loaded, layer: int, folder: Path, *, progress: bool = True, log=print):
    """Walk the method's path, scoring each point on validation people; stop at the first meeting the targets
    (else keep the point with the least leakage, then least KL). Returns the edited model and the summary."""
    from .evaluate.utility import reference
    from .methods import build, changed_tensors

    spec, iv = recipe.method, recipe.intervention
    model, tok = loaded.model, loaded.tokenizer
    val = _people(inputs, "validation")
    ref = reference(model, tok, benign_texts(inputs.benign_path, split="heldout")[:24])  # before any edit
    prompts = search_prompts(inputs.benign_path) if iv.collapse_tolerance is not None else []
    max_rep = None
    if prompts:
        max_rep = _base_repetition(folder / "base-repetition.json", lambda: cast_copy(model, recipe.eval.dtype), tok,
                                   prompts) + iv.collapse_tolerance
    forget = list(inputs.docs)
    retain = benign_texts(inputs.benign_path, split="train")
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}  # before a LoRA wraps the modules
    method = build(spec, model, tok, forget, retain, layer=layer, seed=recipe.data.seed, progress=progress)
    originals = {n: t for n, t in originals.items() if n in set(method.tensors)}
    points, best, best_state = [], None, None
    started = time.perf_counter()
    for point in method.path():
        net = model  # LoRA adapters are injected into its modules: its forward is the current point
        score = _score_point(net, cast_copy(net, recipe.eval.dtype), tok, ref, val, recipe, prompts, max_rep,
                             lazy=iv.search == "lazy")
        points.append({"value": point.value, "label": point.label, **point.stats, **score,
                       "seconds": round(time.perf_counter() - started, 1)})
        log(f"{point.label}: validation leakage {100 * score['leakage']:.0f}% exact / "
            f"{100 * score['username']:.0f}% username, KL {score['kl']:.4f}")
        met = _meets(score, recipe, max_rep)
        if best is None or met or (score["leakage"], score["username"], score["kl"]) < (
                best["leakage"], best["username"], best["kl"]):
            best = points[-1]
            best_state = None if met else {n: p.detach().clone() for n, p in net.named_parameters()}
        if met:
            break
    if best_state is not None and best is not points[-1]:  # the path went past its best point: go back to it
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(best_state[n])
    edited = method.finish()
    changed = changed_tensors(edited, originals)
    summary = {"method": spec.name, "points": points, "chosen": best, "met": _meets(best, recipe, max_rep),
               "max_repetition": max_rep, "target": iv.leakage_target, "username_target": iv.username_target,
               "seconds": round(time.perf_counter() - started, 1), "changed_tensors": changed,
               "changed_parameters": int(sum(dict(edited.named_parameters())[n].numel() for n in changed))}
    return edited, summary


def _plot_path(points: list[dict], chosen: dict, recipe, path: Path) -> Path:
    from .evaluate.tradeoff import Candidate, Scored, plot_front

    def scored(p):
        return Scored(Candidate(p["value"], 0.0, recipe.method.name, name=p["label"]), p["leakage"], p["username"],
                      p["kl"], p["perplexity"], p.get("repetition"), p.get("complete", True))

    return plot_front([scored(p) for p in points], scored(chosen), recipe.intervention.leakage_target, path,
                      recipe.intervention.username_target)


def _control(recipe, loaded_base, summary: dict):
    """What the method's edit would do without aiming at PII: DEPN zeroes as many random neurons of the same
    layers; the training methods have no cheap control (it would be a second training run on other text)."""
    if recipe.method.name != "depn":
        return None
    import copy

    from .methods.depn import neuron_count, zero_neuron
    from .models import architecture_of

    model = copy.deepcopy(loaded_base.model)
    arch = architecture_of(model)
    n = summary["chosen"].get("neurons", summary["chosen"]["value"])
    layers = recipe.method.layers if recipe.method.layers is not None else list(range(arch.num_layers(model)))
    outs = [model.get_submodule(f"{arch.layers}.{i}.{arch.mlp_out}") for i in layers]
    width = neuron_count(outs[0])
    pick = torch.randperm(len(layers) * width, generator=torch.Generator().manual_seed(recipe.data.seed))[:n]
    for flat in pick.tolist():
        zero_neuron(outs[flat // width], flat % width)
    return model


def final_evaluation(recipe, inputs: Inputs, base, edited, control, tok, *, progress: bool = True, log=print) -> dict:
    from .evaluate.harness import evaluate_variant
    from .evaluate.utility import reference

    ev = recipe.eval
    groups = {"test": _people(inputs, "test"), "never_seen": _people(inputs, "never_seen")}
    texts, prompts = utility_texts(inputs.benign_path, tok, ev.ppl_tokens)
    common = dict(few_shot=ev.few_shot, samples=ev.samples, max_new_tokens=ev.max_new_tokens, seed=recipe.data.seed,
                  progress=progress, ref=reference(base, tok, texts, max_bytes=2 << 30), adversarial=ev.adversarial,
                  documents=test_documents(inputs, groups["test"], ev))
    out = {}
    for name, other in (("base", None), ("patched", edited), ("control", control)):
        if name == "control" and other is None:
            continue
        model = other if other is not None else base
        out[name] = evaluate_variant(base, tok, groups, texts, prompts, other=other,
                                     attacker=cast_copy(model, ev.dtype), **common)
        log(f"final evaluation: {name} done")
    return out


def run_method(recipe, recipe_text: str, out: Path, work: Path, *, overwrite: bool = False, progress: bool = True,
               log=print) -> ExportResult:
    """The recipe's unlearning method end to end: path search (validation) → evaluation (test) → plain export.
    The edited tensors and the evaluation are cached in `work`, so a re-run only writes the export."""
    from safetensors.torch import load_file, save_file

    _refuse_existing(out, overwrite)
    spec = recipe.method
    inputs = resolve_inputs(recipe, progress=progress, log=log)
    layer = 0
    if spec.name == "rmu":
        layer = spec.layer if spec.layer is not None else probe_stage(recipe, work, progress=progress, log=log,
                                                                        inputs=inputs).chosen
    loaded = load_model(inputs.model)
    folder = Path(work) / f"method-{spec.name}"
    iv, ev = recipe.intervention, recipe.eval
    key = content_key("method-v1", inputs.model_id, spec.model_dump(), recipe.data.model_dump(), layer,
                      ev.max_new_tokens, ev.few_shot, ev.dtype, iv.leakage_target, iv.username_target,
                      iv.collapse_tolerance, iv.search)
    if _stage_cached(folder, key, ("edited.safetensors", "search.json")):
        log(f"{spec.name} (cached): {folder}")
        summary = json.loads((folder / "search.json").read_text())
        edited = loaded.model
        edited.load_state_dict(load_file(folder / "edited.safetensors"), strict=False)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        edited, summary = search_path(recipe, inputs, loaded, layer, folder, progress=progress, log=log)
        _plot_path(summary["points"], summary["chosen"], recipe, folder / "front.png")
        params = dict(edited.named_parameters())
        with atomic_dir(folder, overwrite=True) as tmp:
            save_file({n: params[n].detach().contiguous() for n in summary["changed_tensors"]},
                      tmp / "edited.safetensors")
            (tmp / "search.json").write_text(json.dumps(summary, indent=2))
            (tmp / "front.png").write_bytes((folder / "front.png").read_bytes())
            (tmp / "key.txt").write_text(key)
    edited = edited.eval()
    ev_folder = Path(work) / f"method-{spec.name}-evaluate"
    ev_key = content_key("method-evaluate-v1", key, ev.model_dump())
    if _stage_cached(ev_folder, ev_key, ("evaluation.json",)):
        log(f"evaluation (cached): {ev_folder}")
        final = json.loads((ev_folder / "evaluation.json").read_text())
    else:
        base = load_model(inputs.model)
        final = final_evaluation(recipe, inputs, base.model, edited, _control(recipe, base, summary),
                                 loaded.tokenizer, progress=progress, log=log)
        with atomic_dir(ev_folder, overwrite=True) as tmp:
            (tmp / "evaluation.json").write_text(json.dumps(final, indent=2))
            (tmp / "key.txt").write_text(ev_key)
    report = {"method": spec.name, "settings": spec.model_dump(), "layer": layer if spec.name == "rmu" else None,
              "search": summary, "evaluation": final}
    write_method_export(edited, loaded, recipe, recipe_text, report, out, folder / "front.png", overwrite=overwrite)
    log(f"export: {out}")
    return ExportResult(Path(out), report)


def write_method_export(model, loaded, recipe, recipe_text: str, report: dict, out: Path, front: Path, *,
                        overwrite: bool = False) -> Path:
    """A plain checkpoint (the base architecture, no remote code) with card, report and redacted recipe."""
    from .card import base_metadata, render_method_card
    from .data.detectors import redact_text

    card = render_method_card(report, recipe_text, base=base_metadata(recipe.model),
                              model_type=model.config.model_type, plots=("plots/front.png",) if front.exists() else ())
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(str(card), encoding="utf-8")
        (tmp / "scalpel_report.json").write_text(json.dumps(report, indent=2))
        (tmp / "scalpel_recipe.yaml").write_text(redact_text(recipe_text), encoding="utf-8")
        if front.exists():
            (tmp / "plots").mkdir()
            (tmp / "plots" / "front.png").write_bytes(front.read_bytes())
    return Path(out)
