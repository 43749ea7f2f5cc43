"""Weight-editing unlearning methods, run as recipes beside PrivacyScalpel and scored by the same harness.

Each method edits the model in place and yields a `Point` at each stage of its path (training steps, or
neuron counts): the caller scores every point on validation people and stops at the first that meets the
targets (the stopping rule of the unlearning papers: stop once extraction on memorised people is down to
the never-seen level). `tensors` names what a method may change; everything else stays byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class Point:
    value: int  # training steps taken, or neurons edited
    label: str
    stats: dict = field(default_factory=dict)  # the method's own losses at this point


@dataclass
class Method:
    """A method bound to its model and data: the tensors it may change and the path it walks."""

    name: str
    tensors: list[str]  # parameter names (of the base model) the method may change
    path: Callable[[], Iterator[Point]]
    finish: Callable[[], torch.nn.Module] = lambda: None  # the plain model to export (LoRA merged)


def changed_tensors(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> list[str]:
    """Names among `originals` whose values in `model` differ from them."""
    params = dict(model.named_parameters())
    return [n for n, t in originals.items() if not torch.equal(params[n].detach(), t)]


def build(spec, model, tokenizer, forget: list[str], retain: list[str], *, layer: int, seed: int,
          progress: bool = True) -> Method:
    """The method named by a recipe's `method` section, bound to `model` and its data."""
    if spec.name == "rmu":
        from .rmu import rmu

        return rmu(spec, model, tokenizer, forget, retain, layer=layer, seed=seed, progress=progress)
    if spec.name == "gradient_ascent":
        from .gradient_ascent import gradient_ascent

        return gradient_ascent(spec, model, tokenizer, forget, retain, seed=seed, progress=progress)
    if spec.name == "depn":
        from .depn import depn

        return depn(spec, model, tokenizer, forget, seed=seed, progress=progress)
    raise ValueError(f"unknown method {spec.name!r}; use scalpel, rmu, gradient_ascent or depn")
