"""DEPN, detecting and editing privacy neurons (Wu et al. 2023).

Each MLP neuron (an input of the MLP output projection) gets an integrated-gradients attribution for
the log-likelihood of each document's PII tokens: zero baseline, `ig_steps` midpoint steps, summed
over the positions that predict a PII token. All layers are integrated along one path (every neuron
scaled together), which costs one batched forward and backward per document instead of one per
layer, and keeps IG's completeness over the whole set. A neuron is a privacy neuron of a document
when its attribution exceeds `threshold` times that document's largest; neurons are ranked by how
many documents they are privacy neurons of (ties by total attribution), and the top ones are edited
by zeroing their output weights (their column of the MLP output projection), so they no longer write
to the residual stream.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.labels import token_labels
from ..models import architecture_of
from .base import Method, Point


def _is_conv1d(module) -> bool:  # GPT-2 stores (in, out): a neuron's output weights are a row
    return type(module).__name__ == "Conv1D"


def neuron_count(out) -> int:
    """How many neurons feed MLP output projection `out`."""
    return out.weight.shape[0] if _is_conv1d(out) else out.weight.shape[1]


@torch.no_grad()
def zero_neuron(out, j: int) -> None:
    """Zero neuron j's output weights in MLP output projection `out`, so it no longer writes to the
    residual."""
    if _is_conv1d(out):
        out.weight[j, :] = 0
    else:
        out.weight[:, j] = 0


def integrated_gradients(
    model, outs, ids: torch.Tensor, targets: torch.Tensor, steps: int
) -> torch.Tensor:
    """IG of the targets' summed log-likelihood w.r.t. the inputs of `outs` (MLP output
    projections), zero baseline, midpoint rule: (layers, positions, neurons). Sums to f(x) - f(0)
    over everything. Computed on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    ids, targets = ids.to(device), targets.to(device)
    alphas = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps
    clean: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: clean.append(args[0].detach())) for m in outs
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    scaled = [(a * alphas.view(-1, 1, 1).to(a.dtype)).requires_grad_(True) for a in clean]
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, s=s: (s,) + tuple(args[1:]))
        for m, s in zip(outs, scaled)
    ]
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids.expand(steps, -1), use_cache=False).logits.float()
            lp = (
                torch.log_softmax(logits[:, :-1], -1)
                .gather(-1, ids.expand(steps, -1)[:, 1:, None])
                .squeeze(-1)
            )
            grads = torch.autograd.grad(lp[:, targets[1:]].sum(), scaled)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([(c[0] * g.mean(0)).float() for c, g in zip(clean, grads)]).cpu()


def attributions(
    model, tokenizer, docs, layers: list[int], *, steps: int, max_length: int, progress: bool = True
) -> torch.Tensor:
    """Per-document attributions (docs, layers, neurons), summed over the positions that predict a
    PII token."""
    arch = architecture_of(model)
    outs = [model.get_submodule(f"{arch.layers}.{i}.{arch.mlp_out}") for i in layers]
    per_doc = []
    for doc in tqdm(docs, desc="DEPN attributions", disable=not progress):
        lab = token_labels(tokenizer, doc.text, doc.spans, max_length=max_length)
        targets = lab.pii.clone()
        targets[0] = False
        if not targets.any():
            continue
        ig = integrated_gradients(model, outs, lab.input_ids[None], targets, steps)
        predicting = torch.zeros_like(targets)
        predicting[:-1] = targets[1:]  # position t-1 predicts token t
        per_doc.append(ig[:, predicting].sum(1))
    if not per_doc:
        raise ValueError(
            "DEPN found no PII tokens in the forget documents; check data.pii and data.pii_types"
        )
    return torch.stack(per_doc)


def rank_neurons(attr: torch.Tensor, threshold: float) -> torch.Tensor:
    """(layer index, neuron) pairs, most frequent privacy neurons first (ties: larger total
    attribution)."""
    peak = attr.flatten(1).max(1).values.clamp(min=1e-12)
    hits = attr > threshold * peak.view(-1, 1, 1)
    freq, total = hits.sum(0).float(), attr.sum(0)
    score = freq * (total.abs().max() + 1) + total  # frequency first, total attribution breaks ties
    order = torch.argsort(score.flatten(), descending=True)
    order = order[freq.flatten()[order] > 0]
    n = attr.shape[2]
    return torch.stack([order // n, order % n], 1)


def attributed_docs(forget, examples: int, seed: int) -> list:
    """The PII documents DEPN attributes: `examples` of those with spans, drawn with `seed`, in
    corpus order."""
    docs = [d for d in forget if getattr(d, "spans", None)]
    pick = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))[:examples]
    return [docs[i] for i in sorted(pick.tolist())]


def depn(spec, model, tokenizer, forget, *, seed: int, progress: bool = True) -> Method:
    arch = architecture_of(model)
    layers = list(spec.layers) if spec.layers is not None else list(range(arch.num_layers(model)))
    bad = [i for i in layers if not 0 <= i < arch.num_layers(model)]
    if bad:
        raise IndexError(
            f"DEPN layers {bad} are out of range: the model has layers "
            f"0..{arch.num_layers(model) - 1}"
        )
    names = [f"{arch.layers}.{i}.{arch.mlp_out}.weight" for i in layers]

    def path():
        attr = attributions(
            model,
            tokenizer,
            attributed_docs(forget, spec.examples, seed),
            layers,
            steps=spec.ig_steps,
            max_length=spec.max_length,
            progress=progress,
        )
        ranked = rank_neurons(attr, spec.threshold)
        done = 0
        for target in sorted(spec.neurons):
            for li, j in ranked[done:target].tolist():
                zero_neuron(model.get_submodule(f"{arch.layers}.{layers[li]}.{arch.mlp_out}"), j)
            done = min(target, len(ranked))
            yield Point(
                target,
                f"DEPN {done} neurons",
                {"neurons": done, "candidates": len(ranked), "documents": int(attr.shape[0])},
            )
            # every privacy neuron is edited; larger counts would repeat this point
            if done < target:
                return

    return Method("depn", names, path, finish=lambda: model)
