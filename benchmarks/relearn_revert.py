"""Back to the model before the leaky fine-tune: does undoing part of that fine-tune above the patch
make a distilled export hold against the relearning attack?

A user who fine-tuned a public model on data with PII in it has the model from before that
fine-tune (the reference). Whatever the fine-tune wrote into the layers above the patch is the
difference between the two, so the distilled student can be moved back towards the reference there,
in three ways, each in a copy of the student, every MLP map of layers `--first`..`--last` (default:
the patch's + 1 to the last):

1. `--neurons N ...`: the N neurons whose change acts most on the PII tokens are reset to the
   reference's weights (their input rows and output column). A neuron's change at a token is the
   distance between what it writes there and what the reference's neuron would write from the same
   input; the ranking is its mean over the tokens of PII values (and the token before each) of the
   recipe's PII documents, less its mean over every token of as many benign windows, in the leaky
   base (where the memorised values are still read).
2. `--directions K ...`: each map's change is undone along the K directions of its input that the
   PII tokens use most relative to benign text (the top generalised eigenvectors of the two
   second-moment matrices of that input, in the leaky base): the keys the memorised values are
   looked up by, whatever neurons read them.
3. `--toward B ...`: every MLP weight of those layers (with `--maps NAME ...`, of the named maps
   only) moved the fraction B of the way back to the reference's (B=1: those MLPs are the
   reference's).

With `--repair STEPS`, each edited copy then has the MLP weights of those layers trained, full rank,
towards the student's next-token distribution on the distillation's own texts (a hardened export's
repair, `exporter/harden.py`: AdamW at `--lr`, one batch of `--batch` PII texts and one of benign
windows a step; `--bf16`: in bfloat16 autocast; `--whole`: every token of each benign window, in
pieces of the repair's length, not only its first ones; `--benign-weight W`: the benign batch at
weight W (0: none), not the distillation's; `--warmup N`: the learning rate ramped up over the
first N steps; `--burst N --settle-lr LR2`: only the first N steps at `--lr`, the rest at LR2;
linear decay in every case). The reference plays the part noise plays in
"Distillation robustifies unlearning" (Lee et al. 2025): the edit takes out what the fine-tune wrote
there, the repair gives back only what the student shows, which holds no memorised value.

Each model is attacked on the validation and the test people as it is and after the relearning
attack, as `relearn_noise.py` attacks them (the final evaluation's template attacks; the harness's
relearning budget on other people's PII documents); KL and perplexity on 48 held-out pydoc texts.
`--kl-only` prints each model's KL and attacks none; `--attack NAME ...` attacks only the named rows
(as printed); `--relearn-seeds S ...` runs the relearning attack once per seed (as
`relearn_seeds.py` draws them), each seed's counts in turn.

    python benchmarks/relearn_revert.py --recipe R --work W --reference REF [--candidate 100:0.2]
        [--neurons 1600 6400] [--directions 256 512] [--toward 0.5 1] [--docs 200]
        [--repair STEPS [--lr 1e-4] [--batch 4] [--bf16] [--whole] [--benign-weight W] [--warmup N]
            [--burst N --settle-lr LR2]]
        [--kl-only] [--attack NAME ...] [--relearn-seeds S ...] [--json OUT]

REF is a Hugging Face folder of the model the leaky base was fine-tuned from (for the demo: the
converted SmolLM2 in the user cache, `models/SmolLM2-135M-Instruct...`). W is a work folder of a
run of R; the student is `relearn_noise.py`'s (kept in W/relearn/). Counts only: no name, address
or generated text is printed or written.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from relearn_noise import bench_args, report, setup_of, student_of
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from exporter.distill import autocast_for
from exporter.evaluate.utility import mean_kl
from exporter.harden import HardenConfig, repair
from exporter.mlp_keys import (
    key_directions,
    mlp_inputs,
    mlp_maps,
    mlp_of,
    output_map,
    second_moments,
    token_sets,
    undo_along,
)
from exporter.models import architecture_of
from exporter.run.distilled import config_of, tail_mean

MAX_LENGTH = 128


def out_columns(module) -> torch.Tensor:
    """The output map's weight as (hidden, neurons), whatever the module's layout."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def neuron_change(base, reference, layers: list[int], sets: dict) -> torch.Tensor:
    """(layers, neurons): each neuron's mean change on the PII tokens less its mean on benign
    tokens (the module docstring's ranking)."""
    out = output_map(base)
    norms = []
    for i in layers:
        w, r = out_columns(mlp_maps(base, i)[out]), out_columns(mlp_maps(reference, i)[out])
        norms.append(((w * w).sum(0), (w * r).sum(0), (r * r).sum(0)))
    ref_mid = {}

    def grab(i):
        return lambda _m, inp: ref_mid.__setitem__(i, inp[0].detach())

    hooks = [mlp_maps(reference, i)[out].register_forward_pre_hook(grab(i)) for i in layers]
    sums = {k: torch.zeros(len(layers), norms[0][0].numel()) for k in sets}
    counts = dict.fromkeys(sets, 0)
    try:
        for kind, inputs in mlp_inputs(base, layers, sets):
            for n, i in enumerate(layers):
                with torch.no_grad():
                    mlp_of(reference, i)(inputs[(i, "in")][None])
                a, b = inputs[(i, "mid")], ref_mid[i][0]
                ww, wr, rr = norms[n]
                sq = a * a * ww - 2 * a * b * wr + b * b * rr
                sums[kind][n] += sq.clamp(min=0).sqrt().sum(0)
            counts[kind] += len(inputs[(layers[0], "in")])
    finally:
        for h in hooks:
            h.remove()
    return sums["pii"] / counts["pii"] - sums["benign"] / counts["benign"]


