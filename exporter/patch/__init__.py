"""The patch: one implementation of the maths (remote/scalpel_patch.py), built from an SAE, attached
in-process or written into an export."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..models import architecture_of
from .build import (
    GateBank,
    agreement,
    build_patch,
    calibrate_gates,
    fit_context_gate,
    fit_context_mlp,
    plain_edit,
    random_direction,
    set_context,
    steering_vector,
    topk_membership,
)
from .plain import PlainEdit, projected
from .remote.scalpel_patch import (
    ScalpelPatch,
    TamperedPatchError,
    context_scores,
    insert,
    patch_digest,
    remove,
    verify,
)


@contextmanager
def attached(model, layer: int, patch: ScalpelPatch) -> Iterator[None]:
    """The model runs with `patch` inserted at decoder layer `layer`, as an export runs it (removed
    after)."""
    layers = architecture_of(model).decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(
            f"layer {layer} is out of range: this model has decoder layers 0..{len(layers) - 1}"
        )
    patch.to(next(model.parameters()).device)
    insert(layers[layer], patch)
    try:
        yield
    finally:
        remove(layers[layer])


def applied(model, layer: int, intervention):
    """The context in which `model` runs with `intervention`: a ScalpelPatch attached after `layer`,
    or a PlainEdit's in-process twin (its projection hooked onto the residual writers)."""
    width, d = intervention.steer.shape[-1], architecture_of(model).hidden_size(model)
    if width != d:
        raise ValueError(
            f"the patch (and the SAE it came from) is {width} wide, but this model's residual "
            f"stream is {d} wide: it was made for another model; train the SAE on this one "
            "(scalpel train-sae)"
        )
    if isinstance(intervention, PlainEdit):
        return projected(
            model, layer, intervention.directions, intervention.steer, intervention.first_layer
        )
    return attached(model, layer, intervention)


__all__ = [
    "PlainEdit",
    "applied",
    "plain_edit",
    "projected",
    "GateBank",
    "ScalpelPatch",
    "TamperedPatchError",
    "agreement",
    "attached",
    "build_patch",
    "context_scores",
    "fit_context_gate",
    "fit_context_mlp",
    "calibrate_gates",
    "insert",
    "patch_digest",
    "random_direction",
    "set_context",
    "remove",
    "steering_vector",
    "topk_membership",
    "verify",
]
