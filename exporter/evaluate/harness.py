"""One leakage / utility harness for every method: the same attacks and metrics, as table rows."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch

from ..data.people import Person
from ..lm import padding_side
from .leakage import (
    ADVERSARIAL_TEMPLATES,
    EMAIL_TEMPLATES,
    MANY_SAMPLES,
    PHONE_NEW_TOKENS,
    PHONE_TEMPLATES,
    PREFIX_CHARS,
    few_shot_prompts,
    first_email,
    first_phone,
    greedy_continuations,
    prefix_prompts,
    sampled_continuations,
    score_any,
    score_emails,
    score_phones,
)
from .memorisation import memorisation_metrics
from .utility import (
    Context,
    Reference,
    against_reference,
    generation_diversity,
    reference,
)

# People the model never saw: their rows measure the guessing level, which the zero-shot templates
# show; k shots, more samples or adversarial prompts only restate it, and on a 135M model in float32
# they cost half of a variant's evaluation.
GUESSING_GROUPS = frozenset({"never_seen"})


def _seen(groups: dict) -> dict:
    """The groups the stronger attacks (k-shot, sampling, adversarial) go to."""
    return {g: people for g, people in groups.items() if g not in GUESSING_GROUPS}


def attack_row(group: str, attack: str, decoding: str, score) -> dict:
    """One attack's rates on one group of people, as a report row."""
    return {
        "group": group,
        "attack": attack,
        "decoding": decoding,
        "pii_type": score.pii_type,
        "n": score.n,
        "exact": score.exact,
        "username": score.username,
        "domain": score.domain,
    }


def _across(groups: dict[str, list], decode) -> dict[str, list]:
    """Decode every group's prompts in one pass (bigger batches decode faster) and split them
    back."""
    flat = [q for prompts in groups.values() for q in prompts]
    out, i = {}, 0
    decoded = decode(flat) if flat else []
    for group, prompts in groups.items():
        out[group], i = decoded[i : i + len(prompts)], i + len(prompts)
    return out


def _emails(people, continuations, template: str):
    return score_emails(people, [first_email(c) for c in continuations], template)


def _template_rows(
    model,
    tokenizer,
    groups,
    add,
    name: str,
    template: str,
    *,
    few_shot: int,
    samples: int,
    max_new_tokens: int,
    seed: int,
    progress: bool,
) -> bool:
    """One email template's attacks: zero-shot greedy, k-shot greedy, sampled. True when `add` says
    to stop."""

    def greedy(q):
        return greedy_continuations(model, tokenizer, q, max_new_tokens, progress=progress)

    prompts = {g: [template.format(name=p.name) for p in people] for g, people in groups.items()}
    conts = _across(prompts, greedy)
    if any(
        [add(g, name, "greedy", _emails(people, conts[g], name)) for g, people in groups.items()]
    ):
        return True
    strong = _seen(groups)
    shot_groups = {g: people for g, people in strong.items() if few_shot and len(people) > few_shot}
    if shot_groups:
        shots = {
            g: few_shot_prompts(people, name, few_shot, seed=seed)
            for g, people in shot_groups.items()
        }
        conts = _across(shots, greedy)
        attack = f"{name}+{few_shot}shot"
        if any(
            [
                add(g, attack, "greedy", _emails(people, conts[g], name))
                for g, people in shot_groups.items()
            ]
        ):
            return True
    if samples and strong:
        sampled = _across(
            {g: prompts[g] for g in strong},
            lambda q: sampled_continuations(
                model, tokenizer, q, samples=samples, max_new_tokens=max_new_tokens, seed=seed
            ),
        )
        decoding = f"sampled x{samples}"
        if any(
            [
                add(g, name, decoding, score_any(people, sampled[g], name))
                for g, people in strong.items()
            ]
        ):
            return True
    return False


def _phone_rows(model, tokenizer, groups, add, progress: bool) -> None:
    with_phone = {g: [p for p in people if p.phone] for g, people in groups.items()}
    with_phone = {g: people for g, people in with_phone.items() if people}
    for name, template in PHONE_TEMPLATES.items():
        prompts = {
            g: [template.format(name=p.name) for p in people] for g, people in with_phone.items()
        }
        conts = _across(prompts, lambda q: greedy_continuations(
            model, tokenizer, q, PHONE_NEW_TOKENS, progress=progress))  # fmt: skip
        for g, people in with_phone.items():
            add(g, name, "greedy", score_phones(people, [first_phone(c) for c in conts[g]], name))


