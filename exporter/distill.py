"""Distillation of a patch into the model's own weights: the patched model is the teacher, the
student is the base with LoRA adapters on every linear map of the last decoder layers up to l
(`adapted_layers`, default 4: l-3..l), trained so that its layer-l output matches the teacher's
(squared error per real token relative to the target's squared norm; no layer after l runs, no LM
head) on PII text and benign prose, then merged into the weights.

Why the last few layers and not 0..l: on the demo (patch at layer 13 of SmolLM2), adapters on
10..13 left held-out KL 0.0086 where 0..13 left 0.0210, at the same leakage (0% / 0%): the layers
below stay the base's, so every token's input to the adapted ones (the attention sink's too) is
exactly what the base computes. Their output on the training text never changes, so it is computed
once and each step starts at the first adapted layer (0.77 s a step there against 2.9 s for 0..13).

Every real token is trained, the first one too. The first token is the attention sink and its norm
puts it outside the patch (the teacher leaves it as the base has it); left out of the loss, the
adapters moved it freely, and with it the first next-token prediction and every later token's
attention (on the demo, held-out prose at KL 0.114 with 4.8 nats at the first prediction).

The result is the base's own architecture with some weights changed: it loads anywhere, and unlike a
remote-code export its files no longer hold what the patch hides. The teacher's layer-l outputs are
computed once, before the adapters go in (one model in memory, not two).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import from_layer, layer_outputs
from .lm import WIDTH_STEP, padded_width, padding_side
from .models import architecture_of, unfrozen
from .patch import applied
from .precision import compute_dtype, device_of


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 300
    lr: float = 1e-3
    rank: int = 16
    batch_size: int = 8
    max_length: int = 128
    benign_weight: float = 4.0  # the benign batch's weight in each step's loss
    # texts per forward and backward: each batch's gradient is accumulated over chunks of this many
    # (the same gradient as the whole batch at once; the autograd activations of one chunk, not of
    # both batches, are what is held at a time)
    micro_batch: int = 2
    seed: int = 0
    # the student's forward and backward: bfloat16 autocast (on SmolLM2 here about 1.0 s a step
    # against 1.4 in float32); the adapters and the merge stay float32
    dtype: str = "bfloat16"
    # defence in depth (distill_late.py): steps of LoRA on the layers after l, fed the base's own
    # layer-l output, towards the patched model's next-token distribution (0: not run)
    late_steps: int = 0
    # single-token texts per step, beside the benign batch and at its weight (0: none): see
    # `first_tokens`
    first_tokens: int = 64
    # position p (1-based) of every text weighs max(1, early_positions / p) in the loss (0: every
    # position weighs 1): see `position_weights`
    early_positions: int = 64
    # the decoder layers that get adapters: the last this many up to l (0: every one, 0..l)
    adapted_layers: int = 4


@dataclass
class Distilled:
    """The merged student and how it got there."""

    model: nn.Module
    curve: list[dict]  # per step: {"step", "pii", "benign"}: the training loss of each batch
    # {"pii"|"benign": {"base": base→teacher, "student": student→teacher, "student_vs_base"}}, each
    # a mean over the real tokens of the squared distance relative to the base's squared norm there
    heldout: dict
    changed: list[str]  # names of the weights the merge changed
    seconds: float
    tokens: int  # tokens the student trained on (steps x both batches)
    adapter_parameters: int = 0  # what was trained: the rank-r factors (each merged matrix changes)
    # the later layers' phase, when run: {"curve", "heldout_kl": {"before"|"after": {"pii",
    # "benign"}}, "seconds", "tokens"}
    late: Optional[dict] = None


Batch = tuple[torch.Tensor, torch.Tensor]


def fixed_batches(
    tokenizer, texts: Sequence[str], batch_size: int, max_length: int, width_step: int = WIDTH_STEP,
    whole: bool = False,
) -> list[Batch]:  # fmt: skip
    """Right-padded (ids, mask) batches of `texts` in length order (little padding), each
    `width_step`-rounded wide (at most `max_length`); the order the student sees them in is
    shuffled later, per pass. Each text is cut at `max_length` tokens or, `whole`, into pieces of
    that many (every token of it trained on)."""
    if not texts:
        return []
    with padding_side(tokenizer, "right"):
        enc = tokenizer(list(texts), truncation=not whole, max_length=max_length)["input_ids"]
    rows = [r[i : i + max_length] for r in enc for i in range(0, len(r), max_length)]
    rows.sort(key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = padded_width(max(len(r) for r in batch), max_length, width_step)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        out.append((ids, mask))
    return out


def first_tokens(batches: Sequence[Batch], size: int, seed: int) -> list[Batch]:
    """Single-token texts of every distinct token of `batches`, `size` per batch (seeded order);
    none when every text starts with the same token (a BOS: every text trains it already).

    A text's first token is computed from that token alone, and on a real model it is the attention
    sink (about 150 times the median norm on SmolLM2): a small relative change there moves the first
    prediction and every later token's attention. The training texts train it only for the tokens
    they start with; these train it for any text's first token."""
    if size <= 0 or len({int(i) for ids, _ in batches for i in ids[:, 0]}) < 2:
        return []
    tokens = torch.unique(torch.cat([ids[mask.bool()] for ids, mask in batches]))
    order = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))]
    chunks = order.split(size)
    return [(c.unsqueeze(1), torch.ones(len(c), 1, dtype=torch.long)) for c in chunks]


