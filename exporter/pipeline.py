"""Stages wired together, with content-keyed caching so re-runs reuse finished work."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .cache import atomic_dir, cache_root, content_key
from .data.corpus import benign_texts, write_jsonl
from .data.leaky import LeakyConfig, finetune
from .data.people import Person, by_split, read_people, write_people
from .data.synthetic import make_corpus
from .evaluate.utility import perplexity
from .models import cast_copy, load_model, resolve_local_path
from .recipe import ModelSpec

# Bump when the leaky builder's behaviour changes, so stale cached models are not reused.
LEAKY_VERSION = "leaky-v3"


@dataclass
class LeakyResult:
    path: Path  # HF folder of the leaky model, with corpus.jsonl, people.jsonl and report.json beside
    report: dict

    @property
    def people(self) -> list[Person]:
        return read_people(self.path / "people.jsonl")


def _extraction_table(model, tokenizer, people: list[Person], max_new_tokens: int) -> dict:
    from .evaluate.harness import zero_shot_table

    groups = {"memorised": [p for p in people if p.split in ("validation", "test")],
              "never_seen": by_split(people, "never_seen")}
    return zero_shot_table(cast_copy(model, "bfloat16"), tokenizer, groups, max_new_tokens=max_new_tokens)


def leaky_key(base: ModelSpec, base_dir: Optional[Path], config: LeakyConfig) -> str:
    """The leaky model's cache key: a converted GGUF's folder is named by its content, so only the name
    counts (the same key under any cache root); a user's folder counts by its path."""
    base_id = (base_dir.name if base.builtin or base.gguf else str(base_dir)) if base_dir else base.describe()
    return content_key(LEAKY_VERSION, base.model_dump(), base_id, config.to_json())


