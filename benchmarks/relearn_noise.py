"""Noise, then repair: does it make a distilled export hold against the relearning attack?

The distilled student changes the layers up to the patch's; the layers above it still hold what the
leaky fine-tune wrote there, and a short fine-tune on other people's PII brings part of it back
(README: "Threat model"). Distilling a noised copy of an unlearnt model from that model is reported
to make the unlearning robust to such tuning ("Distillation robustifies unlearning", Lee et al.
2025: the noise damages what the weights hold, and the repair restores only what the teacher shows).
This tries it on the layers above the patch:

1. the run's chosen patch distilled into the base as the export does (`export.distill`): the
   student;
2. Gaussian noise of each `--sigmas` added to every MLP weight of layers `--noise-from`..L-1 of a
   copy of the student; with `--depn N ...`, instead, the N privacy neurons of those layers zeroed
   (DEPN's integrated gradients of the PII tokens' likelihood in the leaky base, over `--depn-docs`
   of the recipe's PII documents: where the memorised values are stored, not noise spread over
   everything; with `--depn-specific`, ranked by how much more they matter to the PII tokens than
   to benign text);
3. those MLP weights trained full-rank (AdamW, `--lr`, linear decay, `--steps` steps of `--batch`
   PII texts and as many benign windows, the distillation's own texts) towards the student's
   next-token distribution (KL over every real token; benign at the distillation's weight); with
   `--repair neurons`, only the zeroed neurons' own weights (their input rows and output column),
   so that every other weight stays the student's.

The ranking takes 5-17 minutes on SmolLM2 here, so it is kept in W/relearn/ (neuron indices only,
keyed by the recipe's text and the ranking's settings) and read back by the next run;
`--kl-only` prints each model's KL before and after the repair and attacks none, to pick the
settings cheaply.

Each model (the student, each repaired copy) is attacked on the validation and the test people
with the final evaluation's template attacks (greedy, k-shot, sampled), as it is and after the
relearning attack (the harness's budget: the recipe's relearning steps, 100 where it leaves
relearning out, on other people's PII documents); KL and perplexity on 48 held-out pydoc texts.

    python benchmarks/relearn_noise.py --recipe R --work W [--candidate 150:0.2]
        [--sigmas 0.005] [--depn 400 [--depn-specific]] [--noise-from L+1] [--steps 150]
        [--noise-seed 1234] [--repair mlp neurons] [--kl-only] [--no-student]
        [--harden [N:STEPS:LR ...]]
        [--json OUT]

With `--harden` the student is also hardened exactly as a run with R's `export.distill.harden`
hardens it (`exporter/harden.py`), beside the variants above (give `--sigmas` nothing to run only
that: `--sigmas`); `--harden N:STEPS:LR ...` hardens it once per setting instead (R's other
settings, and the run's cached ranking, kept), to trade KL against what relearning brings back.

The student is kept in W/relearn/ too (keyed by the recipe's text and the candidate) and read back
by the next run: the distillation takes about 10 minutes here.

W is a work folder of a run of R (its cached probe, SAE and features are read); the candidate
defaults to W's search choice. Choose on the validation columns; the test columns report. Counts
only: no name, address or generated text is printed or written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from itertools import product
from pathlib import Path
from typing import Optional

import torch
from adversarial_search import candidate_of
from run_args import run_args
from safetensors.torch import load_model, save_model
from who_leaks import hits, parse_candidate

from exporter.cache import atomic_dir, content_key, write_atomic
from exporter.distill import distil
from exporter.evaluate.summary import markdown_table
from exporter.evaluate.utility import mean_kl, perplexity
from exporter.harden import (
    HardenConfig,
    mlp_weights,
    repair,
    specific_neurons,
    zero_neurons,
)
from exporter.methods.depn import attributed_docs, attributions, rank_neurons
from exporter.models import architecture_of
from exporter.recipe import load_recipe
from exporter.recipe.methods import DepnMethod
from exporter.recipe.schema import DEFAULT_RELEARN_STEPS
from exporter.relearn import Budget, relearned, relearning_texts
from exporter.run.context import RunContext
from exporter.run.distilled import config_of, distill_texts, hardened, tail_mean
from exporter.run.scalpel import prepare
from exporter.threat import upper_bound


def noised(model, sigma: float, first: int, seed: int):
    """A copy of `model` with N(0, sigma^2) added to every MLP weight of layers `first`.. (seeded),
    those weights, and no masks (the repair trains them whole)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    weights = list(mlp_weights(out, first).values())
    for w in weights:
        w.data.add_(sigma * torch.randn(w.shape, generator=gen).to(w.dtype))
    return out, weights, None


