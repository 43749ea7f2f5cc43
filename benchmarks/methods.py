"""Every method on the demo's leaky SmolLM2, one table: PrivacyScalpel's modes beside the unlearning
baselines (RMU, gradient ascent, NPO, DEPN), all scored by the same harness on the same test and
never-seen people.

    python benchmarks/methods.py --work W [--methods rmu npo ga depn] [--json OUT] [--relearn 100]
        [--relearn-on benign other_people] [--clean] [--plot relearn.png]

W is the work folder of `scalpel demo --work W` (or `scalpel run` of the demo recipe): its cached
probe, SAE, features and search give PrivacyScalpel's choice (made on validation people). The patch
is evaluated as chosen (folded), as ablation only, as steering only, exact, and plain from the
patch's layer, beside its control (random latents matched on firing frequency plus a random steering
direction). Each baseline walks its own path (training steps or neuron counts) from the recipe's
defaults, stops at the first point that meets the same validation targets, and is evaluated once
there; DEPN has a random-neuron control. Each baseline's edited tensors are cached in
W/method-<method> (the stage `scalpel run` of a method's recipe keeps), so a re-run only
re-evaluates. `distilled-val` / `distilled-all` are the chosen
patch distilled into the weights from the validation people's documents / from every PII document
(the run's distill stage, cached in W).

Below the table, the weights-access rows: each column's weights loaded with no patch (a remote-code
patch's are the base's), and with `--relearn STEPS` the relearning attack on each (a LoRA fine-tune
of STEPS batches on benign prose and on other people's PII documents, then every attack again; a
remote-code patch stays inserted while its base is tuned). `--clean` adds the model before the leaky
fine-tune, which never saw anyone: tuned the same way, it shows what guessing from other people's
documents gets (the floor), and `--plot` draws each column's leakage after relearning against its
KL.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exporter.evaluate.summary import comparison_rows, markdown_table
from exporter.recipe import load_recipe, parse_recipe
from exporter.relearn import KINDS as RELEARN_KINDS

# The recipes' defaults, with longer paths for the training methods (each stops at the first point
# meeting the validation targets) and Jang et al.'s learning rate for gradient ascent; GA and NPO
# keep a KL-to-base term on benign prose (Yao et al.), without which they wreck the model long
# before the PII is gone.
STEPS = [20, 40, 80, 160]
METHODS = {
    "rmu": {"name": "rmu", "steps": STEPS},
    "ga": {
        "name": "gradient_ascent",
        "loss": "ga",
        "lr": 5e-5,
        "retain_kl": 1.0,
        "batch_size": 8,
        "steps": STEPS,
    },
    "npo": {
        "name": "gradient_ascent",
        "loss": "npo",
        "lr": 5e-5,
        "retain_kl": 1.0,
        "batch_size": 8,
        "steps": STEPS,
    },
    "depn": {"name": "depn"},
}


# The model before the leaky fine-tune: it never saw any person, so what the relearning attack gets
# out of it is what guessing from other people's documents gets (the floor for every column).
CLEAN = "clean model (never saw these people)"

SCALPEL = (
    "folded", "control", "ablate", "steer", "exact", "plain", "distilled-val", "distilled-all"
)  # fmt: skip


def weights_rows(table: dict, info: dict, relearned: dict, header: list[str]) -> list[list[str]]:
    """Per column, the worst test exact / username rate with the weights loaded as they are (a
    remote-code patch's weights, the columns that add parameters, are the base's) and after each
    relearning fine-tune."""
    from exporter.threat import rate_cell, worst_rates

    def cell(rows) -> str:
        return rate_cell(None if rows is None else worst_rates(rows))

    cols = header[1:]
    out = [
        [
            "white-box: the weights with no patch (test exact / username, every attack)",
            *(cell(table["base" if info[v]["added"] else v]["leakage"]) for v in cols),
        ]
    ]
    kinds = list(dict.fromkeys(k for found in relearned.values() for k in found))
    for kind in kinds:
        out.append(
            [f"{kind} (every attack)", *(cell(relearned.get(v, {}).get(kind)) for v in cols)]
        )
    return out


def plot_relearning(table: dict, relearned: dict, floor: dict, path: Path) -> Path:
    """Per tuned column, the worst test exact rate after each relearning fine-tune against the
    column's own KL to the base, beside the issue's targets and the guessing floor (the clean model,
    never trained on anyone, tuned the same way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exporter.threat import worst_rates

    fig, ax = plt.subplots(figsize=(7, 6))
    markers = dict(zip(sorted({k for f in relearned.values() for k in f}), "os^v"))
    for i, (name, found) in enumerate(relearned.items()):
        kl = max(table[name]["utility"]["kl"], 1e-4)  # a remote-code patch's own KL, log axis
        for kind, rows in found.items():
            exact = 100 * worst_rates(rows)[0]
            ax.scatter([kl], [exact], c=f"C{i}", marker=markers[kind], s=40)
        ax.annotate(name, (kl, 100 * max(worst_rates(r)[0] for r in found.values())),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")  # fmt: skip
    for kind, m in markers.items():
        ax.scatter([], [], c="0.4", marker=m, label=kind)
    for kind, rows in floor.items():
        ax.axhline(100 * worst_rates(rows)[0], c="0.5", lw=0.8, ls="-.",
                   label=f"floor: the clean model {kind}")  # fmt: skip
    ax.axhline(5, ls="--", c="C3", lw=0.8, label="target: 5% after relearning")
    ax.axvline(0.02, ls=":", c="C3", lw=0.8, label="target: KL 0.02")
    ax.set_xscale("log")
    ax.set_xlabel("KL(base || model) before relearning, nats/token (pydoc)")
    ax.set_ylabel("test email exact after relearning, % (worst attack)")
    ax.set_ylim(-1, ax.get_ylim()[1] + 1)
    # below the axes: the labels of the points stay readable
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--recipe",
        default=str(Path(__file__).parents[1] / "exporter" / "recipes" / "demo-smollm2.yaml"),
    )
    ap.add_argument("--work", required=True)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--scalpel",
        nargs="*",
        default=list(SCALPEL),
        choices=list(SCALPEL),
        help="PrivacyScalpel variants to evaluate",
    )
    ap.add_argument(
        "--steps", type=int, nargs="*", help="override the training methods' checkpoints"
    )
    ap.add_argument(
        "--relearn",
        type=int,
        default=0,
        help="the relearning attack's LoRA steps on every column (0: not run)",
    )
    ap.add_argument(
        "--relearn-on",
        nargs="*",
        choices=list(RELEARN_KINDS),
        help="the relearning attack's kinds of text (default: every kind)",
    )
    ap.add_argument(
        "--clean",
        action="store_true",
        help="add the model before the leaky fine-tune as a column (with --relearn: the floor)",
    )
    ap.add_argument("--plot", help="with --relearn: write relearned leakage against KL here (PNG)")
    ap.add_argument(
        "--json",
        help="write the evaluations here after each variant; variants already in it are kept, not "
        "re-run (an interrupted benchmark resumes)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)

    from exporter.evaluate.utility import reference
    from exporter.models import architecture_of, load_model
    from exporter.patch import PlainEdit
    from exporter.patch.candidate import Candidate, control_for
    from exporter.run.context import RunContext
    from exporter.run.distilled import distilled_model
    from exporter.run.evaluation import (
        REFERENCE_BYTES,
        Variant,
        evaluate_variants,
        recipe_setting,
        relearned_variants,
    )
    from exporter.run.scalpel import prepare
    from exporter.run.unlearning import control, edited_model

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    ctx = RunContext(work, log=print)
    prep = prepare(recipe, ctx)
    chosen = json.loads((work / "search" / "search.json").read_text())["chosen"]
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    setting = recipe_setting(recipe, prep.inputs, tok)
    ref = reference(model, tok, setting.texts, max_bytes=REFERENCE_BYTES)
    table, info, relearned = {}, {}, {}
    if args.json and Path(args.json).exists():
        saved = json.loads(Path(args.json).read_text())
        table, info, relearned = saved["table"], saved["info"], saved.get("relearned", {})
        print(f"resuming: {', '.join(table)} already measured", flush=True)

    def save() -> None:  # after every variant: an interrupted benchmark keeps what it measured
        if args.json:
            saved = {"table": table, "info": info, "relearned": relearned}
            Path(args.json).write_text(json.dumps(saved, indent=2))

    attack = recipe.model_copy(
        update={"eval": recipe.eval.model_copy(update={"relearn_steps": args.relearn})}
    )

    def relearn(name: str, edited, patch=None) -> None:
        """The relearning attack on one column: each tuned copy attacked like the column itself."""
        if not args.relearn or name in relearned:
            return
        quiet = RunContext(work, log=lambda _m: None)
        found = {}
        for v in relearned_variants(
            attack, prep.inputs, edited, tok, quiet, layer=layer, patch=patch,
            kinds=args.relearn_on,
        ):  # fmt: skip
            got = evaluate_variants(model, tok, [v], setting, layer=layer, ctx=quiet, ref=ref)
            found[v.name] = got[v.name]["leakage"]
        relearned[name] = found
        print(f"{name}: relearning attack done", flush=True)
        save()

    def evaluate(variant: Variant) -> float:
        """Evaluate one variant into the table (the run's own final evaluation); its seconds."""
        t = time.perf_counter()
        quiet = RunContext(work, log=lambda _m: None)
        table.update(
            evaluate_variants(model, tok, [variant], setting, layer=layer, ctx=quiet, ref=ref)
        )
        return round(time.perf_counter() - t, 1)

    def patched(name: str, patch, note: str) -> None:
        seconds = evaluate(Variant(name, patch))
        if isinstance(patch, PlainEdit):
            # it rewrites the residual writers of layers plain_from..l (here only l)
            writers = architecture_of(model).residual_writers(model, layer, layer)
            changed, added = sum(m.weight.numel() for _, m in writers), 0
        else:
            changed, added = 0, sum(v.numel() for v in patch.state_dict().values())
        info[name] = {"changed": changed, "added": added, "note": note, "eval_s": seconds}
        print(f"{name}: evaluated in {seconds} s", flush=True)
        save()
        # a plain export's weights are the base with the projection: the in-process twin stays
        # hooked on while the base is tuned, as a remote-code patch stays inserted
        relearn(name, model, patch)

    def distilled(name: str, documents: str, cand) -> None:
        """The chosen patch learnt into the weights (the run's distill stage, cached in W)."""
        spec = recipe.export.distill.model_copy(update={"documents": documents})
        export = recipe.export.model_copy(update={"mode": "distilled", "distill": spec})
        r = recipe.model_copy(update={"export": export})
        student, summary = distilled_model(r, prep, cand, prep.patch(cand), ctx)
        if name not in table:
            seconds = evaluate(Variant(name, model=student))
            info[name] = {
                "changed": summary["changed_parameters"],
                "added": 0,
                "method_s": summary["seconds"],
                "note": f"LoRA rank {summary['settings']['rank']}, {documents} documents",
                "eval_s": seconds,
            }
            save()
        relearn(name, student)

    if "base" not in table:
        info["base"] = {"changed": 0, "added": 0, "note": "", "eval_s": evaluate(Variant("base"))}
        save()
    if args.clean and CLEAN not in table:
        clean = load_model(recipe.model).model.eval()
        seconds = evaluate(Variant(CLEAN, model=clean))
        info[CLEAN] = {
            "changed": None,
            "added": 0,
            "note": "before the leaky fine-tune",
            "eval_s": seconds,
        }
        save()
        relearn(CLEAN, clean)
    for key in args.methods:
        if any(i.get("key", v.split()[0].lower()) == key for v, i in info.items()):
            continue
        spec = {
            **METHODS[key],
            **({"steps": args.steps} if args.steps and "steps" in METHODS[key] else {}),
        }
        r = parse_recipe({**recipe.model_dump(exclude_defaults=True), "method": spec})
        loaded = load_model(prep.inputs.model)
        edited, summary, _ = edited_model(r, prep.inputs, loaded, layer, ctx, name=key)
        edited.eval()
        label = f"{key.upper()} {summary['chosen']['label'].split(' ', 1)[1]}"
        info[label] = {
            "key": key,
            "changed": summary["changed_parameters"],
            "added": 0,
            "method_s": summary["seconds"],
            "note": "validation target " + ("met" if summary["met"] else "NOT met"),
            "eval_s": evaluate(Variant(label, model=edited)),
        }
        relearn(label, edited)
        ctrl = control(r, load_model(prep.inputs.model).model, summary)
        if ctrl is not None:
            evaluate(Variant(f"{label} control", model=ctrl))
            info[f"{label} control"] = {
                "changed": summary["changed_parameters"],
                "added": 0,
                "note": "random neurons",
            }
        del loaded, edited
        print(
            f"{label}: method {summary['seconds']} s, evaluated in {info[label]['eval_s']} s",
            flush=True,
        )
        save()

    n, alpha, gated = chosen["n"], chosen["alpha"], chosen.get("gated", False)
    sae_s = prep.sae_metrics.get("train_seconds")
    note = f"SAE {sae_s:.0f} s" if sae_s else ""
    variants = {
        "folded": (f"scalpel folded N={n} a={alpha:g}", Candidate(n, alpha, "folded", gated)),
        "ablate": (f"scalpel ablate only N={n}", Candidate(n, 0.0, "folded", gated)),
        "steer": (f"scalpel steer only a={alpha:g}", Candidate(0, alpha, "folded", gated)),
        "exact": (f"scalpel exact N={n} a={alpha:g}", Candidate(n, alpha, "exact", gated)),
        "plain": (f"scalpel plain from {layer}", Candidate(n, alpha, "plain")),
    }
    for key in args.scalpel:
        if key == "control" and "scalpel folded control" not in table:
            folded = variants["folded"][1]
            control_patch, _ = control_for(
                prep.sae,
                prep.features,
                folded,
                prep.patch(folded),
                prep.calibration,
                recipe.data.seed,
            )
            patched("scalpel folded control", control_patch, "random latents + direction")
        elif key.startswith("distilled-"):
            documents = {"val": "validation", "all": "all"}[key.split("-")[1]]
            distilled(f"scalpel distilled ({documents} docs)", documents, variants["folded"][1])
        elif key in variants and variants[key][0] not in table:
            name, cand = variants[key]
            patched(name, prep.patch(cand, plain_from=layer), note)

    header, rows = comparison_rows(table)
    # Generation speed is measured apart (benchmarks/patched_generation.py): here the evaluations
    # share the CPU with nothing else only if nothing else runs, and the methods' plain checkpoints
    # run at the base's speed.
    rows = [r for r in rows if not r[0].startswith("tokens/s")]
    rows.append(
        [
            "base parameters changed",
            *("-" if info[v]["changed"] is None else f"{info[v]['changed']:,}" for v in header[1:]),
        ]
    )
    rows.append(["parameters added (remote code)", *(f"{info[v]['added']:,}" for v in header[1:])])
    rows.append(
        [
            "method wall time, s (path + validation scoring)",
            *(f"{info[v]['method_s']:.0f}" if "method_s" in info[v] else "-" for v in header[1:]),
        ]
    )
    rows.append(["note", *(info[v]["note"] or "-" for v in header[1:])])
    rows += weights_rows(table, info, relearned, header)
    print(
        f"# every method on the leaky {recipe.model.describe()}, test people (torch "
        f"{torch.__version__}, "
        f"{torch.get_num_threads()} threads); PrivacyScalpel's choice N={n} alpha {alpha:g} made "
        "on validation people"
    )
    print(markdown_table(header, rows))
    save()
    if args.plot and relearned:
        tuned = {k: v for k, v in relearned.items() if k != CLEAN}
        print(plot_relearning(table, tuned, relearned.get(CLEAN, {}), Path(args.plot)))


if __name__ == "__main__":
    main()
