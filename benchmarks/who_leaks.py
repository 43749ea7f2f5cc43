"""Who leaks, and would they anyway? For a finished run, the final evaluation's template attacks
(each email template greedy, k-shot greedy and sampled `eval.samples` times) on the test people,
person by person, for: the model before the leaky fine-tune (the recipe's own model: it never saw
these people), the leaky base, and the leaky base under each listed candidate's patch. Each row
says how many test people each model writes exactly under any of those attacks, which ones (by
their index among the test people), and how many of those the clean model writes too: an address
the model that never saw the person writes is guessed from the name, not recalled. A second table
says, for each candidate and template, on how many test people the context gate is open at the
prompt's last token (the one that predicts the address's first token).

    python benchmarks/who_leaks.py --recipe R --work W --candidates 200:0.2 400:0.1
                                   [--dtype float32] [--json OUT]

W is the work folder of a run of R (its cached probe, SAE and features are read; nothing is
recomputed). A diagnostic of the test set: nothing here chooses a setting. Counts and indices
only: no name, address or generated text is printed or written.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from run_args import run_args

from exporter.evaluate.leakage import (
    EMAIL_TEMPLATES,
    few_shot_prompts,
    first_email,
    greedy_continuations,
    sampled_continuations,
)
from exporter.evaluate.summary import markdown_table
from exporter.models import cast_copy, load_model
from exporter.patch import applied
from exporter.patch.candidate import Candidate
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.scalpel import prepare


def hits(model, tok, people, ev, seed: int) -> dict[str, set[int]]:
    """For each attack, the indices of the people whose whole address it writes (sampled: in any
    of the samples)."""
    out: dict[str, set[int]] = {}

    def exact(attack: str, predictions: list[list[str]]) -> None:
        out[attack] = {
            i
            for i, (p, texts) in enumerate(zip(people, predictions))
            if p.email.lower() in {first_email(t) for t in texts}
        }

    for name, template in EMAIL_TEMPLATES.items():
        prompts = [template.format(name=p.name) for p in people]
        greedy = lambda q: [[c] for c in greedy_continuations(model, tok, q, ev.max_new_tokens)]  # noqa: E731
        exact(f"{name} greedy", greedy(prompts))
        if ev.few_shot:
            exact(
                f"{name} {ev.few_shot}-shot",
                greedy(few_shot_prompts(people, name, ev.few_shot, seed=seed)),
            )
        if ev.samples:
            exact(
                f"{name} sampled x{ev.samples}",
                sampled_continuations(
                    model,
                    tok,
                    prompts,
                    samples=ev.samples,
                    max_new_tokens=ev.max_new_tokens,
                    seed=seed,
                ),
            )
    return out


@contextmanager
def captured(patch):
    """The residuals `patch` is handed, in call order, while the context is open."""
    seen: list[torch.Tensor] = []
    hook = patch.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        hook.remove()


def prompts_of(people, ev, seed: int) -> dict[str, list[str]]:
    """Each email template's prompts for `people`, zero-shot and k-shot."""
    out = {}
    for name, template in EMAIL_TEMPLATES.items():
        out[f"{name} 0-shot"] = [template.format(name=p.name) for p in people]
        if ev.few_shot:
            out[f"{name} {ev.few_shot}-shot"] = few_shot_prompts(people, name, ev.few_shot, seed)
    return out


def prompt_ends(model, tok, layer: int, patch, prompts: list[str]) -> torch.Tensor:
    """[len(prompts), d]: the residual the patch is handed at each prompt's last token (each
    prompt alone)."""
    rows = []
    with applied(model, layer, patch), captured(patch) as seen, torch.no_grad():
        for prompt in prompts:
            seen.clear()
            model(**tok(prompt, return_tensors="pt"))
            rows.append(seen[0][0, -1].float())
    return torch.stack(rows)


def parse_candidate(text: str, mode: str = "folded") -> Candidate:
    n, alpha = text.split(":")
    return Candidate(int(n), float(alpha), mode, True)


def main() -> None:
    ap = run_args(__doc__)
    ap.add_argument("--candidates", nargs="+", default=[], help="N:alpha, folded and gated")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--json")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    ev, seed = recipe.eval, recipe.data.seed
    prep = prepare(recipe, RunContext(Path(args.work), progress=False, log=print))
    tok, layer = prep.loaded.tokenizer, prep.layer
    people = prep.inputs.split("test")
    found: dict[str, dict[str, set[int]]] = {}
    clean = cast_copy(load_model(recipe.model).model.eval(), args.dtype)
    found["clean model (never saw these people)"] = hits(clean, tok, people, ev, seed)
    del clean
    leaky = cast_copy(prep.loaded.model, args.dtype)
    found["leaky base"] = hits(leaky, tok, people, ev, seed)
    gates = []
    for text in args.candidates:
        cand = parse_candidate(text)
        patch = prep.patch(cand)
        with applied(leaky, layer, patch) if cand.n or cand.alpha else nullcontext():
            found[f"patched {cand.label}"] = hits(leaky, tok, people, ev, seed)
        leaked = set().union(*found[f"patched {cand.label}"].values())
        for form, prompts in prompts_of(people, ev, seed).items():
            is_open = patch.context(prompt_ends(prep.loaded.model, tok, layer, patch, prompts))
            gates.append(
                [
                    cand.label,
                    form,
                    f"{int(is_open.sum())} / {len(people)}",
                    f"{sum(bool(is_open[i]) for i in leaked)} / {len(leaked)}",
                ]
            )

    guessed = set().union(*found["clean model (never saw these people)"].values())
    header = [
        "model",
        "test people written exactly, any attack",
        "worst attack",
        "which (index among the test people)",
        "of those, the clean model writes too",
    ]
    rows = []
    for model, by_attack in found.items():
        anyone = set().union(*by_attack.values())
        worst = max(by_attack, key=lambda a: len(by_attack[a]))
        which = " ".join(f"#{i}" for i in sorted(anyone)) if len(anyone) <= 10 else "-"
        rows.append(
            [
                model,
                len(anyone),
                f"{worst}: {len(by_attack[worst])}",
                which,
                len(anyone & guessed),
            ]
        )
    print(f"{len(people)} test people; {args.dtype}; {ev.few_shot}-shot, sampled x{ev.samples}")
    print(markdown_table(header, rows))
    if gates:
        print("\nthe context gate at the prompt's last token (each prompt alone, float32)")
        gate_header = ["candidate", "prompt", "open on (test people)", "of the people it lets out"]
        print(markdown_table(gate_header, gates, text_columns=2))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {m: {a: sorted(s) for a, s in b.items()} for m, b in found.items()}, indent=2
            )
        )


if __name__ == "__main__":
    main()
