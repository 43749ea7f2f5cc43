"""`scalpel run --dry-run`: what a recipe will do, how many tokens it processes and the memory it
needs, worked out from the model's config alone (no weights are loaded, nothing is downloaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .data.leaky import LeakyConfig
from .data.synthetic import SyntheticConfig
from .distill import DistillConfig
from .estimate import (
    BUILTIN_PII_TOKENS,
    LEAKY_TOKENS,
    PYDOC_TOKENS,
    Sizes,
    estimate_seconds,
    layer_params,
    machine_gflops,
)
from .harden import HardenConfig
from .models import resolve_local_path
from .recipe import Recipe
from .run.analysis import GATE_WINDOW_TOKENS, SPLICED_CE_TEXTS
from .run.inputs import HELDOUT_TOKENS
from .run.stage import DISTILL, EVALUATE, FEATURES, METHOD, METHOD_EVALUATE, PROBE, SAE, SEARCH

# the distillation's single-token texts per step (not a recipe setting)
FIRST_TOKENS = DistillConfig().first_tokens

# Shapes of models the paper's recipes name, for planning on a machine that has never downloaded
# them.
KNOWN_CONFIGS = {
    "google/gemma-2-2b": dict(
        model_type="gemma2",
        hidden_size=2304,
        num_hidden_layers=26,
        intermediate_size=9216,
        vocab_size=256000,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        tie_word_embeddings=True,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        vocab_size=32000,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-2-70b-hf": dict(
        model_type="llama",
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        vocab_size=32000,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
BYTES = {"float32": 4, "bfloat16": 2}
GIB = 1024**3


@dataclass
class Plan:
    model: str
    config_source: str
    params: int
    d_model: int
    n_layers: int
    layer: str
    d_sae: int
    stages: list[tuple[str, str]]  # (stage, what it does with how many tokens)
    memory: list[tuple[str, float]]  # (what, GiB)
    # input files the recipe names that are not here
    missing: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # estimated wall time per stage
    gflops: float = 0.0  # the matrix rate the estimate assumed
    measured: bool = False  # measured on this machine (else nominal: the device is not here)

    @property
    def peak_gib(self) -> float:
        weights = self.memory[0][1]
        return weights + max(v for _, v in self.memory[1:])


def model_config(recipe: Recipe) -> tuple[Optional[dict], str]:
    """The model's config.json from a local folder, the converted built-in, the local HF cache, or
    the table of known shapes; (None, reason) when none is available."""
    spec = recipe.model
    if spec.path:
        cfg = Path(spec.path) / "config.json"
        return (
            (json.loads(cfg.read_text()), str(cfg)) if cfg.is_file() else (None, f"{cfg} not found")
        )
    if spec.builtin or spec.gguf:
        # converts a GGUF once (cached); reads no weights afterwards
        local = resolve_local_path(spec)
        return json.loads((local / "config.json").read_text()), str(local / "config.json")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub, "config.json", revision=spec.revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text()), f"HF cache ({spec.describe()})"
    if spec.hub in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[spec.hub], "built-in table of known shapes"
    return None, f"{spec.describe()} is not in the local HF cache"


def parameter_count(cfg: dict) -> int:
    """Decoder-only transformer parameters from its config (norms and biases ignored: <0.1%)."""
    tied = cfg.get("tie_word_embeddings", True)
    embeddings = cfg["vocab_size"] * cfg["hidden_size"] * (1 if tied else 2)
    return cfg["num_hidden_layers"] * layer_params(cfg) + embeddings


EXPORT_PLANS = {
    "remote_code": "remote_code export; base weights copied, patch in scalpel_patch.safetensors",
    "plain": "plain export; the residual writers' weights projected, the others copied",
    "distilled": "distilled export; the student saved as a stock checkpoint of the base's type",
    "remote_code over distilled": "remote_code export; the distilled weights written, patch in "
    "scalpel_patch.safetensors",
}


def _scalpel_stages(recipe: Recipe, n_layers: int, d_sae: int) -> list[tuple[str, str]]:
    s, p, iv, ev = recipe.sae, recipe.probe, recipe.intervention, recipe.eval
    harvest = (
        f"harvest {s.harvest_tokens:,} tokens once (cached), "
        if s.source == "cached"
        else "stream activations online, "
    )
    n_candidates = len(iv.ablate_n) * len(iv.alpha) * len(iv.patch)
    samples = f", {ev.samples} samples" if ev.samples else ""
    relearn = recipe.relearn_steps
    stages = [
        (PROBE.name, f"harvest {p.max_tokens:,} tokens at all {n_layers} layers; one logistic "
         "probe per layer"),
        (SAE.name, harvest + f"train {d_sae:,} latents (k={s.k}) on {s.train_tokens:,} tokens in "
         f"batches of {s.batch_size:,}"),
        (FEATURES.name, "rank latents on PII documents about validation people or values (plus "
         "benign text)"),
        (SEARCH.name, f"{n_candidates} candidates ({len(iv.ablate_n)} sizes x {len(iv.alpha)} "
         f"alphas x {len(iv.patch)} modes) on validation people and values (templates, document "
         f"prefixes), greedy"
         + (f" and {iv.search_samples} samples" if iv.search_samples else "")
         + f", {ev.max_new_tokens} new tokens"),
    ]  # fmt: skip
    distill = recipe.export.distill
    if recipe.export.distils:
        stages.append(
            (
                DISTILL.name,
                f"the chosen patch learnt by LoRA (rank {distill.rank}) on "
                + (
                    f"the last {distill.adapted_layers} layers"
                    if distill.adapted_layers
                    else "every layer"
                )
                + f" up to the patch's: {distill.steps} steps of "
                f"{distill.batch_size} PII + {distill.batch_size} benign texts"
                + (
                    f"; first {distill.late_steps} steps on the layers after it (next-token KL)"
                    if distill.late_steps
                    else ""
                )
                + _harden_plan(distill.harden),
            )
        )
    stages += [
        (EVALUATE.name, ("the control patch learnt the same way; " if recipe.export.distils else "")
         + ("base, teacher patch, student and control" if recipe.export.distils
            else "base, chosen patch and control")
         + " on test + never-seen people and test values: templates, "
         f"{ev.few_shot}-shot{samples}, phones, document prefixes"
         + ("; adversarial prompts and formats, 32 samples" if ev.adversarial else "")
         + (f"; memorisation of {ev.memorisation_docs} test documents"
            if ev.memorisation_docs else "")
         + "; perplexity, KL, diversity"
         + (f"; relearning: {relearn} LoRA steps each on benign prose and on other people's PII"
            if relearn else "")),
        ("export", EXPORT_PLANS[recipe.export.mode + (" over distilled"
                                if recipe.export.base == "distilled" else "")]),
    ]  # fmt: skip
    return stages


def _harden_plan(harden) -> str:
    """What hardening does after the distillation, as the plan says it."""
    repaired = f"their MLPs repaired for {harden.steps} steps"
    if harden.burst:
        repaired += f" (the first {harden.burst} at lr {harden.lr:g}, then {harden.settle_lr:g})"
    if harden.benign_weight is not None:
        repaired += f", benign text at weight {harden.benign_weight:g}"
    if harden.reference and harden.directions:
        return (
            f"; then hardened: each MLP map of the layers after it has its change from "
            f"{harden.reference} undone along the {harden.directions} input directions PII uses "
            f"most (found on {harden.documents} PII documents), {repaired}"
        )
    if harden.reference:
        return (
            f"; then hardened: the MLPs of the layers after it set to {harden.reference}'s, "
            f"{repaired}"
        )
    if harden.neurons:
        return (
            f"; then hardened: {harden.neurons} privacy neurons of the layers after it zeroed "
            f"(ranked on {harden.documents} PII documents) and {repaired}"
        )
    return ""


def make_plan(recipe: Recipe, *, missing: list[str] = ()) -> Plan:
    cfg, source = model_config(recipe)
    if cfg is None:
        raise ValueError(
            f"cannot plan without the model's shape: {source}; download its config.json "
            "(huggingface-cli download ORG/NAME config.json) or point model.path at a folder"
        )
    d, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    params = parameter_count(cfg)
    wbytes = BYTES[recipe.model.dtype]
    if recipe.method.name != "scalpel":
        d_ff = cfg.get("intermediate_size") or 4 * d
        return _method_plan(recipe, source, params, d, n_layers, d_ff, wbytes, list(missing))
    s, p = recipe.sae, recipe.probe
    d_sae = s.expansion * d
    layer = str(p.layer) if isinstance(p.layer, int) else "auto (probe)"
    harvested = s.harvest_tokens if s.source == "cached" else max(4 * s.batch_size, 65536)
    memory = [
        ("model weights", params * wbytes / GIB),
        ("probe activations (all layers, float32)", p.max_tokens * n_layers * d * 4 / GIB),
        ("SAE harvest (float32)", harvested * d * 4 / GIB),
        ("SAE weights + Adam state", (2 * d * d_sae * 4 * 4 + s.batch_size * d_sae * 4 * 3) / GIB),
    ]
    stages = _scalpel_stages(recipe, n_layers, d_sae)
    if recipe.data.pii.builtin == "synthetic":
        stages.insert(0, ("leaky", "fine-tune the model on the synthetic PII corpus until it "
                                   "leaks, and measure the leak (cached per model)"))  # fmt: skip
    gflops, measured = machine_gflops(recipe.model.device)
    # an unpinned layer: the probe's choice, about 45% of the way up on the models measured here
    chosen = p.layer if isinstance(p.layer, int) else round(0.45 * (n_layers - 1))
    seconds = estimate_seconds(cfg, chosen, run_sizes(recipe, d_sae), gflops, recipe.model.device)
    return Plan(
        recipe.model.describe(),
        source,
        params,
        d,
        n_layers,
        layer,
        d_sae,
        stages,
        memory,
        list(missing),
        seconds,
        gflops,
        measured,
    )


def _people(recipe: Recipe) -> int:
    """People attacked in the final evaluation: the people file's lines when it is here, else the
    built-in corpus's (100 memorised unless the recipe says, and 50 never seen)."""
    path = recipe.data.people.path
    if path and Path(path).is_file():
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    corpus = _synthetic(recipe)
    return corpus.n_memorised + corpus.n_never_seen