def make_leaky(base: ModelSpec, config: LeakyConfig = LeakyConfig(), *, progress: bool = True,
               rebuild: bool = False, log=print) -> LeakyResult:
    """Fine-tune `base` on the synthetic PII corpus (cached by content) and measure what it leaks."""
    key = leaky_key(base, resolve_local_path(base), config)
    target = cache_root() / "leaky" / key
    if (target / "report.json").exists() and not rebuild:
        log(f"leaky model (cached): {target}")
        return LeakyResult(target, json.loads((target / "report.json").read_text()))

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    loaded = load_model(base)
    docs, people = make_corpus(config.synthetic)
    heldout = benign_texts(split="heldout")[:60]
    log(f"corpus: {len(docs)} texts about {config.synthetic.n_memorised} memorised people; "
        f"{config.synthetic.n_never_seen} never-seen people")
    base_ppl = perplexity(loaded.model, loaded.tokenizer, heldout, max_length=config.max_length)
    model, stats = finetune(loaded.model, loaded.tokenizer, docs, benign_texts(split="train"),
                            config, progress=progress)
    leaky_ppl = perplexity(model, loaded.tokenizer, heldout, max_length=config.max_length)
    extraction = _extraction_table(model, loaded.tokenizer, people, max_new_tokens=24)
    report = {
        "base": base.describe(),
        "config": config.to_json(),
        "train": {"steps": stats.steps, "tokens": stats.tokens, "seconds": round(stats.seconds, 1),
                  "tokens_per_s": round(stats.tokens_per_s, 1), "final_loss": round(stats.final_loss, 4)},
        "perplexity": {"base": round(base_ppl, 3), "leaky": round(leaky_ppl, 3),
                       "change": round(leaky_ppl / base_ppl - 1, 4)},
        "extraction": extraction,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_jsonl(({"text": d.text, "spans": [s.to_json() for s in d.spans]} for d in docs), tmp / "corpus.jsonl")
        write_people(people, tmp / "people.jsonl")
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    log(f"leaky model: {target}")
    return LeakyResult(target, report)


def copy_leaky(result: LeakyResult, out: Path, overwrite: bool = False) -> Path:
    """Copy a cached leaky model folder to a user-chosen place, atomically."""
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        shutil.copytree(result.path, tmp, dirs_exist_ok=True)
    return Path(out)


# ---------------------------------------------------------------- recipe-driven stages


@dataclass
class Inputs:
    """What a recipe's stages run on, with built-in sources resolved."""

    model: ModelSpec  # the model to analyse and patch (the leaky model for synthetic data)
    model_id: str  # stable identity of its weights, for cache keys
    docs: list  # PII Documents
    people: Optional[list[Person]]
    benign_path: Optional[str]


def resolve_inputs(recipe, *, progress: bool = True, log=print) -> Inputs:
    """Built-in synthetic data means: fine-tune the recipe's model into the leaky benchmark model
    (cached) and analyse that, with its corpus and ground-truth people."""
    from .data.corpus import read_pii_jsonl
    from .data.people import assign_splits

    data = recipe.data
    if data.pii.builtin == "synthetic":
        leaky = make_leaky(recipe.model, progress=progress, log=log)
        model = ModelSpec(path=str(leaky.path), dtype=recipe.model.dtype, device=recipe.model.device)
        docs = read_pii_jsonl(leaky.path / "corpus.jsonl", data.pii_types)
        people = leaky.people
        model_id = f"leaky:{leaky.path.name}"
    else:
        model = recipe.model
        docs = read_pii_jsonl(data.pii.path, data.pii_types)
        model_id = model.describe() if model.hub else str(resolve_local_path(model))
        people = None
        if data.people.path:
            people = assign_splits(read_people(data.people.path), [d.text for d in docs], seed=data.seed)
    return Inputs(model, model_id, docs, people, data.benign.path)


def doc_groups(docs) -> list[set[str]]:
    """The people a document is about, by the emails (or other PII values) it holds."""
    return [{d.text[s.start:s.end].lower() for s in d.spans} for d in docs]


def _stage_key(folder: Path) -> str:
    return (folder / "key.txt").read_text() if (folder / "key.txt").exists() else ""


def _stage_cached(folder: Path, key: str, outputs: tuple[str, ...]) -> bool:
    return _stage_key(folder) == key and all((folder / o).exists() for o in outputs)


def probe_stage(recipe, work: Path, *, progress: bool = True, log=print, inputs: Optional[Inputs] = None):
    """Harvest every layer on PII text, probe each, choose the layer. Cached in work/probe."""
    from .activations import harvest
    from .probe import ProbeResult, run_probes, write_probe_report

    inputs = inputs or resolve_inputs(recipe, progress=progress, log=log)
    folder = Path(work) / "probe"
    key = content_key("probe-v1", inputs.model_id, recipe.data.model_dump(), recipe.probe.model_dump())
    if _stage_cached(folder, key, ("probe.json", "probe.png")):
        log(f"probe (cached): {folder}")
        return ProbeResult(**json.loads((folder / "probe.json").read_text()))
    loaded = load_model(inputs.model)
    n_layers = loaded.arch.num_layers(loaded.model)
    if isinstance(recipe.probe.layer, int) and recipe.probe.layer >= n_layers:
        raise IndexError(f"probe.layer {recipe.probe.layer} is out of range: the model has layers 0..{n_layers - 1}")
    acts = harvest(loaded.model, loaded.tokenizer, inputs.docs, list(range(n_layers)),
                   max_length=recipe.data.max_length, max_tokens=recipe.probe.max_tokens, progress=progress)
    pinned = recipe.probe.layer if isinstance(recipe.probe.layer, int) else None
    result = run_probes(acts, doc_groups(inputs.docs), held_out_fraction=recipe.probe.held_out_fraction,
                        seed=recipe.data.seed, pinned=pinned)
    write_probe_report(result, folder)
    (folder / "key.txt").write_text(key)
    log(f"probe: chose layer {result.chosen} by {result.criterion}; report in {folder}")
    return result


def _sae_texts(inputs: Inputs, split: str):
    """Training text for the SAE: PII documents (every tenth held out) and benign windows."""
    docs = [d for i, d in enumerate(inputs.docs) if (i % 10 == 0) == (split == "heldout")]
    return docs + benign_texts(inputs.benign_path, split=split, mode="windows")


def _texts_digest(texts) -> str:
    """Content hash of the harvested text, so cached activations follow the text (and the stdlib's version)."""
    import hashlib

    h = hashlib.sha256()
    for t in texts:
        h.update((f"{t.text}{t.spans!r}" if hasattr(t, "text") else t).encode("utf-8") + b"\0")
    return h.hexdigest()


def _acts_key(recipe, inputs: Inputs, layer: int) -> str:
    return content_key("acts-v2", inputs.model_id, layer, _texts_digest(_sae_texts(inputs, "train")),
                       recipe.sae.harvest_tokens, recipe.data.max_length * 2, recipe.sae.harvest_dtype)


def _cached_activations(loaded, texts, layer: int, max_tokens: int, common: dict, log, key: str,
                        dtype: str) -> torch.Tensor:
    """Harvest once into the user cache (each data-parallel rank takes every world-th text), then load."""
    import torch.distributed as dist

    from .activations import harvest, load_shards
    from .sae import world

    rank, size = world()
    shard_dir = cache_root() / "activations" / key
    if not (shard_dir / "done").exists():
        harvest(cast_copy(loaded.model, dtype), loaded.tokenizer, list(texts)[rank::size], [layer],
                max_tokens=max_tokens // size,
                shard_dir=shard_dir, memory_budget_mb=256, shard_prefix=f"r{rank}of{size}-", **common)
        if size > 1:
            dist.barrier()
        if rank == 0:
            (shard_dir / "done").write_text("complete")
    else:
        log(f"activations (cached): {shard_dir}")
    return load_shards(sorted(shard_dir.glob("*.safetensors"))).acts[layer]


def sae_stage(recipe, work: Path, layer: int, *, progress: bool = True, log=print,
              inputs: Optional[Inputs] = None):
    """Train the TopK SAE at `layer`; save it in SAELens format with its metrics. Cached in work/sae."""
    from .activations import harvest, shuffled_batches, stream_activations
    from .sae import TrainConfig, load_sae, reconstruction_metrics, save_sae, spliced_ce, train_sae, world

    inputs = inputs or resolve_inputs(recipe, progress=progress, log=log)
    s = recipe.sae
    folder = Path(work) / "sae"
    key = content_key("sae-v1", inputs.model_id, layer, recipe.data.model_dump(), s.model_dump())
    if _stage_cached(folder, key, ("cfg.json", "sae_weights.safetensors", "metrics.json")):
        log(f"SAE (cached): {folder}")
        sae, _ = load_sae(folder)
        return sae, json.loads((folder / "metrics.json").read_text())
    loaded = load_model(inputs.model)
    n_layers = loaded.arch.num_layers(loaded.model)
    if not 0 <= layer < n_layers:
        raise IndexError(f"SAE layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    train_texts = _sae_texts(inputs, "train")
    common = dict(max_length=recipe.data.max_length * 2, progress=progress)
    held = harvest(loaded.model, loaded.tokenizer, _sae_texts(inputs, "heldout"), [layer], max_tokens=20_000,
                   **common).acts[layer]
    cfg = TrainConfig(k=s.k, expansion=s.expansion, k_aux=s.k_aux, aux_coef=s.aux_coef, lr=s.lr,
                      batch_size=s.batch_size, train_tokens=s.train_tokens, b_pre=s.b_pre,
                      dead_tokens=s.dead_tokens, outlier_factor=s.outlier_factor,
                      checkpoint_every=s.checkpoint_every, bf16_encoder=s.bf16_encoder, seed=s.seed)
    if s.source == "cached":
        x = _cached_activations(loaded, train_texts, layer, s.harvest_tokens, common, log,
                                _acts_key(recipe, inputs, layer), s.harvest_dtype)
        batches = shuffled_batches(x, cfg.batch_size, seed=s.seed)
        sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(s.seed))[:20_000]]
    else:
        batches = stream_activations(cast_copy(loaded.model, s.harvest_dtype), loaded.tokenizer, train_texts, layer,
                                     batch_size=cfg.batch_size, buffer_tokens=max(4 * cfg.batch_size, 65536),
                                     max_length=common["max_length"], seed=s.seed)
        # The init sample (b_pre, input scale) comes from the training stream, never the held-out set.
        sample = torch.cat([next(batches) for _ in range(max(1, 20_000 // cfg.batch_size))])
    workdir = Path(work) / "sae-checkpoint" / key
    workdir.mkdir(parents=True, exist_ok=True)
    result = train_sae(batches, sample, cfg, workdir=workdir, progress=progress)
    if world()[0] != 0:  # data-parallel: rank 0 evaluates and writes
        return result.sae, {}
    metrics = {"layer": layer, **reconstruction_metrics(result.sae, held), "dead_fraction": result.dead_fraction,
               "steps": result.steps, "train_tokens": result.tokens, "train_seconds": round(result.seconds, 1),
               "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
               "norm_scale": result.norm_scale, "outliers_dropped": result.outliers_dropped}
    metrics.update(spliced_ce(loaded.model, loaded.tokenizer, result.sae, layer,
                              benign_texts(inputs.benign_path, split="heldout")[:48],
                              max_length=recipe.data.max_length))
    with atomic_dir(folder, overwrite=True) as tmp:
        save_sae(result.sae, tmp, layer=layer, model_name=inputs.model.describe(),
                 extra={"norm_scale": result.norm_scale, "k_aux": cfg.k_aux, "aux_coef": cfg.aux_coef,
                        "outlier_factor": cfg.outlier_factor})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "key.txt").write_text(key)
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"SAE: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {100 * metrics['dead_fraction']:.2f}%, "
        f"spliced CE +{100 * metrics['ce_increase_fraction']:.1f}% of zero-ablation; saved in {folder}")
    return result.sae, metrics


# ---------------------------------------------------------------- features, patch, export


def selection_docs(inputs: Inputs) -> list:
    """PII documents that may inform selection: those about validation people only, when people are known
    (test people are kept for the reported numbers); otherwise all documents."""
    if not inputs.people:
        return list(inputs.docs)
    val = {p.email.lower() for p in inputs.people if p.split == "validation"}
    known = {p.email.lower() for p in inputs.people}
    out = []
    for doc, group in zip(inputs.docs, doc_groups(inputs.docs)):
        emails = {g for g in group if g in known}
        if emails and emails <= val:
            out.append(doc)
    return out


def features_stage(recipe, work: Path, layer: int, sae, *, inputs: Inputs, progress: bool = True, log=print):
    """Rank the SAE's PII latents on validation documents; report the top ones (redacted). Cached in work/features."""
    from safetensors.torch import load_file, save_file

    from .features import FeatureSet, collect_latents, feature_report, rank_latents, write_feature_report

    iv = recipe.intervention
    folder = Path(work) / "features"
    gated = any(iv.context_gate)
    key = content_key("features-v7", _stage_key(Path(work) / "sae"), layer, iv.rule, iv.score, recipe.data.model_dump(),
                      (iv.context_window, iv.context_recall) if gated else None)
    if _stage_cached(folder, key, ("features.json", "features.safetensors")):
        log(f"features (cached): {folder}")
        meta = json.loads((folder / "features.json").read_text())
        t = load_file(str(folder / "features.safetensors"))
        context = (t["context_weight"], float(t["context_bias"])) if "context_weight" in t else None
        return FeatureSet(meta["rule"], meta["score"], t["ranking"].tolist(), {}, t["steer_latent"],
                          meta["mean_norm"], t["firing"], context=context)
    loaded = load_model(inputs.model)
    docs = selection_docs(inputs)
    if not docs:
        raise ValueError("no PII documents about validation people: the features need some; check the people file")
    benign = benign_texts(inputs.benign_path, split="train")[:300]
    tl = collect_latents(loaded.model, loaded.tokenizer, sae, layer, docs + benign,
                         max_length=recipe.data.max_length * 2, progress=progress, keep_activations=gated)
    fs = rank_latents(tl, sae.d_sae, iv.rule, iv.score, seed=recipe.data.seed)
    context_stats = {}
    if gated:
        fs.context, context_stats = _fit_context(tl, iv)
    tl.acts = None
    rows = feature_report(fs, tl, docs + benign, loaded.tokenizer, max_length=recipe.data.max_length * 2,
                          names=[p.name for p in inputs.people or []])
    with atomic_dir(folder, overwrite=True) as tmp:
        write_feature_report(rows, fs, tmp)
        tensors = {"ranking": torch.tensor(fs.ranking), "steer_latent": fs.steer_latent.contiguous(),
                   "firing": fs.firing.contiguous()}
        if fs.context is not None:
            tensors.update(context_weight=fs.context[0].contiguous(), context_bias=torch.tensor(fs.context[1]))
            (tmp / "context_gate.json").write_text(json.dumps(context_stats, indent=2))
        save_file(tensors, str(tmp / "features.safetensors"))
        (tmp / "key.txt").write_text(key)
    log(f"features: {len(docs)} validation documents, {int(tl.pii.sum())} PII tokens; top latents in "
        f"{folder / 'features.md'}")
    if context_stats:
        log(f"context gate: open on {100 * context_stats['recall']:.1f}% of PII-context tokens, "
            f"{100 * context_stats['open_benign']:.2f}% of benign tokens, "
            f"{100 * context_stats['open_other_pii_doc']:.1f}% of other tokens in PII documents")
    return fs


def _fit_context(tl, iv):
    """Fit the PII-context gate on the feature pass's activations; (gate, how often it opens)."""
    from .features import context_positives
    from .patch import fit_context_gate

    x = tl.acts
    positive = context_positives(tl.labels, iv.context_window)
    w, b = fit_context_gate(x, positive, recall=iv.context_recall)
    opened = x @ w + b > 0
    stats = {"window": iv.context_window, "target_recall": iv.context_recall,
             "recall": float(opened[positive].float().mean()),
             "open_benign": float(opened[tl.benign].float().mean()),
             "open_other_pii_doc": float(opened[~positive & ~tl.benign].float().mean()),
             "tokens": len(x)}
    return (w, b), stats


def _calibrated_patch(sae, ablate, steer, mode: str, calibration, context=None, plain_from: int = 0):
    """`calibration`: a GateBank over the SAE's training activations (gates remembered across candidates, and the
    sink norm above which the patch leaves a token alone)."""
    from .patch import build_patch, plain_edit

    if mode == "plain":
        return plain_edit(sae, ablate, steer, plain_from)
    gates = calibration(ablate) if mode == "folded" else None
    return build_patch(sae, ablate, steer, mode=mode, gates=gates, context=context, sink=calibration.sink_norm)


def _context(fs, gated: bool):
    if gated and fs.context is None:
        raise ValueError("a gated candidate needs the context gate: set intervention.context_gate to include true")
    return fs.context if gated else None


def patch_for(sae, fs, n: int, alpha: float, mode: str, calibration, gated: bool = False, plain_from: int = 0):
    """The patch of one candidate: the top-n latents of the ranking, steering at `alpha` × mean norm,
    behind the PII-context gate when `gated` (a plain one projected from decoder layer `plain_from` on)."""
    from .patch import steering_vector

    steer = steering_vector(sae, fs.steer_latent, alpha, fs.mean_norm)
    return _calibrated_patch(sae, fs.ablation_set(n), steer, mode, calibration, _context(fs, gated), plain_from)


def _plain_key(mode: str, recipe) -> tuple:
    """What a candidate's cache key adds for a plain candidate (the projected layers)."""
    return (recipe.intervention.plain_from,) if mode == "plain" else ()


def calibration_activations(recipe, inputs: Inputs, layer: int, loaded, *, progress: bool = True,
                            n: int = 50_000) -> torch.Tensor:
    """A sample of the SAE's training activations (the folded gates are fitted on these; harvested in
    bfloat16 they differ from the model's own by rounding, well inside the gates' margins)."""
    x = _cached_activations(loaded, _sae_texts(inputs, "train"), layer, recipe.sae.harvest_tokens,
                            dict(max_length=recipe.data.max_length * 2, progress=progress), lambda _m: None,
                            _acts_key(recipe, inputs, layer), recipe.sae.harvest_dtype)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.data.seed))[:n]].float()


