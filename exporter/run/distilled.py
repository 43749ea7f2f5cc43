"""A run's distillation: the chosen patch (and its control) learnt into the base's weights, cached
as a stage, with the loss curve plotted in the work folder."""

from __future__ import annotations

import copy
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

from ..data.corpus import benign_texts
from ..distill import DistillConfig, Distilled, distil, first_adapted
from ..evaluate.leakage import EMAIL_TEMPLATES, FEW_SHOT_FORMS
from ..evaluate.memorisation import documents_of
from ..harden import HardenConfig, Hardened, harden, revert, specific_neurons
from ..methods.depn import attributed_docs
from ..mlp_keys import key_bases, token_sets
from ..models import architecture_of, load_checkpoint, load_model
from .context import RunContext
from .inputs import Inputs, selection_docs
from .stage import DISTILL, FEATURES, PROBE, Stage

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


# The privacy neurons a hardened export zeroes (`harden.py`): ranked once per base and documents,
# shared by the patch's and the control's distillation, forgotten with the distillation.
NEURONS = Stage(
    "privacy-neurons",
    1,
    ("neurons.json",),
    "privacy neurons above the patch's layer, most specific to PII first",
    folder_name="distill-neurons",
)
# The key directions a hardened export undoes the fine-tune's change along (`mlp_keys.py`): found
# once per base and documents, shared by the patch's and the control's distillation.
KEYS = Stage(
    "mlp-keys",
    1,
    ("keys.safetensors",),
    "the input directions of each later MLP map that PII tokens use most",
    folder_name="distill-keys",
)


def distill_docs(recipe, inputs: Inputs) -> tuple[list, list]:
    """The PII documents the student learns from (`export.distill.documents`) and the people whose
    documents they are."""
    if recipe.export.distill.documents == "validation":
        return selection_docs(inputs), inputs.split("validation")
    people = [p for p in (inputs.people or []) if p.split != "never_seen"]
    return list(inputs.docs), people  # the never-seen people's text was never trained on


def distill_texts(recipe, inputs: Inputs) -> dict[str, list[str]]:
    """What the student learns on (PII text as `export.distill.documents` says, as much benign
    prose) and the held-out text it is measured on (test documents, held-out prose)."""
    spec = recipe.export.distill
    docs, people = distill_docs(recipe, inputs)
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


def harden_config_of(recipe) -> HardenConfig:
    """The hardening's settings: the recipe's `export.distill.harden` (its benign weight, where
    it names none, the distillation's) and the recipe's seed."""
    spec = recipe.export.distill
    own = spec.harden.model_dump(exclude={"benign_weight"})
    weight = spec.harden.benign_weight
    return HardenConfig(
        **own, benign_weight=spec.benign_weight if weight is None else weight, seed=recipe.data.seed
    )


def harden_stage(stage: Stage, recipe, prep, ctx: RunContext, settings: tuple) -> tuple:
    """(the hardening's settings, `stage`'s key for this base, layer, documents and the named
    `settings`, its folder where found before, else None)."""
    cfg = harden_config_of(recipe)
    key = stage.key(
        PROBE.stored_key(ctx.work), prep.layer, recipe.export.distill.documents,
        {k: getattr(cfg, k) for k in settings},
    )  # fmt: skip
    return cfg, key, stage.cached(ctx.work, key)


def ranked_neurons(recipe, prep, texts: dict, ctx: RunContext) -> list:
    """Every neuron above the patch's layer, most specific to the PII tokens first: from
    work/distill-neurons when ranked before on the same base, layer, documents and settings."""
    ranking = ("documents", "ig_steps", "rank_length", "seed")
    cfg, key, folder = harden_stage(NEURONS, recipe, prep, ctx, ranking)
    if folder:
        ctx.log(f"privacy neurons (cached): {folder}")
        return [tuple(n) for n in json.loads((folder / "neurons.json").read_text())]
    docs = attributed_docs(distill_docs(recipe, prep.inputs)[0], cfg.documents, cfg.seed)
    ctx.log(
        f"hardening: ranking the neurons of layers {prep.layer + 1}.. on {len(docs)} PII "
        f"documents against {cfg.documents} benign windows"
    )
    ranked = specific_neurons(
        prep.loaded.model, prep.loaded.tokenizer, docs, texts["benign"][: cfg.documents],
        prep.layer + 1, cfg, progress=ctx.progress,
    )  # fmt: skip
    with NEURONS.saving(ctx.work, key) as tmp:  # indices only: nothing of the text
        (tmp / "neurons.json").write_text(json.dumps(ranked))
    return ranked