def reset_neurons(model, reference, neurons) -> None:
    """Each (layer, neuron) given to the reference's weights: its output column and its row of
    every input map (and bias entry), in place."""
    out = output_map(model)
    for i, j in neurons:
        mine, theirs = mlp_maps(model, i), mlp_maps(reference, i)
        for name, m in mine.items():
            r = theirs[name]
            along_rows = (name == out) == isinstance(m, Conv1D)  # the neuron's weights are a row
            if along_rows:
                m.weight.data[j] = r.weight.data[j]
            else:
                m.weight.data[:, j] = r.weight.data[:, j]
            if name != out and m.bias is not None:
                m.bias.data[j] = r.bias.data[j]


def toward(model, reference, layers: list[int], fraction: float, maps=None) -> None:
    """Every MLP weight of `layers` (of the maps named in `maps`, default all) moved `fraction` of
    the way to the reference's, in place."""
    for i in layers:
        theirs = mlp_maps(reference, i)
        for name, m in mlp_maps(model, i).items():
            if maps and name not in maps:
                continue
            m.weight.data.lerp_(theirs[name].weight.data, fraction)
            if m.bias is not None:
                m.bias.data.lerp_(theirs[name].bias.data, fraction)


def repaired(model, student, setup, layers: list[int], args) -> dict[str, float]:
    """`model`'s MLP weights of `layers` trained towards `student`'s next-token distribution on the
    distillation's PII texts and benign windows (the benign at the distillation's weight), in
    place; the repair's own KL to the student over its last 10 steps ("pii", "benign")."""
    weights = [m.weight for i in layers for m in mlp_maps(model, i).values()]
    cfg = HardenConfig(
        steps=args.repair, lr=args.lr, batch_size=args.batch,
        benign_weight=(
            config_of(setup.recipe).benign_weight if args.benign_weight is None
            else args.benign_weight
        ),
        whole_benign=args.whole,
        warmup=args.warmup, burst=args.burst, settle_lr=args.settle_lr,
    )  # fmt: skip
    cast = autocast_for(replace(config_of(setup.recipe), dtype="bfloat16"), model)
    curve = repair(
        model, student, setup.tok, setup.texts["pii"], setup.texts["benign"], weights, cfg, True,
        cast=cast if args.bf16 else nullcontext,
    )  # fmt: skip
    return tail_mean(curve, last=10)


def schedule(args) -> str:
    """The repair's learning rates, for a row's name."""
    text = f" at lr {args.lr:g}"
    if args.warmup:
        text += f" after {args.warmup} steps of warmup"
    if args.burst and args.settle_lr is not None:
        text += f" for {args.burst} steps, then {args.settle_lr:g}"
    if args.benign_weight is not None:
        text += f", benign texts at weight {args.benign_weight:g}"
    return text


