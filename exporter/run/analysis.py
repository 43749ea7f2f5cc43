"""Where the PII lives: the probe stage (layer choice), the SAE stage and the features stage, each
cached."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..activations import harvest, shuffled_batches, stream_activations
from ..data.corpus import benign_texts
from ..features import (
    FeatureSet,
    collect_latents,
    context_positives,
    feature_report,
    joined,
    rank_latents,
    write_feature_report,
)
from ..models import cast_copy, load_model
from ..patch import context_scores, fit_context_gate, fit_context_mlp
from ..patch.remote.scalpel_patch import CONTEXT_BUFFERS
from ..precision import recipe_device
from ..probe import ProbeResult, run_probes, write_probe_report
from ..sae import load_sae, reconstruction_metrics, save_sae, spliced_ce, train_sae, world
from .context import RunContext
from .inputs import (
    Inputs,
    doc_groups,
    heldout_activations,
    sae_texts,
    selection_docs,
    training_activations,
)
from .stage import FEATURES, PROBE, SAE, Stage

# tokens of benign windows the context gate is fitted against at most (context_negatives: windows);
# 100,000 residuals of a 4,096-wide model are 1.6 GB
GATE_WINDOW_TOKENS = 100_000
INIT_SAMPLE = 20_000  # activations the SAE's b_pre and input scale are taken from
SPLICED_CE_TEXTS = 48  # held-out prose texts the SAE's spliced cross-entropy is measured on


def probe_stage(recipe, inputs: Inputs, ctx: RunContext) -> ProbeResult:
    """Harvest every layer on PII text, probe each, choose the layer. Cached in work/probe."""
    key = PROBE.key(inputs.model_id, recipe.data.model_dump(), recipe.probe.model_dump())
    folder = PROBE.cached(ctx.work, key)
    if folder:
        ctx.log(f"probe (cached): {folder}")
        return ProbeResult(**json.loads((folder / "probe.json").read_text()))
    loaded = load_model(inputs.model)
    n_layers = loaded.arch.num_layers(loaded.model)
    pinned = recipe.probe.layer if isinstance(recipe.probe.layer, int) else None
    if pinned is not None and pinned >= n_layers:
        raise IndexError(
            f"probe.layer {pinned} is out of range: the model has layers 0..{n_layers - 1}"
        )
    acts = harvest(
        loaded.model,
        loaded.tokenizer,
        inputs.docs,
        list(range(n_layers)),
        max_length=recipe.data.max_length,
        max_tokens=recipe.probe.max_tokens,
        progress=ctx.progress,
    )
    result = run_probes(
        acts,
        doc_groups(inputs.docs),
        held_out_fraction=recipe.probe.held_out_fraction,
        seed=recipe.data.seed,
        pinned=pinned,
    )
    with PROBE.saving(ctx.work, key) as tmp:
        write_probe_report(result, tmp)
    ctx.log(
        f"probe: chose layer {result.chosen} by {result.criterion}; report in "
        f"{PROBE.folder(ctx.work)}"
    )
    return result


def _sae_batches(recipe, inputs: Inputs, loaded, layer: int, ctx: RunContext):
    """(training batches, the init sample): from the cached harvest, or streamed from the model."""
    s = recipe.sae
    if s.source == "cached":
        x = training_activations(recipe, inputs, loaded, layer, ctx)
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(s.seed))[:INIT_SAMPLE]
        return shuffled_batches(x, s.batch_size, seed=s.seed), x[pick]
    batches = stream_activations(
        cast_copy(loaded.model, s.harvest_dtype),
        loaded.tokenizer,
        sae_texts(inputs, "train"),
        layer,
        batch_size=s.batch_size,
        buffer_tokens=max(4 * s.batch_size, 65536),
        max_length=recipe.data.max_length * 2,
        seed=s.seed,
    )
    # The init sample (b_pre, input scale) comes from the training stream, never the held-out set.
    return batches, torch.cat([next(batches) for _ in range(max(1, INIT_SAMPLE // s.batch_size))])


def sae_stage(recipe, inputs: Inputs, layer: int, ctx: RunContext):
    """Train the TopK SAE at `layer`; save it in SAELens format with its metrics. Cached in
    work/sae."""
    s = recipe.sae
    key = SAE.key(inputs.model_id, layer, recipe.data.model_dump(), s.model_dump())
    folder = SAE.cached(ctx.work, key)
    if folder:
        ctx.log(f"SAE (cached): {folder}")
        sae, _ = load_sae(folder)
        return sae, json.loads((folder / "metrics.json").read_text())
    loaded = load_model(inputs.model)
    n_layers = loaded.arch.num_layers(loaded.model)
    if not 0 <= layer < n_layers:
        raise IndexError(
            f"SAE layer {layer} is out of range: the model has layers 0..{n_layers - 1}"
        )
    held = heldout_activations(recipe, inputs, loaded, layer, progress=ctx.progress)
    batches, sample = _sae_batches(recipe, inputs, loaded, layer, ctx)
    checkpoints = ctx.work / SAE.scratch[0] / key
    checkpoints.mkdir(parents=True, exist_ok=True)
    result = train_sae(
        batches,
        sample,
        s,
        workdir=checkpoints,
        progress=ctx.progress,
        device=recipe_device(recipe.model.device),
    )
    if world()[0] != 0:  # data-parallel: rank 0 evaluates and writes
        return result.sae, {}
    metrics = {
        "layer": layer,
        **reconstruction_metrics(result.sae, held, outlier_factor=s.outlier_factor),
        "dead_fraction": result.dead_fraction,
        "steps": result.steps,
        "train_tokens": result.tokens,
        "train_seconds": round(result.seconds, 1),
        "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
        "norm_scale": result.norm_scale,
        "outliers_dropped": result.outliers_dropped,
    }
    metrics.update(
        spliced_ce(
            loaded.model,
            loaded.tokenizer,
            result.sae,
            layer,
            benign_texts(inputs.benign_path, split="heldout")[:SPLICED_CE_TEXTS],
            max_length=recipe.data.max_length,
        )
    )
    with SAE.saving(ctx.work, key) as tmp:
        save_sae(
            result.sae,
            tmp,
            layer=layer,
            model_name=inputs.model.describe(),
            extra={
                "norm_scale": result.norm_scale,
                "k_aux": s.k_aux,
                "aux_coef": s.aux_coef,
                "outlier_factor": s.outlier_factor,
            },
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(checkpoints, ignore_errors=True)
    ctx.log(
        f"SAE: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead "
        f"{100 * metrics['dead_fraction']:.2f}%, spliced CE "
        f"+{100 * metrics['ce_increase_fraction']:.1f}% of zero-ablation; saved in "
        f"{SAE.folder(ctx.work)}"
    )
    return result.sae, metrics


def _load_features(folder) -> FeatureSet:
    meta = json.loads((folder / "features.json").read_text())
    t = load_file(str(folder / "features.safetensors"))
    # a linear gate (w, b) or one with a hidden layer (W, c, v, b); its last term a number
    found = [t[name] for name in CONTEXT_BUFFERS if name in t]
    context = (*found[:-1], float(found[-1])) if found else None
    return FeatureSet(
        meta["rule"],
        meta["score"],
        t["ranking"].tolist(),
        {},
        t["steer_latent"],
        meta["mean_norm"],
        t["firing"],
        context=context,
    )


FEATURE_BENIGN_TEXTS = 300  # training prose beside the validation documents in the feature pass


@dataclass
class BenignPasses:
    """The feature pass's training prose and the context gate's windows, computed once per run and
    reused by every features stage of it (the run's own and each cross-fitted part's): they depend
    on the model, the SAE, the layer and the benign text, never on which validation people a part
    keeps. Each entry is keyed by what it was computed from."""

    prose: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)


def feature_latents(
    recipe,
    inputs: Inputs,
    loaded,
    sae,
    layer: int,
    *,
    progress: bool,
    keep_activations: bool,
    shared: Optional[BenignPasses] = None,
):
    """The feature pass: the SAE's latents (and with `keep_activations` the layer's activations,
    which the context gate is fitted on) over the validation people's PII documents, then training
    prose (from `shared` when an earlier pass of the run computed it). Returns (those documents,
    that prose, the latents)."""
    docs = selection_docs(inputs)
    if not docs:
        raise ValueError(
            "no PII documents about validation people: the features need some; check the people "
            "file"
        )
    benign = benign_texts(inputs.benign_path, split="train")[:FEATURE_BENIGN_TEXTS]

    def latents_of(texts):
        return collect_latents(
            loaded.model,
            loaded.tokenizer,
            sae,
            layer,
            texts,
            max_length=recipe.data.max_length * 2,
            progress=progress,
            keep_activations=keep_activations,
        )

    latents = latents_of(docs)
    if benign:
        shared = shared if shared is not None else BenignPasses()
        key = (str(inputs.benign_path), id(sae), layer, recipe.data.max_length, keep_activations)
        if key not in shared.prose:
            shared.prose[key] = latents_of(benign)
        latents = joined(latents, shared.prose[key], len(docs))
    return docs, benign, latents


def features_stage(
    recipe,
    inputs: Inputs,
    layer: int,
    sae,
    ctx: RunContext,
    stage: Stage = FEATURES,
    about: tuple = (),
    loaded=None,
    shared: Optional[BenignPasses] = None,
) -> FeatureSet:
    """Rank the SAE's PII latents on validation documents; report the top ones (redacted). Cached in
    work/features, or for one of the search's folds (`stage`, and `about` naming it) in its
    folder. `loaded`: the model when the caller has it in memory (else it is loaded here);
    `shared`: the run's benign passes, computed by the first features stage that needs them."""
    iv = recipe.intervention
    gated = any(iv.context_gate)
    key = stage.key(
        *about,
        SAE.stored_key(ctx.work),
        layer,
        iv.rule,
        iv.score,
        recipe.data.model_dump(),
        (iv.context_window, iv.context_recall, iv.context_fit) if gated else None,
        *((iv.context_negatives,) if gated and iv.context_negatives != "paragraphs" else ()),
        *((("hidden", iv.context_hidden),) if gated and iv.context_hidden else ()),
    )
    folder = stage.cached(ctx.work, key)
    if folder:
        ctx.log(f"{stage.name} (cached): {folder}")
        return _load_features(folder)
    loaded = loaded or load_model(inputs.model)
    docs, benign, latents = feature_latents(
        recipe,
        inputs,
        loaded,
        sae,
        layer,
        progress=ctx.progress,
        keep_activations=gated,
        shared=shared,
    )
    fs = rank_latents(latents, sae.d_sae, iv.rule, iv.score, seed=recipe.data.seed)
    gate_stats = {}
    if gated:
        windows = gate_windows(recipe, inputs, loaded, layer, progress=ctx.progress, shared=shared)
        fs.context, gate_stats = fit_context(latents, iv, windows)
    latents.acts = None
    rows = feature_report(
        fs,
        latents,
        docs + benign,
        loaded.tokenizer,
        max_length=recipe.data.max_length * 2,
        names=[p.name for p in inputs.people or []],
    )
    with stage.saving(ctx.work, key) as tmp:
        write_feature_report(rows, fs, tmp)
        tensors = {
            "ranking": torch.tensor(fs.ranking),
            "steer_latent": fs.steer_latent.contiguous(),
            "firing": fs.firing.contiguous(),
        }
        if fs.context is not None:
            tensors.update(
                {
                    name: torch.as_tensor(t, dtype=torch.float32).contiguous().clone()
                    for name, t in zip(CONTEXT_BUFFERS, fs.context)
                }
            )
            (tmp / "context_gate.json").write_text(json.dumps(gate_stats, indent=2))
        save_file(tensors, str(tmp / "features.safetensors"))
    ctx.log(
        f"{stage.name}: {len(docs)} validation documents, {int(latents.pii.sum())} PII tokens; "
        f"top latents in {stage.folder(ctx.work) / 'features.md'}"
    )
    if gate_stats:
        ctx.log(
            f"context gate ({gate_stats['fit']} fit): open on {100 * gate_stats['recall']:.1f}% "
            "of PII-context tokens, "
            f"{100 * gate_stats['open_benign']:.2f}% of benign tokens, "
            f"{100 * gate_stats['open_other_pii_doc']:.1f}% of other tokens in PII documents"
            + (
                f", {100 * gate_stats['open_windows']:.3f}% of the benign text's windows"
                if "open_windows" in gate_stats
                else ""
            )
        )
    return fs


