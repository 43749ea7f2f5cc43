"""Utility: perplexity and next-token KL on benign held-out prose, and a collapse check on
generations."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional, Sequence

import torch

from ..lm import logits_rows, next_token_nll, padding_side, right_padded, target_mask

Context = Callable[[], ContextManager]


def _device(model):
    return next(model.parameters()).device


def _batches(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    rows = logits_rows(tokenizer, max_length, batch_size)
    return right_padded(
        tokenizer, texts, max_length=max_length, batch_size=rows, device=_device(model)
    )


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
    context: Optional[Context] = None,
) -> float:
    """Token-weighted perplexity; position 0 of each text is context only. `context` wraps each
    forward (e.g. a patch attached in-process)."""
    total_nll, total_tokens = 0.0, 0
    for enc in _batches(model, tokenizer, texts, max_length, batch_size):
        with (context or nullcontext)():
            logits = model(**enc).logits
        nll, n = next_token_nll(logits, enc)
        total_nll += nll
        total_tokens += n
        if max_tokens and total_tokens >= max_tokens:
            break
    return math.exp(total_nll / max(total_tokens, 1))


def _log_probs(model, enc, context: Optional[Context] = None) -> torch.Tensor:
    with (context or nullcontext)():
        return torch.log_softmax(model(**enc.to(_device(model))).logits[:, :-1].float(), -1)


def _kl_sum(p: torch.Tensor, q: torch.Tensor, enc) -> tuple[float, int]:
    """(summed KL(p || q), number of targets) over a batch's real next-token positions (log-probs
    in)."""
    mask = target_mask(enc).to(p.device)
    kl = (p.exp() * (p - q.to(p.device))).sum(-1)
    return float(kl[mask].sum()), int(mask.sum())


@torch.no_grad()
def mean_kl(
    base,
    other,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    base_context: Optional[Context] = None,
    other_context: Optional[Context] = None,
) -> float:
    """Mean next-token KL(base || other) in nats per token over real target positions.

    `base` and `other` may be the same model with a different `*_context` (a patch attached
    in-process)."""
    total, count = 0.0, 0
    for enc in _batches(base, tokenizer, texts, max_length, batch_size):
        kl, n = _kl_sum(
            _log_probs(base, enc, base_context), _log_probs(other, enc, other_context), enc
        )
        total, count = total + kl, count + n
    return total / max(count, 1)


# The base's log-probs are kept when they fit (each variant's KL and perplexity then take one pass);
# past this they are recomputed beside each variant's, one batch at a time (Gemma's 262k-token head:
# 24 texts of 128 tokens hold 3.2 GB of float32 log-probs).
REFERENCE_BYTES = 2 << 30


@dataclass
class Reference:
    """The base model's next-token log-probs on a few fixed texts, computed once so that many
    variants (the candidates of a search) each cost one forward pass for both KL and perplexity."""

    # [(encoding, log-probs [B, T-1, V] float32)]: a list, or `_Recomputed` batch by batch
    batches: Iterable


class _Recomputed:
    """The base's log-probs recomputed batch by batch on every pass over them: a reference too
    large to keep costs each variant one more forward pass instead of its memory."""

    def __init__(self, base, tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
        self.base, self.tokenizer, self.texts = base, tokenizer, list(texts)
        self.max_length, self.batch_size = max_length, batch_size

    def __iter__(self):
        for enc in _batches(
            self.base, self.tokenizer, self.texts, self.max_length, self.batch_size
        ):
            with torch.no_grad():  # not held across the yield: the reader's grad mode is its own
                p = _log_probs(self.base, enc)
            yield enc, p


@torch.no_grad()
def reference(
    base,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    max_bytes: Optional[int] = None,
) -> Reference:
    """The base's log-probs on `texts`: kept, or (when they would take more than `max_bytes` of
    memory: a large vocabulary) recomputed batch by batch each time they are read."""
    if max_bytes is not None:
        tokens = sum(min(len(ids), max_length) for ids in tokenizer(list(texts))["input_ids"])
        if tokens * len(tokenizer) * 4 > max_bytes:
            return Reference(_Recomputed(base, tokenizer, texts, max_length, batch_size))
    return Reference(
        [
            (enc, _log_probs(base, enc))
            for enc in _batches(base, tokenizer, texts, max_length, batch_size)
        ]
    )


@torch.no_grad()
def against_reference(ref: Reference, other=None, context: Optional[Context] = None) -> dict:
    """{"kl": mean KL(base || other), "perplexity": of other} on the reference's texts; `other`
    None: the base itself, read from the reference with no forward pass."""
    kl_total, nll_total, count = 0.0, 0.0, 0
    for enc, p in ref.batches:
        q = p if other is None else _log_probs(other, enc, context)
        mask = target_mask(enc).to(q.device)
        kl, n = (0.0, int(mask.sum())) if other is None else _kl_sum(p, q, enc)
        nll = -q.gather(-1, enc["input_ids"][:, 1:].to(q.device).unsqueeze(-1)).squeeze(-1)
        kl_total, nll_total, count = kl_total + kl, nll_total + float(nll[mask].sum()), count + n
    return {"kl": kl_total / max(count, 1), "perplexity": math.exp(nll_total / max(count, 1))}


def diversity(token_lists: Sequence[Sequence[int]]) -> dict:
    """distinct-2 (unique bigrams / bigrams over all generations) and repetition (share of 4-grams
    that already occurred earlier in the same generation): a collapsed model loops and scores low /
    high."""
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
    return {
        "distinct_2": len(seen_bigrams) / max(bigrams, 1),
        "repetition_4": repeats / max(grams, 1),
    }


@torch.no_grad()
def generation_diversity(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    context: Optional[Context] = None,
) -> dict:
    """Greedy continuations of benign prompts scored by `diversity`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with padding_side(tokenizer, "left"):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[i : i + batch_size]), return_tensors="pt", padding=True
            ).to(_device(model))
            with (context or nullcontext)():
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
                )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                out.append([t for t in row if t != pad])
    return diversity(out)
