"""Wall-time estimates per stage for `--dry-run`: each stage's arithmetic (FLOPs, from the model's
shape and the recipe's sizes) divided by the rate that kind of work reached in a measured reference
run (the SmolLM2 demo on a 2-core CPU), scaled by how fast this machine multiplies matrices
against that one.

A stage's rate folds in everything FLOPs leave out (Python overhead, small generation batches,
data movement), so the estimate holds best for models and machines like the reference's. On a GPU,
decoding one token at a time is bound by latency, not arithmetic (a floor per step), each stage
keeps a host's share that no GPU speeds up (measured on one H200 run of the SmolLM2 demo).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from .distill import first_adapted

# The reference run: the built-in SmolLM2 demo (`scalpel demo`, defaults) on the 2-core CPU machine
# the README's numbers come from, each stage alone (the README's demo timings: leaky build 7:51,
# probe about a minute, SAE harvest and training about three, features half a minute, search 5:28,
# final evaluation 5:50, export with the user's path 5:29), and that machine's float32
# matrix-multiply rate by `machine_gflops` with nothing else running (63-89).
# The distillation and the final evaluation have grown since: their rates come from later runs on
# another 2-core CPU (AMD EPYC, avx512_bf16, `machine_gflops` there SECOND_GFLOPS), scaled to the
# reference machine's rate: the distilled demo's student 320-341 s (adapters on layers 10..13); the
# demo's evaluation of one model 84 s with neither the adversarial attacks nor the memorisation
# metrics, the adversarial attacks on its 50 test people 93 s more, the memorisation metrics 2.5 s a
# document, the base's reference log-probs (once) 12.8 s.
REFERENCE_GFLOPS = 80.0
SECOND_GFLOPS = 200.0
ADVERSARIAL_SECONDS_PER_PERSON = 93.0 / 50
MEMORISATION_SECONDS_PER_DOC = 2.5
# The SAE stage likewise, from the SmolLM2 demo's there (alone): 262 s, of which training 126.3 s
# (3M tokens), the rest its forward passes: the training harvest, the held-out activations and the
# spliced cross-entropy (three passes with the output head).
SAE_TRAIN_SECONDS = 126.3
# The AuxK term decodes the top k_aux dead latents of each token, and its sparse backward is slow
# per FLOP: one such latent costs about AUX_FLOPS_PER_DIM of the encoder's FLOPs per input dimension
# (`python benchmarks/sae_train.py --dead 0.0125 0.05 0.2`: 264-333 at SmolLM2's and Gemma's
# widths; 256 of them make a step 2.4-2.8 times one with none dead). Latents die only after
# `dead_tokens` without firing, so how many slots are filled varies along a run and between
# models: by the benchmark's step times, about 12 on average in the reference run (1.3% dead at
# the end) and about 190 of 256 in Gemma-3-270M's (20% dead). A plan cannot know; it counts half
# of k_aux.
AUX_FLOPS_PER_DIM = 300.0
REFERENCE_AUX_LATENTS = 12
REFERENCE_SECONDS = {
    "leaky": 471.0,
    "probe": 60.0,
    "sae": (262.0 - SAE_TRAIN_SECONDS) * SECOND_GFLOPS / REFERENCE_GFLOPS,
    "sae_train": SAE_TRAIN_SECONDS * SECOND_GFLOPS / REFERENCE_GFLOPS,
    "features": 30.0,
    "search": 328.0,
    "distill": 330.0 * SECOND_GFLOPS / REFERENCE_GFLOPS,
    "evaluate": (3 * 84.0 + 12.8) * SECOND_GFLOPS / REFERENCE_GFLOPS,
    "export": 329.0,
}
REFERENCE_CONFIG = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    vocab_size=49152,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)
REFERENCE_LAYER = 13  # the layer the demo's probe chose
# Nominal dense bfloat16 rate of a data-centre GPU (an A100 reaches about 300 TFLOP/s at best):
# used when the recipe says cuda but this machine has none to measure.
NOMINAL_CUDA_GFLOPS = 150_000.0
# On a GPU, a decoding step is bound by kernel launches (this many seconds per decoder layer in
# eager PyTorch, the patch's few ops included) or by reading every weight once (at this many
# bytes/s, HBM), not by arithmetic; prompts are decoded GENERATION_BATCH at a time, about
# PROMPTS_PER_PERSON attack prompts per person and pass.
GPU_LAYER_STEP_S = 1.5e-4
GPU_BYTES_PER_S = 1.5e12
GENERATION_BATCH = 16
PROMPTS_PER_PERSON = 8
ADVERSARIAL_PROMPTS = 7 + 32  # seven paraphrases and formats, greedy; one template sampled 32 times
# What a GPU does not speed up: each stage's seconds on one H200 running
# recipes/demo-smollm2-cuda.yaml (SmolLM2, 30 layers of 576) less the device's share by the
# estimate: the per-layer probes' fits on the CPU (scaled by layers x width), loading, Python's
# per-step work in the fine-tunes, the SAE's per-batch work.
GPU_HOST_SECONDS = {"leaky": 19.0, "probe": 26.0, "sae": 11.0, "features": 1.4, "search": 9.0}
HOST_PROBE_SIZE = 30 * 576
# The built-in leaky fine-tune: 3 epochs of 500 PII texts and 125 benign ones, about 60 tokens each.
LEAKY_TOKENS = 3 * 625 * 60
# The distillation's training texts on the built-in data, in SmolLM2's tokens cut at 128: the 800
# PII documents and written templates (37,058) and the 352 windows of pydoc prose (42,929).
BUILTIN_PII_TOKENS = 37_000
PYDOC_TOKENS = 43_000


def layer_params(cfg: dict) -> int:
    """One decoder layer's matrix parameters (attention and MLP; norms and biases ignored)."""
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads") or heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2
    mlp = (2 if cfg.get("model_type") in ("gpt2", "gpt_neox") else 3) * d * ff
    return attention + mlp


