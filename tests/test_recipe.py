import textwrap

import pytest
import yaml

from exporter.recipe import Recipe, RecipeError, load_recipe, parse_recipe, recipe_yaml


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_minimal_recipe_fills_every_default(tmp_path, hf_dir):
    (tmp_path / "pii.jsonl").write_text('{"text": "mail a@b.com"}\n')
    (tmp_path / "benign.txt").write_text("prose\n")
    (tmp_path / "people.jsonl").write_text('{"name": "A B", "email": "a@b.com"}\n')
    path = write(
        tmp_path,
        """
        model: {path: ./model, dtype: float32}
        data:
          pii: {path: pii.jsonl}
          benign: {path: benign.txt}
          people: {path: people.jsonl}
    """,
    )
    recipe = load_recipe(path)
    assert recipe.model.path == str(hf_dir.resolve())
    assert recipe.data.pii.path == str((tmp_path / "pii.jsonl").resolve())
    assert recipe.sae.k == 32 and recipe.sae.expansion == 8 and recipe.probe.layer == "auto"
    assert set(Recipe.model_fields) == {
        "model",
        "method",
        "data",
        "probe",
        "sae",
        "intervention",
        "export",
        "eval",
        "hub",
    }
    assert recipe.method.name == "scalpel"
    # Round-trips through YAML.
    again = parse_recipe(__import__("yaml").safe_load(recipe_yaml(recipe)))
    assert again == recipe


@pytest.mark.parametrize(
    "spec",
    [
        {"builtin": "smollm2-135m"},
        {"hub": "org/name", "revision": "abc123"},
        {"builtin": "gemma3-270m", "dtype": "bfloat16", "device": "auto"},
    ],
)
def test_model_sources(spec):
    recipe = parse_recipe({"model": spec})
    assert recipe.data.benign.builtin == "pydoc"


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, "model: {builtin: smollm2-135m}\n")
    assert load_recipe(path, {"sae.k": 16, "probe.layer": 7}).sae.k == 16
    with pytest.raises(RecipeError, match=r"sae\.k"):
        load_recipe(path, {"sae.k": 0})


# (yaml text, what the message must name)
BAD = [
    (
        "model: {builtin: smollm2-135m}\nsae: {kk: 3}\n",
        ["sae.kk", "did you mean 'k'", "allowed here"],
    ),
    ("model: {builtin: smollm2-135m}\nprobe: {layr: 3}\n", ["probe.layr", "did you mean 'layer'"]),
    ("modle: {builtin: smollm2-135m}\n", ["modle", "did you mean 'model'"]),
    ("data: {}\n", ["model", "missing"]),
    (
        "model: {builtin: smollm2-135m, dtype: float64}\n",
        ["model.dtype", "'float64'", "float32", "bfloat16"],
    ),
    ("model: {builtin: smolm2-135m}\n", ["model.builtin", "did you mean 'smollm2-135m'"]),
    ("model: {path: ./does-not-exist}\n", ["model.path", "file not found", "does-not-exist"]),
    ("model: {builtin: smollm2-135m, path: ./x}\n", ["model.path", "file not found"]),
    ("model: {}\n", ["model", "exactly one model source"]),
    (
        "model: {builtin: smollm2-135m, revision: abc}\n",
        ["model", "revision only applies to a hub model"],
    ),
    ("model: {hub: not a repo id}\n", ["model.hub", "not a repo id"]),
    (
        "model: {builtin: smollm2-135m}\nsae: {k: -1}\n",
        ["sae.k", "-1", "greater than or equal to 1"],
    ),
    ("model: {builtin: smollm2-135m}\nsae: {k: many}\n", ["sae.k", "'many'", "integer"]),
    ("model: {builtin: smollm2-135m}\nprobe: {layer: -2}\n", ["probe.layer", "-2"]),
    (
        "model: {builtin: smollm2-135m}\ndata: {pii: {path: missing.jsonl}}\n",
        ["data.pii.path", "missing.jsonl"],
    ),
    ("model: {builtin: smollm2-135m}\ndata: {pii: {}}\n", ["data.pii", "exactly one of path"]),
    (
        "model: {builtin: smollm2-135m}\n"
        "data: {pii: {path: c.txt}, people: {builtin: synthetic}}\n",
        ["data", "names the synthetic corpus's people", "leave people out"],
    ),
    (
        "model: {builtin: smollm2-135m}\ndata: {pii: {builtin: synthetic, memorised: 1}}\n",
        ["data.pii.memorised", "greater than or equal to 2"],
    ),
    (
        "model: {builtin: smollm2-135m}\ndata: {benign: {builtin: wikipedia}}\n",
        ["data.benign.builtin", "pydoc"],
    ),
    (
        "model: {builtin: smollm2-135m}\nintervention: {ablate_n: []}\n",
        ["intervention.ablate_n", "non-empty"],
    ),
    (
        "model: {builtin: smollm2-135m}\nexport: {mode: gguf}\n",
        ["export.mode", "remote_code", "plain"],
    ),
    ("model: {builtin: smollm2-135m}\nhub: {repo_id: nope}\n", ["hub.repo_id", "'nope'"]),
    (
        "model: {builtin: smollm2-135m}\ndata: {pii_types: [email, passport]}\n",
        ["data.pii_types.1", "'passport'"],
    ),
    ("model: [builtin]\n", ["model"]),
    (
        "model: {builtin: smollm2-135m}\nmethod: {name: npoo}\n",
        ["method", "'npoo'", "use one of", "gradient_ascent"],
    ),
    ("model: {builtin: smollm2-135m}\nmethod: {lr: 0.1}\n", ["method", "needs a name", "rmu"]),
    (
        "model: {builtin: smollm2-135m}\nmethod: {name: rmu, coef: 6.5}\n",
        ["method.rmu.coef", "allowed here", "alpha"],
    ),
    (
        "model: {builtin: smollm2-135m}\nmethod: {name: depn, neurons: [0]}\n",
        ["method.depn.neurons", ">= 1"],
    ),
    (
        "model: {builtin: smollm2-135m}\nmethod: {name: gradient_ascent, loss: dpo}\n",
        ["method.gradient_ascent.loss", "'dpo'", "npo"],
    ),
]


