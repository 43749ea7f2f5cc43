"""A run's distillation: the chosen patch (and its control) learnt into the base's weights, cached
as a stage, with the loss curve plotted in the work folder."""

from __future__ import annotations

import copy
import json
from dataclasses import fields, replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..data.corpus import benign_texts
from ..distill import DistillConfig, Distilled, distil, first_adapted
from ..evaluate.leakage import EMAIL_TEMPLATES, FEW_SHOT_FORMS
from ..evaluate.memorisation import documents_of
from .context import RunContext
from .inputs import Inputs, selection_docs
from .stage import DISTILL, FEATURES

HELDOUT_TEXTS = 64  # test documents and held-out prose the student's layer output is measured on


def written_templates(people) -> list[str]:
    """Each attack template completed with the person's own address, as a document would hold it."""
    return [
        EMAIL_TEMPLATES[t].format(name=p.name)
        + FEW_SHOT_FORMS[t][0]
        + p.email
        + FEW_SHOT_FORMS[t][1]
        for p in people
        for t in EMAIL_TEMPLATES
    ]


def distill_texts(recipe, inputs: Inputs) -> dict[str, list[str]]:
    """What the student learns on (PII text as `export.distill.documents` says, as much benign
    prose) and the held-out text it is measured on (test documents, held-out prose)."""
    spec = recipe.export.distill
    if spec.documents == "validation":
        docs, people = selection_docs(inputs), inputs.split("validation")
    else:
        docs, people = list(inputs.docs), list(inputs.people or [])
        people = [p for p in people if p.split != "never_seen"]  # none of their text was trained on
    pii = [d.text for d in docs] + (written_templates(people) if spec.templates else [])
    # Windows of all the benign text (code and tables too), not only its prose paragraphs: the
    # student keeps the base's behaviour on what it was shown (on SmolLM2 the paragraphs alone, at
    # benign weight 1, cost KL 0.0199 on held-out prose; windows at weight 2, 0.0102).
    benign = benign_texts(inputs.benign_path, split="train", mode="windows")
    return {
        "pii": pii,
        "benign": benign,
        "heldout_pii": [d.text for d in documents_of(inputs.docs, inputs.values("test"))][
            :HELDOUT_TEXTS
        ],
        "heldout_benign": benign_texts(inputs.benign_path, split="heldout")[:HELDOUT_TEXTS],
    }


def config_of(recipe) -> DistillConfig:
    """The distillation's settings: the recipe's `export.distill` (same names) and its seed; what
    the recipe does not name (the micro-batch: memory, not the result) keeps its default."""
    spec = recipe.export.distill
    names = [f.name for f in fields(DistillConfig) if f.name != "seed" and hasattr(spec, f.name)]
    return DistillConfig(**{n: getattr(spec, n) for n in names}, seed=recipe.data.seed)


def distill_key(recipe) -> tuple:
    """What a final evaluation's key gains from a distilled export (nothing for the others, so
    their cached evaluations stay valid)."""
    if not recipe.export.distils:
        return ()
    return (recipe.export.mode, recipe.export.base, recipe.export.distill.model_dump())


def plot_curve(curve: list[dict], path: Path, title: str, late: list[dict] = ()) -> Path:
    """The training loss (relative squared error to the teacher's layer output) against steps,
    beside the later layers' (KL to their target) when that phase ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(curve, "relative squared error to the teacher\n(layer-l output)")]
    if late:
        panels.insert(0, (late, "KL to the target, nats/token\n(later layers, next token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (points, ylabel) in zip(axes[0], panels):
        steps = [c["step"] for c in points]
        for key, label in (("pii", "PII text"), ("benign", "benign prose")):
            ax.plot(steps, [c[key] for c in points], label=label, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_of(got: Distilled, cfg: DistillConfig, texts: dict, spec) -> dict:
    params = dict(got.model.named_parameters())
    curve = got.curve
    tail = curve[-min(20, len(curve)) :]
    return {
        "settings": {**vars(cfg), "documents": spec.documents, "templates": spec.templates},
        "texts": {k: len(v) for k, v in texts.items()},
        "seconds": got.seconds,
        "tokens": got.tokens,
        "heldout": got.heldout,
        "final_loss": {k: sum(c[k] for c in tail) / len(tail) for k in ("pii", "benign")},
        "changed_tensors": len(got.changed),
        "changed_parameters": int(sum(params[n].numel() for n in got.changed)),
        "adapter_parameters": got.adapter_parameters,
        "curve": curve,
        **({"late": got.late} if got.late else {}),
    }


def distilled_model(recipe, prep, cand, patch, ctx: RunContext, *, control: bool = False):
    """(the base with `patch` learnt into its weights, the distillation's summary): from
    work/distill (work/distill-control for the control's patch) when cached. The prepared model is
    left as it was: the student is a copy."""
    stage = replace(DISTILL, folder_name="distill-control") if control else DISTILL
    spec = recipe.export.distill
    key = stage.key(FEATURES.stored_key(ctx.work), vars(cand), spec.model_dump(), recipe.data.seed)
    student = copy.deepcopy(prep.loaded.model)
    folder = stage.cached(ctx.work, key)
    if folder:
        ctx.log(f"{folder.name} (cached): {folder}")
        student.load_state_dict(load_file(folder / "student.safetensors"), strict=False)
        return student.eval(), json.loads((folder / "distill.json").read_text())
    texts = distill_texts(recipe, prep.inputs)
    cfg = config_of(recipe)
    ctx.log(
        f"distillation{' (control)' if control else ''}: {len(texts['pii'])} PII texts "
        f"({spec.documents} documents{', templates' if spec.templates else ''}) and "
        f"{len(texts['benign'])} benign, {cfg.steps} steps, LoRA rank {cfg.rank} on layers "
        f"{first_adapted(prep.layer, cfg.adapted_layers)}..{prep.layer}"
        + (f"; first {cfg.late_steps} steps on the layers after it" if cfg.late_steps else "")
    )
    got = distil(
        student, prep.loaded.tokenizer, prep.layer, patch, texts["pii"], texts["benign"], cfg,
        heldout_pii=texts["heldout_pii"], heldout_benign=texts["heldout_benign"],
        progress=ctx.progress,
    )  # fmt: skip
    summary = summary_of(got, cfg, texts, spec)
    params = dict(got.model.named_parameters())
    with stage.saving(ctx.work, key) as tmp:
        save_file(
            {n: params[n].detach().contiguous() for n in got.changed}, tmp / "student.safetensors"
        )
        (tmp / "distill.json").write_text(json.dumps(summary, indent=2))
        late = got.late["curve"] if got.late else ()
        plot_curve(got.curve, tmp / "curve.png", f"distilling {cand.label}", late)
    pii = got.heldout.get("pii")
    if pii:
        ctx.log(
            f"distillation: {got.seconds:.0f} s; on held-out test documents the layer-{prep.layer} "
            f"output's distance to the patched one fell from {pii['base']:.4f} (base) to "
            f"{pii['student']:.4f}"
        )
    if got.late:
        before, after = (got.late["heldout_kl"][k] for k in ("before", "after"))
        if "pii" in after:
            ctx.log(
                "distillation, later layers: on held-out test documents, fed the base's layer-"
                f"{prep.layer} output, KL to the patched model fell from {before['pii']:.3f} to "
                f"{after['pii']:.3f} nats/token; on held-out prose KL to the base "
                f"{after.get('benign', 0.0):.4f}"
            )
    return got.model, summary