def forward_flops(cfg: dict, upto: Optional[int] = None, head: bool = True) -> float:
    """FLOPs of one token's forward pass through decoder layers 0..`upto` (all by default), plus
    the output head over the whole vocabulary when `head` (on a 262k vocabulary, most of it)."""
    layers = cfg["num_hidden_layers"] if upto is None else upto + 1
    flops = 2.0 * layers * layer_params(cfg)
    return flops + (2.0 * cfg["hidden_size"] * cfg["vocab_size"] if head else 0.0)


@dataclass(frozen=True)
class Sizes:
    """What a run's cost scales with besides the model (the recipe's and the data's sizes)."""

    probe_tokens: int
    harvest_tokens: int  # run through layers 0..l for the SAE (online: the training tokens)
    sae_tokens: int
    d_sae: int
    candidates: int
    people: int  # people (or values) attacked per group
    new_tokens: int
    samples: int
    ppl_tokens: int
    distill_tokens: int  # tokens each student trains on (0: no distillation)
    relearn_tokens: int  # tokens each relearning fine-tune trains on (0: none)
    leaky_tokens: int  # tokens of the leaky fine-tune (0: the data is the user's own)
    late_tokens: int = 0  # tokens the distillation's later-layer phase trains on (late_steps)
    # hardening (export.distill.harden): tokens the privacy neurons' integrated gradients run over
    # (documents and benign windows, times the IG steps; once, shared with the control), and the
    # tokens the repair trains on (per student)
    harden_rank_tokens: int = 0
    harden_tokens: int = 0
    gate_window_tokens: int = 0  # benign windows the context gate is fitted on besides
    search_samples: int = 0  # sampled continuations per validation prompt in the search
    # parts of the validation split the search cross-fits (each > 1 runs the features stage again)
    search_folds: int = 1
    # models the final evaluation attacks: base, patch, control; a distilled run's teacher; each
    # relearned copy
    variants: int = 3
    adversarial: bool = False  # the adversarial attacks, on the test people
    memorisation_docs: int = 0  # test documents the memorisation metrics score, per model
    distill_layers: int = 0  # the decoder layers the student's adapters are on (0: 0..l)
    # tokens of the distillation's training texts: the teacher's forward runs over them once per
    # student
    teacher_tokens: int = 0
    heldout_tokens: int = 0  # the SAE's held-out activations, through layers 0..l
    ce_tokens: int = 0  # the SAE's spliced cross-entropy texts, three whole forwards each
    # people in each of the validation and test splits (0: a third of `people` each)
    split_people: int = 0
    aux_latents: int = 0  # latents the AuxK term decodes per token, on average over the training

    @property
    def per_split(self) -> float:
        """The people the search attacks (validation), and the adversarial attacks and the user's
        path (test)."""
        return self.split_people or self.people / 3


