"""What a recipe's stages run on: the model, its PII documents, the people (when known), benign
text; and the activation samples several stages share (harvested once into the user cache)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

from ..activations import harvest, load_shards
from ..cache import cache_root, content_key
from ..data.corpus import benign_texts, read_corpus, read_pii_jsonl
from ..data.leaky import LeakyConfig
from ..data.names import people_from_corpus
from ..data.people import Person, assign_splits, read_people
from ..evaluate.leakage import EMAIL_TEMPLATES, check_prompts_fit
from ..evaluate.prefix import (
    corpus_values,
    document_values,
    normalise,
    prefix_targets,
    split_values,
)
from ..evaluate.tradeoff import Validation
from ..models import cast_copy, resolve_local_path
from ..precision import compute_dtype, precision_note, recipe_device
from ..recipe import ModelSpec
from ..sae import world
from .context import RunContext
from .leaky import make_leaky

SET_ASIDE = "set aside"  # the split of validation people another fold's fit leaves out
HELDOUT_TOKENS = (
    20_000  # held-out activations for the SAE's metrics and the folded-vs-exact agreement
)


@dataclass
class Inputs:
    """What a recipe's stages run on, with built-in sources resolved."""

    model: ModelSpec  # the model to analyse and patch (the leaky model for synthetic data)
    model_id: str  # stable identity of its weights, for cache keys
    docs: list  # PII Documents
    people: Optional[list[Person]]
    benign_path: Optional[str]
    # With no people file: (validation, test) PII values, half each, every document holding a value
    # on its side; the people then are the values written with a name.
    value_split: Optional[tuple[set[str], set[str]]] = None

    def split(self, name: str) -> list[Person]:
        """The people of one split (validation, test, never_seen); none when no people are known."""
        return [p for p in self.people or [] if p.split == name]

    def values(self, split: str) -> set[str]:
        """The normalised PII values of the validation or test split: the people's when a people
        file names them (so no value of a validation person is reported), else the value split's."""
        if self.value_split is not None:
            return self.value_split[0 if split == "validation" else 1]
        people = self.split(split)
        return {normalise(p.email, "email") for p in people} | {
            normalise(p.phone, "phone") for p in people if p.phone
        }

    def validation(self, tokenizer) -> Validation:
        """Whom the search attacks: the validation people and the validation values' documents."""
        prefix = prefix_targets(self.docs, tokenizer, self.values("validation"))
        return Validation(self.split("validation"), prefix)

    def fold_units(self) -> list[set[str]]:
        """What the search's cross-fitting deals out, each a set of normalised values: the
        validation people where a people file names them (a person's values stay together), else
        the validation values (a named address's person follows it)."""
        people = self.split("validation")
        if self.value_split is None and people:
            return [
                {normalise(p.email, "email"), *([normalise(p.phone, "phone")] if p.phone else [])}
                for p in sorted(people, key=lambda p: p.email.lower())
            ]
        return [{v} for v in sorted(self.values("validation"))]

    def folds(self, k: int, seed: int) -> list[set[str]]:
        """The validation split in `k` seeded parts of (about) equal size (see `fold_units`)."""
        units = self.fold_units()
        if len(units) < 2 * k:
            raise ValueError(
                f"{k} parts of {len(units)} validation people or values leave fewer than two in "
                "some part: cut fewer parts (intervention.search_folds)"
            )
        order = list(range(len(units)))
        random.Random(seed).shuffle(order)
        parts: list[set[str]] = [set() for _ in range(k)]
        for i, unit in enumerate(order):
            parts[i % k] |= units[unit]
        return parts

    def keeping(self, values: set[str]) -> "Inputs":
        """These inputs with only the validation values in `values` (and their people) left to
        choose on; the other validation people and values are set aside: neither fitted on nor
        attacked (nor reported: they stay out of the test split)."""

        def kept(p: Person) -> Person:
            if p.split != "validation" or normalise(p.email, "email") in values:
                return p
            return replace(p, split=SET_ASIDE)

        people = [kept(p) for p in self.people] if self.people else self.people
        value_split = self.value_split and (self.value_split[0] & values, self.value_split[1])
        return replace(self, people=people, value_split=value_split)


def resolve_inputs(recipe, ctx: RunContext = RunContext()) -> Inputs:
    """Built-in synthetic data means: fine-tune the recipe's model into the leaky benchmark model
    (cached) and analyse that, with its corpus and ground-truth people."""
    data = recipe.data
    if note := precision_note(recipe_device(recipe.model.device)):
        ctx.log(note)
    if data.pii.builtin == "synthetic":
        leaky = make_leaky(recipe.model, LeakyConfig().sized(data.pii.memorised), ctx=ctx)
        model = ModelSpec(
            path=str(leaky.path), dtype=recipe.model.dtype, device=recipe.model.device
        )
        docs = read_pii_jsonl(leaky.path / "corpus.jsonl", data.pii_types)
        return Inputs(model, f"leaky:{leaky.path.name}", docs, leaky.people, data.benign.path)
    model = recipe.model
    docs = read_corpus(data.pii.path, data.pii_types)
    model_id = model.describe() if model.hub else str(resolve_local_path(model))
    if data.people.path:
        people = assign_splits(
            read_people(data.people.path), [d.text for d in docs], seed=data.seed
        )
        return Inputs(model, model_id, docs, people, data.benign.path)
    value_split = split_values(docs, data.seed)
    people = named_people(docs, value_split[0], ctx) or None
    return Inputs(model, model_id, docs, people, data.benign.path, value_split)