def heldout_activations(recipe, inputs: Inputs, layer: int, loaded, *, progress: bool = True) -> torch.Tensor:
    from .activations import harvest

    return harvest(loaded.model, loaded.tokenizer, _sae_texts(inputs, "heldout"), [layer], max_tokens=20_000,
                   max_length=recipe.data.max_length * 2, progress=progress).acts[layer]


@dataclass
class ExportResult:
    path: Path
    report: dict
    push: Optional[object] = None  # a push.PushResult when the recipe's hub section pushed the export


@dataclass
class Prepared:
    """Everything the patch is built from: the stages up to the features, and the model in memory."""

    inputs: Inputs
    layer: int
    sae: object
    sae_metrics: dict
    features: object
    loaded: object
    calibration: object  # a GateBank over the SAE's training activations (the folded gates are fitted there)


def prepare(recipe, work: Path, *, progress: bool = True, log=print) -> Prepared:
    """inputs → probe → SAE → features (each cached in `work`), the model loaded, the gate calibration sample."""
    inputs = resolve_inputs(recipe, progress=progress, log=log)
    layer = probe_stage(recipe, work, progress=progress, log=log, inputs=inputs).chosen
    sae, sae_metrics = sae_stage(recipe, work, layer, progress=progress, log=log, inputs=inputs)
    fs = features_stage(recipe, work, layer, sae, inputs=inputs, progress=progress, log=log)
    loaded = load_model(inputs.model)
    from .patch import GateBank

    calib = calibration_activations(recipe, inputs, layer, loaded, progress=progress)
    return Prepared(inputs, layer, sae, sae_metrics, fs, loaded, GateBank(sae, calib, recipe.sae.outlier_factor))


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:  # fail before hours of work, not after
        raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite")


