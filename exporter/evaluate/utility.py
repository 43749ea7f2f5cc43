"""Utility: perplexity and next-token KL on benign held-out prose, and a collapse check on generations."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..lm import next_token_nll, padding_side, right_padded, target_mask

Context = Callable[[], ContextManager]


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 16,
               max_tokens: int | None = None, context: Optional[Context] = None) -> float:
    """Token-weighted perplexity; position 0 of each text is context only. `context` wraps each forward
    (e.g. a patch attached in-process)."""
    total_nll, total_tokens = 0.0, 0
    for enc in right_padded(tokenizer, texts, max_length=max_length, batch_size=batch_size, device=_device(model)):
        with (context or nullcontext)():
            logits = model(**enc).logits
        nll, n = next_token_nll(logits, enc)
        total_nll += nll
        total_tokens += n
        if max_tokens and total_tokens >= max_tokens:
            break
    return math.exp(total_nll / max(total_tokens, 1))


@torch.no_grad()
def mean_kl(base, other, tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 16,
            base_context: Optional[Context] = None, other_context: Optional[Context] = None) -> float:
    """Mean next-token KL(base || other) in nats per token over real target positions.

    `base` and `other` may be the same model with a different `*_context` (a patch attached in-process)."""
    total, count = 0.0, 0
    for enc in right_padded(tokenizer, texts, max_length=max_length, batch_size=batch_size, device=_device(base)):
        with (base_context or nullcontext)():
            p = torch.log_softmax(base(**enc).logits[:, :-1].float(), -1)
        with (other_context or nullcontext)():
            q = torch.log_softmax(other(**enc.to(_device(other))).logits[:, :-1].float(), -1).to(p.device)
        kl = (p.exp() * (p - q)).sum(-1)
        mask = target_mask(enc)
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)


def diversity(token_lists: Sequence[Sequence[int]]) -> dict:
    """distinct-2 (unique bigrams / bigrams over all generations) and repetition (share of 4-grams that
    already occurred earlier in the same generation): a collapsed model loops and scores low / high."""
    bigrams, seen_bigrams, grams, repeats = 0, set(), 0, 0
    for toks in token_lists:
        toks = list(toks)
        pairs = list(zip(toks, toks[1:]))
        bigrams += len(pairs)
        seen_bigrams.update(pairs)
        earlier = set()
        for i in range(len(toks) - 3):
            g = tuple(toks[i : i + 4])
            grams += 1
            repeats += g in earlier
            earlier.add(g)
    return {"distinct_2": len(seen_bigrams) / max(bigrams, 1), "repetition_4": repeats / max(grams, 1)}


@torch.no_grad()
def generation_diversity(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 16,
                         context: Optional[Context] = None) -> dict:
    """Greedy continuations of benign prompts scored by `diversity`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with padding_side(tokenizer, "left"):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(_device(model))
            with (context or nullcontext)():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                out.append([t for t in row if t != pad])
    return diversity(out)
