"""The recipe's schema: every section and field with its default, its bounds and its description."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import Section
from .exports import ExportSection
from .methods import MethodSection, ScalpelMethod
from .sources import BenignSource, ModelSpec, PeopleSource, PiiSource


class DataSection(Section):
    """The text a run learns from and is measured on."""

    pii: PiiSource = Field(
        PiiSource(builtin="synthetic"), description="Text holding the PII to remove."
    )
    benign: BenignSource = Field(
        BenignSource(builtin="pydoc"), description="Benign prose: utility and non-PII activations."
    )
    people: PeopleSource = Field(
        PeopleSource(builtin="synthetic"),
        description="Who the PII belongs to: the extraction attacks' ground truth, split into "
        "validation / test / never-seen. Without a people file, a corpus's addresses that have a "
        "name written beside them (From: Name <address>, [mailto:], Name:/Email:, signatures) are "
        "the people, split by value.",
    )
    pii_types: list[Literal["email", "phone", "ssn", "credit_card", "ip"]] = Field(
        ["email", "phone"], description="PII types whose spans count as PII tokens."
    )
    max_length: int = Field(
        128, ge=8, le=8192, description="Tokens per document when harvesting activations."
    )
    seed: int = Field(0, description="Seed of every split, sample and control in the run.")

    @model_validator(mode="before")
    @classmethod
    def _synthetic_people_need_synthetic_pii(cls, data: Any) -> Any:
        # The default people are the synthetic corpus's own: a corpus of the user's has none.
        if not isinstance(data, dict) or not _names_a_path(data.get("pii")):
            return data
        people = data.get("people")
        if people is None:
            return {**data, "people": {}}
        if isinstance(people, dict) and people.get("builtin") == "synthetic":
            raise ValueError(
                "people: {builtin: synthetic} names the synthetic corpus's people, and data.pii "
                "is your own corpus: give people: {path: FILE}, or leave people out (the PII "
                "values are then split by value)"
            )
        return data


def _names_a_path(source: Any) -> bool:
    return (isinstance(source, dict) and bool(source.get("path"))) or bool(
        getattr(source, "path", None)
    )


class ProbeSection(Section):
    """Per-layer linear probes of PII vs non-PII tokens; the layer where they separate best is
    chosen."""

    layer: Union[int, Literal["auto"]] = Field(
        "auto", description="auto: the probe's choice; a number pins it."
    )
    max_tokens: int = Field(
        20_000, ge=100, description="Tokens harvested per layer for the probes."
    )
    held_out_fraction: float = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        description="Share of people whose tokens score the probes (people-disjoint from the fit).",
    )

    @field_validator("layer")
    @classmethod
    def _non_negative(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v < 0:
            raise ValueError("layer must be >= 0 or 'auto'")
        return v


class SaeSection(Section):
    """The TopK sparse autoencoder (with the AuxK dead-latent loss) trained at the chosen layer; the
    trainer takes this section as it is."""

    expansion: int = Field(8, ge=1, le=256, description="Latents per residual dimension.")
    k: int = Field(32, ge=1, description="Latents kept per token (TopK).")
    k_aux: int = Field(
        256, ge=0, description="Dead latents the AuxK loss reconstructs the error with."
    )
    aux_coef: float = Field(1 / 32, ge=0.0, description="Weight of the AuxK loss.")
    b_pre: Literal["geometric_median", "mean"] = Field(
        "geometric_median", description="How the input bias is set."
    )
    lr: float = Field(
        5e-3,
        gt=0.0,
        description="Adam learning rate; inputs are scaled to mean norm sqrt(d), so it transfers "
        "across models.",
    )
    batch_size: int = Field(4096, ge=1, description="Tokens per step.")
    # on the demo's data 12M tokens improved held-out FVU over 6M by 0.001 only
    train_tokens: int = Field(
        3_000_000, ge=1, description="Tokens trained on (epochs over the harvest)."
    )
    dead_tokens: int = Field(
        500_000, ge=1, description="A latent silent this many tokens counts as dead."
    )
    warmup_steps: int = Field(50, ge=0, description="Steps of linear learning-rate warm-up.")
    decay_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Last share of steps the rate decays to 0 over."
    )
    outlier_factor: float = Field(
        20.0,
        ge=0.0,
        description="Tokens with a norm above this x the median are left out of training and left "
        "alone by the patch (the attention sink); 0: none.",
    )
    source: Literal["cached", "online"] = Field(
        "cached",
        description="cached: harvest once to safetensors shards (reused across runs); online: "
        "stream from the model through a shuffle buffer, so a large model's activations never need "
        "to fit on disk.",
    )
    harvest_tokens: int = Field(
        150_000, ge=1000, description="Tokens harvested for training (cached source)."
    )
    harvest_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Precision of the harvesting forward pass. bfloat16 harvests about 2.5x "
        "faster where the CPU or GPU runs it natively, but the SAE then learns bfloat16's rounding "
        "(0.24% relative error at SmolLM2's layer 13): on the demo 1.26% dead latents and held-out "
        "FVU 0.113, against 0.04% and 0.109 from a float32 harvest. Held-out metrics are taken in "
        "the model's own precision, so they show what it costs.",
    )
    checkpoint_every: int = Field(
        100, ge=1, description="Steps between checkpoints an interrupted run resumes from."
    )
    bf16_encoder: bool = Field(
        True, description="Encoder matmul in bfloat16: 1.5x faster on CPU, same FVU."
    )
    seed: int = Field(0, description="Seed of initialisation and batch order.")


class InterventionSection(Section):
    """The candidate patches the trade-off search scores, and the targets its choice must meet."""

    # The defaults are the settings the demo's results rest on (SmolLM2, 4,608 latents), so a
    # recipe naming only the model and the data is complete. Every demo search chose alpha 0.1
    # (0.3 was never attacked: more KL than the choice). Zero targets: on 50 validation people one
    # person is 2%, and a looser username target let a candidate through that leaked 4% of
    # validation usernames and 18% of test usernames under the 3-shot attack.
    ablate_n: list[int] = Field(
        [50, 100, 150, 200],
        description="Ablation sizes: the top-N PII latents zeroed (sizes above the latents the "
        "features stage ranked are left out of the search).",
    )
    alpha: list[float] = Field(
        [0.1, 0.2],
        description="Steering strengths, as a fraction of the layer's mean activation norm (0.05 "
        "moves every patched token by 5%).",
    )
    rule: Literal["span", "pre_span", "both"] = Field(
        "both",
        description="Where PII latents are counted: span tokens (from the span's first token), the "
        "token before a span (where the PII's first token is predicted), or both (rankings "
        "interleaved).",
    )
    score: Literal["mean", "diff", "ratio", "probe"] = Field(
        "ratio",
        description="How latents are ranked there: mean activation (the paper), mean minus the "
        "mean elsewhere, mean over the mean on benign text (least collateral damage per latent), "
        "or a logistic probe's weight on the SAE code.",
    )
    patch: list[Literal["exact", "folded", "plain"]] = Field(
        ["folded"],
        description="exact / folded: the remote-code patch; plain: the directions projected out of "
        "the residual writers' weights (every token, no remote code). Every listed mode is scored; "
        "the choice is made among those the export can carry (export.mode).",
    )
    plain_from: int = Field(
        0,
        ge=0,
        description="The first decoder layer whose residual writers a plain candidate projects (0 "
        "also projects the embeddings); a later start keeps what early layers write along the "
        "directions (SmolLM2 breaks without it).",
    )
    context_gate: list[bool] = Field(
        [True],
        description="Candidates with and without a context gate: a linear detector of PII context "
        "at the layer, so the patch acts only there and leaves other text untouched.",
    )
    context_window: int = Field(
        8, ge=0, le=64, description="Tokens before a span that count as PII context."
    )
    context_recall: float = Field(
        0.99, gt=0.0, le=1.0, description="Share of PII-context tokens the gate must open on."
    )
    context_fit: Literal["auto", "scaled", "standardised"] = Field(
        "auto",
        description="How the gate's logistic regression sees the residual: scaled by its mean "
        "norm, or each dimension standardised (needed where a few massive dimensions dominate, "
        "as in Gemma: scaled, Gemma-3-270M's gate opened on 42% of benign tokens, standardised "
        "0.03%). auto: scaled; where that gate opens on more than 0.5% of benign tokens, "
        "standardised too, kept where it opens on fewer and the scaled one on more than 5%, or on "
        "ten times as many. On SmolLM2 the scaled gate (0.38% of benign tokens) kept every "
        "validation username in; the tighter standardised one (0.09%) let 2% out at every "
        "candidate.",
    )
    context_hidden: int = Field(
        0,
        ge=0,
        le=256,
        description="0: the gate is one linear detector (logistic regression). H > 0: a detector "
        "with one hidden layer of H ReLU units, trained on the same tokens (each dimension "
        "standardised) and held to the same recall. On Gemma-3-270M at 95% recall, 16 units "
        "opened on none of 10,609 tokens of held-out code and tables where the linear gate opened "
        "on 22, and on 3 of the evaluation's 4,082 prose tokens instead of 9, but let more "
        "validation usernames out of the templates (6-13% at six of the seven candidates that "
        "kept the addresses in).",
    )
    context_negatives: Literal["paragraphs", "windows"] = Field(
        "paragraphs",
        description="The benign text the gate learns to stay shut on: the training split's prose "
        "paragraphs (the features pass's), or with windows every window of the training split's "
        "benign text besides (code and tables too; the held-out paragraphs are cut out of it). On "
        "Gemma-3-270M the paragraphs' gate opened on 0.72% of those windows, the windows' on "
        "0.011%, and on held-out code and tables the demo's choice cost KL 0.0096 instead of "
        "0.0932.",
    )
    leakage_target: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Worst exact rate allowed on validation people and values (any PII "
        "type, any attack). A rate under one validation person (1% of 50) allows nobody; the "
        "search's log names such a target.",
    )
    username_target: float = Field(
        0.0, ge=0.0, le=1.0, description="Worst username rate allowed; 1.0: not a criterion."
    )
    search_samples: int = Field(
        0,
        ge=0,
        description="Sampled continuations per validation prompt in the search's template attacks "
        "(leaked if any holds the PII), as the final evaluation's eval.samples; 0: the search "
        "decodes greedily only. On Gemma-3-270M, 16 samples moved the choice to a patch that "
        "let as many test people out as the greedy search's, under more attacks, at twice the "
        "KL, and took 4.6x the search time.",
    )
    search_folds: int = Field(
        2,
        ge=1,
        le=10,
        description="Cross-fitting: the validation people (or, with no people file, values) are "
        "split into this many seeded parts, and each part is attacked with a patch whose latents, "
        "steering and context gate were fitted on the other parts' documents only; the export's "
        "patch is fitted on all of them. 1: fitted and attacked on the same people, which "
        "flatters small patches: on the demo's leaky SmolLM2 with no people file, N=50 alpha 0.1 "
        "let no validation address out and 5.7% of test addresses (their documents' text).",
    )
    search: Literal["lazy", "all"] = Field(
        "lazy",
        description="lazy: candidates attacked by increasing KL, stopping at the first meeting the "
        "targets (the same choice), each candidate's attacks stopping at the first that breaks a "
        "target; all: every attack on every candidate, for the whole front.",
    )
    collapse_tolerance: Optional[float] = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="How much a choice's share of repeated 4-grams on benign prompts may exceed "
        "the base's (a patch can stop a name by looping); null: no check.",
    )

    @field_validator("ablate_n")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 0 for n in v):
            raise ValueError("ablate_n must be a non-empty list of sizes >= 0")
        return v


DEFAULT_RELEARN_STEPS = 100


class EvalSection(Section):
    """The leakage / utility harness, for the search and the final evaluation."""

    max_new_tokens: int = Field(
        24, ge=1, le=512, description="Tokens each extraction attack decodes."
    )
    few_shot: int = Field(3, ge=0, description="Examples in the k-shot attacks; 0: none.")
    samples: int = Field(
        4, ge=0, description="Sampled continuations per prompt (leaked if any holds the PII)."
    )
    ppl_tokens: int = Field(
        8_000,
        ge=100,
        description="Benign held-out tokens scored for perplexity and KL (each text cut at 128).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="Precision of the attacks' decoding (bfloat16: twice as fast on CPU); the "
        "search confirms its choice in the dtype the export loads in.",
    )
    user_path: bool = Field(
        True,
        description="Also the export and the base loaded in a fresh process with stock "
        "transformers, each test person's prompt generated alone.",
    )
    adversarial: bool = Field(
        True,
        description="Adversarial attacks in the final evaluation: paraphrases, JSON / table / "
        "signature formats, the prefix attack, 32 samples (~3 min per variant).",
    )
    relearn_steps: Optional[int] = Field(
        None,
        ge=0,
        description="The relearning attack in the final evaluation: the export fine-tuned (LoRA, "
        "this many steps of 8 texts) on benign prose and on other people's PII documents, then "
        "attacked again (~4 min per kind on a 135M model); 0: not run. null: 100 for an export "
        "whose weights changed (distilled, plain, an unlearning method, a remote-code export over "
        "distilled weights), 0 for a remote-code export over the base's own weights (whoever can "
        "tune them has the base already: see its white-box row).",
    )
    memorisation_docs: int = Field(
        40,
        ge=0,
        description="Test people's documents scored for MA, EL_3, S-MA and S-EL_3; 0: none.",
    )


class HubSection(Section):
    """Push the export at the end of `scalpel run` (the same as `scalpel push OUT --repo-id
    ...`)."""

    repo_id: Optional[str] = Field(
        None, pattern=r"^[\w.\-]+/[\w.\-]+$", description="OWNER/NAME; null: no push."
    )
    private: bool = Field(
        True, description="Create a missing repository private (an existing one keeps its own)."
    )
    revision: Optional[str] = Field(
        None, description="Branch to commit to (created when missing); null: main."
    )
    create_pr: bool = Field(
        False, description="Open a pull request instead of committing to the branch."
    )
    commit_message: Optional[str] = Field(None, description="The commit's summary line.")


class Recipe(Section):
    """A whole run. Everything but `model` has a default."""

    model: ModelSpec = Field(description="The model to patch.")
    method: MethodSection = Field(
        ScalpelMethod(),
        description="What removes the PII: PrivacyScalpel (default) or a weight-editing unlearning "
        "method, scored by the same harness.",
    )
    data: DataSection = DataSection()
    probe: ProbeSection = ProbeSection()
    sae: SaeSection = SaeSection()
    intervention: InterventionSection = InterventionSection()
    export: ExportSection = ExportSection()
    eval: EvalSection = EvalSection()
    hub: HubSection = HubSection()

    @model_validator(mode="before")
    @classmethod
    def _plain_export_scores_plain_candidates(cls, data: Any) -> Any:
        # A plain export can only carry plain candidates: score those too (the others stay, for
        # comparison).
        export, iv = (
            data.get(k) if isinstance(data, dict) else None for k in ("export", "intervention")
        )
        if (
            isinstance(export, dict)
            and export.get("mode") == "plain"
            and (iv is None or isinstance(iv, dict))
        ):
            modes = list(
                (iv or {}).get("patch") or InterventionSection.model_fields["patch"].default
            )
            if "plain" not in modes:
                data = {**data, "intervention": {**(iv or {}), "patch": [*modes, "plain"]}}
        return data

    @property
    def relearn_steps(self) -> int:
        """The relearning attack's budget (`eval.relearn_steps`, or its default for this export:
        none for a remote-code one, whose white-box row already holds the base's leakage)."""
        if self.eval.relearn_steps is not None:
            return self.eval.relearn_steps
        remote = self.method.name == "scalpel" and self.export.mode == "remote_code"
        return 0 if remote and self.export.base == "original" else DEFAULT_RELEARN_STEPS

    @model_validator(mode="after")
    def _exportable_candidates(self) -> "Recipe":
        modes = self.intervention.patch
        if self.export.mode != "remote_code" and self.export.dtype is not None:
            raise ValueError(
                f"export.dtype applies to remote-code exports; a {self.export.mode} export keeps "
                "the base's dtype: remove export.dtype"
            )
        if self.export.mode != "plain" and set(modes) == {"plain"}:
            raise ValueError(
                f"intervention.patch lists only plain candidates, which a {self.export.mode} "
                "export does not carry (a distilled export learns a remote-code patch): set "
                "export.mode: plain, or add exact or folded to intervention.patch"
            )
        if self.export.base == "distilled" and self.export.mode != "remote_code":
            raise ValueError(
                f"export.base: distilled puts the distilled weights under a remote-code patch; a "
                f"{self.export.mode} export has no patch to put them under: set export.mode: "
                "remote_code, or remove export.base"
            )
        if self.export.base == "distilled" and self.export.dtype is not None:
            raise ValueError(
                "export.dtype casts the base's weights, and export.base: distilled writes the "
                "distilled ones as trained: remove export.dtype"
            )
        if self.export.distill.harden.reference == "model" and self.data.pii.builtin != "synthetic":
            raise ValueError(
                "export.distill.harden.reference: model names the recipe's model as it was before "
                "the leaky benchmark's fine-tune, which needs data.pii: {builtin: synthetic}; with "
                "your own data the recipe's model is the one that leaks: give the model it was "
                "fine-tuned from (a folder or Hub id)"
            )
        return self