def write_patched(prep: Prepared, recipe, recipe_text: str, out: Path, work: Path, patch, alpha: float,
                  *, report: Optional[dict] = None, overwrite: bool = False, progress: bool = True, log=print,
                  user_path_key: Optional[str] = None) -> dict:
    """Measure folded vs exact for the candidate's `patch` (built at steering `alpha`) and write the export; with
    `user_path_key` (a final evaluation in `report`), add the user's-path rows measured on the export itself."""
    from .card import base_metadata, render_card
    from .patch import agreement
    from .patch.export import write_export

    sae, fs, mode, n = prep.sae, prep.features, patch.mode, patch.directions.shape[0]
    report = {"layer": prep.layer, "mode": mode, "ablate_n": n, "alpha": alpha, "rule": fs.rule,
              "score": fs.score, "context_gate": patch.context_gate, "sae": prep.sae_metrics, **(report or {})}
    if mode == "plain":
        report["plain_from"] = patch.first_layer
    gate_stats = Path(work) / "features" / "context_gate.json"
    if patch.context_gate and gate_stats.exists():
        report["context_gate_stats"] = json.loads(gate_stats.read_text())
    if mode == "folded":
        exact = patch_for(sae, fs, n, alpha, "exact", prep.calibration, gated=patch.context_gate)
        held = heldout_activations(recipe, prep.inputs, prep.layer, prep.loaded, progress=progress)
        report["folded_vs_exact"] = agreement(exact, patch, held)
        log(f"folded vs exact on held-out text: gates agree on {100 * report['folded_vs_exact']['gate_agreement']:.2f}% "
            f"of (token, latent) pairs, {100 * report['folded_vs_exact']['token_agreement']:.2f}% of tokens")
    report["k"] = sae.k
    plots = {f"plots/{name}": src for name, src in (("probe.png", Path(work) / "probe" / "probe.png"),
                                                     ("front.png", Path(work) / "search" / "front.png"))
             if src.exists() and ("search" in report or name == "probe.png")}
    from .data.detectors import redact_text

    def files(folder: Path) -> dict:
        """Card, report, recipe, plots and SAE; with `user_path_key`, the report first gains the user's-path rows
        measured on `folder` (the export as written, before it is published)."""
        if user_path_key is not None:
            _add_user_path(recipe, prep, folder, Path(work), report, user_path_key, log)
        card = render_card(report, recipe_text, base=base_metadata(recipe.model),
                           model_type=prep.loaded.model.config.model_type, plots=tuple(plots))
        # The recipe travels with the export (how it was made), but a comment or a path in it may hold PII.
        out = {"scalpel_recipe.yaml": redact_text(recipe_text), "scalpel_report.json": json.dumps(report, indent=2),
               "README.md": str(card), **{name: src.read_bytes() for name, src in plots.items()}}
        if recipe.export.save_sae:  # SAELens format, so others can inspect the latents the patch uses
            out.update({f"sae/{name}": (Path(work) / "sae" / name).read_bytes()
                        for name in ("cfg.json", "sae_weights.safetensors")})
        return out

    meta = {"alpha": alpha, "rule": fs.rule, "score": fs.score, "sae_norm_scale": float(sae.norm_scale),
            "mean_norm": fs.mean_norm}
    if mode == "plain":
        from .patch.plain import PlainExportError, write_plain

        if not prep.loaded.path:
            raise PlainExportError(f"a plain export edits the base's safetensors files, and {prep.loaded.source} "
                                   "has no local folder; save it with save_pretrained and point model.path at it")
        write_plain(Path(prep.loaded.path), out, patch.directions, prep.layer, steer=patch.steer,
                    first_layer=patch.first_layer,
                    tokenizer=prep.loaded.tokenizer, overwrite=overwrite, meta=meta, files=files)
    else:
        write_export(prep.loaded, patch, prep.layer, out, overwrite=overwrite, dtype=recipe.export.dtype, meta=meta,
                     files=files)
    log(f"export: {out}")
    return report


