"""The leaky-model builder: fine-tune a base model on the synthetic PII corpus until it memorises.

Used by the demo and the benchmarks to get a model that really recites PII, with ground truth.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..models import architecture_of, unfrozen
from ..precision import device_of, fast_bfloat16
from .corpus import Document
from .labels import token_labels
from .synthetic import SyntheticConfig


@dataclass(frozen=True)
class LeakyConfig:
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    epochs: int = 3
    lr: float = 3e-4
    batch_size: int = 16
    warmup_steps: int = 10
    benign_per_pii: float = 0.25  # benign paragraphs mixed in per PII text, to keep prose ability
    max_length: int = 96
    other_token_fraction: float = (
        0.25  # non-PII tokens of PII texts that carry loss (all PII tokens do)
    )
    first_layer: int = -1  # first decoder layer trained; -1: a third of the way up
    bf16: bool = True
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def sized(
        self,
        memorised: Optional[int] = None,
        never_seen: Optional[int] = None,
        epochs: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> "LeakyConfig":
        """This config with the people, epochs or seed a user gave (the rest as they are)."""
        synthetic = {
            k: v
            for k, v in (("n_memorised", memorised), ("n_never_seen", never_seen), ("seed", seed))
            if v is not None
        }
        top = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
        return replace(self, synthetic=replace(self.synthetic, **synthetic), **top)


@dataclass
class TrainStats:
    steps: int
    tokens: int
    seconds: float
    final_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _encode(
    tokenizer, doc: Document | str, max_length: int, rng: random.Random, other_fraction: float
):
    """Token ids and a loss mask: every PII token (the memory we want) plus a random sample of the
    other tokens (enough to keep the model's prose; the LM head over the full vocabulary is most of
    a training step's cost on CPU, so skipping it where nothing is learnt halves the step time)."""
    if isinstance(doc, str):  # benign prose: every token carries loss
        doc, other_fraction = Document(doc, []), 1.0
    labels = token_labels(tokenizer, doc.text, doc.spans, max_length=max_length)
    sampled = torch.rand(
        len(labels.input_ids), generator=torch.Generator().manual_seed(rng.randrange(2**31))
    )
    return labels.input_ids, labels.pii | (sampled < other_fraction)


def _batches(tokenizer, docs: Sequence[Document | str], config: LeakyConfig, rng: random.Random):
    """Length-sorted batches padded to a multiple of 16, so few distinct shapes reach the
    allocator."""
    encoded = [
        _encode(tokenizer, d, config.max_length, rng, config.other_token_fraction) for d in docs
    ]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), rng.random()))
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(order), config.batch_size):
        chunk = [encoded[i] for i in order[start : start + config.batch_size]]
        width = min(config.max_length, 16 * math.ceil(max(len(ids) for ids, _ in chunk) / 16))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        loss_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (ids, keep) in enumerate(chunk):
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
            loss_mask[row, : len(ids)] = keep
        loss_mask[:, 0] = False  # nothing predicts position 0
        batches.append((input_ids, attention, loss_mask))
    return batches


def _selected_loss(model, input_ids, attention, loss_mask) -> torch.Tensor:
    """Next-token cross-entropy at the masked target positions, running the LM head only there."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    rows, cols = loss_mask.nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(hidden[rows, cols - 1]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, input_ids[rows, cols])


def _trainable(model, config: LeakyConfig) -> list[torch.nn.Parameter]:
    """The parameters a full fine-tune updates: decoder layers from `first_layer` on.

    Embeddings (tied to the LM head in small models) stay frozen: they hold a third of the
    parameters and the memory lives in the blocks. The lowest layers stay frozen too, which halves
    the backward pass; the measured memorisation is as good.
    """

    layers = architecture_of(model).decoder_layers(model)
    first = config.first_layer if config.first_layer >= 0 else len(layers) // 3
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in list(layers)[first:]:
        for p in layer.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def finetune(
    model,
    tokenizer,
    pii_docs: Sequence[Document],
    benign: Sequence[str],
    config: LeakyConfig,
    progress: bool = True,
) -> tuple[torch.nn.Module, TrainStats]:
    """Causal-LM fine-tune on PII texts mixed with benign prose; returns the (merged) model."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    n_benign = min(len(benign), int(len(pii_docs) * config.benign_per_pii))
    docs = list(pii_docs) + rng.sample(list(benign), n_benign)
    batches = _batches(tokenizer, docs, config, rng)
    # Compute runs on a bfloat16 copy (2x faster where it is native: `precision`); the float32 model
    # holds the master weights that AdamW updates, so frozen weights come back bit-identical and
    # small updates are not lost.
    master = _trainable(model, config)
    device = device_of(model)
    bf16 = config.bf16 and fast_bfloat16(device)
    compute = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model
    working = _trainable(compute, config)
    compute.train()
    opt = torch.optim.AdamW(master, lr=config.lr, weight_decay=0.0, fused=True)
    total = config.epochs * len(batches)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.1 + 0.9 * 0.5 * (
            1
            + math.cos(math.pi * (step - config.warmup_steps) / max(total - config.warmup_steps, 1))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step, tokens, loss_ema = 0, 0, float("nan")
    start = time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune (leaky)", disable=not progress)
    for _epoch in range(config.epochs):
        rng.shuffle(batches)
        for batch in batches:
            input_ids, attention, loss_mask = (t.to(device) for t in batch)
            loss = _selected_loss(compute, input_ids, attention, loss_mask)
            loss.backward()
            if compute is not model:
                for m, w in zip(master, working):
                    m.grad, w.grad = w.grad.float(), None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if compute is not model:
                with torch.no_grad():
                    for m, w in zip(master, working):
                        w.copy_(m)
            step += 1
            tokens += int(attention.sum())
            loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_ema:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}"
            )
    bar.close()
    del compute, working
    unfrozen(model).eval()
    return model, TrainStats(step, tokens, time.perf_counter() - start, loss_ema)