def check_attacks_fit(inputs: Inputs, max_new_tokens: int) -> None:
    """Before any stage runs (minutes on a real model): the search's attacks must fit the model's
    context. Reads only its config and tokenizer; a Hub model is checked when its attacks run."""
    folder = resolve_local_path(inputs.model)
    if folder is None:
        return
    tokenizer = AutoTokenizer.from_pretrained(folder)
    val = inputs.validation(tokenizer)
    prompts = [t.prompt for t in val.prefix] + [
        template.format(name=p.name) for p in val.people for template in EMAIL_TEMPLATES.values()
    ]
    check_prompts_fit(AutoConfig.from_pretrained(folder), tokenizer, prompts, max_new_tokens)


def named_people(docs, validation: set[str], ctx: RunContext) -> list[Person]:
    """With no people file: the corpus's named addresses as people, on the side of the value split
    their address is on."""
    values = corpus_values(docs)
    people = people_from_corpus(docs, validation)
    emails = sum(kind == "email" for kind in values.values())
    ctx.log(
        f"people: no people file; the corpus's {len(values)} PII values split by value, "
        f"{len(validation)} to choose on and {len(values) - len(validation)} to report on; "
        f"{len(people)} of its {emails} addresses have a name written beside them (From: Name "
        "<address>, [mailto:], Name:/Email:, signatures), attacked with the templates too"
    )
    return people


def doc_groups(docs) -> list[set[str]]:
    """The people a document is about, by the emails (or other PII values) it holds."""
    return [{d.text[s.start : s.end].lower() for s in d.spans} for d in docs]


def selection_docs(inputs: Inputs) -> list:
    """PII documents that may inform selection: those about validation people only, or with no
    people file those whose every PII value is a validation value (test values are kept for the
    reported numbers)."""
    if inputs.value_split is not None:
        val = inputs.value_split[0]
        return [d for d in inputs.docs if d.spans and document_values(d) <= val]
    if not inputs.people:
        return list(inputs.docs)
    val = {p.email.lower() for p in inputs.people if p.split == "validation"}
    known = {p.email.lower() for p in inputs.people}
    out = []
    for doc, group in zip(inputs.docs, doc_groups(inputs.docs)):
        emails = {g for g in group if g in known}
        if emails and emails <= val:
            out.append(doc)
    return out


def sae_texts(inputs: Inputs, split: str) -> list:
    """Training text for the SAE: PII documents (every tenth held out) and benign windows."""
    docs = [d for i, d in enumerate(inputs.docs) if (i % 10 == 0) == (split == "heldout")]
    return docs + benign_texts(inputs.benign_path, split=split, mode="windows")


def texts_digest(texts) -> str:
    """Content hash of the harvested text, so cached activations follow the text (and the stdlib's
    version)."""
    h = hashlib.sha256()
    for t in texts:
        h.update((f"{t.text}{t.spans!r}" if hasattr(t, "text") else t).encode("utf-8") + b"\0")
    return h.hexdigest()


def activations_key(recipe, inputs: Inputs, layer: int) -> str:
    """The user-cache key of the SAE's training activations at `layer`."""
    return content_key(
        "acts-v2",
        inputs.model_id,
        layer,
        texts_digest(sae_texts(inputs, "train")),
        recipe.sae.harvest_tokens,
        recipe.data.max_length * 2,
        compute_dtype(recipe.sae.harvest_dtype, recipe_device(recipe.model.device)),
    )


def training_activations(
    recipe, inputs: Inputs, loaded, layer: int, ctx: RunContext = RunContext()
) -> torch.Tensor:
    """The SAE's training activations at `layer`: harvested once into the user cache (each
    data-parallel rank takes every world-th text), then loaded."""
    rank, size = world()
    shard_dir = cache_root() / "activations" / activations_key(recipe, inputs, layer)
    if not (shard_dir / "done").exists():
        harvest(
            cast_copy(loaded.model, recipe.sae.harvest_dtype),
            loaded.tokenizer,
            sae_texts(inputs, "train")[rank::size],
            [layer],
            max_tokens=recipe.sae.harvest_tokens // size,
            shard_dir=shard_dir,
            memory_budget_mb=256,
            shard_prefix=f"r{rank}of{size}-",
            max_length=recipe.data.max_length * 2,
            progress=ctx.progress,
        )
        if size > 1:
            dist.barrier()
        if rank == 0:
            (shard_dir / "done").write_text("complete")
    else:
        ctx.log(f"activations (cached): {shard_dir}")
    return load_shards(sorted(shard_dir.glob("*.safetensors"))).acts[layer]


def calibration_activations(
    recipe, inputs: Inputs, loaded, layer: int, ctx: RunContext, n: int = 50_000
) -> torch.Tensor:
    """A sample of the SAE's training activations (the folded gates are fitted on these; harvested
    in bfloat16 they differ from the model's own by rounding, well inside the gates' margins)."""
    x = training_activations(recipe, inputs, loaded, layer, ctx.quiet())
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.data.seed))[:n]
    return x[pick].float()


def heldout_activations(
    recipe, inputs: Inputs, loaded, layer: int, *, progress: bool = True
) -> torch.Tensor:
    """Held-out activations at `layer`, in the model's own precision."""
    return harvest(
        loaded.model,
        loaded.tokenizer,
        sae_texts(inputs, "heldout"),
        [layer],
        max_tokens=HELDOUT_TOKENS,
        max_length=recipe.data.max_length * 2,
        progress=progress,
    ).acts[layer]