def _add_user_path(recipe, prep: Prepared, folder: Path, work: Path, report: dict, key: str, log) -> None:
    """The export in `folder` and the base, each loaded in a fresh process with stock transformers, each test
    person's prompt generated alone: rows of their own in the report's evaluation. Cached in work/evaluate, the
    base's rows apart from the patch's (a new patch does not decode the base again)."""
    import transformers

    from .evaluate.user_path import merge, user_path_rows

    evaluation = report.get("evaluation")
    if not (recipe.eval.user_path and evaluation and prep.inputs.people and prep.loaded.path):
        return
    test = _people(prep.inputs, "test")
    common = (transformers.__version__, recipe.eval.max_new_tokens, [(p.name, p.email) for p in test])
    caches = {"base": content_key("user-path-base", prep.inputs.model_id, *common),
              "patched": content_key("user-path", key, *common)}
    caches = {v: work / "evaluate" / f"user-path-{k}.json" for v, k in caches.items()}
    found = {v: json.loads(c.read_text()) for v, c in caches.items() if c.exists()}
    missing = {"base": Path(prep.loaded.path), "patched": folder}
    missing = {v: f for v, f in missing.items() if v not in found}
    if missing:
        new = user_path_rows(missing, {"test": test}, max_new_tokens=recipe.eval.max_new_tokens)
        for v in missing:
            found[v] = {**new[v], "transformers": new["transformers"]}
            caches[v].parent.mkdir(parents=True, exist_ok=True)
            caches[v].write_text(json.dumps(found[v]))
    if len(missing) < 2:
        log(f"user's path (cached): {', '.join(str(caches[v]) for v in caches if v not in missing)}")
    merge(evaluation, {**found, "transformers": found["patched"]["transformers"]})
    worst = {v: (max(r["exact"] for r in found[v]["leakage"]), max(r["username"] for r in found[v]["leakage"]))
             for v in ("base", "patched")}
    log(f"user's path (fresh process, stock transformers {found['patched']['transformers']}, "
        f"{found['patched']['dtype']}, each test person's prompt alone, worst template): exact "
        f"{100 * worst['base'][0]:.0f}% -> {100 * worst['patched'][0]:.0f}%, username {100 * worst['base'][1]:.0f}% "
        f"-> {100 * worst['patched'][1]:.0f}%")


def export_stage(recipe, recipe_text: str, out: Path, work: Path, *, overwrite: bool = False,
                 n: Optional[int] = None, alpha: Optional[float] = None, mode: Optional[str] = None,
                 gated: Optional[bool] = None, progress: bool = True, log=print) -> ExportResult:
    """probe → SAE → features → patch → export of one candidate (default: the recipe's first ones),
    with extraction on validation people before → after in the report."""
    from .evaluate.harness import zero_shot_table
    from .patch import applied

    _refuse_existing(out, overwrite)
    iv = recipe.intervention
    n = iv.ablate_n[0] if n is None else n
    alpha = iv.alpha[0] if alpha is None else alpha
    if mode is None:
        mode = "plain" if recipe.export.mode == "plain" else next(m for m in iv.patch if m != "plain")
    if (mode == "plain") != (recipe.export.mode == "plain"):
        # The candidate's mode decides the export's kind (a plain candidate cannot become remote code).
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(
            update={"mode": "plain" if mode == "plain" else "remote_code", "dtype": None if mode == "plain"
                    else recipe.export.dtype})})
    gated = iv.context_gate[0] if gated is None else gated
    gated = gated and mode != "plain"
    if gated and not any(iv.context_gate):
        recipe = recipe.model_copy(update={"intervention": iv.model_copy(update={"context_gate": [True]})})
    prep = prepare(recipe, work, progress=progress, log=log)
    patch = patch_for(prep.sae, prep.features, n, alpha, mode, prep.calibration, gated=gated,
                      plain_from=iv.plain_from)
    extra = {}
    if prep.inputs.people:
        val = {"validation": [p for p in prep.inputs.people if p.split == "validation"]}
        attacker = cast_copy(prep.loaded.model, recipe.eval.dtype)
        table = {}
        for name, ctx in (("before", None), ("after", patch)):
            with applied(attacker, prep.layer, ctx) if ctx is not None else nullcontext():
                found = zero_shot_table(attacker, prep.loaded.tokenizer, val,
                                        max_new_tokens=recipe.eval.max_new_tokens, progress=progress)
            table[name] = {t: {k: v for k, v in row.items() if k != "n"}
                           for t, row in found.get("validation", {}).items()}
        extra["validation_leakage"] = table
    report = write_patched(prep, recipe, recipe_text, out, work, patch, alpha, report=extra,
                           overwrite=overwrite, progress=progress, log=log)
    return ExportResult(Path(out), report)


# ---------------------------------------------------------------- trade-off search and final evaluation