def _synthetic(recipe: Recipe) -> SyntheticConfig:
    """The built-in corpus the recipe's leaky model is fine-tuned on, sized as `resolve_inputs`
    sizes it."""
    return LeakyConfig().sized(recipe.data.pii.memorised).synthetic


def _memorised_share(recipe: Recipe) -> float:
    """The built-in corpus's size against the default one the estimate's constants were measured
    on."""
    return _synthetic(recipe).n_memorised / SyntheticConfig().n_memorised


def run_sizes(recipe: Recipe, d_sae: int) -> Sizes:
    """What the recipe's run processes, in the units the time estimate scales with."""
    s, iv, ev, dist = recipe.sae, recipe.intervention, recipe.eval, recipe.export.distill
    distils = recipe.export.distils
    # a distillation step's PII and benign batch, texts about half their length limit
    step_tokens = 2 * dist.batch_size * dist.max_length // 2 if distils else 0
    return Sizes(
        probe_tokens=recipe.probe.max_tokens,
        harvest_tokens=s.harvest_tokens if s.source == "cached" else s.train_tokens,
        sae_tokens=s.train_tokens,
        d_sae=d_sae,
        heldout_tokens=HELDOUT_TOKENS,
        ce_tokens=SPLICED_CE_TEXTS * recipe.data.max_length,
        aux_latents=min(s.k_aux, d_sae) // 2,  # see AUX_FLOPS_PER_DIM
        candidates=len(iv.ablate_n) * len(iv.alpha) * len(iv.patch),
        people=_people(recipe),
        # the built-in corpus's memorised people, halved into validation and test
        split_people=(
            _synthetic(recipe).n_memorised // 2
            if recipe.data.pii.builtin and not recipe.data.people.path
            else 0
        ),
        new_tokens=ev.max_new_tokens,
        samples=ev.samples,
        search_samples=iv.search_samples,
        search_folds=iv.search_folds,
        ppl_tokens=ev.ppl_tokens,
        # each step adds its single-token texts
        distill_tokens=dist.steps * (step_tokens + FIRST_TOKENS * distils),
        teacher_tokens=_teacher_tokens(recipe) if distils else 0,
        relearn_tokens=(recipe.relearn_steps or 0) * 8 * 64,
        # base, patch, control; a distilled run's teacher; the two relearned copies
        variants=3 + distils + 2 * bool(recipe.relearn_steps),
        adversarial=ev.adversarial,
        memorisation_docs=ev.memorisation_docs,
        distill_layers=dist.adapted_layers,
        late_tokens=dist.late_steps * step_tokens,
        # the ranking's texts are cut at its length, the repair's at its own; the key directions
        # are one forward of each text (and their second moments, about as much again)
        harden_rank_tokens=(
            2 * dist.harden.documents * HardenConfig.rank_length * HardenConfig.ig_steps
            if dist.harden.neurons
            else 2 * dist.harden.documents * HardenConfig.rank_length
            if dist.harden.directions
            else 0
        ),
        harden_tokens=(
            dist.harden.steps * 2 * dist.harden.batch_size * dist.harden.max_length
            if dist.harden.on
            else 0
        ),
        gate_window_tokens=_gate_window_tokens(recipe),
        leaky_tokens=(
            int(LEAKY_TOKENS * _memorised_share(recipe))
            if recipe.data.pii.builtin == "synthetic"
            else 0
        ),
    )


