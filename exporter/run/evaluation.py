"""The one final evaluation: variants of a model (the base, a patch attached in-process, an edited
copy, another checkpoint) attacked and measured by the same harness on the same people and text."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..cache import write_atomic
from ..data.corpus import benign_texts, read_pii_jsonl
from ..data.people import read_people
from ..evaluate.harness import evaluate_variant
from ..evaluate.memorisation import documents_of
from ..evaluate.prefix import normalise, prefix_rows, prefix_targets
from ..evaluate.user_path import merge, user_path_rows
from ..evaluate.utility import REFERENCE_BYTES, reference
from ..models import cast_copy, load_checkpoint, resolve_local_path, spec_for
from ..patch import applied
from ..recipe import EvalSection
from ..relearn import KINDS as RELEARN_KINDS
from ..relearn import Budget, relearned, relearning_texts
from ..threat import RELEARNED
from .context import RunContext


@dataclass
class Variant:
    """One model the final evaluation measures: the base itself (none given), the base with
    `patch` attached in-process at the evaluation's layer, or another `model` (an edited copy, a
    loaded export), with `patch` attached to it when given. `build` makes that model when it is
    needed (a relearning fine-tune): never, when the variant's results were kept by an interrupted
    run."""

    name: str
    patch: Optional[object] = None
    model: Optional[object] = None
    build: Optional[Callable[[], object]] = None

    def edited(self):
        """The model this variant measures instead of the base, or None for the base."""
        return self.model if self.model is not None or self.build is None else self.build()


@dataclass
class Setting:
    """Who is attacked and what text utility is measured on: the same for every variant."""

    groups: dict  # {group: people}
    texts: list[str]  # benign held-out prose for perplexity / KL
    prompts: list[str]  # benign generation prompts (collapse check, speed)
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 0
    # {group: PII documents} for the memorisation metrics
    documents: dict = field(default_factory=dict)
    prefix: list = field(default_factory=list)  # corpus-derived attacks on the test values


def utility_texts(
    benign_path: Optional[str], tokenizer, tokens: int, max_length: int = 128
) -> tuple[list[str], list[str]]:
    """Held-out benign prose for perplexity / KL (texts until `tokens` scored tokens, each cut at
    `max_length`), and generation prompts (prefixes of the last 16 held-out texts, never scored)."""
    held = benign_texts(benign_path, split="heldout")
    pool, prompts = held[:-16] or held, [" ".join(t.split()[:16]) for t in held[-16:]]
    lengths = [min(len(ids), max_length) - 1 for ids in tokenizer(pool)["input_ids"]]
    texts, total = [], 0
    for text, n in zip(pool, lengths):
        if total >= tokens:
            break
        texts.append(text)
        total += max(n, 0)
    return texts, prompts


def test_documents(docs: Sequence, test_values: set[str], ev: EvalSection) -> dict:
    """{"test": the PII documents holding a test value} for the memorisation metrics."""
    found = documents_of(docs, test_values, ev.memorisation_docs) if ev.memorisation_docs else []
    return {"test": found} if found else {}


def recipe_setting(recipe, inputs, tokenizer) -> Setting:
    """The final evaluation of a recipe's run: test and never-seen people (when known), the recipe's
    benign text, and the corpus-derived attacks on the test values (the test people's, or with no
    people file the test half of the value split)."""
    ev = recipe.eval
    groups = {g: people for g in ("test", "never_seen") if (people := inputs.split(g))}
    texts, prompts = utility_texts(inputs.benign_path, tokenizer, ev.ppl_tokens)
    test = inputs.values("test")
    targets = prefix_targets(inputs.docs, tokenizer, test)
    # the memorisation metrics score the documents of test addresses (of any test value when none)
    documents = test_documents(inputs.docs, {v for v in test if "@" in v} or test, ev)
    return Setting(groups, texts, prompts, ev, recipe.data.seed, documents, targets)


def evaluate_variants(
    base,
    tokenizer,
    variants: Sequence[Variant],
    setting: Setting,
    *,
    layer: Optional[int] = None,
    ctx: RunContext = RunContext(),
    ref=None,
    kept: Optional[Path] = None,
) -> dict:
    """{variant name: {"leakage": rows, "utility": ..., "memorisation": ...}}; KL is taken against
    `base`. The attacks decode in `eval.dtype`: the base and its in-process patches share one cast
    copy. `kept`: a folder holding each finished variant's results, so that an interrupted
    evaluation resumes with the variant it was on (its caller keys the folder by content)."""
    ev = setting.eval
    common = dict(
        few_shot=ev.few_shot,
        samples=ev.samples,
        max_new_tokens=ev.max_new_tokens,
        seed=setting.seed,
        progress=ctx.progress,
        ref=ref
        if ref is not None
        else reference(base, tokenizer, setting.texts, max_bytes=REFERENCE_BYTES),
        adversarial=ev.adversarial,
        documents=setting.documents,
    )
    shared = None
    out = {}
    for v in variants:
        done = Path(kept) / f"{_file_name(v.name)}.json" if kept is not None else None
        if done is not None and done.exists():
            out[v.name] = json.loads(done.read_text())
            ctx.log(f"final evaluation: {v.name} (kept from an earlier, interrupted run)")
            continue
        other = v.edited()
        if other is not None:
            model, attacker = other, cast_copy(other, ev.dtype)
        else:
            shared = shared if shared is not None else cast_copy(base, ev.dtype)
            model, attacker = base, shared
        on_base = on_attacker = None
        if v.patch is not None:  # inserted in the model and its cast copy, as an export loads it
            on_base = partial(applied, model, layer, v.patch)
            on_attacker = partial(applied, attacker, layer, v.patch)
        out[v.name] = evaluate_variant(
            base, tokenizer, setting.groups, setting.texts, setting.prompts, other=other,
            context=on_base, attacker=attacker, attacker_context=on_attacker, **common,
        )  # fmt: skip
        if setting.prefix:  # the corpus-derived attacks, on the test values, the same way
            with on_attacker() if on_attacker is not None else nullcontext():
                out[v.name]["leakage"] += prefix_rows(
                    attacker, tokenizer, setting.prefix, group="test",
                    max_new_tokens=ev.max_new_tokens, seed=setting.seed, progress=ctx.progress,
                )  # fmt: skip
        if done is not None:
            write_atomic(done, json.dumps(out[v.name]))
        ctx.log(f"final evaluation: {v.name} done")
    return out


def _file_name(name: str) -> str:
    """A variant's name as a file name (names hold spaces and quotes)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "variant"