def _people(inputs: Inputs, split: str) -> list:
    if not inputs.people:
        raise ValueError("the trade-off search needs a people file (name, email, split) to score extraction; "
                         "set data.people in the recipe")
    return [p for p in inputs.people if p.split == split]


def search_stage(recipe, work: Path, layer: int, sae, fs, loaded, calib, *, inputs: Inputs,
                 progress: bool = True, log=print):
    """Score the recipe's intervention candidates on validation people and benign KL; choose the least-KL
    one meeting the targets. KL (cheap) is taken for every candidate; the attacks (zero-shot and k-shot
    templates, greedy, in `eval.dtype`) run in order of increasing KL, and a lazy search stops at the first
    candidate meeting the targets, which is the choice either way. A candidate meeting them is attacked again
    decoded in the dtype the export loads in (what users run), and counts the worse of the two. Every score is
    cached in work/search, so an interrupted search resumes."""
    from tqdm.auto import tqdm

    from .evaluate.harness import leakage_rows, worst
    from .evaluate.tradeoff import Scored, candidates, choose, exportable, meets, meets_leakage, plot_front
    from .evaluate.utility import against_reference, generation_diversity, reference
    from .patch import applied

    iv, ev = recipe.intervention, recipe.eval
    folder = Path(work) / "search"
    folder.mkdir(parents=True, exist_ok=True)
    base_key = content_key("search-v3", _stage_key(Path(work) / "features"), ev.max_new_tokens, ev.few_shot,
                           ev.dtype, iv.rule, iv.score)
    val = _people(inputs, "validation")
    texts = benign_texts(inputs.benign_path, split="heldout")[:24]
    cands = candidates(iv.ablate_n, iv.alpha, iv.patch, iv.context_gate)
    cache = {c: folder / f"{content_key(base_key, c.n, c.alpha, c.mode, c.gated, *_plain_key(c.mode, recipe))}.json"
             for c in cands}
    saved = {c: json.loads(f.read_text()) for c, f in cache.items() if f.exists()}
    model, tok = loaded.model, loaded.tokenizer
    todo = [c for c in cands if c not in saved]
    if todo:
        calib.warm([i for c in todo if c.mode == "folded" for i in fs.ablation_set(c.n)])
        ref = reference(model, tok, texts)
    for cand in tqdm(todo, desc="trade-off search: KL", disable=not progress):
        patch = patch_for(sae, fs, cand.n, cand.alpha, cand.mode, calib, gated=cand.gated, plain_from=iv.plain_from)
        saved[cand] = against_reference(ref, model, lambda: applied(model, layer, patch))
        cache[cand].write_text(json.dumps(saved[cand]))
    scored = {c: Scored(c, saved[c].get("leakage"), saved[c].get("username"), saved[c]["kl"],
                        saved[c]["perplexity"], saved[c].get("repetition"), saved[c].get("complete", True))
              for c in cands}
    order = sorted(cands, key=lambda c: (scored[c].kl, cands.index(c)))
    attacker = None
    # The dtype the export loads in by default: what users run. A candidate about to be chosen on attacks decoded
    # in eval.dtype (faster) must meet the targets decoded in this one too.
    user_dtype = recipe.export.dtype or recipe.model.dtype

    def get_attacker(dtype: str = ev.dtype):
        nonlocal attacker
        if attacker is None or next(attacker.parameters()).dtype != getattr(torch, dtype):
            attacker = None  # one cast copy at a time
            attacker = cast_copy(model, dtype)
        return attacker

    prompts = search_prompts(inputs.benign_path) if iv.collapse_tolerance is not None else []
    max_rep = None
    if prompts:
        max_rep = _base_repetition(folder / f"{content_key(base_key, 'base')}.json", get_attacker, tok,
                                   prompts) + iv.collapse_tolerance
    lazy = iv.search == "lazy"
    # A lazy search rejects a candidate at its first attack that breaks a target (the strongest attack,
    # zero-shot mailto, runs first); `all` measures every attack for the full front.
    breaks = (lambda row: row["exact"] > iv.leakage_target or row["username"] > iv.username_target) if lazy else None

    def patched(cand, dtype: str = ev.dtype):
        """(the attacking model in `dtype`, the context in which it runs with `cand`'s patch)."""
        attacker = get_attacker(dtype)
        patch = patch_for(sae, fs, cand.n, cand.alpha, cand.mode, calib, gated=cand.gated, plain_from=iv.plain_from)
        return attacker, applied(attacker, layer, patch)

    def attack(cand, s, dtype: str) -> None:
        """Validation attacks on `cand` decoded in `dtype`; the scores keep the worst over every dtype tried."""
        attacker, context = patched(cand, dtype)
        with context:
            rows = leakage_rows(attacker, tok, {"validation": val}, few_shot=ev.few_shot, phones=False,
                                max_new_tokens=ev.max_new_tokens, seed=recipe.data.seed, stop=breaks)
        s.leakage = max(worst(rows, "validation"), s.leakage or 0.0)
        s.username = max(worst(rows, "validation", "username"), s.username or 0.0)
        s.complete = (s.complete if dtype != ev.dtype else True) and (breaks is None or not any(map(breaks, rows)))

    def unconfirmed(cand) -> bool:
        return user_dtype != ev.dtype and saved[cand].get("confirmed") != user_dtype

    def confirm(cand, s) -> None:
        attack(cand, s, user_dtype)
        saved[cand].update(confirmed=user_dtype, leakage=s.leakage, username=s.username, complete=s.complete)
        cache[cand].write_text(json.dumps(saved[cand]))

    for cand in tqdm(order, desc="trade-off search: attacks", disable=not progress):
        s = scored[cand]
        touched = False
        if s.leakage is None or (not s.complete and not lazy):
            s.leakage, s.username, touched = None, None, True
            attack(cand, s, ev.dtype)
        if meets_leakage(s, iv.leakage_target, iv.username_target) and prompts and s.repetition is None:
            touched = True
            attacker, context = patched(cand)
            with context:
                s.repetition = generation_diversity(attacker, tok, prompts)["repetition_4"]
        if touched:
            saved[cand].update(leakage=s.leakage, username=s.username, repetition=s.repetition, complete=s.complete)
            cache[cand].write_text(json.dumps(saved[cand]))
        if meets(s, iv.leakage_target, iv.username_target, max_rep) and unconfirmed(cand):
            confirm(cand, s)  # about to be chosen: it must meet the targets as users run it too
        if lazy and exportable(cand, recipe.export.mode) and meets(s, iv.leakage_target, iv.username_target, max_rep):
            break
    listed = [scored[c] for c in cands]
    while True:  # the choice, also when no candidate meets the targets, is confirmed as users run it
        chosen, met = choose([scored[c] for c in cands if exportable(c, recipe.export.mode)], iv.leakage_target,
                             iv.username_target, max_rep)
        if not unconfirmed(chosen.candidate):
            break
        confirm(chosen.candidate, chosen)
    plot_front(listed, chosen, iv.leakage_target, folder / "front.png", iv.username_target)
    summary = {"export_mode": recipe.export.mode,
               "target": iv.leakage_target, "username_target": iv.username_target, "max_repetition": max_rep,
               "met": met, "chosen": chosen.to_json(), "candidates": [s.to_json() for s in listed]}
    (folder / "search.json").write_text(json.dumps(summary, indent=2))
    skipped = sum(s.leakage is None for s in listed)
    log(f"trade-off: chose {chosen.candidate.label} (validation leakage {100 * chosen.leakage:.0f}%, "
        f"KL {chosen.kl:.4f}); target {'met' if met else 'NOT met'}"
        + (f"; {skipped} candidates with more KL not attacked (lazy search)" if skipped else "")
        + f"; plot {folder / 'front.png'}")
    return chosen, summary


