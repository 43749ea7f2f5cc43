"""Token-level PII labels from character spans, through the tokenizer's offsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .detectors import PII_TYPES, Span


@dataclass
class TokenLabels:
    """Per-token masks for one text (all 1-D, aligned with `input_ids`).

    pii:        the token overlaps a PII span.
    span_start: the token where a PII span starts (the paper's "from the token where the PII starts"
                counts this token and the rest of the span: that is `pii`).
    pre_span:   the token just before a span starts, where the span's first token is predicted.
    type_id:    index into PII_TYPES for PII tokens, -1 elsewhere.
    """

    input_ids: torch.Tensor
    pii: torch.Tensor
    span_start: torch.Tensor
    pre_span: torch.Tensor
    type_id: torch.Tensor


def token_labels(
    tokenizer, text: str, spans: Sequence[Span], max_length: int | None = None
) -> TokenLabels:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "token labels need a fast tokenizer (with offset mapping); load one with use_fast=True"
        )
    enc = tokenizer(
        text,
        return_offsets_mapping=True,
        add_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    n = len(ids)
    pii = torch.zeros(n, dtype=torch.bool)
    start = torch.zeros(n, dtype=torch.bool)
    pre = torch.zeros(n, dtype=torch.bool)
    type_id = torch.full((n,), -1, dtype=torch.long)
    offsets = enc["offset_mapping"]
    for span in spans:
        if not 0 <= span.start < span.end <= len(text):
            raise ValueError(
                f"span {span.start}..{span.end} is outside the text (length {len(text)})"
            )
        first = None
        for i, (a, b) in enumerate(offsets):
            if b <= a:  # special tokens have empty offsets
                continue
            if a < span.end and b > span.start:
                pii[i] = True
                type_id[i] = PII_TYPES.index(span.type)
                if first is None:
                    first = i
        if first is not None:
            start[first] = True
            if first > 0:
                pre[first - 1] = True
    pre &= ~pii  # a token inside an earlier span is PII, not context
    return TokenLabels(ids, pii, start, pre, type_id)
