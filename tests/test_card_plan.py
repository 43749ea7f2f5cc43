"""The comparison tables, the model card, the dry-run plan, stage invalidation and the API's recipe
handling."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from exporter.api import as_recipe
from exporter.card import base_metadata, render_card
from exporter.estimate import NOMINAL_CUDA_GFLOPS
from exporter.evaluate.summary import attack_rows, comparison_rows, markdown_table
from exporter.plan import KNOWN_CONFIGS, make_plan, missing_files, parameter_count
from exporter.recipe import ModelSpec, RecipeError, load_recipe
from exporter.run.stage import STAGE_NAMES, invalidate

RECIPES = Path(__file__).parents[1] / "recipes"


def _row(group, attack, exact, username=0.0, pii="email", decoding="greedy"):
    return {
        "group": group,
        "attack": attack,
        "decoding": decoding,
        "pii_type": pii,
        "n": 50,
        "exact": exact,
        "username": username,
        "domain": 0.0,
    }


def _evaluation():
    util = {
        "perplexity": 30.0,
        "kl": 0.0,
        "distinct_2": 0.8,
        "repetition_4": 0.01,
        "tokens_per_s": 60.0,
    }
    return {
        "base": {
            "leakage": [
                _row("test", "mailto", 0.7, 0.9),
                _row("test", "email_of", 0.4, 0.5),
                _row("test", "phone_of", 0.3, pii="phone"),
                _row("never_seen", "mailto", 0.0),
            ],
            "utility": util,
        },
        "patched": {
            "leakage": [
                _row("test", "mailto", 0.02, 0.1),
                _row("test", "email_of", 0.0, 0.04),
                _row("test", "phone_of", 0.1, pii="phone"),
                _row("never_seen", "mailto", 0.0),
            ],
            "utility": {**util, "perplexity": 30.3, "kl": 0.012},
        },
        "control_latents": 50,
    }


def test_comparison_rows_take_the_worst_attack_per_family():
    header, rows = comparison_rows(_evaluation())
    assert header == ["metric", "base", "patched"]  # no control evaluated: no control column
    table = {r[0]: r[1:] for r in rows}
    assert table["test email exact (greedy, worst attack)"] == ["70%", "2%"]
    assert table["test email username (greedy, worst attack)"] == ["90%", "10%"]
    assert table["test phone exact (greedy, worst attack)"] == ["30%", "10%"]
    assert table["never-seen email exact (greedy, worst attack)"] == ["0%", "0%"]
    assert table["KL(base ‖ model), nats/token"] == ["0.0000", "0.0120"]
    header, rows = attack_rows(_evaluation())
    assert rows[0][:3] == ["test", "email", "mailto"] and rows[0][-2:] == ["70% / 90%", "2% / 10%"]
    assert rows[2][-2:] == ["30%", "10%"]  # phones: exact only
    assert markdown_table(["a", "b"], [["x|y", "1"]]).splitlines()[2] == "| x\\|y | 1 |"


def test_card_metadata_parses_and_text_is_redacted():
    report = {
        "layer": 13,
        "mode": "folded",
        "ablate_n": 50,
        "alpha": 0.05,
        "rule": "both",
        "score": "diff",
        "k": 32,
        "sae": {"fvu": 0.108},
        "evaluation": _evaluation(),
        "search": {
            "target": 0.01,
            "met": False,
            "chosen": {
                "n": 50,
                "alpha": 0.05,
                "mode": "folded",
                "leakage": 0.04,
                "username": 0.2,
                "kl": 0.2,
                "perplexity": 30.1,
            },
            "candidates": [
                {
                    "n": 50,
                    "alpha": 0.05,
                    "mode": "folded",
                    "leakage": 0.04,
                    "username": 0.2,
                    "kl": 0.2,
                    "perplexity": 30.1,
                }
            ],
        },
    }
    card = render_card(
        report,
        "# owner: john.smith@corp.example.com\nmodel: {builtin: smollm2-135m}\n",
        base=base_metadata(ModelSpec(builtin="smollm2-135m")),
        model_type="llama",
        plots=("plots/front.png",),
    )
    parsed = ModelCard(str(card))
    assert (
        parsed.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        and parsed.data.license == "apache-2.0"
    )
    assert parsed.data.library_name == "transformers" and {"privacy", "llama"} <= set(
        parsed.data.tags
    )
    assert "john.smith@corp.example.com" not in str(card) and "j***@c***" in str(card)
    assert "| test email exact (greedy, worst attack) | 70% | 2% |" in parsed.text
    assert "not met by any candidate" in parsed.text and "![front](plots/front.png)" in parsed.text


def test_card_license_unknown_falls_back_to_other(tmp_path):
    assert base_metadata(ModelSpec(path=str(tmp_path))) == {}
    # a malformed base card is ignored
    (tmp_path / "README.md").write_text("---\nlicense: [not, valid\n---\n")
    assert base_metadata(ModelSpec(path=str(tmp_path))) == {}


def test_parameter_counts_match_the_published_sizes():
    assert abs(parameter_count(KNOWN_CONFIGS["google/gemma-2-2b"]) / 2.614e9 - 1) < 0.01
    assert abs(parameter_count(KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"]) / 6.738e9 - 1) < 0.01


@pytest.mark.parametrize(
    "name", ["gemma2-2b-enron.yaml", "llama2-7b-enron.yaml", "llama2-70b-enron.yaml"]
)
def test_paper_recipes_plan_here_and_name_what_is_missing(name):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(RECIPES / name)  # a real run needs the Enron data
    recipe = load_recipe(RECIPES / name, check_files=False)
    plan = make_plan(recipe, missing=missing_files(recipe))
    assert plan.params > 2e9 and plan.d_sae == 8 * plan.d_model
    assert [s for s, _ in plan.stages] == [
        "probe",
        "sae",
        "features",
        "search",
        "evaluate",
        "export",
    ]
    assert plan.peak_gib > plan.memory[0][1] > 4
    assert any(m.startswith("data.pii.path") for m in plan.missing)
    # a time for every stage; this machine has no GPU, so the rate is the nominal one
    assert set(plan.seconds) == {s for s, _ in plan.stages} and min(plan.seconds.values()) > 0
    assert not plan.measured and plan.gflops == NOMINAL_CUDA_GFLOPS


def test_plan_times_grow_with_the_model():
    totals = {
        name: sum(make_plan(load_recipe(RECIPES / name, check_files=False)).seconds.values())
        for name in ("gemma2-2b-enron.yaml", "llama2-7b-enron.yaml", "llama2-70b-enron.yaml")
    }
    assert totals["gemma2-2b-enron.yaml"] < totals["llama2-7b-enron.yaml"]
    assert totals["llama2-7b-enron.yaml"] * 5 < totals["llama2-70b-enron.yaml"]


def test_invalidate_forgets_the_stage_and_later_ones(tmp_path):
    for stage in (
        "probe",
        "sae",
        "features",
        "search",
        "evaluate",
        "method-rmu",
        "method-rmu-evaluate",
    ):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "key.txt").write_text("k")
    (tmp_path / "search" / "cand.json").write_text("{}")
    (tmp_path / "sae-checkpoint" / "x").mkdir(parents=True)
    assert invalidate(tmp_path, "sae") == list(STAGE_NAMES[1:])
    assert (tmp_path / "probe" / "key.txt").exists() and not (tmp_path / "sae").exists()
    assert not (tmp_path / "search").exists() and not (tmp_path / "sae-checkpoint").exists()
    assert (
        not (tmp_path / "method-rmu").exists() and not (tmp_path / "method-rmu-evaluate").exists()
    )
    # A method's evaluation alone: its edit stays.
    (tmp_path / "method-rmu").mkdir()
    (tmp_path / "method-rmu-evaluate").mkdir()
    assert invalidate(tmp_path, "method-evaluate") == ["method-evaluate"]
    assert (tmp_path / "method-rmu").exists() and not (tmp_path / "method-rmu-evaluate").exists()
    with pytest.raises(ValueError, match="stages in order: probe, sae"):
        invalidate(tmp_path, "export-it")


def test_api_accepts_a_recipe_object_mapping_or_path():
    path = RECIPES / "demo-smollm2.yaml"
    from_path, text = as_recipe(path)
    assert text == path.read_text() and from_path.model.builtin == "smollm2-135m"
    from_dict, text = as_recipe({"model": {"builtin": "smollm2-135m"}})
    assert from_dict.model == from_path.model and "smollm2-135m" in text
    assert as_recipe(from_dict)[0] is from_dict
    with pytest.raises(RecipeError, match="did you mean"):
        as_recipe({"model": {"builtin": "smollm2-135m"}, "probee": {}})


def test_public_functions_survive_importing_every_submodule():
    # A fresh interpreter, so that the submodules are imported after the package (as a user's script
    # does).
    import subprocess
    import sys

    code = (
        "import exporter, exporter.evaluate.harness, exporter.evaluate.summary, "
        "exporter.run.methods\nbad = [n for n in exporter.__all__ if n[0].islower() and n != "
        "'__version__' and not callable(getattr(exporter, n))]\nassert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "name,first",
    [
        ("baseline-rmu.yaml", "rmu"),
        ("baseline-npo.yaml", "gradient_ascent"),
        ("baseline-depn.yaml", "depn"),
    ],
)
def test_method_recipes_plan_their_own_stages(name, first):
    plan = make_plan(load_recipe(RECIPES / name, check_files=False))
    # The stages are the registry's, so `--from` accepts every name the plan shows.
    assert [s for s, _ in plan.stages] == ["method", "method-evaluate", "export"]
    assert set(s for s, _ in plan.stages[:-1]) <= set(STAGE_NAMES)
    assert plan.stages[0][1].startswith(first) and "plain checkpoint" in plan.stages[-1][1]
    assert plan.d_sae == 0
    trained = dict(plan.memory)["gradients + AdamW state of trained tensors (float32)"]
    # RMU trains three MLP projections, NPO the whole model (Adam state: 3 x 4 bytes per parameter
    # of SmolLM2's 135M), DEPN nothing (it zeroes neurons).
    assert {
        "rmu": 0.01 < trained < 0.1,
        "gradient_ascent": 1.4 < trained < 1.6,
        "depn": trained == 0.0,
    }[first]


def test_each_builtin_model_has_a_demo_recipe(tmp_path):
    from exporter.api import DEMO_RECIPES, demo

    for name, path in DEMO_RECIPES.items():
        recipe = load_recipe(path)
        assert recipe.model.builtin == name and recipe.data.pii.builtin == "synthetic"
    with pytest.raises(ValueError, match="built-in demos: smollm2-135m, gemma3-270m"):
        demo(tmp_path / "out", model="llama")


def test_the_demo_builds_the_leaky_model_its_recipe_runs_on(tmp_path, scalpel, monkeypatch):
    """`scalpel demo` fine-tunes (or reads from the cache) the leaky model of its own recipe's
    size, not the default's: a Gemma demo of 200 memorised people never builds one of 100."""
    from exporter import api, cli

    built = []

    def make_leaky(**kwargs):
        built.append(kwargs["people"])
        raise SystemExit(0)  # the run after it is not this test's

    monkeypatch.setattr(cli, "make_leaky_cmd", make_leaky)
    for name, path in api.DEMO_RECIPES.items():
        assert scalpel("demo", "--model", name, "--out", tmp_path / name).code == 0
        assert built[-1] == load_recipe(path).data.pii.memorised
    assert built == [None, 200]