def privacy_neurons(
    setup: "Setup", first: int, docs: int, seed: int, specific: bool = False
) -> list[tuple[int, int]]:
    """(layer, neuron) of layers `first`.. in DEPN's order (most documents first), attributed in the
    leaky base over `docs` of the recipe's PII documents (drawn as DEPN draws them, at DEPN's
    defaults otherwise). `specific`: ranked as a hardened export ranks them (`harden.py`), by how
    much more a neuron matters to the PII tokens than to every token of as many benign windows."""
    spec = DepnMethod(name="depn")
    chosen = attributed_docs(setup.prep.inputs.docs, docs, seed)
    if specific:
        cfg = HardenConfig(documents=docs, ig_steps=spec.ig_steps, rank_length=spec.max_length)
        benign = setup.texts["benign"][:docs]
        return specific_neurons(setup.base, setup.tok, chosen, benign, first, cfg)
    layers = list(range(first, architecture_of(setup.base).num_layers(setup.base)))
    attr = attributions(
        setup.base, setup.tok, chosen, layers, steps=spec.ig_steps, max_length=spec.max_length,
        progress=True,
    )  # fmt: skip
    return [(layers[li], j) for li, j in rank_neurons(attr, spec.threshold).tolist()]


def ranked_neurons(setup: "Setup", args, first: int) -> list[tuple[int, int]]:
    """`privacy_neurons`, read from W/relearn/ when a run with the same recipe and settings ranked
    them before (the ranking is the slow part)."""
    key = json.dumps(
        [Path(args.recipe).read_text(), first, args.depn_docs, args.noise_seed, args.depn_specific]
    )
    path = Path(args.work) / "relearn" / f"neurons-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    path = path.with_suffix(".json")
    if path.exists():
        print(f"privacy neurons (cached): {path}")
        return [tuple(n) for n in json.loads(path.read_text())]
    started = time.perf_counter()
    ranked = privacy_neurons(setup, first, args.depn_docs, args.noise_seed, args.depn_specific)
    print(f"{len(ranked)} privacy neurons ranked in {time.perf_counter() - started:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(ranked))
    return ranked


def own_weights(model, neurons: list[tuple[int, int]]) -> tuple[list, list]:
    """The weights of the MLPs holding `neurons`, and for each a mask of those neurons' own rows
    (inputs) and columns (output): the repair trains only those entries."""
    arch = architecture_of(model)
    by_layer: dict[int, list[int]] = {}
    for layer, j in neurons:
        by_layer.setdefault(layer, []).append(j)
    weights, masks = [], []
    for layer, js in sorted(by_layer.items()):
        block = model.get_submodule(f"{arch.layers}.{layer}")
        out = block.get_submodule(arch.mlp_out)
        for module in block.mlp.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            mask = torch.zeros_like(module.weight)
            if module is out:  # (hidden, intermediate): a column per neuron
                mask[:, js] = 1
            else:  # the input projections, (intermediate, hidden): a row per neuron
                mask[js, :] = 1
            weights.append(module.weight)
            masks.append(mask)
    return weights, masks


def zeroed(model, neurons: list[tuple[int, int]], first: int, own: bool = False):
    """A copy of `model` with `neurons` zeroed (DEPN's edit), and what the repair trains: the MLP
    weights of layers `first`.. (no masks), or (`own`) only the zeroed neurons' own entries."""
    out = copy.deepcopy(model)
    zero_neurons(out, neurons)
    if own:
        return (out, *own_weights(out, neurons))
    return out, list(mlp_weights(out, first).values()), None


def repaired(model, weights, masks, teacher, tok, texts: dict, args, benign_weight: float):
    """`model` with `weights` (only their `masks`' entries, where given) trained towards `teacher`'s
    next-token distribution on the distillation's PII and benign texts (a hardened export's
    repair), the other weights frozen while it trains."""
    cfg = HardenConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch, max_length=96,
        benign_weight=benign_weight,
    )  # fmt: skip
    repair(model, teacher, tok, texts["pii"], texts["benign"], weights, cfg, False, masks)
    return model