@pytest.mark.parametrize("text,needles", BAD, ids=[b[1][0] for b in BAD])
def test_bad_recipes_name_the_file_key_value_and_fix(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "model: {builtin: smollm2-135m\nsae: [\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d+"):
        load_recipe(path)


def test_non_mapping_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_exits_nonzero_with_message(tmp_path, scalpel):
    bad = scalpel("check", write(tmp_path, "model: {builtin: smollm2-135m}\nsae: {kk: 3}\n"))
    assert bad.code == 2
    assert "sae.kk" in bad.err and "did you mean 'k'" in bad.err
    ok = scalpel("check", write(tmp_path, "model: {builtin: smollm2-135m}\n"))
    assert ok.code == 0, ok.err
    assert "expansion: 8" in ok.out


def test_shipped_recipes_validate(tmp_path):
    import shutil
    from pathlib import Path

    recipes = Path(__file__).parent.parent / "recipes"
    assert load_recipe(recipes / "demo-smollm2.yaml").model.builtin == "smollm2-135m"
    # The local-model template needs its files; give it some and it validates.
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(recipes / "local-model.yaml", folder)
    (tmp_path / "my-model").mkdir()
    (tmp_path / "pii.jsonl").write_text('{"text": "a@b.com"}\n')
    local = load_recipe(folder / "local-model.yaml")
    # the model and the corpus are the whole recipe: no people file, none of the synthetic people
    assert (local.data.people.path, local.data.people.builtin) == (None, None)
    assert local.intervention.context_gate == [True] and local.intervention.leakage_target == 0.0
    (tmp_path / "people.jsonl").write_text('{"name": "A", "email": "a@b.com"}\n')
    text = (folder / "local-model.yaml").read_text().replace("  # people:", "  people:")
    (folder / "local-model.yaml").write_text(text)
    assert load_recipe(folder / "local-model.yaml").data.people.path == str(
        (tmp_path / "people.jsonl").resolve()
    )
    with pytest.raises(RecipeError, match="model.path"):
        load_recipe(recipes / "local-model.yaml")
    # the distilled Gemma demo is the Gemma demo with a distilled export (the teacher's search and
    # gate the same), relearning left out
    gemma, distilled = (load_recipe(recipes / f"demo-gemma3{s}.yaml") for s in ("", "-distilled"))
    assert distilled.export.mode == "distilled" and distilled.export.distill.documents == "all"
    assert distilled.eval.relearn_steps == 0 and gemma.export.mode != "distilled"
    assert (distilled.model, distilled.data, distilled.intervention, distilled.sae) == (
        gemma.model, gemma.data, gemma.intervention, gemma.sae,
    )  # fmt: skip
    names = {
        name: load_recipe(recipes / f"baseline-{name}.yaml").method.name
        for name in ("rmu", "npo", "depn")
    }
    assert names == {"rmu": "rmu", "npo": "gradient_ascent", "depn": "depn"}


def test_every_recipe_field_is_explained_from_the_schema(scalpel):
    """`scalpel check --explain` reads the schema's own descriptions: no field goes unexplained."""
    from exporter.recipe import explain

    rows = list(explain())
    keys = {k for k, _, _ in rows}
    assert {"sae.k", "intervention.alpha", "eval.dtype", "method[name=rmu].c"} <= keys
    assert not [k for k, _, text in rows if not text]
    assert dict((k, d) for k, d, _ in rows)["sae.k"] == "32" and "model" in keys
    run = scalpel("check", "--explain")
    assert run.code == 0, run.err
    out = " ".join(run.out.split())
    assert (
        "intervention.leakage_target" in out
        and "Worst exact rate allowed on validation people and values" in out
    )


