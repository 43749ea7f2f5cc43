"""PrivacyScalpel's trade-off search: every candidate's KL on benign text, then attacks on
validation people in order of increasing KL; the least-KL candidate meeting the targets is chosen.
Every score is cached in work/search (one file per candidate), so an interrupted search resumes."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..cache import content_key, write_atomic
from ..data.corpus import benign_texts
from ..evaluate.prefix import prefix_attack
from ..evaluate.tradeoff import (
    Scored,
    Targets,
    Validation,
    candidates,
    choose,
    diluted,
    meets,
    meets_leakage,
    plot_front,
    pooled,
    validation_rows,
    worst_rates,
)
from ..evaluate.utility import (
    REFERENCE_BYTES,
    against_reference,
    generation_diversity,
    reference,
)
from ..models import cast_copy
from ..patch import applied
from ..patch.candidate import Candidate, Mode, patch_for
from ..precision import compute_dtype, device_of
from .analysis import features_stage
from .context import RunContext
from .stage import FEATURES, SEARCH, fold_stage


def search_prompts(benign_path: Optional[str]) -> list[str]:
    """Benign validation prompts for the search's collapse check: prefixes of held-out texts other
    than the ones whose continuations the final evaluation reports."""
    held = benign_texts(benign_path, split="heldout")
    # a tiny held-out set overlaps
    return [" ".join(t.split()[:16]) for t in (held[-48:-16] or held[:8])]


def kl_texts(benign_path: Optional[str]) -> list[str]:
    """The held-out prose every candidate's KL and perplexity are scored on."""
    return benign_texts(benign_path, split="heldout")[:24]


def base_repetition(cache: Path, get_model: Callable, tok, prompts: list[str]) -> float:
    """The base's repeated-4-gram share on the search prompts (the collapse check's reference),
    cached."""
    if not cache.exists():
        rep = generation_diversity(get_model(), tok, prompts)["repetition_4"]
        write_atomic(cache, json.dumps({"repetition": rep}))
    return json.loads(cache.read_text())["repetition"]


def collapse_limit(
    recipe, cache: Path, get_model: Callable, tok, prompts: list[str]
) -> Optional[float]:
    """The most repetition a choice may show: the base's plus the recipe's tolerance (None: no
    check)."""
    if not prompts:
        return None
    return base_repetition(cache, get_model, tok, prompts) + recipe.intervention.collapse_tolerance


def plain_key(mode: Mode, recipe) -> tuple:
    """What a candidate's cache key adds for a plain candidate (the projected layers)."""
    return (recipe.intervention.plain_from,) if Mode(mode) is Mode.PLAIN else ()


def fitting(cands: list[Candidate], ranked: int, ctx: RunContext) -> list[Candidate]:
    """The candidates whose ablation size the ranked latents can fill (the default sizes suit a
    model's SAE of thousands of latents, not every SAE)."""
    kept = [c for c in cands if c.n <= ranked]
    if not kept:
        raise ValueError(
            f"every size in intervention.ablate_n exceeds the {ranked} latents the features stage "
            f"ranked: list sizes up to {ranked}"
        )
    if len(kept) < len(cands):
        left = sorted({c.n for c in cands if c.n > ranked})
        ctx.log(f"search: ablation sizes {left} exceed the {ranked} ranked latents; left out")
    return kept


@dataclass
class Part:
    """One part of the validation split the search attacks, with the features fitted without it
    (with one part: the features of the whole split)."""

    features: object
    val: Validation
    other_people: int = 0  # people the other parts attack with the templates
    # values the other parts attack with their documents' text, by (attack, PII type)
    other_values: dict = field(default_factory=dict)

    def others(self, row: dict) -> int:
        """How many more the other parts attack with `row`'s attack."""
        return self.other_values.get((row["attack"], row["pii_type"]), self.other_people)


def _prefix_counts(val: Validation) -> Counter:
    return Counter((prefix_attack(t.cut), t.pii_type) for t in val.prefix)