def stage_flops(cfg: dict, layer: int, s: Sizes) -> dict[str, float]:
    """Each stage's arithmetic. Generation counts prompt and new tokens through the whole model;
    training three times a forward pass."""
    full, upto = forward_flops(cfg), forward_flops(cfg, layer, head=False)
    decode = s.people * (1 + s.samples / 4) * (64 + s.new_tokens) * full
    # the search attacks the validation people, greedy unless it samples too
    search_decode = s.per_split * (1 + s.search_samples / 4) * (64 + s.new_tokens) * full
    # the feature pass (the search's cross-fitting runs it again for each part)
    features = (30_000 + s.gate_window_tokens) * upto
    out = {
        "probe": s.probe_tokens * forward_flops(cfg, head=False),
        "sae": (s.harvest_tokens + s.heldout_tokens) * upto + 3 * s.ce_tokens * full,
        "sae_train": s.sae_tokens
        * cfg["hidden_size"]
        * (12.0 * s.d_sae + AUX_FLOPS_PER_DIM * s.aux_latents),
        "features": features,
        "search": s.candidates * (search_decode + s.ppl_tokens * full)
        + (s.search_folds if s.search_folds > 1 else 0) * features,
        # each model attacked and measured; each relearning fine-tune (benign prose, other
        # people's PII)
        "evaluate": s.variants * (decode + s.ppl_tokens * full) + 2 * 3 * s.relearn_tokens * full,
        "export": decode,
    }
    if s.leaky_tokens:
        out = {"leaky": 3 * s.leaky_tokens * full, **out}
    if s.distill_tokens:
        # one student (the patch's; the control's is trained in the final evaluation, below): the
        # teacher's forward through 0..l over the training texts once, then each step's forward
        # and backward (twice a forward) through the adapted layers only (each step starts at the
        # first of them)
        first = first_adapted(layer, s.distill_layers)
        adapted = upto - (forward_flops(cfg, first - 1, head=False) if first else 0.0)
        out["distill"] = s.teacher_tokens * upto + 3 * s.distill_tokens * adapted
        # the later layers' phase: the target's and the student's whole forward, the backward
        # through the layers after l only
        out["distill"] += s.late_tokens * (2 * full + 2 * (full - upto))
        # hardening: the repair's target and student forwards, the backward through the layers
        # after l; apart, the ranking's forward and backward through the whole model (once: the
        # control's distillation reads it back)
        out["distill"] += s.harden_tokens * (2 * full + 2 * (full - upto))
        if s.harden_rank_tokens:
            out["distill_rank"] = 3 * s.harden_rank_tokens * full
    return out


def reference_sizes() -> Sizes:
    """The demo recipe's sizes, as the reference run had them."""
    return Sizes(
        probe_tokens=20_000,
        harvest_tokens=150_000,
        heldout_tokens=20_000,
        ce_tokens=48 * 128,
        sae_tokens=3_000_000,
        d_sae=8 * 576,
        aux_latents=REFERENCE_AUX_LATENTS,
        candidates=8,
        people=150,
        new_tokens=24,
        samples=4,
        ppl_tokens=8_000,
        distill_tokens=300 * (2 * 8 * 64 + 64),
        teacher_tokens=BUILTIN_PII_TOKENS + PYDOC_TOKENS,
        distill_layers=4,
        relearn_tokens=0,
        leaky_tokens=LEAKY_TOKENS,
    )