def test_the_demo_recipes_in_recipes_are_the_ones_scalpel_demo_runs():
    """The README points users at recipes/demo-*.yaml; `scalpel demo` runs the packaged copies."""
    from pathlib import Path

    from exporter.api import DEMO_RECIPES

    recipes = Path(__file__).parent.parent / "recipes"
    for model, packaged in DEMO_RECIPES.items():
        shipped = recipes / Path(packaged).name
        assert shipped.read_text() == Path(packaged).read_text(), f"{shipped} differs ({model})"


def test_the_synthetic_corpus_size_reaches_the_leaky_fine_tune_and_keys_only_when_given(
    tmp_path, monkeypatch
):
    """`data.pii.memorised` sizes the leaky model's corpus; left out, the recipe serialises (and so
    keys its cached stages) as before the field existed."""
    from exporter.run import inputs

    plain = parse_recipe({"model": {"builtin": "smollm2-135m"}})
    assert "memorised" not in plain.data.model_dump()["pii"]
    assert "memorised" not in recipe_yaml(plain)
    sized = parse_recipe(
        {
            "model": {"builtin": "smollm2-135m"},
            "data": {"pii": {"builtin": "synthetic", "memorised": 200}},
        }
    )
    assert sized.data.model_dump()["pii"]["memorised"] == 200
    assert parse_recipe(yaml.safe_load(recipe_yaml(sized))) == sized

    class Stop(Exception):
        pass

    def make_leaky(base, config, ctx):
        raise Stop(config.synthetic.n_memorised, config.synthetic.n_never_seen)

    corpus = tmp_path / "pii.jsonl"
    corpus.write_text('{"text": "mail a@b.com"}\n')
    with pytest.raises(RecipeError, match="memorised sizes the built-in synthetic corpus.*drop"):
        own = "model: {builtin: smollm2-135m}\ndata: {pii: {path: pii.jsonl, memorised: 200}}\n"
        load_recipe(write(tmp_path, own))

    monkeypatch.setattr(inputs, "make_leaky", make_leaky)
    for recipe, want in ((plain, 100), (sized, 200)):
        with pytest.raises(Stop) as info:
            inputs.resolve_inputs(recipe)
        assert info.value.args == (want, 50)


def test_set_flags_are_read_as_yaml_and_bad_ones_name_the_fix():
    from exporter.recipe import parse_overrides

    flags = ["eval.samples=0", "intervention.alpha=[0.2, 0.3]", "hub.repo_id=a/b"]
    assert parse_overrides(flags) == {
        "eval.samples": 0,
        "intervention.alpha": [0.2, 0.3],
        "hub.repo_id": "a/b",
    }
    with pytest.raises(RecipeError, match=r"SECTION\.FIELD=VALUE"):
        parse_overrides(["eval.samples"])
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_overrides(["intervention.alpha=[0.2"])


def test_an_overridden_recipe_records_what_ran(tmp_path):
    """The text a run keeps (export, card) is the file's settings with the overrides applied: read
    back, it is the recipe that ran."""
    from exporter.api import as_recipe

    path = write(tmp_path, "model: {builtin: smollm2-135m}\neval: {samples: 2, few_shot: 1}\n")
    overrides = {"eval.samples": 0, "intervention.alpha": [0.2], "sae.k": 16}
    recipe, text = as_recipe(path, overrides)
    assert (recipe.eval.samples, recipe.eval.few_shot, recipe.sae.k) == (0, 1, 16)
    assert recipe.intervention.alpha == [0.2]
    assert text.startswith("# recipe.yaml --set eval.samples=0 --set intervention.alpha=[0.2]")
    (tmp_path / "ran.yaml").write_text(text)
    assert load_recipe(tmp_path / "ran.yaml") == recipe
    # a recipe object or mapping takes the same overrides; none leaves the file's text as it is
    assert as_recipe(load_recipe(path), overrides)[0] == recipe
    assert as_recipe(path)[1] == path.read_text()
    with pytest.raises(RecipeError, match=r"eval\.samples"):
        as_recipe(path, {"eval.samples": -1})


def test_run_and_check_take_set_flags(tmp_path, scalpel):
    path = write(tmp_path, "model: {builtin: smollm2-135m}\n")
    plan = scalpel("run", path, "--dry-run", "--set", "sae.expansion=4")
    assert plan.code == 0 and "SAE 2,304 latents" in plan.out
    bad = scalpel("check", path, "--set", "evl.samples=0")
    assert bad.code == 2 and "did you mean 'eval'" in bad.err
    bad = scalpel("check", path, "--set", "eval.samples")
    assert bad.code == 2 and "--set eval.samples=0" in bad.err
