"""Weight-editing unlearning methods, run as recipes beside PrivacyScalpel and scored by the same
harness.

Each method edits the model in place and yields a `Point` at each stage of its path (training steps,
or neuron counts): the caller scores every point on validation people and stops at the first that
meets the targets (the stopping rule of the unlearning papers: stop once extraction on memorised
people is down to the never-seen level). `tensors` names what a method may change; everything else
stays byte for byte.
"""

from __future__ import annotations

from .base import Method, Point, changed_tensors
from .depn import depn
from .gradient_ascent import gradient_ascent
from .rmu import rmu

__all__ = ["Method", "Point", "build", "changed_tensors"]


def build(
    spec,
    model,
    tokenizer,
    forget: list[str],
    retain: list[str],
    *,
    layer: int,
    seed: int,
    progress: bool = True,
) -> Method:
    """The method named by a recipe's `method` section, bound to `model` and its data."""
    if spec.name == "rmu":
        return rmu(
            spec, model, tokenizer, forget, retain, layer=layer, seed=seed, progress=progress
        )
    if spec.name == "gradient_ascent":
        return gradient_ascent(spec, model, tokenizer, forget, retain, seed=seed, progress=progress)
    if spec.name == "depn":
        return depn(spec, model, tokenizer, forget, seed=seed, progress=progress)
    raise ValueError(f"unknown method {spec.name!r}; use scalpel, rmu, gradient_ascent or depn")
