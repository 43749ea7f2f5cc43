"""The recipe's export section: what is written, and how a distilled export learns the patch."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .base import Section, in_recipe_folder


class HardenSection(Section):
    """Hardening a distilled export against relearning (`harden.py`): the privacy neurons of the
    layers above the patch's zeroed (or, with `reference`, those layers' MLPs set to the model
    before the fine-tune), then those layers' MLP weights repaired towards the distilled student.
    Off by default: it lowers what a fine-tune on other people's PII brings back, at many times the
    student's KL (README, "Threat model": 8 test people of 50 to 3 with 400 neurons, KL 0.003 to
    0.14; to 2 with 100 neurons and lr 3e-5, KL 0.09; the demo's 6 to 1 with `reference`, KL
    0.007 to 0.09; 6-10 to 2-5 over three relearning seeds with `directions: 512`, KL 0.038; to
    2-4 with a repair that bursts at 3e-4 for 20 steps and settles to 1e-4, KL 0.023; 0.021 with
    `benign_weight: 1`)."""

    neurons: int = Field(
        0,
        ge=0,
        description="Privacy neurons zeroed above the patch's layer, the most specific to the PII "
        "tokens first (integrated gradients in the leaky base, against benign text). 0: no "
        "hardening.",
    )
    documents: int = Field(
        100,
        ge=1,
        description="PII documents of the distillation's (and as many benign windows) the neurons "
        "are ranked on, or the key directions found on: the time grows with them (ranking: about "
        "24 minutes for 100 on SmolLM2 on 2 CPU cores; key directions: 2.5 for 200); it is cached "
        "in the work folder and shared by the control.",
    )
    steps: int = Field(
        150, ge=1, description="Repair steps (one PII and one benign batch of the distillation's)."
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the repair (linear decay).")
    burst: int = Field(
        0,
        ge=0,
        description="With settle_lr: only the repair's first `burst` steps run at lr, the rest at "
        "settle_lr (both decaying). Adam's first steps move every weight by about the learning "
        "rate whatever its gradient: a short burst at a high rate scatters what the edit left of "
        "the memorised values, and the lower rate then repairs at less cost in KL. 0: every step "
        "at lr. Measured on the demo with directions 512: 20 steps at 3e-4, then 1e-4, holds as "
        "all 150 at 3e-4 do (2-4 test people of 50 after relearning over three seeds) at KL "
        "0.023 against 0.038; 10 steps, KL 0.020 and 3-5 (README, 'Threat model').",
    )
    settle_lr: Optional[float] = Field(
        None, gt=0, description="The repair's learning rate after its `burst` steps."
    )
    benign_weight: Optional[float] = Field(
        None,
        ge=0,
        description="The benign batch's weight in each repair step's loss (default: the "
        "distillation's benign_weight). Adam scales each weight's step by its own gradient's "
        "size, so this chooses whose gradient the burst's first steps follow, not how large they "
        "are: on the demo with directions 512 and a 20-step burst, weight 1 ends at KL 0.021, 4 at "
        "0.023, 12 at 0.031, 0.25 at 0.026 (README, 'Threat model').",
    )
    batch_size: int = Field(4, ge=1, description="Texts per repair batch.")
    max_length: int = Field(96, ge=8, description="Tokens per repair text (the ranking's: 128).")
    reference: Optional[str] = Field(
        None,
        description="The model the base was fine-tuned from (before it saw the PII): instead of "
        "zeroing privacy neurons (`neurons` stays 0), the MLPs of every layer above the patch's "
        "take its weights, which hold none of what the fine-tune memorised, and are then repaired. "
        "`model`: the recipe's own model as it was before the leaky benchmark's fine-tune (the "
        "built-in synthetic data); else a built-in name, a folder (relative to the recipe's) or a "
        "Hub id, of the base's architecture and size. Measured on the demo: 1-2 test people of 50 "
        "after relearning (the floor: 1), KL 0.09 with 150 repair steps, 0.052 with 450 at lr "
        "3e-4 in bfloat16 (README, 'Threat model').",
    )
    directions: int = Field(
        0,
        ge=0,
        description="With reference: the MLPs above the patch keep their weights, except that "
        "each map's change from the reference is undone along this many of its input directions "
        "(those PII tokens use most relative to benign text, found in the base on `documents` PII "
        "documents and as many benign windows; minutes, cached in the work folder). 0: the "
        "whole MLPs set to the reference's. Measured on the demo: 512 with 150 repair steps at "
        "lr 3e-4 in bfloat16, 2-5 test people of 50 after relearning over three seeds at KL 0.038 "
        "(README, 'Threat model').",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="The repair's compute: bfloat16 autocast where the device runs it natively "
        "(1.6x faster on SmolLM2 on an AVX512-BF16 CPU), else float32.",
    )

    @field_validator("reference")
    @classmethod
    def _resolved(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        """A relative folder resolved against the recipe's; a name or Hub id kept as given."""
        if value is None or value == "model":
            return value
        path = in_recipe_folder(value, info)
        return str(path.resolve()) if path.exists() else value

    @model_validator(mode="after")
    def _one_edit(self) -> "HardenSection":
        if self.neurons and self.reference:
            raise ValueError(
                "export.distill.harden takes either neurons (privacy neurons zeroed) or reference "
                "(the later MLPs set to the model before the fine-tune), not both: set neurons: 0 "
                "or remove reference"
            )
        if bool(self.burst) != (self.settle_lr is not None):
            raise ValueError(
                "export.distill.harden.burst and settle_lr go together (the first burst steps at "
                "lr, the rest at settle_lr): set both, or neither"
            )
        if self.directions and not self.reference:
            raise ValueError(
                "export.distill.harden.directions undoes the base's change from the model before "
                "the fine-tune: name that model in reference (or `model`), or set directions: 0"
            )
        return self

    @property
    def on(self) -> bool:
        """Whether the distilled student is hardened at all."""
        return bool(self.neurons or self.reference)


