"""The methods a recipe can name: PrivacyScalpel, or a weight-editing unlearning baseline."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator

from .base import Section


class ScalpelMethod(Section):
    """PrivacyScalpel: probe → SAE → features → patch (the sections above)."""

    name: Literal["scalpel"] = "scalpel"


class _TrainedMethod(Section):
    steps: list[int] = Field(
        [25, 50, 100],
        description="Checkpoints scored on validation people, in order; training stops at the "
        "first meeting the targets, or after the last.",
    )
    batch_size: int = Field(4, ge=1, description="Documents per step.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per document.")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("steps must be a non-empty list of step counts >= 1")
        return sorted(set(v))


class RmuMethod(_TrainedMethod):
    """RMU (Li et al. 2024): the MLP output projections of layers l-2..l push PII text towards a
    random direction and hold benign text where it was. Defaults from the WMDP reference run."""

    name: Literal["rmu"]
    layer: Optional[int] = Field(
        None, ge=0, description="The steered layer; null: the probe's choice."
    )
    c: float = Field(
        6.5, gt=0.0, description="Steering coefficient: the norm of the random target vector."
    )
    alpha: float = Field(1200.0, ge=0.0, description="Weight of the retain loss.")
    lr: float = Field(5e-5, gt=0.0, description="Learning rate.")
    steps: list[int] = Field(
        [20, 40, 80], description="Checkpoints scored on validation people, in order."
    )


class GradientAscentMethod(_TrainedMethod):
    """Gradient ascent on the PII text (Jang et al. 2022) or NPO (Zhang et al. 2024), optionally
    with a KL-to-base term on benign text (Yao et al. 2023); full fine-tune or LoRA merged at
    export."""

    name: Literal["gradient_ascent"]
    loss: Literal["ga", "npo"] = Field("npo", description="Plain gradient ascent or NPO.")
    beta: float = Field(0.1, gt=0.0, description="NPO's inverse temperature.")
    retain_kl: float = Field(
        0.0, ge=0.0, description="Weight of KL(base || model) on benign text; 0: none."
    )
    lr: float = Field(1e-5, gt=0.0, description="Learning rate.")
    lora_rank: Optional[int] = Field(
        None, ge=1, description="LoRA rank (merged at export); null: full fine-tune."
    )


class DepnMethod(Section):
    """DEPN (Wu et al. 2023): privacy neurons by integrated gradients, their output weights
    zeroed."""

    name: Literal["depn"]
    neurons: list[int] = Field(
        [50, 100, 200, 400],
        description="Edit sizes scored in order (the first meeting the targets wins).",
    )
    ig_steps: int = Field(16, ge=1, description="Integrated-gradients steps.")
    threshold: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="Share of the document's largest attribution a neuron needs.",
    )
    examples: int = Field(100, ge=1, description="PII documents attributed.")
    layers: Optional[list[int]] = Field(
        None, description="Decoder layers searched; null: every one."
    )
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per document.")

    @field_validator("neurons")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("neurons must be a non-empty list of counts >= 1")
        return sorted(set(v))


MethodSection = Annotated[
    Union[ScalpelMethod, RmuMethod, GradientAscentMethod, DepnMethod], Field(discriminator="name")
]