def reference_model(recipe):
    """The model `export.distill.harden.reference` names, loaded in the base's dtype."""
    word = recipe.export.distill.harden.reference
    if word == "model":  # the recipe checks that its data is the built-in synthetic corpus
        return load_model(recipe.model).model
    return load_checkpoint(word, dtype=recipe.model.dtype)[0]


def mlp_keys(recipe, prep, texts: dict, ctx: RunContext) -> dict:
    """{(layer, "in" | "mid"): the key directions of that input} of every layer above the patch's,
    in the leaky base: from work/distill-keys when found before on the same base, layer,
    documents and settings."""
    found = ("documents", "directions", "rank_length", "seed")
    cfg, key, folder = harden_stage(KEYS, recipe, prep, ctx, found)
    if folder:
        ctx.log(f"key directions (cached): {folder}")
        stored = load_file(folder / "keys.safetensors")
        return {(int(n.split(".")[0]), n.split(".")[1]): t for n, t in stored.items()}
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    docs = attributed_docs(distill_docs(recipe, prep.inputs)[0], cfg.documents, cfg.seed)
    ctx.log(
        f"hardening: the {cfg.directions} key directions of each MLP map of layers "
        f"{prep.layer + 1}.. from {len(docs)} PII documents against {cfg.documents} benign windows"
    )
    sets = token_sets(tok, docs, texts["benign"][: cfg.documents], cfg.rank_length)
    layers = list(range(prep.layer + 1, architecture_of(model).num_layers(model)))
    keys = key_bases(model, layers, sets, cfg.directions, progress=ctx.progress)
    with KEYS.saving(ctx.work, key) as tmp:  # directions only: no token, no text
        tensors = {f"{i}.{where}": q.contiguous() for (i, where), q in keys.items()}
        save_file(tensors, tmp / "keys.safetensors")
    return keys


def hardened(recipe, prep, student, texts: dict, ctx: RunContext) -> Hardened:
    """`student` hardened as `export.distill.harden` says, in place."""
    cfg = harden_config_of(recipe)
    if cfg.reference:
        keys = mlp_keys(recipe, prep, texts, ctx) if cfg.directions else None
        edit = (
            f"their change from {cfg.reference} undone along {cfg.directions} key directions"
            if keys
            else f"set to {cfg.reference}'s"
        )
        ctx.log(
            f"hardening: the MLPs of layers {prep.layer + 1}.. {edit}, then {cfg.steps} steps of "
            "repair"
        )
        # revert copies what it needs: the reference is not kept beside the student
        return revert(
            student, prep.loaded.tokenizer, prep.layer, reference_model(recipe), texts, cfg,
            progress=ctx.progress, keys=keys,
        )  # fmt: skip
    ranked = ranked_neurons(recipe, prep, texts, ctx)
    ctx.log(
        f"hardening: {min(cfg.neurons, len(ranked))} privacy neurons zeroed, {cfg.steps} steps of "
        f"repair of the MLPs of layers {prep.layer + 1}.."
    )
    return harden(
        student, prep.loaded.tokenizer, prep.layer, ranked, texts, cfg, progress=ctx.progress
    )


def spec_key(spec) -> dict:
    """`export.distill` as the cache keys read it: without hardening when it is off, so that the
    distillations and evaluations cached before the option existed stay valid."""
    return spec.model_dump(exclude=set() if spec.harden.on else {"harden"})


def distill_key(recipe) -> tuple:
    """What a final evaluation's key gains from a distilled export (nothing for the others, so
    their cached evaluations stay valid)."""
    if not recipe.export.distils:
        return ()
    return (recipe.export.mode, recipe.export.base, spec_key(recipe.export.distill))


