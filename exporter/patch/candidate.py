"""A candidate intervention (ablation size, steering strength, mode, context gate) and the patch it
builds."""

from __future__ import annotations

from dataclasses import dataclass

from ..features import matched_random_latents
from .build import build_patch, plain_edit, random_direction, steering_vector
from .modes import ExportKind, Mode


@dataclass(frozen=True)
class Candidate:
    n: int  # ablation size: the top-n latents of the ranking
    alpha: float  # steering, fraction of the mean norm
    mode: Mode
    gated: bool = False  # behind the PII-context gate

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))

    @property
    def label(self) -> str:
        return f"N={self.n} alpha={self.alpha:g} {self.mode}" + (" gated" if self.gated else "")

    def exportable(self, export_mode: "ExportKind | str") -> bool:
        """Whether an export of `export_mode` carries this candidate (plain ones only in plain
        exports; a distilled export learns a remote-code one)."""
        return ExportKind(export_mode).carries(self.mode)


def context_of(features, gated: bool):
    """The features' context gate for a gated candidate (None for an ungated one)."""
    if gated and features.context is None:
        raise ValueError(
            "a gated candidate needs the context gate: set intervention.context_gate to include "
            "true"
        )
    return features.context if gated else None


def calibrated_patch(
    sae, ablate, steer, mode: Mode, calibration, context=None, plain_from: int = 0
):
    """A patch from explicit latents and steering. `calibration`: a GateBank over the SAE's training
    activations (gates remembered across candidates, and the sink norm above which the patch leaves
    a token alone)."""
    if Mode(mode) is Mode.PLAIN:
        return plain_edit(sae, ablate, steer, plain_from)
    gates = calibration(ablate) if Mode(mode) is Mode.FOLDED else None
    return build_patch(
        sae, ablate, steer, mode=str(mode), gates=gates, context=context, sink=calibration.sink_norm
    )


def patch_for(sae, features, cand: Candidate, calibration, plain_from: int = 0):
    """The patch of one candidate: the top-n latents of the ranking, steering at `alpha` x mean
    norm, behind the PII-context gate when gated (a plain one projected from decoder layer
    `plain_from` on)."""
    steer = steering_vector(sae, features.steer_latent, cand.alpha, features.mean_norm)
    return calibrated_patch(
        sae,
        features.ablation_set(cand.n),
        steer,
        cand.mode,
        calibration,
        context_of(features, cand.gated),
        plain_from,
    )


def control_for(sae, features, cand: Candidate, patch, calibration, seed: int, plain_from: int = 0):
    """The control of a candidate's `patch`: as many random latents matched on firing frequency and
    a random direction of the steering vector's norm, behind the same context gate (only latents and
    direction differ). Returns (control patch, number of latents)."""
    latents = matched_random_latents(features.firing, features.ablation_set(cand.n), seed=seed)
    control = calibrated_patch(
        sae,
        latents,
        random_direction(patch.steer, seed=seed),
        cand.mode,
        calibration,
        context_of(features, cand.gated),
        plain_from,
    )
    return control, len(latents)