def _gate_window_tokens(recipe: Recipe) -> int:
    """Tokens of the benign windows a gated run's context gate is also fitted on: the training
    split's windows, each cut at twice the data's length limit (pydoc's 352 hold about 203 tokens
    each: 71,448 of Gemma's cut at 256); a user's prose as `_teacher_tokens` counts it."""
    iv, data = recipe.intervention, recipe.data
    if iv.context_negatives != "windows" or not any(iv.context_gate):
        return 0
    cut = 2 * data.max_length
    if data.benign.builtin:
        return min(352 * min(203, cut), GATE_WINDOW_TOKENS)
    return min(_training_windows_tokens(data.benign.path, cut), GATE_WINDOW_TOKENS)


def _training_windows_tokens(path: str, cut: int) -> int:
    """Tokens of a user's prose as the training windows hold it: 4/5 of it, in 1,000-character
    windows of about 250 tokens, each cut at `cut`."""
    return int(0.8 * _size_bytes(path) / 1000 * min(250, cut))


def _size_bytes(path: str) -> int:
    """Bytes of a file, or of every file under a folder (a maildir)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.is_file() else 0


def _teacher_tokens(recipe: Recipe) -> int:
    """Tokens of the distillation's training texts (the teacher's forward runs over them): the
    built-in corpus's as measured; a user's PII corpus at about 4 bytes a token, and a user's
    prose as the student takes it (its training windows, each cut at the length limit)."""
    dist, data = recipe.export.distill, recipe.data
    if data.pii.builtin:
        pii = int(BUILTIN_PII_TOKENS * _memorised_share(recipe))
    else:
        pii = _size_bytes(data.pii.path) // 4
    if dist.documents == "validation":
        pii //= 3
    if data.benign.builtin:
        benign = PYDOC_TOKENS
    else:
        benign = _training_windows_tokens(data.benign.path, dist.max_length)
    return pii + benign


def _method_plan(
    recipe: Recipe,
    source: str,
    params: int,
    d: int,
    n_layers: int,
    d_ff: int,
    wbytes: int,
    missing: list[str],
) -> Plan:
    """The plan of a weight-editing method: its path, the evaluation and a plain export."""
    m, ev = recipe.method, recipe.eval
    if m.name == "depn":
        what = (
            f"integrated gradients ({m.ig_steps} steps) over the MLP neurons of {m.examples} PII "
            f"documents; edit {', '.join(map(str, m.neurons))} neurons in turn, scored on "
            "validation people and values"
        )
        trained = 0
    else:
        kind = "RMU" if m.name == "rmu" else m.loss.upper()
        what = (
            f"{kind} for up to {max(m.steps):,} steps (batches of {m.batch_size}), scored on "
            f"validation people and values after {', '.join(map(str, m.steps))} steps; stops at "
            "the first meeting the targets"
        )
        # RMU: three MLP output projections; LoRA: rank-r adapters on the seven projections of every
        # layer
        trained = (
            3 * d * d_ff
            if m.name == "rmu"
            else n_layers * 7 * m.lora_rank * (d + d_ff)
            if m.lora_rank
            else params
        )
    layer = (
        "probe's choice"
        if m.name == "rmu" and m.layer is None
        else str(getattr(m, "layer", None) or "-")
    )
    stages = [
        (METHOD.name, f"{m.name}: {what}"),
        (
            METHOD_EVALUATE.name,
            f"base, edited model{' and control' if m.name == 'depn' else ''} on test + never-seen "
            "people: templates, "
            f"{ev.few_shot}-shot{', ' + str(ev.samples) + ' samples' if ev.samples else ''}; "
            "memorisation metrics; perplexity, KL, diversity",
        ),
        ("export", "plain checkpoint (save_pretrained of the edited model; no remote code)"),
    ]
    memory = [
        ("model weights (edited + frozen reference)", 2 * params * wbytes / GIB),
        ("gradients + AdamW state of trained tensors (float32)", 3 * trained * 4 / GIB),
    ]
    return Plan(
        recipe.model.describe(), source, params, d, n_layers, layer, 0, stages, memory, missing
    )


def missing_files(recipe: Recipe) -> list[str]:
    """Input files a recipe names that do not exist on this machine."""
    out = []
    for key, value in (
        ("model.path", recipe.model.path),
        ("model.gguf", recipe.model.gguf),
        ("data.pii.path", recipe.data.pii.path),
        ("data.benign.path", recipe.data.benign.path),
        ("data.people.path", recipe.data.people.path),
    ):
        if value and not Path(value).exists():
            out.append(f"{key}: {value}")
    return out