def part_count(recipe, inputs) -> int:
    """How many parts the search cuts the validation split into: `intervention.search_folds`, or
    fewer where that would leave a part under two people or values."""
    return min(recipe.intervention.search_folds, len(inputs.fold_units()) // 2)


def validation_parts(recipe, prep, ctx: RunContext, val: Validation) -> list[Part]:
    """The search's cross-fitting (`intervention.search_folds`): each part of the validation split
    with the features stage run again on the documents of the other parts only (cached in the
    search's folder)."""
    inputs, tok = prep.inputs, prep.loaded.tokenizer
    asked, units = recipe.intervention.search_folds, len(inputs.fold_units())
    k = part_count(recipe, inputs)
    if k < asked:
        ctx.log(
            f"search: {units} validation people or values make "
            f"{max(k, 1)} part(s) of two or more, not {asked}"
            + ("" if k > 1 else ": fitted and attacked on the same ones (a flattering choice)")
        )
    if k <= 1:
        return [Part(prep.features, val)]
    folds = inputs.folds(k, recipe.data.seed)
    everything = set().union(*folds)
    found = [
        (
            features_stage(
                recipe,
                inputs.keeping(everything - fold),
                prep.layer,
                prep.sae,
                ctx,
                stage=fold_stage(j),
                about=(("folds", k),),
                loaded=prep.loaded,
                shared=prep.benign,
            ),
            inputs.keeping(fold).validation(tok),
        )
        for j, fold in enumerate(folds)
    ]
    people = sum(len(v.people) for _, v in found)
    values = sum((_prefix_counts(v) for _, v in found), Counter())

    def part(features, v: Validation) -> Part:
        mine = _prefix_counts(v)
        others = {key: n - mine[key] for key, n in values.items()}
        return Part(features, v, people - len(v.people), others)

    return [part(f, v) for f, v in found]


@dataclass
class Search:
    """One search over the recipe's candidates on the prepared model (see `scalpel.Prepared`)."""

    recipe: object
    prep: object
    ctx: RunContext

    def __post_init__(self) -> None:
        iv, ev = self.recipe.intervention, self.recipe.eval
        # where eval.dtype falls back to float32 (`precision`), the attacks already run as users run
        eval_dtype = compute_dtype(ev.dtype, device_of(self.prep.loaded.model))
        self.folder = SEARCH.folder(self.ctx.work)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.val = self.prep.inputs.validation(self.prep.loaded.tokenizer)
        self.parts = validation_parts(self.recipe, self.prep, self.ctx, self.val)
        folds = [fold_stage(j).stored_key(self.ctx.work) for j in range(len(self.parts))]
        greedy = (
            FEATURES.stored_key(self.ctx.work),
            *((("folds", folds),) if len(self.parts) > 1 else ()),
            ev.max_new_tokens,
            ev.few_shot,
            eval_dtype,
            iv.rule,
            iv.score,
            [(t.cut, t.pii_type) for t in self.val.prefix],
        )
        # samples only when set, so the greedy search's cached candidates stay valid
        self.key = SEARCH.key(
            *greedy, *((("samples", iv.search_samples),) if iv.search_samples else ())
        )
        # the greedy search's key: a candidate's KL and perplexity do not depend on how the
        # validation people are attacked, so a sampling search takes them from its files
        self.greedy_key = SEARCH.key(*greedy)
        self.cands = fitting(
            candidates(iv.ablate_n, iv.alpha, iv.patch, iv.context_gate),
            len(self.prep.features.ranking),
            self.ctx,
        )
        self.files = {c: self.folder / f"{self.candidate_key(c)}.json" for c in self.cands}
        self.saved = {c: json.loads(f.read_text()) for c, f in self.files.items() if f.exists()}
        # The dtype the export loads in by default: what users run. A candidate about to be chosen
        # on attacks decoded in eval.dtype (faster) must meet the targets decoded in this one too.
        self.user_dtype = self.recipe.export.dtype or self.recipe.model.dtype
        self.same_dtype = eval_dtype == self.user_dtype
        self._attacker = None

    def candidate_key(self, c: Candidate, key=None) -> str:
        parts = (c.n, c.alpha, c.mode, c.gated, *plain_key(c.mode, self.recipe))
        return content_key(key or self.key, *parts)

    def known_kl(self, c: Candidate) -> Optional[dict]:
        """`c`'s KL and perplexity from the greedy search's file of it, when this search samples
        and that one scored it."""
        if self.greedy_key == self.key:
            return None
        f = self.folder / f"{self.candidate_key(c, self.greedy_key)}.json"
        if not f.exists():
            return None
        found = json.loads(f.read_text())
        return {k: found[k] for k in ("kl", "perplexity")}

    def patch(self, cand: Candidate, features=None):
        """`cand`'s patch, fitted on `features` (default: the whole validation split's)."""
        p = self.prep
        return patch_for(
            p.sae, features or p.features, cand, p.calibration, self.recipe.intervention.plain_from
        )

    def save(self, cand: Candidate) -> None:
        write_atomic(self.files[cand], json.dumps(self.saved[cand]))

    def kl_scores(self) -> None:
        """KL and perplexity on benign held-out text for every candidate not yet scored (cheap: no
        decoding)."""
        model, tok = self.prep.loaded.model, self.prep.loaded.tokenizer
        for cand in [c for c in self.cands if c not in self.saved]:
            known = self.known_kl(cand)
            if known:
                self.saved[cand] = known
                self.save(cand)
        todo = [c for c in self.cands if c not in self.saved]
        if not todo:
            return
        self.prep.calibration.warm(
            [i for c in todo if c.mode is Mode.FOLDED for i in self.prep.features.ablation_set(c.n)]
        )
        texts = kl_texts(self.prep.inputs.benign_path)
        ref = reference(model, tok, texts, max_bytes=REFERENCE_BYTES)
        for cand in tqdm(todo, desc="trade-off search: KL", disable=not self.ctx.progress):
            patch = self.patch(cand)
            self.saved[cand] = against_reference(
                ref, model, lambda: applied(model, self.prep.layer, patch)
            )
            self.save(cand)

    def attacker(self, dtype: str):
        if self._attacker is None or next(self._attacker.parameters()).dtype != getattr(
            torch, dtype
        ):
            self._attacker = None  # one cast copy at a time
            self._attacker = cast_copy(self.prep.loaded.model, dtype)
        return self._attacker

    def patched(self, cand: Candidate, dtype: str, features=None):
        """(the attacking model in `dtype`, the context in which it runs with `cand`'s patch)."""
        attacker = self.attacker(dtype)
        return attacker, applied(attacker, self.prep.layer, self.patch(cand, features))

    def attack(self, cand: Candidate, s: Scored, dtype: str, targets: Targets) -> None:
        """Validation attacks on `cand` decoded in `dtype`, each part of the validation split with
        the patch fitted without it, pooled; the scores keep the worst over every dtype tried. A
        lazy search stops at the first attack whose leaks alone break a target, whatever the other
        parts would show (the rates are then lower bounds)."""
        lazy = self.recipe.intervention.search == "lazy"
        found, complete = [], True
        for part in self.parts:
            stop = (lambda r, p=part: targets.broken_by(diluted(r, p.others(r)))) if lazy else None
            attacker, context = self.patched(cand, dtype, part.features)
            with context:
                rows, complete = validation_rows(
                    attacker,
                    self.prep.loaded.tokenizer,
                    part.val,
                    self.recipe.eval,
                    self.recipe.data.seed,
                    stop,
                    self.recipe.intervention.search_samples,
                )
            if not complete:
                found = [[diluted(r, part.others(r)) for r in rows]]
                break
            found.append(rows)
        leakage, username = worst_rates(pooled(found))
        s.leakage = max(leakage, s.leakage or 0.0)
        s.username = max(username, s.username or 0.0)
        s.complete = (s.complete if dtype != self.recipe.eval.dtype else True) and complete

    def unconfirmed(self, cand: Candidate) -> bool:
        return not self.same_dtype and self.saved[cand].get("confirmed") != self.user_dtype

    def confirm(self, cand: Candidate, s: Scored, targets: Targets) -> None:
        """Attack again decoded as users run the export; the worse of the two counts."""
        self.attack(cand, s, self.user_dtype, targets)
        self.saved[cand].update(
            confirmed=self.user_dtype, leakage=s.leakage, username=s.username, complete=s.complete
        )
        self.save(cand)

    def scored(self) -> dict[Candidate, Scored]:
        return {c: Scored.from_json(c, self.saved[c]) for c in self.cands}


def _attack_in_kl_order(search: Search, scored: dict, targets: Targets, prompts: list[str]) -> None:
    """Attack candidates by increasing KL (a lazy search stops at the first exportable one meeting
    the targets, which is the choice either way); a candidate meeting the leakage targets also gets
    the collapse check."""
    recipe, tok = search.recipe, search.prep.loaded.tokenizer
    lazy, ev_dtype = recipe.intervention.search == "lazy", recipe.eval.dtype
    order = sorted(search.cands, key=lambda c: (scored[c].kl, search.cands.index(c)))
    for cand in tqdm(order, desc="trade-off search: attacks", disable=not search.ctx.progress):
        s = scored[cand]
        touched = False
        if s.leakage is None or (not s.complete and not lazy):
            s.leakage, s.username, touched = None, None, True
            search.attack(cand, s, ev_dtype, targets)
        if meets_leakage(s, targets) and prompts and s.repetition is None:
            touched = True
            attacker, context = search.patched(cand, ev_dtype)
            with context:
                s.repetition = generation_diversity(attacker, tok, prompts)["repetition_4"]
        if touched:
            search.saved[cand].update(
                leakage=s.leakage, username=s.username, repetition=s.repetition, complete=s.complete
            )
            search.save(cand)
        if meets(s, targets) and search.unconfirmed(cand):
            # about to be chosen: it must meet the targets as users run it too
            search.confirm(cand, s, targets)
        if lazy and cand.exportable(recipe.export.mode) and meets(s, targets):
            break


def search_stage(recipe, prep, ctx: RunContext) -> tuple[Scored, dict]:
    """Score the recipe's candidates on validation people and benign KL; choose the least-KL one
    meeting the targets. A candidate meeting them is attacked again decoded in the dtype the export
    loads in (what users run), and counts the worse of the two. Returns (the choice, the summary
    written to search.json)."""
    iv = recipe.intervention
    search = Search(recipe, prep, ctx)
    search.kl_scores()
    scored = search.scored()
    prompts = search_prompts(prep.inputs.benign_path) if iv.collapse_tolerance is not None else []
    limit = collapse_limit(
        recipe,
        search.folder / f"{content_key(search.key, 'base')}.json",
        lambda: search.attacker(recipe.eval.dtype),
        prep.loaded.tokenizer,
        prompts,
    )
    targets = Targets.of(iv, limit)
    for warning in targets.unresolved(len(search.val.people)):
        ctx.log(f"search: {warning}")
    _attack_in_kl_order(search, scored, targets, prompts)
    listed = [scored[c] for c in search.cands]
    # the choice, also when no candidate meets the targets, is confirmed as users run it
    while True:
        chosen, met = choose(
            [scored[c] for c in search.cands if c.exportable(recipe.export.mode)], targets
        )
        if not search.unconfirmed(chosen.candidate):
            break
        search.confirm(chosen.candidate, chosen, targets)
    plot_front(listed, chosen, targets, search.folder / "front.png")
    summary = {
        "export_mode": str(recipe.export.mode),
        "target": iv.leakage_target,
        "username_target": iv.username_target,
        "max_repetition": limit,
        "met": met,
        "folds": len(search.parts),
        "chosen": chosen.to_json(),
        "candidates": [s.to_json() for s in listed],
    }
    (search.folder / "search.json").write_text(json.dumps(summary, indent=2))
    skipped = sum(s.leakage is None for s in listed)
    ctx.log(
        f"trade-off: chose {chosen.candidate.label} (validation leakage "
        f"{100 * chosen.leakage:.0f}%, KL {chosen.kl:.4f}); target {'met' if met else 'NOT met'}"
        + (f"; {skipped} candidates with more KL not attacked (lazy search)" if skipped else "")
        + f"; plot {search.folder / 'front.png'}"
    )
    return chosen, summary