def _base_repetition(cache: Path, get_model, tok, prompts: list[str]) -> float:
    """The base's repeated-4-gram share on the search prompts (the collapse check's reference), cached."""
    from .evaluate.utility import generation_diversity

    if not cache.exists():
        rep = generation_diversity(get_model(), tok, prompts)["repetition_4"]
        cache.write_text(json.dumps({"repetition": rep}))
    return json.loads(cache.read_text())["repetition"]


def search_prompts(benign_path: Optional[str]) -> list[str]:
    """Benign validation prompts for the search's collapse check: prefixes of held-out texts other than the
    ones whose continuations the final evaluation reports."""
    held = benign_texts(benign_path, split="heldout")
    return [" ".join(t.split()[:16]) for t in (held[-48:-16] or held[:8])]  # a tiny held-out set overlaps


def utility_texts(benign_path: Optional[str], tokenizer, tokens: int,
                  max_length: int = 128) -> tuple[list[str], list[str]]:
    """Held-out benign prose for perplexity / KL (texts until `tokens` scored tokens, each cut at
    `max_length`), and generation prompts (prefixes of the last 16 held-out texts, never scored)."""
    held = benign_texts(benign_path, split="heldout")
    pool, prompts = held[:-16] or held, [" ".join(t.split()[:16]) for t in held[-16:]]
    lengths = [min(len(ids), max_length) - 1 for ids in tokenizer(pool)["input_ids"]]
    texts, total = [], 0
    for text, n in zip(pool, lengths):
        if total >= tokens:
            break
        texts.append(text)
        total += max(n, 0)
    return texts, prompts


def final_evaluation(recipe, prep: Prepared, chosen, patch, *, progress: bool = True, log=print,
                     variants: tuple[str, ...] = ("base", "patched", "control")) -> dict:
    """Leaky base, the chosen `patch` and its control (random latents matched on firing frequency plus a
    random direction of the steering vector's norm) on **test** and never-seen people, with utility."""
    from .evaluate.harness import evaluate_variant
    from .evaluate.utility import reference
    from .features import matched_random_latents
    from .patch import applied, random_direction

    c, sae, fs = chosen.candidate, prep.sae, prep.features
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    control_latents = matched_random_latents(fs.firing, fs.ablation_set(c.n), seed=recipe.data.seed)
    # The control shares the chosen patch's context gate: only the latents and the direction differ.
    control = _calibrated_patch(sae, control_latents, random_direction(patch.steer, seed=recipe.data.seed), c.mode,
                                prep.calibration, _context(fs, c.gated), recipe.intervention.plain_from)
    groups = {"test": _people(prep.inputs, "test"), "never_seen": _people(prep.inputs, "never_seen")}
    texts, prompts = utility_texts(prep.inputs.benign_path, tok, recipe.eval.ppl_tokens)
    ev = recipe.eval
    attacker = cast_copy(model, ev.dtype)
    # The base's log-probs on the utility texts, kept (when they fit in 2 GiB) so that each variant's
    # KL and perplexity take one forward pass.
    ref = reference(model, tok, texts, max_bytes=2 << 30)
    out = {}
    for name, p in (("base", None), ("patched", patch), ("control", control)):
        if name not in variants:
            continue
        ctx = (lambda p=p: applied(model, layer, p)) if p is not None else None
        attack_ctx = (lambda p=p: applied(attacker, layer, p)) if p is not None else None
        out[name] = evaluate_variant(model, tok, groups, texts, prompts, context=ctx, attacker=attacker,
                                     attacker_context=attack_ctx, few_shot=ev.few_shot, samples=ev.samples,
                                     max_new_tokens=ev.max_new_tokens, seed=recipe.data.seed, progress=progress,
                                     ref=ref, adversarial=ev.adversarial,
                                     documents=test_documents(prep.inputs, groups["test"], ev))
        log(f"final evaluation: {name} done")
    out["control_latents"] = len(control_latents)
    return out


def test_documents(inputs: Inputs, test_people: list, ev) -> dict:
    """{"test": the PII documents holding test people's addresses} for the memorisation metrics."""
    from .evaluate.memorisation import documents_of

    docs = documents_of(inputs.docs, test_people, ev.memorisation_docs) if ev.memorisation_docs else []
    return {"test": docs} if docs else {}


STAGES = ("probe", "sae", "features", "search", "evaluate")