def machine_gflops(device: str = "cpu", n: int = 1024, repeats: int = 5) -> tuple[float, bool]:
    """(this machine's float32 matrix-multiply rate on `device`, True) (about a tenth of a second
    on a CPU), or (a nominal GPU rate, False) when the device is cuda and none is here."""
    if device != "cpu" and not torch.cuda.is_available():
        return NOMINAL_CUDA_GFLOPS, False
    dev = "cuda" if device != "cpu" else "cpu"
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    a @ b  # warm-up: thread pool, kernels
    fastest = float("inf")
    # the fastest of several: a single timing swings by a third when anything else wakes up
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        fastest = min(fastest, time.perf_counter() - started)
    return 2.0 * n**3 / fastest / 1e9, True


def decoding_steps(s: Sizes) -> dict[str, float]:
    """Sequential decoding steps of the generation-bound stages on a GPU."""
    batches = s.people * PROMPTS_PER_PERSON * (1 + s.samples / 4) / GENERATION_BATCH
    # the adversarial attacks: the test people, ADVERSARIAL_PROMPTS each
    batches += s.adversarial * s.per_split * ADVERSARIAL_PROMPTS / GENERATION_BATCH
    per_pass = batches * (1 + s.new_tokens)  # one prefill, then a step per new token
    # the search attacks the validation people (greedy, and sampled if it samples)
    search = (
        s.per_split
        * PROMPTS_PER_PERSON
        * (1 + s.search_samples / 4)
        / GENERATION_BATCH
        * (1 + s.new_tokens)
    )
    # the user's path: the test people, each zero-shot template's prompt alone (base and export
    # in two processes at once)
    user_path = s.per_split * 3 * (1 + s.new_tokens)
    return {
        "search": s.candidates * search,
        "evaluate": s.variants * per_pass,
        "export": user_path,
    }


def estimate_seconds(
    cfg: dict, layer: int, sizes: Sizes, gflops: float, device: str = "cpu"
) -> dict[str, float]:
    """Seconds per stage: the stage's FLOPs at the rate the reference run reached on that stage,
    scaled by this machine's matrix rate against the reference machine's. On a GPU (`gflops` its
    rate), generation is never faster than its launch-bound floor and each stage adds the host's
    share that no GPU speeds up."""
    ref = stage_flops(REFERENCE_CONFIG, REFERENCE_LAYER, reference_sizes())
    speed = gflops / REFERENCE_GFLOPS
    flops = stage_flops(cfg, layer, sizes)
    rank = flops.pop("distill_rank", 0.0)
    out = {stage: f / (ref[stage] / REFERENCE_SECONDS[stage]) / speed for stage, f in flops.items()}
    # the SAE's forward passes and its training, each at its own measured rate
    out["sae"] += out.pop("sae_train")
    if "distill" in out:
        # the final evaluation distils the control patch too: the same work at the same rate
        out["evaluate"] += out["distill"]
        out["distill"] += rank / (ref["distill"] / REFERENCE_SECONDS["distill"]) / speed
    # the attacks measured per person and per document on the second machine, scaled by the
    # model's forward and this machine's rate
    per_model = (
        ADVERSARIAL_SECONDS_PER_PERSON * sizes.per_split * sizes.adversarial
        + MEMORISATION_SECONDS_PER_DOC * sizes.memorisation_docs
    )
    scale = forward_flops(cfg) / forward_flops(REFERENCE_CONFIG) * SECOND_GFLOPS / gflops
    out["evaluate"] += sizes.variants * per_model * scale
    if device != "cpu":
        # the bytes of bfloat16 weights a decoding step reads (every layer and the head) equal the
        # FLOPs of one token's forward: two per weight
        weights = forward_flops(cfg)
        floor = max(cfg["num_hidden_layers"] * GPU_LAYER_STEP_S, weights / GPU_BYTES_PER_S)
        for stage, steps in decoding_steps(sizes).items():
            out[stage] = max(out[stage], steps * floor)
        width = cfg["num_hidden_layers"] * cfg["hidden_size"] / HOST_PROBE_SIZE
        for stage, seconds in GPU_HOST_SECONDS.items():
            if stage in out:
                out[stage] += seconds * (width if stage == "probe" else 1.0)
    return out