class DistillSection(Section):
    """How a distilled export learns the chosen patch (export.mode: distilled): LoRA adapters on
    the last decoder layers up to l trained so that the layer-l output matches the patched
    model's, merged."""

    documents: Literal["all", "validation"] = Field(
        "all",
        description="The PII text the student learns on: every PII document of the recipe (what a "
        "user deploys; the weight-editing methods learn from all of them too) or only the "
        "validation people's (the patch's own information; a fair comparison with the patch).",
    )
    templates: bool = Field(
        True,
        description="Also the attack templates written out with those people's own addresses, so "
        "the student sees the contexts an extraction prompt creates.",
    )
    steps: int = Field(300, ge=1, description="Training steps (one PII and one benign batch each).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the adapters (linear decay).")
    rank: int = Field(16, ge=1, description="LoRA rank.")
    batch_size: int = Field(8, ge=1, description="Texts per batch.")
    max_length: int = Field(128, ge=8, description="Tokens per text (longer ones are cut).")
    benign_weight: float = Field(
        4.0,
        ge=0,
        description="Weight of the benign batch's loss: keeps prose at the base's (on the demo, "
        "weight 2 left KL 0.0226 from every PII document, weight 4 0.0180, with no address out).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="The student's forward and backward (autocast); the adapters and the merge "
        "stay float32 (the teacher's targets are computed in the model's dtype, held in bfloat16).",
    )
    early_positions: int = Field(
        64,
        ge=0,
        description="Position p (1-based) of every text weighs max(1, early_positions / p) in the "
        "student's loss: the first positions are read by every later token's attention, so an "
        "error there moves every later prediction (on the demo's patch, held-out KL 0.075 with "
        "every position at 1, 0.033 with 16, 0.021 with 64, at the same leakage). 0: every "
        "position weighs the same.",
    )
    adapted_layers: int = Field(
        4,
        ge=0,
        description="LoRA adapters go on the last this many decoder layers up to the patch's "
        "layer l (l-3..l with 4); the layers below keep the base's weights. 0: every layer 0..l. "
        "On the demo's patch (layer 13), 4 layers left held-out KL 0.0086 where 0..13 left "
        "0.0210, at the same leakage; each step starts at the first adapted layer (the layers "
        "below it are the base's), a quarter of the time per step.",
    )
    late_steps: int = Field(
        0,
        ge=0,
        description="Defence in depth: first train LoRA on the layers after the patch's, fed the "
        "base's own layer-l output on PII text, towards the patched model's next-token "
        "distribution (and the base's on benign prose), so that features a relearning fine-tune "
        "restores no longer lead to the hidden values; each step runs the whole model twice per "
        "batch. 0: only the adapted layers up to l are trained.",
    )
    harden: HardenSection = HardenSection()


class ExportSection(Section):
    """What is written."""

    mode: Literal["remote_code", "plain", "distilled"] = Field(
        "remote_code",
        description="remote_code: the patch as a module (auto_map, trust_remote_code), the base "
        "weights unchanged inside; distilled: the base's own type with the chosen patch learnt "
        "into its weights (loads anywhere, and its files no longer hold what the patch hides); "
        "plain: the base's own type with the patch's directions projected out of its weights.",
    )
    save_sae: bool = Field(
        True, description="Ship the SAE (SAELens format) in the export's sae/ folder."
    )
    dtype: Optional[Literal["float32", "bfloat16"]] = Field(
        None, description="Cast a remote-code export's base weights; null: keep the base's."
    )
    base: Literal["original", "distilled"] = Field(
        "original",
        description="The weights under a remote-code export's patch: the base's own (original), "
        "or the base with the patch distilled into them (distilled; as export.distill says): "
        "defence in depth, whoever loads the weights without the patch gets the distilled model, "
        "not the leaky base.",
    )
    distill: DistillSection = DistillSection()

    @property
    def distils(self) -> bool:
        """Whether this export needs the distilled student (its weights, or under the patch)."""
        return self.mode == "distilled" or self.base == "distilled"
