"""Next-token scoring over right-padded batches of text, shared by the SAE's spliced CE and the
utility metrics."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

# The float32 logits one forward may hold (log-softmax, exp and a KL product each hold as much
# again): Gemma's 262k-token head at 16 texts of 128 tokens made 2 GiB per copy and a 13 GiB peak
# in the search; SmolLM2's 49k-token head keeps its 16 texts (25 MiB each).
LOGITS_BYTES = 512 << 20


# Training batches come in widths that are multiples of this. Over a run the CPU allocator and
# oneDNN keep buffers for every shape a step has seen: with each batch at its own width, SmolLM2's
# distillation grew by about 20 MB a step (1.05 GiB before the first step, 2.48 GiB after 300);
# with four widths it stays at 1.1 GiB, for a few padded tokens that weigh 0 in the loss.
WIDTH_STEP = 32


def padded_width(longest: int, cap: int, step: int = WIDTH_STEP) -> int:
    """A batch's width: its longest text rounded up to a multiple of `step`, at most `cap` (never
    less than the text)."""
    return max(longest, min(-(-longest // step) * step, cap))


def logits_rows(tokenizer, max_length: int, batch_size: int) -> int:
    """At most `batch_size` texts per forward, fewer where a vocabulary is so large that their
    logits would pass LOGITS_BYTES."""
    return max(1, min(batch_size, LOGITS_BYTES // (max_length * len(tokenizer) * 4)))


@contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    """Pad on `side` inside the block (left for generation, right for scoring), restored after."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def right_padded(
    tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int, device=None
) -> Iterator[dict]:
    """Tokenised batches, right-padded whatever the tokenizer's own default (position t predicts
    t+1)."""
    with padding_side(tokenizer, "right"):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            yield enc.to(device) if device is not None else enc


def target_mask(enc) -> torch.Tensor:
    """[B, T-1] bool: next-token targets that are real tokens (position 0 is context only)."""
    return enc["attention_mask"][:, 1:].bool()


def next_token_nll(logits: torch.Tensor, enc) -> tuple[float, int]:
    """(summed NLL, number of targets) of a batch's next-token predictions."""
    mask = target_mask(enc)
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), enc["input_ids"][:, 1:], reduction="none"
    )
    return float(ce[mask].sum()), int(mask.sum())
