"""Memorisation metrics of the unlearning literature, on the PII documents themselves.

- MA (memorisation accuracy; Tirumala et al., used by Jang et al. 2022): the share of positions
  whose greedy next-token prediction is the document's own next token.
- EL_n (extraction likelihood; Jang et al.): from each prefix `x_<t` the model decodes greedily;
  the score is the share of the continuation's n-grams that occur in the true suffix `x_>=t`,
  averaged over positions. To bound its cost, positions are taken every `stride` tokens and
  continuations are cut at `horizon` tokens (the suffix compared is cut alike).
- S-MA / S-EL_n (their span-restricted forms, SeUL, Wang et al. 2024): the same restricted to the
  tokens of the PII spans; S-EL decodes from every position inside a span and compares with the
  rest of that span (n-grams of min(n, its length)).

Documents are grouped by the people whose address they hold, so the metrics read per people split.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..data.labels import token_labels
from ..lm import logits_rows, padding_side
from .prefix import document_values


def _ngrams(ids: Sequence[int], n: int) -> list[tuple]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def overlap(generated: Sequence[int], truth: Sequence[int], n: int) -> float:
    """Share of the generated n-grams that occur among the true n-grams (Jang et al.'s
    OVERLAP_n)."""
    n = max(1, min(n, len(truth), len(generated)))
    got, want = _ngrams(list(generated), n), set(_ngrams(list(truth), n))
    return sum(g in want for g in got) / len(got) if got else 0.0


@torch.no_grad()
def _greedy_ids(
    model, tokenizer, prefixes: list[list[int]], lengths: list[int], batch_size: int
) -> list[list[int]]:
    """Greedy continuation of each token-id prefix (left-padded batches), `lengths[i]` new tokens
    each."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prefixes]
    order = sorted(range(len(prefixes)), key=lambda i: (lengths[i], len(prefixes[i])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(prefixes[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prefixes[i]) :] = torch.tensor(prefixes[i])
            mask[row, width - len(prefixes[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(lengths[i] for i in idx),
            min_new_tokens=max(lengths[i] for i in idx),
            do_sample=False,
            pad_token_id=pad,
        )
        for row, i in enumerate(idx):
            out[i] = gen[row, width : width + lengths[i]].tolist()
    return out


def memorisation_metrics(
    model,
    tokenizer,
    docs: Sequence,
    *,
    n: int = 3,
    stride: int = 4,
    horizon: int = 16,
    max_length: int = 128,
    batch_size: int = 32,
) -> dict:
    """MA, EL_n, S-MA and S-EL_n of `model` on PII documents (each a `Document` with spans)."""
    if not docs:
        return {}
    labels = [token_labels(tokenizer, d.text, d.spans, max_length=max_length) for d in docs]
    device = next(model.parameters()).device
    ma, sma = [], []
    rows = logits_rows(tokenizer, max_length, batch_size)
    with padding_side(tokenizer, "right"), torch.no_grad():
        for s in range(0, len(labels), rows):
            chunk = labels[s : s + rows]
            width = max(len(lab.input_ids) for lab in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, lab in enumerate(chunk):
                ids[row, : len(lab.input_ids)], mask[row, : len(lab.input_ids)] = lab.input_ids, 1
            pred = (
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                .logits.argmax(-1)
                .cpu()
            )
            for row, lab in enumerate(chunk):
                hit = (pred[row, : len(lab.input_ids) - 1] == lab.input_ids[1:]).float()
                ma.append(float(hit.mean()) if len(hit) else 0.0)
                span = lab.pii[1:]
                if span.any():
                    sma.append(float(hit[span].mean()))
    # EL: prefixes every `stride` tokens; S-EL: every position inside a span, compared with the
    # span's rest.
    el_jobs, sel_jobs = [], []
    for d, lab in enumerate(labels):
        ids = lab.input_ids.tolist()
        for t in range(1, len(ids) - n + 1, stride):
            el_jobs.append((d, ids[:t], ids[t : t + horizon]))
        pii = lab.pii.tolist()
        t = 1
        while t < len(ids):
            if pii[t]:
                end = t
                while end < len(ids) and pii[end]:
                    end += 1
                for u in range(t, end):
                    sel_jobs.append((d, ids[:u], ids[u : min(end, u + horizon)]))
                t = end
            t += 1
    jobs = el_jobs + sel_jobs
    gens = (
        _greedy_ids(model, tokenizer, [j[1] for j in jobs], [len(j[2]) for j in jobs], batch_size)
        if jobs
        else []
    )
    el = _per_doc([(j[0], overlap(g, j[2], n)) for j, g in zip(el_jobs, gens[: len(el_jobs)])])
    sel = _per_doc([(j[0], overlap(g, j[2], n)) for j, g in zip(sel_jobs, gens[len(el_jobs) :])])
    return {
        "documents": len(docs),
        "ma": _mean(ma),
        f"el_{n}": _mean(el),
        "s_ma": _mean(sma),
        f"s_el_{n}": _mean(sel),
    }


def _per_doc(scores: list[tuple[int, float]]) -> list[float]:
    by: dict[int, list[float]] = {}
    for d, v in scores:
        by.setdefault(d, []).append(v)
    return [sum(v) / len(v) for v in by.values()]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def documents_of(docs: Sequence, values: set[str], limit: Optional[int] = None) -> list:
    """The documents holding one of `values` (normalised, see `prefix.normalise`; at most `limit`,
    in corpus order)."""
    found = [d for d in docs if document_values(d) & values]
    return found[:limit] if limit is not None else found