def leaked(model, tok, splits: dict, ev, seed: int) -> dict[str, tuple[int, int]]:
    """Per split: (people written exactly under any attack, under the worst single attack)."""
    out = {}
    for name, people in splits.items():
        found = hits(model, tok, people, ev, seed)
        out[name] = (len(set().union(*found.values())), max(len(v) for v in found.values()))
    return out


@dataclass
class Setup:
    """A run's leaky base, chosen patch, distillation texts, people and relearning budget."""

    recipe: object
    prep: object
    cand: object
    texts: dict
    splits: dict
    heldout: list
    budget: Budget
    seeds: list[int]  # the relearning attack's seeds (its LoRA's initialisation and texts)

    @property
    def tok(self):
        return self.prep.loaded.tokenizer

    @property
    def base(self):
        return self.prep.loaded.model


def bench_args(doc: str) -> argparse.ArgumentParser:
    """The arguments every relearning-defence benchmark takes."""
    ap = run_args(doc)
    ap.add_argument("--candidate", help="N:alpha, folded and gated (default: W's search choice)")
    ap.add_argument("--json")
    ap.add_argument(
        "--relearn-seeds",
        "--seeds",
        type=int,
        nargs="+",
        help="attack each model once per relearning seed (default: the recipe's seed)",
    )
    return ap


def setup_of(args) -> Setup:
    recipe = load_recipe(args.recipe)
    prep = prepare(recipe, RunContext(Path(args.work), progress=False, log=print))
    prep.loaded.model.eval()
    if args.candidate:
        cand = parse_candidate(args.candidate)
    else:
        cand = candidate_of(
            json.loads((Path(args.work) / "search" / "search.json").read_text())["chosen"]
        )
    texts = distill_texts(recipe, prep.inputs)
    # the recipe's relearning budget; a recipe that leaves relearning out gets the default one
    budget = Budget(steps=recipe.relearn_steps or DEFAULT_RELEARN_STEPS)
    seeds = args.relearn_seeds or [recipe.data.seed]
    splits = {s: prep.inputs.split(s) for s in ("validation", "test")}
    return Setup(recipe, prep, cand, texts, splits, texts["heldout_benign"][:48], budget, seeds)


def student_of(setup: Setup, args):
    """The chosen patch distilled into the base as the export does, and its wall time: read from
    W/relearn/ when a run with the same recipe and candidate distilled it before (the time then is
    the first run's)."""
    key = content_key(Path(args.recipe).read_text(), str(setup.cand), setup.prep.layer)
    path = Path(args.work) / "relearn" / f"student-{key}"
    student = copy.deepcopy(setup.base)
    if (path / "model.safetensors").exists():
        load_model(student, path / "model.safetensors")
        print(f"distilled student (cached): {path}")
        return student.eval(), json.loads((path / "seconds.json").read_text())
    started = time.perf_counter()
    student = distil(
        student, setup.tok, setup.prep.layer, setup.prep.patch(setup.cand), setup.texts["pii"],
        setup.texts["benign"], config_of(setup.recipe), progress=False,
    ).model  # fmt: skip
    seconds = time.perf_counter() - started
    with atomic_dir(path, overwrite=True) as tmp:  # weights only; no text
        save_model(student, str(tmp / "model.safetensors"))
        (tmp / "seconds.json").write_text(json.dumps(seconds))
    return student, seconds


