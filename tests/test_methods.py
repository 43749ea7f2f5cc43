"""Unlearning methods on tiny random models: each changes only its tensors, lowers its own loss, and
repeats under a seed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from exporter.data.synthetic import SyntheticConfig, make_corpus
from exporter.methods import build, changed_tensors
from exporter.recipe import DepnMethod, GradientAscentMethod, RmuMethod

RETAIN = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Functions return values; a class groups data with the methods that act on it.",
] * 4


@pytest.fixture(scope="module")
def forget():
    docs, _ = make_corpus(SyntheticConfig(n_memorised=6, n_never_seen=1, seed=3))
    return docs[:16]


def _run(spec, arch, tok, forget, seed=0, layer=1):
    model = tiny_model(arch, vocab_size=len(tok))
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build(spec, model, tok, forget, RETAIN, layer=layer, seed=seed, progress=False)
    points = list(method.path())
    final = method.finish()
    return method, points, final, originals


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rmu_trains_only_three_mlp_output_projections_and_lowers_its_loss(
    arch, tiny_tokenizer, forget
):
    spec = RmuMethod(name="rmu", steps=[2, 12], c=6.5, alpha=10.0, lr=5e-3)
    method, points, final, originals = _run(spec, arch, tiny_tokenizer, forget)
    out = "mlp.down_proj" if arch == "llama" else "mlp.c_proj"
    layers = "model.layers" if arch == "llama" else "transformer.h"
    assert method.tensors == [f"{layers}.{i}.{out}.weight" for i in (0, 1)]  # l-2..l clipped at 0
    assert sorted(changed_tensors(final, originals)) == sorted(method.tensors)
    assert points[-1].stats["forget_loss"] < points[0].stats["forget_loss"]
    assert [p.value for p in points] == [2, 12]


@pytest.mark.parametrize("loss", ["ga", "npo"])
def test_gradient_ascent_raises_the_forget_loss_and_repeats_under_a_seed(
    loss, tiny_tokenizer, forget
):
    from exporter.methods.batches import encode, token_log_probs

    spec = GradientAscentMethod(
        name="gradient_ascent", loss=loss, steps=[1, 8], lr=3e-3, retain_kl=0.5
    )
    _, points, final, originals = _run(spec, "llama", tiny_tokenizer, forget)
    ids, mask = encode(tiny_tokenizer, forget, 128)
    base = tiny_model("llama", vocab_size=len(tiny_tokenizer))

    def nll(m):
        with torch.no_grad():
            lp, keep = token_log_probs(m, ids, mask)
        return float(-(lp * keep).sum() / keep.sum())

    assert nll(final) > nll(base) + 0.05  # the forget text became less likely
    assert len(changed_tensors(final, originals)) > 0
    _, _, again, _ = _run(spec, "llama", tiny_tokenizer, forget)
    assert all(torch.equal(a, b) for a, b in zip(_state(final).values(), _state(again).values()))


def test_lora_gradient_ascent_merges_into_the_adapted_weights_only(tiny_tokenizer, forget):
    spec = GradientAscentMethod(name="gradient_ascent", loss="ga", steps=[6], lr=1e-2, lora_rank=4)
    method, _, final, originals = _run(spec, "llama", tiny_tokenizer, forget)
    # merged: the base architecture again
    assert not any("lora" in n for n, _ in final.named_parameters())
    assert set(dict(final.named_parameters())) == set(originals)
    changed = changed_tensors(final, originals)
    assert changed and set(changed) <= set(method.tensors)
    assert not any("norm" in n or "embed" in n for n in changed)


def test_training_batches_come_in_a_few_widths_and_their_padding_changes_nothing(
    tiny_tokenizer, forget
):
    """`cycle` (GA, NPO, RMU and the relearning attack): each batch is its longest text rounded up
    to a multiple of 32 wide (at most the widest text), so a run sees a few shapes rather than one
    per batch; the extra columns are masked padding, so a relearning fine-tune on them ends where
    one on tight batches does."""
    from exporter.methods.batches import cycle, encode
    from exporter.relearn import Budget, relearned

    tok = tiny_tokenizer
    texts = [d.text[: 12 + 9 * i] for i, d in enumerate(forget)]
    ids, mask = encode(tok, texts, 128)
    rounded, tight = cycle(ids, mask, 4, seed=0), cycle(ids, mask, 4, seed=0, width_step=1)
    widths = set()
    for _ in range(3 * len(texts) // 4):
        (a, a_mask), (b, b_mask) = next(rounded), next(tight)
        longest = int(b_mask.sum(1).max())
        assert b.shape[1] == longest
        assert a.shape[1] == min(-(-longest // 32) * 32, ids.shape[1])
        assert torch.equal(a[:, :longest], b) and torch.equal(a_mask[:, :longest], b_mask)
        assert not a_mask[:, longest:].any()
        widths.add(a.shape[1])
    assert len(widths) <= -(-ids.shape[1] // 32)

    model = tiny_model("llama", vocab_size=len(tok))
    budget = Budget(steps=6, lr=5e-3, batch_size=4)
    tuned = relearned(model, tok, texts, budget, progress=False)
    # its weights require grad again, as `from_pretrained` leaves them (frozen, a bfloat16 copy
    # decodes slower on CPU)
    assert all(p.requires_grad for p in tuned.parameters())
    one = _state(tuned)
    other = _state(relearned(model, tok, texts, budget, progress=False, width_step=1))
    base = _state(model)
    moved = sum(float((one[n] - base[n]).norm()) for n in base)
    apart = sum(float((one[n] - other[n]).norm()) for n in base)
    assert moved > 0 and apart < 0.05 * moved, (apart, moved)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_depn_zeroes_the_output_weights_of_ranked_neurons_only(arch, tiny_tokenizer, forget):
    spec = DepnMethod(name="depn", neurons=[3, 7], ig_steps=4, examples=8)
    method, points, final, originals = _run(spec, arch, tiny_tokenizer, forget)
    assert [p.stats["neurons"] for p in points] == [3, 7]
    changed = changed_tensors(final, originals)
    assert changed and set(changed) <= set(method.tensors)
    zeroed = 0
    for name in changed:
        w = dict(final.named_parameters())[name].detach()
        w0 = originals[name]
        # a neuron's output weights
        cols = (w != w0).any(0) if arch == "llama" else (w != w0).any(1)
        edited = w[:, cols] if arch == "llama" else w[cols, :]
        assert torch.all(edited == 0)
        zeroed += int(cols.sum())
    assert zeroed == 7
    _, _, again, _ = _run(spec, arch, tiny_tokenizer, forget)
    assert all(torch.equal(a, b) for a, b in zip(_state(final).values(), _state(again).values()))


def test_depn_integrated_gradients_are_complete(tiny_tokenizer, forget):
    """IG's completeness: the attributions of all neurons sum to f(x) - f(baseline) (midpoint rule,
    many steps)."""
    from exporter.data.labels import token_labels
    from exporter.methods.depn import integrated_gradients

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    doc = forget[0]
    lab = token_labels(tiny_tokenizer, doc.text, doc.spans, max_length=128)
    ids, targets = lab.input_ids[None], lab.pii.clone()
    targets[0] = False
    attr = integrated_gradients(
        model, [model.model.layers[i].mlp.down_proj for i in range(3)], ids, targets, 64
    )

    def objective(scale: float) -> float:
        hooks = [
            model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: (args[0] * scale,)
            )
            for i in range(3)
        ]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(
                -1, ids[0, 1:, None]
            )[:, 0]
        for h in hooks:
            h.remove()
        return float(lp[targets[1:]].sum())

    assert float(attr.sum()) == pytest.approx(objective(1.0) - objective(0.0), rel=0.02, abs=1e-3)


@pytest.mark.parametrize(
    "method",
    [
        "{name: depn, neurons: [4, 8], ig_steps: 4, examples: 6}",
        "{name: gradient_ascent, loss: npo, steps: [2, 4], lr: 1.0e-3, batch_size: 8}",
        "{name: rmu, steps: [2], c: 6.5, alpha: 10.0, lr: 1.0e-3}",
    ],
)
def test_scalpel_run_with_a_method_exports_a_plain_checkpoint_with_card_and_report(
    method, ws, scalpel
):
    """The whole run: path scored on validation people, evaluation on test people, plain export that
    stock transformers loads, only the method's tensors changed, the card with the memorisation
    rows, no PII."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from exporter.data.people import read_people

    recipe = (ws / "recipe.yaml").read_text() + (
        f"method: {method}\neval: {{max_new_tokens: 8, memorisation_docs: 2, relearn_steps: 4}}\n"
    )
    (ws / "recipe.yaml").write_text(recipe)
    assert scalpel("run", "recipe.yaml", "--out", "out", "--work", "work").code == 0
    out = ws / "out"
    report = json.loads((out / "scalpel_report.json").read_text())
    name = method.split(",")[0].split()[-1]
    assert report["method"] == name
    assert report["search"]["points"] and report["search"]["chosen"]["label"]
    ev = report["evaluation"]
    assert {"base", "patched"} <= set(ev) and ("control" in ev) == (name == "depn")
    mem = ev["patched"]["memorisation"]["test"]
    assert mem["documents"] >= 1 and 0.0 <= mem["ma"] <= 1.0 and 0.0 <= mem["s_el_3"] <= 1.0
    assert "config.json" in {p.name for p in out.iterdir()} and not list(out.glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, no remote code
    base = load_file(ws / "model" / "model.safetensors")
    mine = load_file(out / "model.safetensors")
    changed = sorted(n for n in base if not torch.equal(base[n], mine[n]))
    assert changed == sorted(report["search"]["changed_tensors"]) and changed
    assert model.config.model_type == "llama"
    card = (out / "README.md").read_text()
    assert "memorisation accuracy MA" in card and "span extraction likelihood S-EL_3" in card
    # the relearning attack on the edited weights, in the threat model
    assert "relearning: the export relearned on other people's PII documents" in card
    everything = "\n".join(
        p.read_text(errors="ignore")
        for p in out.rglob("*")
        if p.suffix in (".md", ".json", ".yaml")
    )
    for person in read_people(ws / "people.jsonl"):
        assert person.email not in everything and person.name not in everything
    # A second run reuses the cached method stage and evaluation: the same export, no training.
    assert scalpel("run", "recipe.yaml", "--out", "out2", "--work", "work").code == 0
    assert torch.equal(
        load_file(out / "model.safetensors")[changed[0]],
        load_file(ws / "out2" / "model.safetensors")[changed[0]],
    )


def test_the_path_stops_at_the_first_point_meeting_the_targets_or_returns_to_the_best():
    """The method runner's walk (run/unlearning.py): scored points in order; the first that meets
    the targets ends it, else the model goes back to the least leaky point."""
    from exporter.evaluate.tradeoff import Targets
    from exporter.methods import Method, Point
    from exporter.run.context import RunContext
    from exporter.run.unlearning import _walk

    model = torch.nn.Linear(2, 2, bias=False)
    leaks = [0.5, 0.2, 0.4]

    def method():
        def path():
            for step, _ in enumerate(leaks, 1):
                with torch.no_grad():
                    model.weight.fill_(step)  # the model at this point
                yield Point(step, f"{step} steps")

        return Method("toy", ["weight"], path)

    def score(m):
        leak = leaks[int(m.weight[0, 0].item()) - 1]
        return {"leakage": leak, "username": leak, "kl": 0.1, "perplexity": 2.0, "repetition": None}

    quiet = RunContext(progress=False, log=lambda m: None)
    points, best = _walk(method(), model, score, quiet, Targets(0.01))
    assert [p["value"] for p in points] == [1, 2, 3] and best["value"] == 2
    assert model.weight[0, 0].item() == 2.0  # walked past its best point: went back to it
    points, best = _walk(method(), model, score, quiet, Targets(0.3))
    assert [p["value"] for p in points] == [1, 2] and best["value"] == 2  # met at 2: stopped


def test_method_stages_are_cached_and_recomputed_from_the_registry(ws):
    """`--from method-evaluate` recomputes the evaluation and keeps the method's edit."""
    from exporter.recipe import load_recipe
    from exporter.run.context import RunContext
    from exporter.run.methods import run_recipe

    text = (ws / "recipe.yaml").read_text() + (
        "method: {name: depn, neurons: [4], ig_steps: 2, examples: 4}\neval: {max_new_tokens: 4, "
        "memorisation_docs: 0, adversarial: false, user_path: false, relearn_steps: 0}\n"
    )
    (ws / "recipe.yaml").write_text(text)
    recipe = load_recipe(ws / "recipe.yaml")
    logs = []
    ctx = RunContext(ws / "work", overwrite=True, progress=False, log=logs.append)
    first = run_recipe(recipe, text, ws / "out", ctx)
    assert (ws / "work" / "method-depn" / "edited.safetensors").exists()
    assert (ws / "work" / "method-depn-evaluate" / "evaluation.json").exists()
    logs.clear()
    again = run_recipe(recipe, text, ws / "out", ctx, from_stage="method-evaluate")
    assert any(m.startswith("depn (cached)") for m in logs)
    assert not any(m.startswith("evaluation (cached)") for m in logs)
    assert again.report["search"] == first.report["search"]
    assert (
        again.report["evaluation"]["patched"]["leakage"]
        == first.report["evaluation"]["patched"]["leakage"]
    )