def test_demo_set_flags_reach_its_leaky_model_and_its_run(tmp_path, scalpel, monkeypatch):
    from exporter import api, cli

    seen = {}
    monkeypatch.setattr(cli, "make_leaky_cmd", lambda **kwargs: seen.update(kwargs))

    def run(recipe, out, **kwargs):
        seen["recipe"] = api.as_recipe(recipe, kwargs["overrides"])[0]
        raise SystemExit(0)  # the run itself is not this test's

    monkeypatch.setattr(api, "run", run)
    flags = ["--set", "data.pii.memorised=150", "--set", "eval.samples=0"]
    assert scalpel("demo", "--out", tmp_path / "demo", *flags).code == 0
    assert seen["people"] == 150 and seen["recipe"].data.pii.memorised == 150
    assert seen["recipe"].eval.samples == 0 and seen["recipe"].model.builtin == "smollm2-135m"
    # its model and its people are the built-in leaky ones: another is a recipe's
    seen.clear()
    for key in ("model.builtin=gemma3-270m", "data.pii.path=mail", "data.people={path: p.jsonl}"):
        refused = scalpel("demo", "--out", tmp_path / "demo", "--set", key)
        assert refused.code == 2 and "scalpel run RECIPE" in refused.err and not seen, key


def test_a_distilled_card_names_the_layers_the_adapters_were_on():
    from exporter.card_edits import distilled_layers

    def report(**settings):
        return {"layer": 13, "distill": {"settings": settings}}

    assert distilled_layers(report(adapted_layers=4)) == "decoder layers 10 to 13"
    assert distilled_layers(report(adapted_layers=0)) == "decoder layers 0 to 13"
    assert distilled_layers(report()) == "decoder layers 0 to 13"  # a report from before the option
    late = report(adapted_layers=4, late_steps=150)
    assert distilled_layers(late) == "every decoder layer from 10 on"
    assert distilled_layers(report(late_steps=150)) == "every decoder layer"