def relearned_leaks(model, setup: Setup, seed: int) -> dict[str, tuple[int, int]]:
    """`leaked` after the relearning attack drawn with `seed` (its LoRA's initialisation and which
    other people's documents it tunes on), the recipe's budget otherwise."""
    budget = dataclasses.replace(setup.budget, seed=seed)
    texts = relearning_texts(
        "other_people", setup.prep.inputs.benign_path, budget.steps * budget.batch_size, seed
    )
    tuned = relearned(model, setup.tok, texts, budget, progress=False)
    return leaked(tuned, setup.tok, setup.splits, setup.recipe.eval, setup.recipe.data.seed)


def interval(hits: int, n: int) -> tuple[float, float]:
    """Two-sided 95% Clopper-Pearson interval of `hits` of `n`."""
    low = 0.0 if hits == 0 else 1 - upper_bound(n - hits, n, 0.975)
    return low, upper_bound(hits, n, 0.975)


def pooled(counts: list[int], people: int) -> str:
    """The rate of `counts` (people of `people`, one per seed) pooled over the seeds, with its
    interval: one seed draws one tuning among many."""
    hits, n = sum(counts), people * len(counts)
    low, high = interval(hits, n)
    return f"{100 * hits / n:.1f}% ({100 * low:.1f}-{100 * high:.1f}%)"


def report(models: dict, setup: Setup, json_path: Optional[str]) -> None:
    """Each model attacked as it is and after the relearning attack; KL and perplexity on the
    held-out prose; a table of counts (and `json_path`)."""
    ev, seed, tok, splits = setup.recipe.eval, setup.recipe.data.seed, setup.tok, setup.splits
    rows, found = [], {}
    for name, model in models.items():
        as_is = leaked(model, tok, splits, ev, seed)
        after = {s: relearned_leaks(model, setup, s) for s in setup.seeds}
        kl = mean_kl(setup.base, model, tok, setup.heldout)
        ppl = perplexity(model, tok, setup.heldout)
        one = after[setup.seeds[0]] if len(setup.seeds) == 1 else after
        found[name] = {"kl": kl, "perplexity": ppl, "as_is": as_is, "relearned": one}
        rows.append(
            [name, f"{kl:.4f}", f"{ppl:.2f}"]
            + [f"{as_is[s][0]}" for s in splits]
            + [" · ".join(f"{a[sp][0]} ({a[sp][1]})" for a in after.values()) for sp in splits]
        )
        if len(setup.seeds) > 1:
            people = len(splits["test"])
            rows[-1] += [pooled([a["test"][i] for a in after.values()], people) for i in (0, 1)]
    header = ["model", "KL", "perplexity", "validation, as is", "test, as is"]
    seeds = f", seeds {' · '.join(map(str, setup.seeds))}" if len(setup.seeds) > 1 else ""
    header += [f"{s}, relearned{seeds}: any attack (worst one)" for s in splits]
    if len(setup.seeds) > 1:
        header += ["test, pooled over seeds: any attack", "worst one"]
    print(f"people written exactly (of {len(splits['test'])} per split)")
    print(markdown_table(header, rows))
    if json_path:
        Path(json_path).write_text(json.dumps(found, indent=2))


def harden_variants(recipe, given: Optional[list[str]]) -> list:
    """The recipes to harden the student as: none without `--harden`, the recipe's own with it
    alone, else one per N:STEPS:LR (the recipe's other hardening settings kept)."""
    if given is None:
        return []
    if not given:
        return [recipe]
    out = []
    for text in given:
        n, steps, lr = text.split(":")
        spec = recipe.export.distill.harden.model_copy(
            update={"neurons": int(n), "steps": int(steps), "lr": float(lr)}
        )
        distill = recipe.export.distill.model_copy(update={"harden": spec})
        out.append(
            recipe.model_copy(
                update={"export": recipe.export.model_copy(update={"distill": distill})}
            )
        )
    return out


