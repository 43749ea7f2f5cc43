"""Utility: perplexity on benign held-out prose."""

from __future__ import annotations

import math
from typing import Sequence

import torch


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 16,
               max_tokens: int | None = None) -> float:
    """Token-weighted perplexity; position 0 of each text is context only."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
        logits = model(**enc).logits[:, :-1].float()
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total_nll += nll[mask].sum().item()
        total_tokens += int(mask.sum())
        if max_tokens and total_tokens >= max_tokens:
            break
    return math.exp(total_nll / max(total_tokens, 1))