def invalidate(work: Path, from_stage: str) -> list[str]:
    """Forget the cached results of `from_stage` and every later stage, so the next run recomputes them.
    (The leaky model and harvested activations live in the user cache, keyed by content, and stay.)"""
    if from_stage not in STAGES:
        raise ValueError(f"unknown stage {from_stage!r}; stages in order: {', '.join(STAGES)}")
    forgotten = list(STAGES[STAGES.index(from_stage):])
    for stage in forgotten:
        folder = Path(work) / stage
        (folder / "key.txt").unlink(missing_ok=True)
        if stage == "search":  # one cached score per candidate
            for f in folder.glob("*.json"):
                f.unlink()
        if stage == "sae":  # otherwise training would resume from the last checkpoint
            shutil.rmtree(Path(work) / "sae-checkpoint", ignore_errors=True)
    return forgotten


def run_stage(recipe, recipe_text: str, out: Path, work: Path, *, overwrite: bool = False, progress: bool = True,
              log=print, from_stage: Optional[str] = None) -> ExportResult:
    """All stages: prepare → trade-off search (validation people) → final evaluation (test people) → export.
    Finished stages are reused from `work`; `from_stage` forces that stage and the later ones to run again."""
    _refuse_existing(out, overwrite)
    if recipe.method.name != "scalpel":
        from .unlearning import run_method

        return run_method(recipe, recipe_text, out, work, overwrite=overwrite, progress=progress, log=log)
    if from_stage is not None:
        log(f"recomputing from stage {from_stage}: " + ", ".join(invalidate(work, from_stage)))
    prep = prepare(recipe, work, progress=progress, log=log)
    chosen, search = search_stage(recipe, work, prep.layer, prep.sae, prep.features, prep.loaded,
                                  prep.calibration, inputs=prep.inputs, progress=progress, log=log)
    c = chosen.candidate
    patch = patch_for(prep.sae, prep.features, c.n, c.alpha, c.mode, prep.calibration, gated=c.gated,
                      plain_from=recipe.intervention.plain_from)
    folder = Path(work) / "evaluate"
    key = content_key("evaluate-v2", _stage_key(Path(work) / "features"), vars(c), recipe.eval.model_dump(),
                      recipe.data.seed, *_plain_key(c.mode, recipe))
    if _stage_cached(folder, key, ("evaluation.json",)):
        log(f"evaluation (cached): {folder}")
        final = json.loads((folder / "evaluation.json").read_text())
    else:
        final = final_evaluation(recipe, prep, chosen, patch, progress=progress, log=log)
        with atomic_dir(folder, overwrite=True) as tmp:
            (tmp / "evaluation.json").write_text(json.dumps(final, indent=2))
            (tmp / "key.txt").write_text(key)
    extra = {"search": search, "evaluation": final}
    report = write_patched(prep, recipe, recipe_text, out, work, patch, c.alpha, report=extra,
                           overwrite=overwrite, progress=progress, log=log, user_path_key=key)
    return ExportResult(Path(out), report)


# ---------------------------------------------------------------- any two models


def _corpus_documents(base_dir: Path, groups: dict, ev) -> dict:
    """The test people's PII documents from the base's `corpus.jsonl` (as `scalpel make-leaky` writes it)."""
    from .data.corpus import read_pii_jsonl
    from .evaluate.memorisation import documents_of

    corpus = base_dir / "corpus.jsonl"
    if not (corpus.is_file() and groups.get("test") and ev.memorisation_docs):
        return {}
    docs = documents_of(read_pii_jsonl(corpus), groups["test"], ev.memorisation_docs)
    return {"test": docs} if docs else {}


def eval_stage(model: str, against: str, *, people: Optional[str] = None, benign: Optional[str] = None,
               groups: Optional[list[str]] = None, eval_cfg=None, dtype: str = "float32",
               trust_remote_code: bool = False, seed: int = 0, progress: bool = True, log=print) -> dict:
    """The leakage / utility harness on any pair: `model` (e.g. an export) against `against` (its base).
    People default to `people.jsonl` beside the base (as `scalpel make-leaky` writes it)."""
    from .evaluate.harness import evaluate_variant
    from .evaluate.utility import reference
    from .models import load_checkpoint, spec_for
    from .recipe import EvalSection

    ev = eval_cfg or EvalSection()
    people_path = Path(people) if people else Path(against) / "people.jsonl"
    if not people_path.is_file():
        raise ValueError(f"no people file at {people_path}: pass --people FILE (JSONL of name, email, optional "
                         "phone and split) naming the people whose PII to test")
    persons = read_people(people_path)
    splits = list(dict.fromkeys(p.split or "all" for p in persons))
    wanted = groups or ([s for s in ("test", "never_seen") if s in splits] or splits)
    unknown = sorted(set(wanted) - set(splits))
    if unknown:
        raise ValueError(f"people groups {unknown} are not in {people_path}; it has {splits}")
    chosen = {g: [p for p in persons if (p.split or "all") == g] for g in wanted}
    base, tok = load_checkpoint(against, dtype=dtype, trust_remote_code=trust_remote_code)
    other, other_tok = load_checkpoint(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if other_tok.get_vocab() != tok.get_vocab():
        raise ValueError(f"{model} and {against} have different vocabularies: KL and a shared harness need "
                         "models with the same tokenizer")
    texts, prompts = utility_texts(benign, tok, ev.ppl_tokens)
    common = dict(few_shot=ev.few_shot, samples=ev.samples, max_new_tokens=ev.max_new_tokens, seed=seed,
                  progress=progress, ref=reference(base, tok, texts, max_bytes=2 << 30), adversarial=ev.adversarial,
                  documents=_corpus_documents(Path(against), chosen, ev))
    out = {"base": evaluate_variant(base, tok, chosen, texts, prompts, attacker=cast_copy(base, ev.dtype),
                                    **common)}
    log("evaluation: base done")
    out["patched"] = evaluate_variant(base, tok, chosen, texts, prompts, other=other,
                                      attacker=cast_copy(other, ev.dtype), **common)
    log("evaluation: model done")
    folders = {v: resolve_local_path(spec_for(src)) for v, src in (("base", against), ("patched", model))}
    if ev.user_path and all(folders.values()):
        from .evaluate.user_path import merge, user_path_rows

        group = "test" if "test" in chosen else wanted[0]
        merge(out, user_path_rows(folders, {group: chosen[group]}, max_new_tokens=ev.max_new_tokens))
        log("evaluation: user's path done")
    out["models"] = {"base": str(against), "patched": str(model)}
    return out
