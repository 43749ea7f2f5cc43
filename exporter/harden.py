"""Hardening a distilled export against the relearning attack: the privacy neurons of the layers
above the patch zeroed, then those layers' MLP weights repaired towards the distilled student.

Why: distillation changes the layers up to the patch's layer l so that its output is the patched
one; the layers above it still hold what the leaky fine-tune wrote there, and a short fine-tune on
other people's PII (which restores the features the patch removes) brings part of it back. Zeroing
the neurons that carry the memorised values removes it from those layers (DEPN, Wu et al. 2023);
DEPN alone also breaks the model, so the damaged MLPs are then trained, full rank, towards the
student's next-token distribution on the distillation's own texts: the repair restores only what the
student shows, which holds no hidden value (cf. "Distillation robustifies unlearning", Lee et al.
2025, where noise plays the neurons' part).

The neurons are ranked by how much more they matter to the PII tokens than to every token of
benign text (integrated gradients in the leaky base, each document's attributions over its
largest), so that neurons every text needs rank last: by DEPN's own ranking (how many documents a
neuron matters to), the top 200 of SmolLM2's layers 14..29 cost KL 1.04 before any repair; by this
one, 400 cost 0.43.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data.corpus import Document
from .data.detectors import Span
from .distill import autocast_for, fixed_batches
from .distill_late import token_kl
from .methods.depn import attributions, zero_neuron
from .mlp_keys import mlp_maps, undo_along
from .models import architecture_of, unfrozen

Neuron = tuple[int, int]  # (decoder layer, neuron of its MLP)


@dataclass(frozen=True)
class HardenConfig:
    neurons: int = 0  # privacy neurons zeroed above the patch (0: no hardening)
    documents: int = 100  # PII documents (and as many benign windows) the neurons are ranked on
    steps: int = 150  # repair steps (one PII and one benign batch each)
    lr: float = 1e-4
    batch_size: int = 4
    max_length: int = 96  # tokens per repair text
    # tokens per text the neurons are ranked on (DEPN's own default; the IG of each runs the model
    # `ig_steps` times at once)
    rank_length: int = 128
    benign_weight: float = 4.0  # the benign batch's weight in each repair step's loss
    ig_steps: int = 16
    seed: int = 0
    # the model before the fine-tune (a recipe's word for it; `revert` is given the model itself)
    reference: Optional[str] = None
    # with a reference: the change from it undone along this many key directions of each MLP map's
    # input (`mlp_keys.py`), not the whole MLPs set back (0)
    directions: int = 0
    dtype: str = "float32"  # the repair's compute: "bfloat16" autocast where native
    # the repair trains on every token of each benign window, in pieces of `max_length`, not only
    # on its first `max_length` tokens
    whole_benign: bool = False
    # the repair's schedule: linear decay from `lr`, after a linear warmup over `warmup` steps; with
    # `burst`, only the first `burst` steps run at `lr` and the rest at `settle_lr`
    warmup: int = 0
    burst: int = 0
    settle_lr: Optional[float] = None


@dataclass
class Hardened:
    """The repaired model and how it got there."""

    model: torch.nn.Module
    neurons: list[Neuron]  # zeroed (none when the MLPs were reverted)
    changed: list[str]  # names of the tensors the edit or the repair changed
    curve: list[dict] = field(default_factory=list)  # per step: {"step", "pii", "benign"}
    seconds: float = 0.0


def mlp_tensors(model, first: int, biases: bool = False) -> dict[str, torch.nn.Parameter]:
    """Every linear weight (and with `biases`, bias) in the MLPs of decoder layers `first`.., by
    full name."""
    arch = architecture_of(model)
    out = {}
    for i in range(first, arch.num_layers(model)):
        for name, module in mlp_maps(model, i).items():
            out[f"{arch.layers}.{i}.mlp.{name}.weight"] = module.weight
            if biases and module.bias is not None:
                out[f"{arch.layers}.{i}.mlp.{name}.bias"] = module.bias
    return out


def mlp_weights(model, first: int) -> dict[str, torch.nn.Parameter]:
    """Every linear weight in the MLPs of decoder layers `first`.., by full name (what the repair
    trains)."""
    return mlp_tensors(model, first)


def same_mlps(model, reference, first: int) -> dict[str, torch.nn.Parameter]:
    """`model`'s MLP tensors of decoder layers `first`.. (weights and biases), once `reference` is
    checked to have the same ones, of the same shapes."""
    mine, theirs = mlp_tensors(model, first, True), mlp_tensors(reference, first, True)
    wrong = next(
        (n for n, t in mine.items() if n not in theirs or theirs[n].shape != t.shape), None
    )
    if wrong or len(theirs) != len(mine):
        found = tuple(theirs[wrong].shape) if wrong in theirs else "nothing"
        raise ValueError(
            "export.distill.harden.reference is not the base's architecture and size: the base's "
            f"{wrong or 'MLPs'} is {tuple(mine[wrong].shape) if wrong else len(mine)}, the "
            f"reference has {found if wrong else len(theirs)}; give the model the base was "
            "fine-tuned from"
        )
    return mine


def revert_mlps(model, reference, first: int) -> list[str]:
    """The MLPs of decoder layers `first`.. of `model` given `reference`'s weights and biases, in
    place; the names of the tensors set."""
    mine, theirs = same_mlps(model, reference, first), mlp_tensors(reference, first, True)
    with torch.no_grad():
        for name, t in mine.items():
            t.copy_(theirs[name].to(t.device, t.dtype))
    return list(mine)


def specific_neurons(
    model, tokenizer, docs: Sequence[Document], benign: Sequence[str], first: int,
    cfg: HardenConfig, progress: bool = True,
) -> list[Neuron]:  # fmt: skip
    """Every MLP neuron of layers `first`.. of `model` (the leaky base), most specific to the PII
    tokens of `docs` first: the mean over documents of each neuron's attribution to the PII tokens'
    likelihood, as a share of that document's largest, less the same share over every token of the
    `benign` windows."""
    layers = list(range(first, architecture_of(model).num_layers(model)))
    if not layers:
        raise ValueError(
            f"hardening zeroes neurons above the patch's layer, and layer {first - 1} is the last: "
            "choose an earlier probe.layer or set export.distill.harden.neurons: 0"
        )

    def attributed(chosen):
        return attributions(
            model, tokenizer, chosen, layers, steps=cfg.ig_steps, max_length=cfg.rank_length,
            progress=progress,
        )  # fmt: skip

    # a benign window as a document whose every token is a target (the span's type is not read)
    general = attributed([Document(t, [Span(0, len(t), "email")]) for t in benign]).abs()

    def share(a: torch.Tensor) -> torch.Tensor:
        return (a / a.flatten(1).abs().max(1).values.clamp(min=1e-12).view(-1, 1, 1)).mean(0)

    order = torch.argsort((share(attributed(docs)) - share(general)).flatten(), descending=True)
    n = general.shape[2]
    return [(layers[int(i) // n], int(i) % n) for i in order]


def zero_neurons(model, neurons: Sequence[Neuron]) -> None:
    """DEPN's edit, in place: each neuron's output weights zeroed."""
    arch = architecture_of(model)
    for layer, j in neurons:
        zero_neuron(model.get_submodule(f"{arch.layers}.{layer}.{arch.mlp_out}"), j)


def repair(
    model, teacher, tokenizer, pii: Sequence[str], benign: Sequence[str], weights: list,
    cfg: HardenConfig, progress: bool = True, masks: Optional[list] = None, cast=nullcontext,
) -> list[dict]:  # fmt: skip
    """Train `weights` of `model` (the others frozen; AdamW, linear decay; with `masks`, only their
    entries) towards `teacher`'s next-token distribution (KL over every real token) on one PII and
    one benign batch a step (the benign at `cfg.benign_weight`), each forward in `cast()`, in
    place; the loss curve."""
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg))
    batched = partial(
        fixed_batches, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length
    )
    sets = {
        "pii": (batched(pii), 1.0),
        "benign": (batched(benign, whole=cfg.whole_benign), cfg.benign_weight),
    }
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    curve = []
    model.train()
    for step in tqdm(range(cfg.steps), desc="repair", disable=not progress):
        opt.zero_grad(set_to_none=True)
        point = {"step": step + 1}
        for name, (batches, weight) in sets.items():
            if not batches or weight <= 0:
                point[name] = 0.0
                continue
            ids, mask = batches[int(torch.randint(len(batches), (1,), generator=gen))]
            loss = kl_from(teacher, model, ids, mask, cast=cast)
            (weight * loss).backward()
            point[name] = loss.item()
        for w, m in zip(weights, masks or []):
            w.grad.mul_(m)  # Adam moves an entry with no gradient, and no decay, not at all
        opt.step()
        sched.step()
        curve.append(point)
    unfrozen(model).eval()
    return curve


def lr_factor(cfg: HardenConfig, step: int) -> float:
    """The repair's learning rate at `step` (from 0), as a factor of `cfg.lr`: linear decay to 0
    over `cfg.steps`, times a linear warmup over the first `cfg.warmup` steps; past `cfg.burst`
    steps, `cfg.settle_lr` takes the place of `cfg.lr`. Adam's first steps move every weight by
    about the learning rate whatever its gradient, so these choose how far the repair first
    scatters the edited weights before it fits them."""
    factor = 1.0 - step / max(cfg.steps, 1)
    if cfg.warmup:
        factor *= min(1.0, (step + 1) / cfg.warmup)
    if cfg.burst and step >= cfg.burst and cfg.settle_lr is not None:
        factor *= cfg.settle_lr / cfg.lr
    return factor


def kl_from(reference, model, ids, mask, where=None, cast=nullcontext) -> torch.Tensor:
    """KL(reference ‖ model) of the next-token distributions, averaged over `where` (default:
    every real token); each forward in its own `cast()` block."""
    with torch.no_grad(), cast():
        target = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with cast():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    keep = mask if where is None else where.long()
    return token_kl(got, target, keep, int(keep.sum()))


def harden(
    student, tokenizer, layer: int, neurons: Sequence[Neuron], texts: dict[str, list[str]],
    cfg: HardenConfig, progress: bool = True,
) -> Hardened:  # fmt: skip
    """`student` (a distilled model, patch at `layer`) with the first `cfg.neurons` of `neurons`
    (ranked by `specific_neurons`, all above `layer`) zeroed and the MLP weights of the layers above
    `layer` repaired towards the student as it was, on `texts` ("pii", "benign"), in place."""
    chosen = [tuple(n) for n in neurons[: cfg.neurons]]
    low = [n for n in chosen if n[0] <= layer]
    if low:
        raise ValueError(
            f"hardening zeroes neurons above the patch's layer {layer} only; got layer {low[0][0]}"
        )
    return _edited_and_repaired(
        student, tokenizer, layer, lambda m: zero_neurons(m, chosen) or [], texts, cfg, progress,
        chosen,
    )  # fmt: skip


def revert(
    student, tokenizer, layer: int, reference, texts: dict[str, list[str]], cfg: HardenConfig,
    progress: bool = True, keys: Optional[dict] = None,
) -> Hardened:  # fmt: skip
    """`student` (a distilled model, patch at `layer`) with the MLPs of the layers above `layer`
    set to `reference`'s (the model before the fine-tune: none of what it memorised is there) or,
    given `keys` (`mlp_keys.key_bases` of the leaky base), with their change from it undone along
    those key directions only; then repaired towards the student as it was on `texts`, in place.

    Why the whole MLPs or their keys: on the demo, what a fine-tune on other people's PII brings
    back is spread over everything the leaky fine-tune changed in them; a quarter of their neurons
    or half of every weight's change taken back left as much to bring back (README, "Back towards
    the model before the fine-tune")."""
    first = layer + 1

    def edit(model):
        if keys is None:
            return revert_mlps(model, reference, first)
        same_mlps(model, reference, first)
        return undo_along(model, reference, sorted({i for i, _ in keys}), keys)

    return _edited_and_repaired(student, tokenizer, layer, edit, texts, cfg, progress, [])


def _edited_and_repaired(
    student, tokenizer, layer: int, edit, texts: dict, cfg: HardenConfig, progress: bool,
    neurons: list,
) -> Hardened:  # fmt: skip
    """`edit(student)` (returning the names of any tensor it set beyond the MLP weights), then the
    MLP weights of the layers above `layer` repaired towards the student as it was, in place."""
    started = time.perf_counter()
    teacher = copy.deepcopy(student).eval()
    edited = edit(student)
    weights = mlp_weights(student, layer + 1)
    curve = repair(
        student, teacher, tokenizer, texts["pii"], texts["benign"], list(weights.values()), cfg,
        progress, cast=autocast_for(cfg, student),
    )  # fmt: skip
    del teacher
    changed = sorted(set(weights) | set(edited))
    return Hardened(student, neurons, changed, curve, time.perf_counter() - started)