def outputs(model, layer: int, batches: Sequence[Batch], patch=None) -> list[torch.Tensor]:
    """Layer `layer`'s output on each batch (computed in the model's dtype, kept on the CPU in
    bfloat16: half the memory of every target held through training, and its rounding, about 2^-9
    of each value, is far below the distances the student is trained and measured on)."""
    return outputs_at(model, {layer: torch.bfloat16}, batches, patch)[layer]


def outputs_at(
    model, layers: dict[int, torch.dtype], batches: Sequence[Batch], patch=None
) -> dict[int, list[torch.Tensor]]:
    """The outputs of several layers on each batch in one forward (`patch` at the deepest), each
    kept on the CPU in the dtype `layers` gives it."""
    model.eval()
    found = {i: [] for i in layers}
    with applied(model, max(layers), patch) if patch is not None else nullcontext():
        for ids, mask in batches:
            got = layer_outputs(model, ids, mask, list(layers))
            for i, dtype in layers.items():
                found[i].append(got[i].to(device="cpu", dtype=dtype))
    return found


def masked_mse(
    h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, count: Optional[float] = None
) -> torch.Tensor:
    """Squared error per real token relative to the target's squared norm, summed over the real
    tokens (each times its weight in `mask`: 1, or `position_weights`; 0 at padding) and divided by
    `count` (default: the weights' sum, a mean; a whole batch's sum when `h` is one chunk of it):
    scale-free, so the attention sink and any other token of outlying norm weigh what every other
    token weighs, neither the whole batch nor nothing."""
    keep = mask.bool().to(h.device)
    w = mask.to(h.device, torch.float32)[keep]
    t = target.to(h.device)[keep].float()
    err = ((h[keep].float() - t) ** 2).sum(-1)
    n = float(w.sum()) if count is None else count
    return (w * err / (t**2).sum(-1).clamp_min(1e-6)).sum() / max(n, 1e-6)


def position_weights(mask: torch.Tensor, early: int) -> torch.Tensor:
    """Each real token's weight in the loss (right-padded texts): max(1, `early` / its 1-based
    position), 0 at padding; the mask itself when `early` is 0.

    The first positions of a text are read by every later token's attention, so a small error there
    moves every later prediction: on the demo, putting the base's layer-l output back at the first 4
    positions of a student took KL 0.037 to 0.020, at the first 16 to 0.009, while a plain mean
    gives those positions 4 and 16 of about 128 shares of the loss."""
    if early <= 0:
        return mask
    position = torch.arange(1, mask.shape[1] + 1, dtype=torch.float32)
    return (early / position).clamp_min(1.0) * mask.float()


def relative_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], base, batches) -> float:
    """Mean over the real tokens of `batches` of the squared distance of `a` from `b`, relative to
    the squared norm of `base` at that token (one denominator for every comparison of the same
    text): per token, as the training loss, so a few tokens of outlying norm do not make it."""
    err, count = 0.0, 0
    for x, y, z, (_, mask) in zip(a, b, base, batches):
        keep = mask.bool()
        d = ((x[keep].float() - y[keep].float()) ** 2).sum(-1)
        err += float((d / (z[keep].float() ** 2).sum(-1).clamp_min(1e-6)).sum())
        count += int(keep.sum())
    return err / max(count, 1)


def first_adapted(layer: int, count: int) -> int:
    """The first decoder layer of `count` ending at `layer` (0 when `count` is 0 or reaches past
    the first layer)."""
    return max(0, layer - count + 1) if count > 0 else 0


def adapted_modules(model, upto: int, first: int = 0) -> list[str]:
    """Every linear map (nn.Linear, GPT-2's Conv1D) of decoder layers `first`..`upto`, by full
    name."""
    from transformers.pytorch_utils import Conv1D

    arch = architecture_of(model)
    prefixes = tuple(f"{arch.layers}.{i}." for i in range(first, upto + 1))
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefixes) and isinstance(module, (nn.Linear, Conv1D))
    ]