# auto: the gate fitted on the scaled residual; where it opens on more than AUTO_FIT_CHECK of benign
# tokens, the standardised fit too, kept where it opens on fewer benign tokens and the scaled gate
# on more than AUTO_FIT_LIMIT of them, or on AUTO_FIT_RATIO times as many. Scaled suits SmolLM2
# (0.38% against 0.09%: the tighter standardised gate let validation usernames out), standardised
# Gemma (scaled: 42% at 95% recall; at 90%, 4.46% against 0.04%, which the limit alone missed)
AUTO_FIT_CHECK = 0.005
AUTO_FIT_LIMIT = 0.05
AUTO_FIT_RATIO = 10


def gate_windows(
    recipe,
    inputs: Inputs,
    loaded,
    layer: int,
    *,
    progress: bool,
    shared: Optional[BenignPasses] = None,
):
    """[N, d] the layer's activations on every window of the training split's benign text (code and
    tables too), more text for the context gate to stay shut on (from `shared` when an earlier
    features stage of the run harvested them); None unless `intervention.context_negatives` asks
    for them."""
    if recipe.intervention.context_negatives != "windows":
        return None
    shared = shared if shared is not None else BenignPasses()
    key = (str(inputs.benign_path), layer, recipe.data.max_length)
    if key not in shared.windows:
        shared.windows[key] = _windows(recipe, inputs, loaded, layer, progress=progress)
    return shared.windows[key]