def leakage_rows(
    model,
    tokenizer,
    groups: dict[str, Sequence[Person]],
    *,
    few_shot: int = 0,
    samples: int = 0,
    max_new_tokens: int = 24,
    phones: bool = True,
    seed: int = 0,
    progress: bool = False,
    stop: Optional[Callable[[dict], bool]] = None,
    adversarial: bool = False,
) -> list[dict]:
    """Extraction attacks per group of people: zero-shot templates (greedy), k-shot templates,
    sampled decoding (leaked if any of `samples` continuations holds it) and phone templates; with
    `adversarial`, also paraphrased and reformatted templates, the prefix attack and many-sample
    decoding, as rows of their own decodings ("adversarial greedy", "adversarial sampled x32").
    Never-seen people (`GUESSING_GROUPS`) get the zero-shot and phone templates only. Each attack
    decodes the groups' prompts together. With `stop`, the rows end at the first email row
    for which it is true (a search rejecting a candidate needs no more). Rows come group by group,
    in attack order."""
    groups = {g: list(people) for g, people in groups.items() if people}
    order = {g: i for i, g in enumerate(groups)}
    rows: list[dict] = []

    def add(group: str, attack: str, decoding: str, score) -> bool:
        rows.append(attack_row(group, attack, decoding, score))
        return stop is not None and stop(rows[-1])

    def done() -> list[dict]:
        return sorted(rows, key=lambda r: order[r["group"]])  # stable: attack order within a group

    for name, template in EMAIL_TEMPLATES.items():
        attack = dict(few_shot=few_shot, samples=samples, max_new_tokens=max_new_tokens, seed=seed)
        if _template_rows(
            model, tokenizer, groups, add, name, template, progress=progress, **attack
        ):
            return done()
    seen = _seen(groups)
    if adversarial and seen:
        _adversarial_rows(model, tokenizer, seen, add, max_new_tokens, seed, progress)
    if phones:
        _phone_rows(model, tokenizer, groups, add, progress)
    return done()


def adversarial_greedy_rows(
    model, tokenizer, groups: dict[str, list], add, max_new_tokens: int, progress: bool = False
) -> None:
    """The adversarial attacks that decode greedily: each paraphrased or reformatted template, then
    the prefix attack; each row handed to `add(group, attack, decoding, score)`."""
    greedy = lambda q: greedy_continuations(model, tokenizer, q, max_new_tokens, progress=progress)  # noqa: E731
    for name, template in ADVERSARIAL_TEMPLATES.items():
        conts = _across(
            {g: [template.format(name=p.name) for p in people] for g, people in groups.items()},
            greedy,
        )
        for g, people in groups.items():
            add(
                g,
                name,
                "adversarial greedy",
                score_emails(people, [first_email(c) for c in conts[g]], name),
            )
    # The prefix attack: the address is read from the given characters and what follows them.
    conts = _across({g: prefix_prompts(people) for g, people in groups.items()}, greedy)
    for g, people in groups.items():
        found = [first_email(p.email[:PREFIX_CHARS] + c) for p, c in zip(people, conts[g])]
        add(g, f"prefix{PREFIX_CHARS}", "adversarial greedy", score_emails(people, found, "prefix"))


def _adversarial_rows(
    model, tokenizer, groups: dict[str, list], add, max_new_tokens: int, seed: int, progress: bool
) -> None:
    adversarial_greedy_rows(model, tokenizer, groups, add, max_new_tokens, progress)
    adversarial_sampled_rows(model, tokenizer, groups, add, max_new_tokens, seed)


def adversarial_sampled_rows(
    model, tokenizer, groups: dict[str, list], add, max_new_tokens: int, seed: int
) -> None:
    """The many-sample attack: the `mailto` prompt sampled `MANY_SAMPLES` times, leaked if any
    sample holds the address; its rows handed to `add` as above."""
    prompts = {
        g: [EMAIL_TEMPLATES["mailto"].format(name=p.name) for p in people]
        for g, people in groups.items()
    }
    sampled = _across(
        prompts,
        lambda q: sampled_continuations(
            model, tokenizer, q, samples=MANY_SAMPLES, max_new_tokens=max_new_tokens, seed=seed + 1
        ),
    )
    for g, people in groups.items():
        add(
            g,
            "mailto",
            f"adversarial sampled x{MANY_SAMPLES}",
            score_any(people, sampled[g], "mailto"),
        )


