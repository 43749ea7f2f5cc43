"""The input directions of each MLP map that PII tokens use most relative to benign text, and a
model's change from a reference undone along them.

An MLP map looks a value up by the direction of its input; what a fine-tune memorised sits mostly
in the part of each map's change that PII tokens read. The directions PII tokens use most relative
to benign text are the top generalised eigenvectors of the two second-moment matrices of that input
(PII tokens: each value's tokens and the token before it; benign: every token), taken in the leaky
model, where the values are still looked up. Undoing the change along K of them takes out what the
fine-tune wrote there and keeps what it wrote along the directions benign text uses.

Why the keys and not the whole MLP: on the demo, undone along 512 directions of each map of layers
14..29 then repaired for 150 steps, a relearning attack brought back 2 test people of 50 at KL
0.038; the whole MLPs set back and repaired for 450 steps, 2 at KL 0.052 (README, "Back towards the
model before the fine-tune").
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .data.corpus import Document
from .data.labels import token_labels
from .models import architecture_of

Texts = list[tuple[torch.Tensor, torch.Tensor]]  # (input ids, the positions that count)
# the second moments held at once (float64): layers are taken in groups that fit, each group one
# pass over the texts (SmolLM2's 16 later layers fit one pass; a 7B model's, one layer a pass)
MOMENT_BYTES = 2**31


def mlp_of(model, layer: int) -> torch.nn.Module:
    return model.get_submodule(f"{architecture_of(model).layers}.{layer}.mlp")


def mlp_maps(model, layer: int) -> dict[str, torch.nn.Module]:
    """The linear maps of one decoder layer's MLP, by name within it."""
    return {
        n: m
        for n, m in mlp_of(model, layer).named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D))
    }


def in_width(m: torch.nn.Module) -> int:
    """How many features a linear map reads, whatever its layout."""
    return m.weight.shape[0] if isinstance(m, Conv1D) else m.weight.shape[1]


def output_map(model) -> str:
    """The name, within the MLP, of the map that writes to the residual stream."""
    return architecture_of(model).mlp_out.split("mlp.", 1)[1]


def token_sets(
    tokenizer, docs: Sequence[Document], benign: Sequence[str], max_length: int
) -> dict[str, Texts]:
    """Each text's ids and the positions that count: of the PII documents, the value tokens and the
    token before each; of the benign texts, every token. The first position never counts (the
    attention sink's residual stream is an outlier)."""
    out: dict[str, Texts] = {"pii": [], "benign": []}
    for doc in docs:
        lab = token_labels(tokenizer, doc.text, doc.spans, max_length=max_length)
        out["pii"].append((lab.input_ids, lab.pii | lab.pre_span))
    for text in benign:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        ids = ids.input_ids[0]
        out["benign"].append((ids, torch.ones(len(ids), dtype=torch.bool)))
    for pairs in out.values():
        for _, where in pairs:
            where[0] = False
    return {k: [(i, w) for i, w in v if w.any()] for k, v in out.items()}


def mlp_inputs(model, layers: Sequence[int], sets: dict[str, Texts]) -> Iterator[tuple[str, dict]]:
    """(kind, {(layer, "in" | "mid"): the inputs at the positions that count}) per text: "in" what
    the MLP reads, "mid" what its output map reads."""
    got, hooks, out = {}, [], output_map(model)

    def grab(key):
        return lambda _m, inp: got.__setitem__(key, inp[0].detach()[0])

    for i in layers:
        hooks.append(mlp_of(model, i).register_forward_pre_hook(grab((i, "in"))))
        hooks.append(mlp_maps(model, i)[out].register_forward_pre_hook(grab((i, "mid"))))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for kind, pairs in sets.items():
                for ids, where in pairs:
                    model(input_ids=ids[None].to(device), use_cache=False)
                    yield kind, {k: v[where.to(v.device)] for k, v in got.items()}
    finally:
        for h in hooks:
            h.remove()


def second_moments(model, layers: Sequence[int], sets: dict[str, Texts]) -> dict:
    """{(layer, "in" | "mid", kind): the mean outer product of that input over `kind`'s tokens}."""
    sums, counts = {}, dict.fromkeys(sets, 0)
    for kind, inputs in mlp_inputs(model, layers, sets):
        for (i, where), x in inputs.items():
            x = x.double().cpu()
            sums[(i, where, kind)] = sums.get((i, where, kind), 0) + x.T @ x
        counts[kind] += len(inputs[(layers[0], "in")])
    return {k: v / counts[k[2]] for k, v in sums.items()}


def key_directions(pii: torch.Tensor, benign: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis (d, min(k, d)) of the top-k generalised eigenvectors of (pii, benign):
    the input directions PII tokens use most relative to benign text (benign regularised by 1e-3
    of its mean eigenvalue, so that a direction benign text never uses stays finite)."""
    d = benign.shape[0]
    benign = benign + 1e-3 * torch.trace(benign) / d * torch.eye(d, dtype=benign.dtype)
    whiten = torch.linalg.inv(torch.linalg.cholesky(benign))
    _, u = torch.linalg.eigh(whiten @ pii @ whiten.T)
    q, _ = torch.linalg.qr(whiten.T @ u[:, -min(k, d) :])
    return q.float()


def key_bases(
    model, layers: Sequence[int], sets: dict[str, Texts], k: int, progress: bool = True
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, "in" | "mid"): the top-k key directions of that input}, in `model` (the leaky
    one), layers taken in groups whose moments fit `MOMENT_BYTES`."""
    out, maps = output_map(model), mlp_maps(model, layers[0])
    # one "in" matrix (the input maps share their input) and one "mid" matrix per kind
    mid, inp = in_width(maps[out]), next(in_width(m) for n, m in maps.items() if n != out)
    per_layer = len(sets) * (mid * mid + inp * inp) * 8
    size = max(1, MOMENT_BYTES // per_layer)
    bases = {}
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    for group in tqdm(groups, desc="key directions", disable=not progress or len(groups) == 1):
        moments = second_moments(model, group, sets)
        for i in group:
            for where in ("in", "mid"):
                pair = (moments.pop((i, where, "pii")), moments.pop((i, where, "benign")))
                bases[(i, where)] = key_directions(*pair, k)
    return bases


def undo_along(model, reference, layers: Sequence[int], bases: dict) -> list[str]:
    """Each MLP map's change from `reference` undone along the key directions of its input
    (`bases`, from `key_bases`), in place; the names of the weights changed."""
    arch, out, changed = architecture_of(model), output_map(model), []
    with torch.no_grad():
        for i in layers:
            theirs = mlp_maps(reference, i)
            for name, m in mlp_maps(model, i).items():
                q = bases[(i, "mid" if name == out else "in")].to(m.weight.device)
                change = m.weight - theirs[name].weight.to(m.weight.device, m.weight.dtype)
                if isinstance(m, Conv1D):  # (in, out)
                    m.weight -= (q @ (q.T @ change.float())).to(m.weight.dtype)
                else:
                    m.weight -= ((change.float() @ q) @ q.T).to(m.weight.dtype)
                changed.append(f"{arch.layers}.{i}.mlp.{name}.weight")
    return changed