def main() -> None:
    ap = bench_args(__doc__)
    ap.add_argument("--reference", required=True, help="the model before the leaky fine-tune")
    ap.add_argument("--first", type=int, help="first layer edited (default: the patch's + 1)")
    ap.add_argument("--last", type=int, help="last layer edited (default: the last)")
    ap.add_argument("--neurons", type=int, nargs="*", default=[])
    ap.add_argument("--directions", type=int, nargs="*", default=[])
    ap.add_argument("--toward", type=float, nargs="*", default=[])
    ap.add_argument(
        "--maps", nargs="*", help="--toward moves only these maps of each MLP (e.g. down_proj)"
    )
    ap.add_argument("--docs", type=int, default=200, help="PII documents (and benign windows)")
    ap.add_argument("--repair", type=int, default=0, help="repair steps after each edit")
    ap.add_argument("--lr", type=float, default=1e-4, help="the repair's learning rate")
    ap.add_argument("--batch", type=int, default=4, help="the repair's texts per batch")
    ap.add_argument("--warmup", type=int, default=0, help="the repair's warmup steps")
    ap.add_argument(
        "--benign-weight",
        type=float,
        help="the benign batch's weight in each repair step (default: the distillation's)",
    )
    ap.add_argument(
        "--burst",
        type=int,
        default=0,
        help="only the repair's first BURST steps at --lr, the rest at --settle-lr",
    )
    ap.add_argument("--settle-lr", type=float, help="the learning rate after --burst steps")
    ap.add_argument(
        "--bf16", action="store_true", help="the repair under bfloat16 autocast, where native"
    )
    ap.add_argument(
        "--whole", action="store_true", help="the repair trains on all of each benign window"
    )
    ap.add_argument("--kl-only", action="store_true", help="print each model's KL; no attacks")
    ap.add_argument("--attack", nargs="*", help="attack only these rows (default: every row)")
    args = ap.parse_args()
    if args.burst and args.settle_lr is None:
        ap.error("--burst needs --settle-lr, the learning rate after the burst")

    setup = setup_of(args)
    student, _ = student_of(setup, args)
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32).eval()
    first = args.first if args.first is not None else setup.prep.layer + 1
    last = args.last if args.last is not None else architecture_of(student).num_layers(student) - 1
    layers = list(range(first, last + 1))
    docs, benign = setup.prep.inputs.docs[: args.docs], setup.texts["benign"][: args.docs]
    sets = token_sets(setup.tok, docs, benign, MAX_LENGTH)
    edits = {}
    if args.neurons:
        started = time.perf_counter()
        score = neuron_change(setup.base, reference, layers, sets)
        order = torch.argsort(score.flatten(), descending=True).tolist()
        ranked = [(layers[k // score.shape[1]], k % score.shape[1]) for k in order]
        print(f"{len(ranked)} neurons ranked in {time.perf_counter() - started:.0f} s")
        for n in args.neurons:
            edits[f"{n} neurons reset"] = (reset_neurons, ranked[:n])
    if args.directions:
        started = time.perf_counter()
        moments = second_moments(setup.base, layers, sets)
        print(f"second moments in {time.perf_counter() - started:.0f} s")
        for k in args.directions:
            bases = {
                (i, w): key_directions(moments[(i, w, "pii")], moments[(i, w, "benign")], k)
                for i in layers
                for w in ("in", "mid")
            }
            edits[f"change undone along {k} key directions"] = (undo_along, layers, bases)
    for b in args.toward:
        which = f"MLP maps {'/'.join(args.maps)}" if args.maps else "MLPs"
        edits[f"{which} {b:g} of the way back"] = (toward, layers, b, args.maps)

    models = {}
    for name, (edit, *rest) in edits.items():
        edited = copy.deepcopy(student)
        edit(edited, reference, *rest)
        name = f"{name}, layers {first}..{last}"
        print(f"{name}: KL {mean_kl(setup.base, edited, setup.tok, setup.heldout):.4f}", flush=True)
        if args.repair:
            started = time.perf_counter()
            ends = repaired(edited, student, setup, layers, args)
            name += f", {args.repair} steps of repair{schedule(args)} "
            name += f"({time.perf_counter() - started:.0f} s)"
            kl = mean_kl(setup.base, edited, setup.tok, setup.heldout)
            print(
                f"{name}: KL {kl:.4f}; the repair's KL to the student over its last 10 steps: "
                f"PII {ends['pii']:.4f}, benign {ends['benign']:.4f}",
                flush=True,
            )
        if not args.kl_only and (args.attack is None or name in args.attack):
            models[name] = edited
    if models:
        report(models, setup, args.json)


if __name__ == "__main__":
    main()
