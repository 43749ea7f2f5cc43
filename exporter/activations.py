"""Harvest residual-stream activations (decoder layer outputs) with their PII labels.

Only layers 0..max(layers) run: the forward is stopped right after the deepest requested layer,
so neither the later layers nor the LM head are computed. Position 0 (BOS, or the first token,
whose residual carries huge outliers) and pad tokens are never kept.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data.corpus import Document
from .data.labels import token_labels
from .models import architecture_of, hidden_of

LABEL_KEYS = ("pii", "span_start", "pre_span", "type_id", "doc")


class _StopForward(Exception):
    pass


def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions whose activations are used: real tokens, never position 0 (BOS / attention
    sink)."""
    keep = mask.bool().clone()
    keep[:, 0] = False
    return keep


@dataclass
class Activations:
    """Activations per layer ([N, d] each) and per-token labels ([N] each), row-aligned."""

    acts: dict[int, torch.Tensor]
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.labels["pii"])


def _encode_docs(tokenizer, docs: Sequence[Document | str], max_length: int):
    out = []
    for i, doc in enumerate(docs):
        doc = doc if isinstance(doc, Document) else Document(doc, [])
        out.append((i, token_labels(tokenizer, doc.text, doc.spans, max_length=max_length)))
    return out


def token_batches(tokenizer, docs: Sequence[Document | str], *, max_length: int, batch_tokens: int):
    """Right-padded batches of length-sorted documents, each at most `batch_tokens` (padded) tokens.

    Yields (input_ids, attention_mask, labels) with labels a dict of [B, T] tensors (pad rows:
    -1/False; `doc` indexes `docs`, `pos` is the token's position in its document).
    """
    encoded = sorted(_encode_docs(tokenizer, docs, max_length), key=lambda e: len(e[1].input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = 0
    while start < len(encoded):
        end = start + 1
        while (
            end < len(encoded)
            and (end - start + 1) * len(encoded[end][1].input_ids) <= batch_tokens
        ):
            end += 1
        chunk = encoded[start:end]
        width = len(chunk[-1][1].input_ids)
        b = len(chunk)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        labels = {
            k: torch.zeros((b, width), dtype=torch.bool) for k in ("pii", "span_start", "pre_span")
        }
        labels["type_id"] = torch.full((b, width), -1, dtype=torch.long)
        labels["doc"] = torch.full((b, width), -1, dtype=torch.long)
        labels["pos"] = torch.arange(width).expand(b, width).clone()
        for row, (doc_index, lab) in enumerate(chunk):
            n = len(lab.input_ids)
            ids[row, :n] = lab.input_ids
            mask[row, :n] = 1
            labels["pii"][row, :n] = lab.pii
            labels["span_start"][row, :n] = lab.span_start
            labels["pre_span"][row, :n] = lab.pre_span
            labels["type_id"][row, :n] = lab.type_id
            labels["doc"][row, :n] = doc_index
        yield ids, mask, labels
        start = end


def layer_outputs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    *,
    grad: bool = False,
    **forward_kwargs,
) -> dict[int, torch.Tensor]:
    """Outputs of the given decoder layers, running the model only up to the deepest of them (with
    autograd when `grad`, for methods that train through them; `forward_kwargs` such as position_ids
    go to the model)."""
    decoder_layers = architecture_of(model).decoder_layers(model)
    deepest = max(layers)
    if min(layers) < 0 or deepest >= len(decoder_layers):
        raise IndexError(
            f"layers {sorted(layers)} out of range: this model has decoder layers "
            f"0..{len(decoder_layers) - 1}"
        )
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(_module, _args, output):
            captured[index] = hidden_of(output)
            if index == deepest:
                raise _StopForward

        return hook

    handles = [decoder_layers[li].register_forward_hook(make_hook(li)) for li in set(layers)]
    try:
        with torch.set_grad_enabled(grad):
            model(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                use_cache=False,
                **forward_kwargs,
            )
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@contextmanager
def from_layer(model, first: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's forward starts at decoder layer `first` on `hidden` (that
    layer's input: layer first-1's output on the same ids, computed before): the layers before it
    hand their input on without computing anything, and layer `first`'s input is replaced. The
    rest of the forward (masks, positions, `layer_outputs`' stop) is the model's own.

    For training that changes only layers `first`.. on fixed text: their inputs never change, so
    the frozen layers need not run at every step."""
    layers = architecture_of(model).decoder_layers(model)
    # the layer's own device: with device_map="auto" the layers spread over several
    weight = next(layers[first].parameters())
    hidden = hidden.to(device=weight.device, dtype=next(model.parameters()).dtype)

    def hand_on(*args, **kwargs):
        # whatever it hands on is replaced at layer `first` (a model that takes a tuple's first
        # element from it hands on a slice, equally unread)
        return args[0] if args else kwargs["hidden_states"]

    def replace(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # an instance attribute over the class's forward; one already there (accelerate's dispatch
    # hooks put theirs there) is put back afterwards
    kept = [vars(layer).get("forward") for layer in layers[:first]]
    for layer in layers[:first]:
        layer.forward = hand_on
    handle = layers[first].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer, forward in zip(layers[:first], kept):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def harvest(
    model,
    tokenizer,
    docs: Sequence[Document | str],
    layers: Sequence[int],
    *,
    max_length: int = 128,
    batch_tokens: int = 4096,
    max_tokens: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    shard_dir: Optional[Path] = None,
    memory_budget_mb: float = 2048,
    progress: bool = True,
    shard_prefix: str = "",
) -> Activations:
    """Residual activations of `layers` on `docs`, with labels; positions 0 and pad are skipped.

    Past `memory_budget_mb` of activations held in memory, full chunks are spilled to safetensors
    shards in `shard_dir` (and the returned object is read back from them).
    """
    layers = sorted(set(layers))
    acts: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    labels: dict[str, list[torch.Tensor]] = {k: [] for k in LABEL_KEYS}
    held_bytes, kept, shards = 0, 0, []
    budget = memory_budget_mb * 2**20
    bar = tqdm(
        total=max_tokens,
        desc=f"harvest layers {layers[0]}..{layers[-1]}",
        unit="tok",
        disable=not progress,
    )
    for ids, mask, lab in token_batches(
        tokenizer, docs, max_length=max_length, batch_tokens=batch_tokens
    ):
        outs = layer_outputs(model, ids, mask, layers)
        keep = kept_positions(mask)
        n = int(keep.sum())
        for li in layers:
            acts[li].append(outs[li][keep.to(outs[li].device)].to("cpu", dtype))
        for k in LABEL_KEYS:
            labels[k].append(lab[k][keep])
        kept += n
        held_bytes += n * sum(a[-1].shape[-1] for a in acts.values()) * torch.finfo(dtype).bits // 8
        bar.update(n)
        if shard_dir is not None and held_bytes > budget:
            shards.append(_spill(shard_dir, f"{shard_prefix}shard-{len(shards):05d}", acts, labels))
            held_bytes = 0
        if max_tokens is not None and kept >= max_tokens:
            break
    bar.close()
    if shard_dir is not None:
        if acts[layers[0]]:
            shards.append(_spill(shard_dir, f"{shard_prefix}shard-{len(shards):05d}", acts, labels))
        return load_shards(shards)
    return Activations(
        {li: torch.cat(a) for li, a in acts.items()}, {k: torch.cat(v) for k, v in labels.items()}
    )


def _spill(shard_dir: Path, name: str, acts: dict, labels: dict) -> Path:
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{li}": torch.cat(a) for li, a in acts.items()}
    tensors.update({f"label.{k}": torch.cat(v) for k, v in labels.items()})
    path = shard_dir / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)
    for lst in list(acts.values()) + list(labels.values()):
        lst.clear()
    return path


def load_shards(paths: Sequence[Path]) -> Activations:
    parts = [load_file(str(p)) for p in paths]
    layers = sorted(int(k.split(".", 1)[1]) for k in parts[0] if k.startswith("layer."))
    return Activations(
        {li: torch.cat([p[f"layer.{li}"] for p in parts]) for li in layers},
        {k: torch.cat([p[f"label.{k}"] for p in parts]) for k in LABEL_KEYS},
    )


def shuffled_batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled minibatches of the rows of x (a new permutation each pass)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[perm[i : i + batch_size]]


def stream_activations(
    model,
    tokenizer,
    docs: Sequence[Document | str],
    layer: int,
    *,
    batch_size: int,
    buffer_tokens: int = 65536,
    max_length: int = 128,
    batch_tokens: int = 4096,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Endless minibatches of layer activations computed online through a shuffle buffer, so a large
    model's activations never need to fit on disk. Documents are re-read (reshuffled) each pass."""
    rng = random.Random(seed)
    buffer: list[torch.Tensor] = []
    held = 0
    order = list(range(len(docs)))
    while True:
        rng.shuffle(order)
        for ids, mask, _ in token_batches(
            tokenizer, [docs[i] for i in order], max_length=max_length, batch_tokens=batch_tokens
        ):
            out = layer_outputs(model, ids, mask, [layer])[layer]
            keep = kept_positions(mask)
            buffer.append(out[keep.to(out.device)].float().cpu())
            held += int(keep.sum())
            if held >= buffer_tokens:
                pool = torch.cat(buffer)
                pool = pool[
                    torch.randperm(
                        len(pool), generator=torch.Generator().manual_seed(rng.randrange(2**31))
                    )
                ]
                half = len(pool) // 2
                for i in range(0, half - batch_size + 1, batch_size):
                    yield pool[i : i + batch_size]
                buffer, held = [pool[half:]], len(pool) - half