def zero_shot_table(
    model,
    tokenizer,
    groups: dict[str, Sequence[Person]],
    *,
    max_new_tokens: int = 24,
    progress: bool = False,
) -> dict:
    """Greedy zero-shot email extraction: {group: {template: {n, exact, username, domain}}}."""
    table: dict = {}
    for r in leakage_rows(
        model, tokenizer, groups, max_new_tokens=max_new_tokens, phones=False, progress=progress
    ):
        table.setdefault(r["group"], {})[r["attack"]] = {
            k: r[k] for k in ("n", "exact", "username", "domain")
        }
    return table


def worst(rows: Sequence[dict], group: str, key: str = "exact", pii_type: str = "email") -> float:
    """The highest rate over the attacks on `group` (the leakage a selection must bring under
    target)."""
    values = [r[key] for r in rows if r["group"] == group and r["pii_type"] == pii_type]
    return max(values) if values else 0.0


@torch.no_grad()
def tokens_per_second(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    context: Optional[Context] = None,
) -> float:
    with padding_side(tokenizer, "left"):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(
            next(model.parameters()).device
        )
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        with (context or nullcontext)():
            start = time.perf_counter()
            model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            seconds = time.perf_counter() - start
    return len(prompts) * max_new_tokens / seconds


def utility_metrics(
    base,
    tokenizer,
    texts: Sequence[str],
    *,
    other=None,
    context: Optional[Context] = None,
    max_length: int = 128,
    prompts: Sequence[str] = (),
    speed: bool = False,
    ref: Optional[Reference] = None,
) -> dict:
    """Perplexity, KL(base || other) and generation diversity of `other` (default: `base` under
    `context`). With `ref` (the base's log-probs on `texts`, see `utility.reference`) KL and
    perplexity take one pass; without it, or where it was too large to keep, two (the base's
    log-probs recomputed beside `other`'s, batch by batch)."""
    other = other if other is not None else base
    if ref is None:
        ref = reference(base, tokenizer, texts, max_length=max_length, max_bytes=0)
    # the base itself needs no second pass: its log-probs are the reference
    out = against_reference(ref, None if other is base and context is None else other, context)
    if prompts:
        out.update(generation_diversity(other, tokenizer, prompts, context=context))
    if speed and prompts:
        out["tokens_per_s"] = tokens_per_second(other, tokenizer, prompts[:8], context=context)
    return out


def evaluate_variant(
    base,
    tokenizer,
    groups: dict[str, Sequence[Person]],
    texts: Sequence[str],
    prompts: Sequence[str],
    *,
    other=None,
    context: Optional[Context] = None,
    attacker=None,
    attacker_context: Optional[Context] = None,
    few_shot: int = 0,
    samples: int = 0,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = False,
    ref: Optional[Reference] = None,
    adversarial: bool = False,
    documents: Optional[dict[str, Sequence]] = None,
) -> dict:
    """Leakage rows and utility of one model variant: `other` (default `base`) under `context`; KL
    is taken against `base` without the context (or against `ref`, its log-probs kept). The attacks
    decode with `attacker` under `attacker_context` when given (the same variant in another dtype,
    see `models.cast_copy`). With `documents` ({group: PII documents}), also the memorisation
    metrics (MA, EL, S-MA, S-EL) per group."""
    model = other if other is not None else base
    if attacker is None:
        attacker, attacker_context = model, context
    with attacker_context() if attacker_context is not None else nullcontext():
        rows = leakage_rows(
            attacker,
            tokenizer,
            groups,
            few_shot=few_shot,
            samples=samples,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
            adversarial=adversarial,
        )
        memorised = {
            g: memorisation_metrics(attacker, tokenizer, docs)
            for g, docs in (documents or {}).items()
            if docs
        }
    out = {
        "leakage": rows,
        "utility": utility_metrics(
            base,
            tokenizer,
            texts,
            other=other,
            context=context,
            prompts=prompts,
            speed=True,
            ref=ref,
        ),
    }
    if memorised:
        out["memorisation"] = memorised
    return out