def _windows(recipe, inputs: Inputs, loaded, layer: int, *, progress: bool) -> torch.Tensor:
    texts = benign_texts(inputs.benign_path, split="train", mode="windows")
    # a large corpus: windows spread evenly over it, as many as the budget holds at their length
    # limit (pydoc's 352 fit whole)
    cap = max(1, GATE_WINDOW_TOKENS // (2 * recipe.data.max_length))
    texts = texts[:: -(-len(texts) // cap)]
    acts = harvest(
        loaded.model,
        loaded.tokenizer,
        texts,
        [layer],
        max_length=recipe.data.max_length * 2,
        progress=progress,
    )
    return acts.acts[layer]


def fit_context(latents, iv, windows=None, prompts=None):
    """Fit the PII-context gate on the feature pass's activations, on `windows` (more benign
    activations) as text to stay shut on, and on `prompts` (activations where a value is about to
    be written, e.g. the last token of an extraction prompt) as text to open on; (gate, how often
    it opens)."""
    # every row's source: 0 the feature pass, 1 the windows, 2 the prompts
    parts = [(0, latents.acts)] + [(i, a) for i, a in ((1, windows), (2, prompts)) if a is not None]
    x = torch.cat([a.to(latents.acts.dtype) for _, a in parts])
    source = torch.cat([torch.full((len(a),), i) for i, a in parts])

    def of_pass(mask: torch.Tensor) -> torch.Tensor:
        """A mask over the feature pass's rows, false on every other row."""
        out = torch.zeros(len(x), dtype=torch.bool)
        out[source == 0] = mask
        return out

    own = context_positives(latents.labels, iv.context_window)
    positive = of_pass(own) | (source == 2)
    benign = of_pass(latents.benign)
    pii_doc = of_pass(~own & ~latents.benign)

    def fitted(standardise: bool):
        if iv.context_hidden:
            gate = fit_context_mlp(x, positive, iv.context_recall, iv.context_hidden)
        else:
            gate = fit_context_gate(x, positive, iv.context_recall, standardise=standardise)
        opened = context_scores(gate, x) > 0
        stats = {
            "window": iv.context_window,
            "target_recall": iv.context_recall,
            "fit": "hidden layer"
            if iv.context_hidden
            else ("standardised" if standardise else "scaled"),
            **({"hidden": iv.context_hidden} if iv.context_hidden else {}),
            "recall": float(opened[positive].float().mean()),
            "open_benign": float(opened[benign].float().mean()),
            "open_other_pii_doc": float(opened[pii_doc].float().mean()),
            "tokens": len(x),
        }
        for name, i in (("open_windows", 1), ("open_prompts", 2)):
            if (source == i).any():
                stats[name] = float(opened[source == i].float().mean())
        return gate, stats

    gate, stats = fitted(iv.context_fit == "standardised")
    auto = iv.context_fit == "auto" and not iv.context_hidden
    if auto and stats["open_benign"] > AUTO_FIT_CHECK:
        other = fitted(True)
        scaled, standardised = stats["open_benign"], other[1]["open_benign"]
        if standardised < scaled and (
            scaled > AUTO_FIT_LIMIT or standardised * AUTO_FIT_RATIO <= scaled
        ):
            (gate, stats), other = other, (gate, stats)
        stats[f"{other[1]['fit']}_open_benign"] = other[1]["open_benign"]
    return gate, stats