def plot_curve(
    curve: list[dict], path: Path, title: str, late: list[dict] = (), repair: list[dict] = ()
) -> Path:
    """The training loss (relative squared error to the teacher's layer output) against steps,
    beside the later layers' (KL to their target) when that phase ran, and the hardening's repair
    (KL to the distilled model) when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(curve, "relative squared error to the teacher\n(layer-l output)")]
    if late:
        panels.insert(0, (late, "KL to the target, nats/token\n(later layers, next token)"))
    if repair:
        panels.append((repair, "KL to the distilled model, nats/token\n(hardening's repair)"))
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


def tail_mean(curve: list[dict], keys=("pii", "benign"), last: int = 20) -> dict:
    tail = curve[-min(last, len(curve)) :]
    return {k: sum(c[k] for c in tail) / len(tail) for k in keys}


def harden_summary(hard: Hardened, reference: Optional[str] = None, directions: int = 0) -> dict:
    """What hardening did, as the report and the checkpoint's config keep it (a local reference by
    its folder's name: a path says where a user keeps their files)."""
    if reference and Path(reference).is_absolute():
        reference = Path(reference).name
    return {
        **({"reference": reference} if reference else {}),
        **({"directions": directions} if reference and directions else {}),
        "neurons": len(hard.neurons),
        "layers": sorted({layer for layer, _ in hard.neurons}),
        "repaired_tensors": len(hard.changed),
        "steps": len(hard.curve),
        "seconds": hard.seconds,
        "final_kl": tail_mean(hard.curve),
        "curve": hard.curve,
    }


def summary_of(
    got: Distilled, cfg: DistillConfig, texts: dict, spec, changed: list[str],
    hard: Optional[Hardened] = None,
) -> dict:  # fmt: skip
    """`changed`: every weight that differs from the base (the distillation's and the repair's)."""
    params = dict(got.model.named_parameters())
    return {
        "settings": {**vars(cfg), "documents": spec.documents, "templates": spec.templates},
        "texts": {k: len(v) for k, v in texts.items()},
        "seconds": got.seconds,
        "tokens": got.tokens,
        "heldout": got.heldout,
        "final_loss": tail_mean(got.curve),
        "changed_tensors": len(changed),
        "changed_parameters": int(sum(params[n].numel() for n in changed)),
        "adapter_parameters": got.adapter_parameters,
        "curve": got.curve,
        **({"late": got.late} if got.late else {}),
        **(
            {"harden": harden_summary(hard, spec.harden.reference, spec.harden.directions)}
            if hard
            else {}
        ),
    }


def distilled_model(recipe, prep, cand, patch, ctx: RunContext, *, control: bool = False):
    """(the base with `patch` learnt into its weights, the distillation's summary): from
    work/distill (work/distill-control for the control's patch) when cached. The prepared model is
    left as it was: the student is a copy."""
    stage = replace(DISTILL, folder_name="distill-control") if control else DISTILL
    spec = recipe.export.distill
    key = stage.key(FEATURES.stored_key(ctx.work), vars(cand), spec_key(spec), recipe.data.seed)
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
    hard = hardened(recipe, prep, got.model, texts, ctx) if spec.harden.on else None
    changed = sorted(set(got.changed) | set(hard.changed if hard else ()))
    summary = summary_of(got, cfg, texts, spec, changed, hard)
    params = dict(got.model.named_parameters())
    with stage.saving(ctx.work, key) as tmp:
        tensors = {n: params[n].detach().contiguous() for n in changed}
        save_file(tensors, tmp / "student.safetensors")
        (tmp / "distill.json").write_text(json.dumps(summary, indent=2))
        late = got.late["curve"] if got.late else ()
        repair = hard.curve if hard else ()
        plot_curve(got.curve, tmp / "curve.png", f"distilling {cand.label}", late, repair)
    pii = got.heldout.get("pii")
    if pii:
        ctx.log(
            f"distillation: {got.seconds:.0f} s; on held-out test documents the layer-{prep.layer} "
            f"output's distance to the patched one fell from {pii['base']:.4f} (base) to "
            f"{pii['student']:.4f}"
        )
    if hard is not None:
        final = summary["harden"]["final_kl"]
        ctx.log(
            f"hardening: {hard.seconds:.0f} s; the repaired model's KL to the distilled one at the "
            f"end {final['pii']:.4f} (PII text), {final['benign']:.4f} (benign) nats/token"
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