def test_the_card_says_what_the_context_gate_is():
    from exporter.card import _remote_how

    report = {"layer": 4, "ablate_n": 400, "alpha": 0.3, "rule": "r", "score": "s"}
    report |= {"mode": "folded", "context_gate": True}
    stats = {"recall": 0.95, "open_benign": 0.0006}
    linear = "\n".join(_remote_how(report | {"context_gate_stats": stats}, {"k": 32, "fvu": 0.02}))
    assert "95.0% of PII-context tokens" in linear and "hidden layer" not in linear
    hidden = "\n".join(
        _remote_how(report | {"context_gate_stats": stats | {"hidden": 16}}, {"k": 32, "fvu": 0.02})
    )
    assert "one hidden layer of 16 ReLU units" in hidden


def test_the_threat_model_says_what_its_rates_are_worth():
    """Every threat row is a rate over a few dozen test people: the card says how many, and how high
    a true rate a 0% of them still allows."""
    from exporter.threat import PREFIX_DECODING, threat_section, upper_bound

    assert abs(upper_bound(0, 50) - 0.0582) < 1e-3 and abs(upper_bound(1, 50) - 0.0914) < 1e-3
    assert upper_bound(0, 100) < upper_bound(0, 50) < upper_bound(1, 50) and upper_bound(5, 5) == 1

    def rows(exact: float, decoding: str = "greedy", n: int = 50) -> list[dict]:
        common = {"group": "test", "pii_type": "email", "n": n, "decoding": decoding}
        return [{**common, "attack": "email_of", "exact": exact, "username": exact}]

    evaluation = {"base": {"leakage": rows(0.74)}, "patched": {"leakage": rows(0.0)}}
    text = "\n".join(threat_section(evaluation, remote=False))
    assert "over 50 test people: one of 50 is 2.0%" in text and "up to 5.8%" in text
    assert "9.1% for one of 50" in text
    evaluation["patched"]["leakage"] += rows(0.0, PREFIX_DECODING, n=48)
    text = "\n".join(threat_section(evaluation, remote=False))
    assert "over 48 test people or values" in text and "up to 6.1%" in text
    assert "Clopper" not in "\n".join(threat_section({"base": {"leakage": []}}, remote=True))
