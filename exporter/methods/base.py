"""What every weight-editing method is: a `Method` bound to its model and data, walking a path of
`Point`s."""

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