def relearned_variants(
    recipe, inputs, model, tokenizer, ctx: RunContext, *, layer=None, patch=None, kinds=None
) -> list[Variant]:
    """The relearning attack on `model` (with `patch` inserted at `layer`, as a remote-code export
    runs): one variant per kind of text (`kinds`, default every kind), each tuned within the same
    budget (`relearn_steps`)."""
    steps = recipe.relearn_steps
    if not steps:
        return []
    budget = Budget(steps=steps, seed=recipe.data.seed)
    found = []
    for kind, label in RELEARN_KINDS.items():
        if kinds is not None and kind not in kinds:
            continue
        texts = relearning_texts(
            kind, inputs.benign_path, steps * budget.batch_size, recipe.data.seed
        )

        def tune(texts=texts, label=label):
            ctx.log(f"relearning attack: {steps} LoRA steps on {label}")
            return relearned(
                model, tokenizer, texts, budget, layer=layer, patch=patch, progress=ctx.progress
            )

        found.append(Variant(f"{RELEARNED} {label}", patch, build=tune))
    return found


def _people_groups(people_path: Path, groups: Optional[list[str]]) -> dict:
    if not people_path.is_file():
        raise ValueError(
            f"no people file at {people_path}: pass --people FILE (JSONL of name, email, optional "
            "phone and split) naming the people whose PII to test"
        )
    persons = read_people(people_path)
    splits = list(dict.fromkeys(p.split or "all" for p in persons))
    wanted = groups or ([s for s in ("test", "never_seen") if s in splits] or splits)
    unknown = sorted(set(wanted) - set(splits))
    if unknown:
        raise ValueError(f"people groups {unknown} are not in {people_path}; it has {splits}")
    return {g: [p for p in persons if (p.split or "all") == g] for g in wanted}


def _corpus_documents(base_dir: Path, groups: dict, ev: EvalSection) -> dict:
    """The test people's PII documents from the base's `corpus.jsonl` (as `scalpel make-leaky`
    writes it)."""
    corpus = base_dir / "corpus.jsonl"
    if not (corpus.is_file() and groups.get("test") and ev.memorisation_docs):
        return {}
    emails = {normalise(p.email, "email") for p in groups["test"]}
    return test_documents(read_pii_jsonl(corpus), emails, ev)


def compare_models(
    model: str,
    against: str,
    *,
    people: Optional[str] = None,
    benign: Optional[str] = None,
    groups: Optional[list[str]] = None,
    eval_cfg: Optional[EvalSection] = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
    clients: Optional[dict[str, Optional[str]]] = None,
    ctx: RunContext = RunContext(),
) -> dict:
    """The final evaluation on any pair: `model` (e.g. an export) against `against` (its base).
    People default to `people.jsonl` beside the base (as `scalpel make-leaky` writes it). The
    user's-path rows come from each of `clients` ({engine: its venv's python or None}; default
    transformers here)."""
    ev = eval_cfg or EvalSection()
    chosen = _people_groups(Path(people) if people else Path(against) / "people.jsonl", groups)
    base, tok = load_checkpoint(against, dtype=dtype, trust_remote_code=trust_remote_code)
    other, other_tok = load_checkpoint(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if other_tok.get_vocab() != tok.get_vocab():
        raise ValueError(
            f"{model} and {against} have different vocabularies: KL and a shared harness need "
            "models with the same tokenizer"
        )
    texts, prompts = utility_texts(benign, tok, ev.ppl_tokens)
    setting = Setting(
        chosen, texts, prompts, ev, seed, _corpus_documents(Path(against), chosen, ev)
    )
    out = evaluate_variants(
        base, tok, [Variant("base"), Variant("patched", model=other)], setting, ctx=ctx
    )
    folders = {
        v: resolve_local_path(spec_for(src)) for v, src in (("base", against), ("patched", model))
    }
    if ev.user_path and all(folders.values()):
        group = "test" if "test" in chosen else next(iter(chosen))
        for client, python in (clients or {"transformers": None}).items():
            found = user_path_rows(
                folders, {group: chosen[group]}, max_new_tokens=ev.max_new_tokens,
                client=client, python=python,
            )  # fmt: skip
            merge(out, found)
            ctx.log(f"evaluation: user's path through {client} done")
    out["models"] = {"base": str(against), "patched": str(model)}
    return out