def main() -> None:
    ap = bench_args(__doc__)
    ap.add_argument("--sigmas", type=float, nargs="*", default=[0.005])
    ap.add_argument("--noise-from", type=int, help="first noised layer (default: the patch's + 1)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--noise-seed", type=int, default=1234)
    ap.add_argument("--depn", type=int, nargs="*", default=[], help="privacy neurons zeroed")
    ap.add_argument("--depn-docs", type=int, default=DepnMethod(name="depn").examples)
    ap.add_argument(
        "--depn-specific", action="store_true", help="rank by PII over benign attribution"
    )
    ap.add_argument(
        "--repair", choices=["mlp", "neurons"], nargs="+", default=["mlp"],
        help="train every MLP weight above the patch, or only the zeroed neurons' own (each given)",
    )  # fmt: skip
    ap.add_argument(
        "--kl-only", action="store_true", help="KL before and after the repair; no attacks"
    )
    ap.add_argument("--no-student", action="store_true", help="leave the student's row out")
    ap.add_argument(
        "--harden", nargs="*", metavar="N:STEPS:LR",
        help="also the student hardened as a run hardens it (the recipe's export.distill.harden; "
        "its ranking kept in W/distill-neurons, where a run reads it back), or once per "
        "N:STEPS:LR given (neurons, repair steps, learning rate)",
    )  # fmt: skip
    args = ap.parse_args()

    setup = setup_of(args)
    student, seconds = student_of(setup, args)
    models = {} if args.no_student else {f"distilled ({seconds:.0f} s)": student}
    first = args.noise_from if args.noise_from is not None else setup.prep.layer + 1
    benign_weight = config_of(setup.recipe).benign_weight
    damages = []
    if args.depn:
        ranked = ranked_neurons(setup, args, first)
        for n, repair in product(args.depn, args.repair):
            own = repair == "neurons"
            if own and n == 0:
                continue  # no neuron of its own to train
            label = f"{min(n, len(ranked))} privacy neurons zeroed"
            label += " (their own weights repaired)" if own else ""
            damages.append((label, partial(zeroed, student, ranked[:n], first, own)))
    else:
        for sigma in args.sigmas:
            noise = partial(noised, student, sigma, first, args.noise_seed)
            damages.append((f"noise {sigma}", noise))
    for recipe in harden_variants(setup.recipe, args.harden):
        started = time.perf_counter()
        ctx = RunContext(Path(args.work), progress=True, log=print)
        got = hardened(recipe, setup.prep, copy.deepcopy(student), setup.texts, ctx)
        lr = recipe.export.distill.harden.lr
        label = f"+ hardened: {len(got.neurons)} privacy neurons, {len(got.curve)} repair steps"
        label += f" at lr {lr:g} ({time.perf_counter() - started:.0f} s)"
        if args.kl_only:
            kl = mean_kl(setup.base, got.model, setup.tok, setup.heldout)
            ends = tail_mean(got.curve, last=10)
            print(
                f"{label}: KL {kl:.4f} on held-out prose; KL to the student over the last "
                f"{min(10, len(got.curve))} repair steps: PII {ends['pii']:.4f}, "
                f"benign {ends['benign']:.4f}"
            )
            continue
        models[label] = got.model
    for label, damage in damages:
        started = time.perf_counter()
        copy_, weights, masks = damage()
        if args.depn:
            kl = mean_kl(setup.base, copy_, setup.tok, setup.heldout)
            print(f"{label}: KL {kl:.4f} before the repair")
        fixed = repaired(
            copy_, weights, masks, student, setup.tok, setup.texts, args, benign_weight
        )
        label = f"+ {label} on layers {first}.. and {args.steps} steps of repair"
        if args.kl_only:
            kl = mean_kl(setup.base, fixed, setup.tok, setup.heldout)
            print(f"{label}: KL {kl:.4f} after the repair ({time.perf_counter() - started:.0f} s)")
            continue
        models[f"{label} ({time.perf_counter() - started:.0f} s)"] = fixed
    if not args.kl_only:
        report(models, setup, args.json)


if __name__ == "__main__":
    main()
