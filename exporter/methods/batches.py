"""Token batches of forget / retain text for the training methods (pads masked, seeded order)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..lm import WIDTH_STEP, padded_width, padding_side


def encode(
    tokenizer, texts: Sequence, max_length: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of `texts` (Documents or strings), BOS included, on
    `device` (the model's)."""
    plain = [getattr(t, "text", t) for t in texts]
    with padding_side(tokenizer, "right"):
        enc = tokenizer(
            plain, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def cycle(
    ids: torch.Tensor, mask: torch.Tensor, batch_size: int, seed: int, width_step: int = WIDTH_STEP
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches over the rows, reshuffled every pass with a seeded generator, each cut to
    its longest text rounded up to a multiple of `width_step` (right padding, masked)."""
    if len(ids) == 0:
        raise ValueError(
            "no text to train on: the method needs PII documents (forget) and benign text (retain)"
        )
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ids), generator=gen)
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            m = mask[rows]
            width = padded_width(int(m.sum(1).max()), ids.shape[1], width_step)
            yield ids[rows, :width], m[:, :width]


def token_log_probs(
    model, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(x_t | x_<t) (batch, T-1) and the mask of real (non-pad) target tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp, mask[:, 1:].bool()
