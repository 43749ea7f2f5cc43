"""The recipe: one YAML file that drives a whole run, validated before any model is loaded."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m")
DTYPES = ("float32", "bfloat16")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key path and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _existing_file(value: Optional[str], info: ValidationInfo) -> Optional[str]:
    """Resolve a path against the recipe's folder and insist that it exists."""
    if value is None:
        return None
    base = Path((info.context or {}).get("base_dir", "."))
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.exists() and (info.context or {}).get("check_files", True):
        raise ValueError(f"file not found: {str(path)!r} (paths are relative to the recipe's folder)")
    return str(path.resolve())


class ModelSpec(_Section):
    """Where the base model comes from: exactly one of path, builtin, hub, gguf."""

    path: Optional[str] = None
    builtin: Optional[Literal["smollm2-135m", "gemma3-270m"]] = None
    hub: Optional[str] = Field(None, pattern=r"^[\w.\-]+/[\w.\-]+$")
    revision: Optional[str] = None
    gguf: Optional[str] = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    _check_path = field_validator("path", "gguf")(_existing_file)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [k for k in ("path", "builtin", "hub", "gguf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one model source, got {given or 'none'}; "
                "allowed: path (HF folder), builtin (smollm2-135m, gemma3-270m), hub (org/name + revision), gguf (file)"
            )
        if self.revision is not None and self.hub is None:
            raise ValueError("revision only applies to a hub model")
        return self

    def describe(self) -> str:
        if self.hub:
            return f"{self.hub}@{self.revision or 'main'}"
        return str(self.path or self.builtin or self.gguf)


class PiiSource(_Section):
    """PII text: a JSONL file of {"text", optional "spans"} or the built-in synthetic leaky corpus."""

    path: Optional[str] = None
    builtin: Optional[Literal["synthetic"]] = None
    _check_path = field_validator("path")(_existing_file)

    @model_validator(mode="after")
    def _one(self) -> "PiiSource":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path (JSONL file) or builtin (synthetic)")
        return self


class BenignSource(_Section):
    """Benign prose for utility and non-PII activations: a text file or the built-in pydoc prose."""

    path: Optional[str] = None
    builtin: Optional[Literal["pydoc"]] = None
    _check_path = field_validator("path")(_existing_file)

    @model_validator(mode="after")
    def _one(self) -> "BenignSource":
        if self.path is not None and self.builtin is not None:
            raise ValueError("give one of path (text file) or builtin (pydoc), not both")
        if self.path is None and self.builtin is None:
            return self.model_copy(update={"builtin": "pydoc"})
        return self


class PeopleSource(_Section):
    """Ground truth for extraction attacks: JSONL of {"name", "email", "phone", "split"}."""

    path: Optional[str] = None
    builtin: Optional[Literal["synthetic"]] = None
    _check_path = field_validator("path")(_existing_file)


class DataSection(_Section):
    pii: PiiSource = PiiSource(builtin="synthetic")
    benign: BenignSource = BenignSource(builtin="pydoc")
    people: PeopleSource = PeopleSource(builtin="synthetic")
    pii_types: list[Literal["email", "phone", "ssn", "credit_card", "ip"]] = ["email", "phone"]
    max_length: int = Field(128, ge=8, le=8192)
    seed: int = 0


class ProbeSection(_Section):
    layer: Union[int, Literal["auto"]] = "auto"
    max_tokens: int = Field(20_000, ge=100)
    held_out_fraction: float = Field(0.3, gt=0.0, lt=1.0)

    @field_validator("layer")
    @classmethod
    def _non_negative(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v < 0:
            raise ValueError("layer must be >= 0 or 'auto'")
        return v


class SaeSection(_Section):
    expansion: int = Field(8, ge=1, le=256)
    k: int = Field(32, ge=1)
    k_aux: int = Field(256, ge=0)
    aux_coef: float = Field(1 / 32, ge=0.0)
    b_pre: Literal["geometric_median", "mean"] = "geometric_median"
    lr: float = Field(5e-3, gt=0.0)  # inputs are scaled to mean norm sqrt(d), so this transfers across models
    batch_size: int = Field(4096, ge=1)
    train_tokens: int = Field(6_000_000, ge=1)
    dead_tokens: int = Field(500_000, ge=1)
    outlier_factor: float = Field(20.0, ge=0.0)
    # cached: harvest once to safetensors shards (reused across runs); online: stream from the model
    # through a shuffle buffer, so a large model's activations never need to fit on disk.
    source: Literal["cached", "online"] = "cached"
    harvest_tokens: int = Field(150_000, ge=1000)
    # Precision of the forward pass that harvests the training activations (bfloat16: ~2.5x faster here).
    # Held-out metrics are always taken on the model's own precision, so they show what it costs.
    harvest_dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint_every: int = Field(100, ge=1)
    bf16_encoder: bool = True  # encoder matmul in bfloat16: 1.5x faster here, same FVU
    seed: int = 0


class InterventionSection(_Section):
    ablate_n: list[int] = [50]
    # Steering strength as a fraction of the layer's mean activation norm (0.05 moves every token by 5%).
    alpha: list[float] = [0.0]
    # Where PII latents are counted: span tokens (from the span's first token), the token before a span
    # (where the PII's first token is predicted), or both (their rankings interleaved).
    rule: Literal["span", "pre_span", "both"] = "both"
    # How latents are ranked there: mean activation (the paper), mean minus the mean elsewhere, mean over
    # the mean on benign text (selectivity: least collateral damage per latent), or the weight of a
    # logistic probe on the SAE code.
    score: Literal["mean", "diff", "ratio", "probe"] = "ratio"
    # exact / folded: the remote-code patch; plain: the directions projected out of the residual writers'
    # weights (every token, no remote code). Candidates of every listed mode are scored; the choice is made
    # among those the export can carry (export.mode).
    patch: list[Literal["exact", "folded", "plain"]] = ["folded"]
    # The first decoder layer whose residual writers a plain candidate projects (through the patch's layer;
    # 0 also projects the embeddings, so that layer l hands on exactly (I - P_A) h). A later start keeps
    # what early layers write along A: some models (SmolLM2) break when their early layers lose it.
    plain_from: int = Field(0, ge=0)
    # Candidates with and without a context gate: a linear detector of PII context at the layer, so the
    # patch acts only there (PII tokens, the token before a span and `context_window` tokens before it)
    # and leaves other text untouched; `context_recall` is the share of PII-context tokens it must open on.
    context_gate: list[bool] = [False]
    context_window: int = Field(0, ge=0, le=64)
    context_recall: float = Field(0.99, gt=0.0, le=1.0)
    leakage_target: float = Field(0.01, ge=0.0, le=1.0)  # worst exact email rate (validation people)
    username_target: float = Field(1.0, ge=0.0, le=1.0)  # worst username rate; 1.0 = not a criterion
    # lazy: candidates are attacked in order of increasing KL and the search stops at the first that meets
    # the targets (the choice is the same: the least-KL candidate meeting them), and a candidate's attacks stop
    # at the first one that breaks a target; all: every attack on every candidate, for the whole front.
    search: Literal["lazy", "all"] = "lazy"
    # A candidate meeting the leakage targets must also not collapse: the share of repeated 4-grams in its
    # greedy continuations of benign validation prompts may exceed the base's by at most this much (a patch
    # can stop a name by looping "Q3 Q3 Q3 ..." where the base would have recited one). null: no check.
    collapse_tolerance: Optional[float] = Field(0.02, ge=0.0, le=1.0)

    @field_validator("ablate_n")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 0 for n in v):
            raise ValueError("ablate_n must be a non-empty list of sizes >= 0")
        return v


class ExportSection(_Section):
    # remote_code: the patch as a module (auto_map, trust_remote_code); plain: the base architecture's own
    # type with the linear part of the patch baked into its weights (loads anywhere, acts on every token).
    mode: Literal["remote_code", "plain"] = "remote_code"
    save_sae: bool = True
    dtype: Optional[Literal["float32", "bfloat16"]] = None


class EvalSection(_Section):
    max_new_tokens: int = Field(24, ge=1, le=512)
    few_shot: int = Field(3, ge=0)
    samples: int = Field(0, ge=0)
    # Benign held-out tokens scored for perplexity and KL (each text cut at 128 tokens).
    ppl_tokens: int = Field(8_000, ge=100)
    # Precision of the extraction attacks' decoding (search and final evaluation). bfloat16 decodes about
    # twice as fast on CPU; perplexity and KL are always taken in the model's own dtype. The search confirms
    # the candidate it is about to choose in the dtype the export loads in, as users run it.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # The user's path: the export loaded in a fresh process with stock transformers, each test person's
    # prompt generated alone (greedy, the three templates, the dtype from_pretrained gives), beside the base
    # loaded the same way; rows of their own in the report and the card.
    user_path: bool = True
    # Adversarial attacks in the final evaluation (never in the search): paraphrased templates, other
    # formats (JSON, a table row, a signature block), the prefix attack and 32-sample decoding, reported
    # in rows of their own. About 3 minutes per variant on SmolLM2 on 2 CPU cores.
    adversarial: bool = True
    # PII documents of the test people scored for the unlearning literature's memorisation metrics: MA and
    # EL_3 (Jang et al. 2022) and their span-restricted forms S-MA and S-EL_3 (SeUL); 0: none.
    memorisation_docs: int = Field(40, ge=0)


class HubSection(_Section):
    """Push the export at the end of `scalpel run` (the same as `scalpel push OUT --repo-id ...`)."""

    repo_id: Optional[str] = Field(None, pattern=r"^[\w.\-]+/[\w.\-]+$")
    # A repository that does not exist yet is created private unless this is false; an existing one keeps
    # its visibility.
    private: bool = True
    revision: Optional[str] = None  # a branch (created when missing); default main
    create_pr: bool = False  # open a pull request instead of committing to the branch
    commit_message: Optional[str] = None


class ScalpelMethod(_Section):
    """PrivacyScalpel: probe → SAE → features → patch (the sections above)."""

    name: Literal["scalpel"] = "scalpel"


class _TrainedMethod(_Section):
    # Checkpoints scored on validation people, in order; training stops at the first that meets the
    # targets (down to the never-seen level) or after the last.
    steps: list[int] = [25, 50, 100]
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(128, ge=8, le=8192)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("steps must be a non-empty list of step counts >= 1")
        return sorted(set(v))


class RmuMethod(_TrainedMethod):
    """RMU (Li et al. 2024): the MLP output projections of layers l-2..l push PII text towards a random
    direction and hold benign text where it was. Defaults from the WMDP reference run."""

    name: Literal["rmu"]
    layer: Optional[int] = Field(None, ge=0)  # null: the probe's layer
    c: float = Field(6.5, gt=0.0)  # steering coefficient: the norm of the random target vector
    alpha: float = Field(1200.0, ge=0.0)  # weight of the retain loss
    lr: float = Field(5e-5, gt=0.0)
    steps: list[int] = [20, 40, 80]


class GradientAscentMethod(_TrainedMethod):
    """Gradient ascent on the PII text (Jang et al. 2022) or NPO (Zhang et al. 2024), optionally with a
    KL-to-base term on benign text (Yao et al. 2023); full fine-tune or LoRA merged at export."""

    name: Literal["gradient_ascent"]
    loss: Literal["ga", "npo"] = "npo"
    beta: float = Field(0.1, gt=0.0)  # NPO's inverse temperature
    retain_kl: float = Field(0.0, ge=0.0)  # weight of KL(base || model) on benign text; 0: none
    lr: float = Field(1e-5, gt=0.0)
    lora_rank: Optional[int] = Field(None, ge=1)  # null: full fine-tune


class DepnMethod(_Section):
    """DEPN (Wu et al. 2023): privacy neurons by integrated gradients, their output weights zeroed."""

    name: Literal["depn"]
    neurons: list[int] = [50, 100, 200, 400]  # edit sizes scored in order (the first meeting the targets wins)
    ig_steps: int = Field(16, ge=1)
    threshold: float = Field(0.1, gt=0.0, le=1.0)  # of the document's largest attribution
    examples: int = Field(100, ge=1)  # PII documents attributed
    layers: Optional[list[int]] = None  # null: every decoder layer
    max_length: int = Field(128, ge=8, le=8192)

    @field_validator("neurons")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("neurons must be a non-empty list of counts >= 1")
        return sorted(set(v))


MethodSection = Annotated[Union[ScalpelMethod, RmuMethod, GradientAscentMethod, DepnMethod],
                          Field(discriminator="name")]


class Recipe(_Section):
    """A whole run. Everything but `model` has a default."""

    model: ModelSpec
    # What removes the PII: PrivacyScalpel (default) or a weight-editing unlearning method, each scored by
    # the same harness and exported as a plain checkpoint.
    method: MethodSection = ScalpelMethod()
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
        # A plain export can only carry plain candidates: score those too (the others stay, for comparison).
        export, iv = (data.get(k) if isinstance(data, dict) else None for k in ("export", "intervention"))
        if isinstance(export, dict) and export.get("mode") == "plain" and (iv is None or isinstance(iv, dict)):
            modes = list((iv or {}).get("patch") or InterventionSection.model_fields["patch"].default)
            if "plain" not in modes:
                data = {**data, "intervention": {**(iv or {}), "patch": [*modes, "plain"]}}
        return data

    @model_validator(mode="after")
    def _exportable_candidates(self) -> "Recipe":
        modes = self.intervention.patch
        if self.export.mode == "plain" and self.export.dtype is not None:
            raise ValueError("export.dtype applies to remote-code exports; a plain export edits the base's weight "
                             "files in place and keeps their dtype: remove export.dtype")
        if self.export.mode == "remote_code" and set(modes) == {"plain"}:
            raise ValueError("intervention.patch lists only plain candidates, which a remote-code export does not "
                             "carry: set export.mode: plain, or add exact or folded to intervention.patch")
        return self


# ---------------------------------------------------------------- loading and friendly errors


def _section_class(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model that owns the last key of `loc`, to list what is allowed there."""
    cls: Any = Recipe
    parts = [p for p in loc[:-1] if isinstance(p, str)]
    while parts:
        part = parts.pop(0)
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        members = [c for c in (typing.get_args(ann) or [ann]) if isinstance(c, type) and issubclass(c, BaseModel)]
        if len(members) > 1 and parts:  # a tagged union (`method`): the next part is the member's tag
            tag = parts.pop(0)
            members = [c for c in members if tag in typing.get_args(c.model_fields["name"].annotation)]
        cls = members[0] if members else None
        if cls is None:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _section_class(loc)
        allowed = sorted(owner.model_fields) if owner else []
        return f"{key}: unknown key; {_did_you_mean(str(loc[-1]), allowed)}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        expected = [s.strip(" '") for s in str(err.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
        return f"{key}: {value!r} is not allowed; {_did_you_mean(str(value), expected)}allowed: {', '.join(expected)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = [typing.get_args(c.model_fields["name"].annotation)[0]
                for c in typing.get_args(Recipe.model_fields["method"].annotation)]
        if kind == "union_tag_not_found":
            return f"{key}: needs a name, one of: {', '.join(tags)}"
        got = err.get("ctx", {}).get("tag", "")
        return f"{key}: name {got!r} is not a method; {_did_you_mean(str(got), tags)}use one of: {', '.join(tags)}"
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f"got {value!r}; "
    return f"{key}: {shown}{msg}"


def parse_recipe(data: Any, *, source: str = "<recipe>", base_dir: Union[str, Path] = ".",
                 check_files: bool = True) -> Recipe:
    """Validate an already-parsed recipe mapping, raising RecipeError with every problem listed.
    `check_files=False` accepts paths that do not exist yet (a plan for another machine)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections (model, data, ...), got {type(data).__name__}")
    try:
        return Recipe.model_validate(data, context={"base_dir": str(base_dir), "check_files": check_files})
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(lines)) from None


def load_recipe(path: Union[str, Path], overrides: Optional[dict[str, Any]] = None, *,
                check_files: bool = True) -> Recipe:
    """Read and validate a YAML recipe; `overrides` maps dotted keys to values (CLI flags)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    data = data if data is not None else {}
    for dotted, value in (overrides or {}).items():
        if isinstance(data, dict):
            _set_dotted(data, dotted, value)
    return parse_recipe(data, source=str(path), base_dir=path.parent, check_files=check_files)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def recipe_yaml(recipe: Recipe) -> str:
    """The validated recipe as YAML (defaults filled in), for reports and cards."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
