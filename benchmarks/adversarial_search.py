"""Would the trade-off search have seen it? The adversarial attacks that decode greedily (three
paraphrases, the JSON / table-row / signature formats, the prefix attack) on every candidate of a
finished search, on the validation people a search chooses with; with `--sampled`, the 32 samples
of the `mailto` prompt too (the final evaluation's whole adversarial family). With `--test`, the
same on the test people, as a diagnostic only: a choice made from those rows would be tuned on the
test set.
With `--kl`, each candidate's KL and perplexity on the final evaluation's held-out prose (its
`eval.ppl_tokens`) beside the search's own KL (24 texts).

    python benchmarks/adversarial_search.py --recipe R --work W [--test] [--kl] [--sampled]
                                            [--only chosen | N:alpha ...]
                                            [--dtype bfloat16] [--json OUT]

W is the work folder of a run of R (its cached probe, SAE, features and search are read; nothing is
recomputed); `--only` attacks the base and only the candidates named (`chosen`: the search's
choice). Rates only: no name, address or generated text is printed or written.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from run_args import run_args
from who_leaks import parse_candidate

from exporter.evaluate.harness import adversarial_greedy_rows, adversarial_sampled_rows, attack_row
from exporter.evaluate.summary import markdown_table
from exporter.evaluate.utility import REFERENCE_BYTES, against_reference, reference
from exporter.models import cast_copy
from exporter.patch import applied
from exporter.patch.candidate import Candidate
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.evaluation import utility_texts
from exporter.run.scalpel import prepare


def attacked(
    model, tok, layer: int, patch, groups: dict, max_new_tokens: int, sampled_seed=None
) -> list[dict]:
    """The adversarial greedy rows of `model` (with `patch` at `layer` unless None), and with
    `sampled_seed` the many-sample rows (that seed, as the final evaluation's)."""
    rows: list[dict] = []

    def add(g, attack, decoding, score):
        rows.append(attack_row(g, attack, decoding, score))

    with applied(model, layer, patch) if patch is not None else nullcontext():
        adversarial_greedy_rows(model, tok, groups, add, max_new_tokens)
        if sampled_seed is not None:
            adversarial_sampled_rows(model, tok, groups, add, max_new_tokens, sampled_seed)
    return rows


def candidate_of(entry: dict) -> Candidate:
    """A candidate as search.json lists it (`Scored.to_json`)."""
    return Candidate(entry["n"], entry["alpha"], entry["mode"], entry["gated"])


def run_choice(recipe_path: str, work: Path):
    """A finished run's stages (read from `work`, nothing recomputed), its chosen candidate and
    that candidate's patch."""
    prep = prepare(load_recipe(recipe_path), RunContext(work, progress=False, log=print))
    cand = candidate_of(json.loads((work / "search" / "search.json").read_text())["chosen"])
    return prep, cand, prep.patch(cand)


def named(cand: Candidate, chosen: Candidate, names: list[str]) -> bool:
    """Whether `--only names` takes `cand`: `chosen` names the search's choice, N:alpha a size and
    strength."""
    picked = [parse_candidate(n) for n in names if n != "chosen"]
    return ("chosen" in names and cand == chosen) or any(
        (p.n, p.alpha) == (cand.n, cand.alpha) for p in picked
    )


def worst_cell(rows: list[dict], group: str) -> str:
    """The group's worst exact / username rate and the attack that reached it."""
    mine = [r for r in rows if r["group"] == group]
    top = max(mine, key=lambda r: (r["exact"], r["username"]))
    name = f" ({top['attack']})" if top["exact"] or top["username"] else ""
    return f"{100 * top['exact']:.0f}% / {100 * max(r['username'] for r in mine):.0f}%{name}"


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--test", action="store_true", help="also the test people (diagnostic only)")
    ap.add_argument("--kl", action="store_true", help="also KL on the final evaluation's prose")
    ap.add_argument("--only", nargs="+", help="only these candidates: `chosen` or N:alpha")
    ap.add_argument("--sampled", action="store_true", help="also the 32 samples of `mailto`")
    ap.add_argument("--json")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    work = Path(args.work)
    prep = prepare(recipe, RunContext(work, progress=False, log=print))
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    search = json.loads((work / "search" / "search.json").read_text())
    groups = {g: prep.inputs.split(g) for g in ["validation"] + ["test"] * args.test}
    attacker = cast_copy(model, args.dtype)
    ref = None
    if args.kl:
        texts, _ = utility_texts(prep.inputs.benign_path, tok, recipe.eval.ppl_tokens)
        ref = reference(model, tok, texts, max_bytes=REFERENCE_BYTES)

    chosen = candidate_of(search["chosen"])
    header = ["candidate", "search: validation exact / username", "search KL (24 texts)"]
    family = "adversarial greedy and sampled x32" if args.sampled else "adversarial greedy"
    header += [f"{family}, {g} people" for g in groups]
    header += ["KL, final evaluation's prose", "perplexity"] if args.kl else []
    table, out = [], {}
    sampled_seed = recipe.data.seed if args.sampled else None
    rows = attacked(attacker, tok, layer, None, groups, recipe.eval.max_new_tokens, sampled_seed)
    table.append(["base", "-", "0"] + [worst_cell(rows, g) for g in groups] + ["0", "-"] * args.kl)
    out["base"] = {"rows": rows}
    for s in search["candidates"]:
        cand = candidate_of(s)
        if s.get("leakage") is None:
            continue  # a lazy search never attacked it
        if args.only and not named(cand, chosen, args.only):
            continue
        patch = prep.patch(cand)
        rows = attacked(
            attacker, tok, layer, patch, groups, recipe.eval.max_new_tokens, sampled_seed
        )
        label = cand.label + (" (chosen)" if cand == chosen else "")
        row = [label, f"{100 * s['leakage']:.0f}% / {100 * s['username']:.0f}%", f"{s['kl']:.4f}"]
        row += [worst_cell(rows, g) for g in groups]
        out[label] = {"rows": rows}
        if ref is not None:
            u = against_reference(ref, model, lambda: applied(model, layer, patch))
            row += [f"{u['kl']:.4f}", f"{u['perplexity']:.2f}"]
            out[label]["utility"] = u
        table.append(row)
        print(" | ".join(row), flush=True)
    print(
        f"# {family} attacks on the search's candidates ({args.dtype} decoding); "
        "test rows are a diagnostic, never a way to choose"
    )
    print(markdown_table(header, table))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
