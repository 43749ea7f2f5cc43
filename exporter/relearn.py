"""The relearning attack: whoever has the weights fine-tunes them a little, on text with no PII of
the people removed (benign prose, or other people's PII documents), and attacks again (cf. "An
adversarial perspective on machine unlearning for AI safety", Lucki et al. 2024). Every model gets
the same fixed budget: LoRA adapters on every linear map of the decoder, next-token loss, merged.

A remote-code export is attacked as it loads: its patch stays inserted while its base is tuned
under it, and after."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data.corpus import benign_texts
from .data.synthetic import SyntheticConfig, make_corpus
from .distill import adapted_modules, with_adapters
from .lm import WIDTH_STEP
from .methods.batches import cycle, encode, token_log_probs
from .models import architecture_of, unfrozen
from .patch import applied
from .precision import device_of, fast_bfloat16

KINDS = {
    "benign": "benign prose",
    "other_people": "other people's PII documents",
}


@dataclass(frozen=True)
class Budget:
    """What the attacker spends: the same for every model attacked."""

    steps: int = 100
    lr: float = 3e-4
    rank: int = 8
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0


def relearning_texts(kind: str, benign_path: Optional[str], n: int, seed: int) -> list[str]:
    """`n` texts of one kind: benign training prose, or the documents of people no model here has
    seen (fresh synthetic people: PII the model was never asked to forget)."""
    if kind == "benign":
        texts = benign_texts(benign_path, split="train")
    elif kind == "other_people":
        docs, _ = make_corpus(
            SyntheticConfig(n_memorised=max(n // 3, 2), n_never_seen=0, texts_per_person=3,
                            seed=seed + 7919)
        )  # fmt: skip
        texts = [d.text for d in docs]
    else:
        raise ValueError(f"unknown relearning text {kind!r}; one of {', '.join(KINDS)}")
    return (texts * (n // max(len(texts), 1) + 1))[:n]


def relearned(
    model,
    tokenizer,
    texts: Sequence[str],
    budget: Budget = Budget(),
    *,
    layer: Optional[int] = None,
    patch=None,
    progress: bool = True,
    width_step: int = WIDTH_STEP,
):
    """A copy of `model` fine-tuned on `texts` within `budget` (bfloat16 autocast, float32
    adapters), merged; with `patch`, tuned with the patch inserted at `layer` (returned without it:
    attach it again to attack). Batches are `width_step`-rounded wide (1: each its longest text)."""
    student = copy.deepcopy(model)
    # every linear map of the decoder (not the embeddings or the LM head)
    every_layer = adapted_modules(student, architecture_of(student).num_layers(student) - 1)
    net = with_adapters(student, every_layer, budget.rank, budget.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.0)
    device = device_of(student)
    batches = cycle(
        *encode(tokenizer, texts, budget.max_length, device),
        budget.batch_size,
        budget.seed,
        width_step,
    )
    cast = (
        partial(torch.autocast, device, dtype=torch.bfloat16)
        if fast_bfloat16(device)
        else nullcontext
    )
    net.train()
    with applied(student, layer, patch) if patch is not None else nullcontext():
        next_token_steps(student, batches, budget.steps, opt, cast, progress)
    return unfrozen(net.merge_and_unload()).eval()


def next_token_steps(model, batches, steps: int, opt, cast, progress: bool = False) -> float:
    """`steps` optimiser steps of next-token loss on `batches` (an endless iterator of (ids,
    mask)), each forward in its own `cast()` block; the last step's loss."""
    for _ in tqdm(range(steps), desc="relearn", disable=not progress):
        ids, mask = next(batches)
        with cast():
            lp, keep = token_log_probs(model, ids, mask)
        loss = -(lp * keep).sum() / keep.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()