def with_adapters(model, names: list[str], rank: int, seed: int):
    """The model wrapped by peft with rank-`rank` LoRA adapters on the modules `names`."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    conv = any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    torch.manual_seed(seed)  # the adapters' initialisation
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=names,
        lora_dropout=0.0,
        fan_in_fan_out=conv,
    )
    return get_peft_model(model, config)


def _passes(n: int, seed: int):
    """Endless indices 0..n-1, reshuffled every pass (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def accumulate(
    batch: Batch, weight: float, micro_batch: int, chunk_loss, count: Optional[float] = None
) -> tuple[float, int]:
    """Backpropagate `weight` x the batch's loss chunk by chunk (gradients add up to the whole
    batch's): `chunk_loss(rows, count)` is the loss of the rows `rows`, summed over their real
    tokens and divided by the batch's `count` (default: its real tokens). Return the batch's loss
    and its tokens."""
    ids, mask = batch
    count = int(mask.sum()) if count is None else count
    total, chunk = 0.0, max(micro_batch, 1)
    for start in range(0, len(ids), chunk):
        loss = chunk_loss(slice(start, start + chunk), count)
        (weight * loss).backward()
        total += loss.item()
    return total, int(mask.sum())


def _mse_loss(model, layer: int, batch: Batch, target, cast, weights, start=None):
    """A chunk's loss for `accumulate`: its layer-`layer` output against the teacher's, each token
    at its weight in `weights`; with `start` (the first adapted layer, its inputs on the batch),
    the forward starts there."""
    ids, mask = batch

    def loss(rows, count):
        skip = from_layer(model, start[0], start[1][rows]) if start else nullcontext()
        with cast(), skip:
            h = layer_outputs(model, ids[rows], mask[rows], [layer], grad=True)[layer]
        return masked_mse(h, target[rows], weights[rows], count)

    return loss


def autocast_for(cfg, model):
    """The student's autocast context (bfloat16 where `cfg.dtype` asks for it and the device runs
    it natively), else no cast."""
    device = device_of(model)
    if compute_dtype(cfg.dtype, device) == "bfloat16":
        return partial(torch.autocast, device, dtype=torch.bfloat16)
    return nullcontext


def lora_steps(
    net, steps: int, lr: float, pii_step, benign_step, counts: tuple[int, int], seed: int,
    desc: str, progress: bool = True,
) -> tuple[list[dict], int]:  # fmt: skip
    """Train `net`'s adapters (AdamW, linear decay to zero over `steps`): each step one PII batch
    (`pii_step(i)`) and, when `benign_step` is given, one benign batch, each backpropagating its
    weighted loss and returning (its loss, its tokens); batches reshuffled every pass (seeded).
    Return the loss curve and the tokens trained on."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    pii_order, benign_order = _passes(counts[0], seed), _passes(counts[1], seed + 1)
    curve, tokens = [], 0
    net.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    try:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            pii_loss, n = pii_step(next(pii_order))
            tokens += n
            benign_loss = 0.0
            if benign_step is not None:
                benign_loss, n = benign_step(next(benign_order))
                tokens += n
            opt.step()
            sched.step()
            curve.append({"step": step + 1, "pii": pii_loss, "benign": benign_loss})
            bar.set_postfix(pii=f"{pii_loss:.3g}", benign=f"{benign_loss:.3g}")
    finally:
        bar.close()
    return curve, tokens


def train_student(
    model, layer: int, sets: dict[str, list[Batch]], targets: dict[str, list],
    cfg: DistillConfig, progress: bool = True, inputs: Optional[dict[str, list]] = None,
) -> tuple[nn.Module, list[dict], int, int]:  # fmt: skip
    """Train LoRA adapters on the last `cfg.adapted_layers` layers up to `layer` towards the targets
    of `sets` ("pii", "benign", "first": see `first_tokens`); return the merged model, the loss
    curve ("benign": the benign batch's loss plus the first-token batch's), the tokens trained on
    and the adapters' parameter count. `inputs`: each set's input to the first adapted layer (the
    base's, fixed while only the layers from it train), so the layers below do not run each step."""
    first = first_adapted(layer, cfg.adapted_layers)
    net = with_adapters(model, adapted_modules(model, layer, first), cfg.rank, cfg.seed)
    adapter = sum(p.numel() for p in net.parameters() if p.requires_grad)
    cast = autocast_for(cfg, model)
    pii, benign, firsts = (sets[k] for k in ("pii", "benign", "first"))

    def step_on(name, weight, chunk=cfg.micro_batch):
        batches, found = sets[name], targets[name]

        def step(i):
            w = position_weights(batches[i][1], cfg.early_positions)
            start = (first, inputs[name][i]) if inputs else None
            loss = _mse_loss(model, layer, batches[i], found[i], cast, w, start)
            return accumulate(batches[i], weight, chunk, loss, float(w.sum()))

        return step

    benign_step = None
    if benign and cfg.benign_weight > 0:
        on_benign = step_on("benign", cfg.benign_weight)
        # single tokens are cheap: one chunk
        on_first = step_on("first", cfg.benign_weight, cfg.first_tokens)
        first_order = _passes(len(firsts), cfg.seed + 3) if firsts else None

        def benign_step(i):
            loss, n = on_benign(i)
            if first_order is None:
                return loss, n
            extra, m = on_first(next(first_order))
            return loss + extra, n + m

    curve, tokens = lora_steps(
        net, cfg.steps, cfg.lr, step_on("pii", 1.0), benign_step,
        (len(pii), len(benign)), cfg.seed, "distil", progress,
    )  # fmt: skip
    merged = unfrozen(net.merge_and_unload()).eval()
    return merged, curve, tokens, adapter


def distil(
    model,
    tokenizer,
    layer: int,
    patch,
    pii_texts: Sequence[str],
    benign_texts: Sequence[str],
    cfg: DistillConfig = DistillConfig(),
    *,
    heldout_pii: Sequence[str] = (),
    heldout_benign: Sequence[str] = (),
    progress: bool = True,
) -> Distilled:
    """Distil `patch` (at decoder layer `layer`) into `model`'s weights, in place: teacher
    targets on the PII and benign texts, LoRA on the last `cfg.adapted_layers` layers up to
    `layer` trained towards them, merged.
    The held-out texts measure how far the student's layer-`layer` output is from the teacher's,
    before (the base) and after."""
    if not pii_texts:
        raise ValueError(
            "distillation needs PII text to learn the patch on: the recipe's PII documents are "
            "empty"
        )
    started = time.perf_counter()
    sets = {
        "pii": fixed_batches(tokenizer, pii_texts, cfg.batch_size, cfg.max_length),
        "benign": fixed_batches(tokenizer, benign_texts, cfg.batch_size, cfg.max_length),
        "heldout_pii": fixed_batches(tokenizer, heldout_pii, cfg.batch_size, cfg.max_length),
        "heldout_benign": fixed_batches(tokenizer, heldout_benign, cfg.batch_size, cfg.max_length),
    }
    sets["first"] = first_tokens(sets["pii"] + sets["benign"], cfg.first_tokens, cfg.seed)
    first = first_adapted(layer, cfg.adapted_layers)
    # below the first adapted layer the student is the base: its input there is computed once, in
    # the teacher's forward (the patch acts after it), and kept in the student's compute dtype
    wanted = {layer: torch.bfloat16}
    if first > 0:
        fast = autocast_for(cfg, model) is not nullcontext
        wanted[first - 1] = torch.bfloat16 if fast else next(model.parameters()).dtype
    found = {k: outputs_at(model, wanted, b, patch) for k, b in sets.items()}
    teacher = {k: f[layer] for k, f in found.items()}
    inputs = {k: found[k][first - 1] for k in ("pii", "benign", "first")} if first > 0 else None
    del found
    base = {k: outputs(model, layer, sets[k]) for k in ("heldout_pii", "heldout_benign")}
    # the merge rewrites exactly the adapted maps' weights (no copy of the model kept to compare)
    changed = [f"{n}.weight" for n in adapted_modules(model, layer, first)]
    late = None
    from .distill_late import late_names, train_late

    later = late_names(model, layer)
    # a patch at the last layer has no later layers: its early phase already covers every one
    if cfg.late_steps and later:
        changed += later
        held = {"pii": sets["heldout_pii"], "benign": sets["heldout_benign"]}
        model, late = train_late(
            model, layer, patch, sets["pii"], sets["benign"], cfg, heldout=held, progress=progress
        )
    merged, curve, tokens, adapter = train_student(
        model, layer, sets, teacher, cfg, progress, inputs
    )
    heldout = {}
    for name in ("pii", "benign"):
        k = f"heldout_{name}"
        b = sets[k]
        if b:
            student = outputs(merged, layer, b)
            heldout[name] = {
                "base": relative_error(base[k], teacher[k], base[k], b),
                "student": relative_error(student, teacher[k], base[k], b),
                "student_vs_base": relative_error(student, base[k], base[k], b),
                "tokens": int(sum(int(m.sum()) for _, m in b)),
            }
    seconds = round(time.perf_counter() - started, 1)
    return Distilled(merged, curve, heldout, changed, seconds, tokens, adapter, late)
