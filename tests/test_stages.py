"""Probe and SAE stages end to end on a tiny model, with the stage cache."""

import json
from pathlib import Path

import pytest
from conftest import write_workspace

from exporter import api
from exporter.patch.candidate import Candidate
from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.methods import run_recipe
from exporter.run.scalpel import prepare
from exporter.run.search import search_stage


def _quiet(work) -> RunContext:
    return RunContext(work, progress=False, log=lambda m: None)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_tokenizer, monkeypatch):
    # keep tiny activations out of the user cache
    monkeypatch.setenv("SCALPEL_CACHE_DIR", str(tmp_path / "cache"))
    write_workspace(
        tmp_path,
        tiny_tokenizer,
        n_memorised=16,
        n_never_seen=4,
        texts_per_person=3,
        seed=7,
        benign="talks about objects, names and the way Python binds them to values.",
        paragraphs=40,
        recipe="""
model: {path: model}
data: {pii: {path: pii.jsonl}, benign: {path: benign.txt}, people: {path: people.jsonl},
       max_length: 64}
probe: {max_tokens: 3000}
sae: {expansion: 2, k: 4, k_aux: 8, batch_size: 256, train_tokens: 5120, harvest_tokens: 3000,
      dead_tokens: 2000, checkpoint_every: 5}
""",
    )
    return load_recipe(tmp_path / "recipe.yaml")


def test_probe_then_sae_stages_write_reports_and_reuse_the_cache(tiny_recipe, tmp_path):
    from exporter.sae import load_sae

    work = tmp_path / "work"
    logs = []
    result = api.probe(tiny_recipe, work=work, progress=False, log=logs.append)
    assert result.layers == [0, 1, 2] and result.chosen in (0, 1, 2)
    assert {p.name for p in (work / "probe").iterdir()} >= {"probe.json", "probe.md", "probe.png"}
    _, sae, metrics = api.train_sae(
        tiny_recipe, work=work, layer=result.chosen, progress=False, log=logs.append
    )
    assert sae.d_in == 32 and sae.d_sae == 64
    for key in (
        "fvu",
        "l0",
        "dead_fraction",
        "ce_increase_fraction",
        "ce_clean",
        "ce_spliced",
        "ce_zero",
    ):
        assert key in metrics
    assert metrics["l0"] <= 4 and 0 <= metrics["fvu"] < 1.5
    loaded, cfg = load_sae(work / "sae")
    assert cfg["metadata"]["hook_layer"] == result.chosen
    assert not (work / "sae-checkpoint").exists() or not any((work / "sae-checkpoint").iterdir())
    # Re-running reuses both stages.
    logs.clear()
    api.probe(tiny_recipe, work=work, progress=False, log=logs.append)
    _, again, metrics2 = api.train_sae(
        tiny_recipe, work=work, layer=result.chosen, progress=False, log=logs.append
    )
    assert any("probe (cached)" in line for line in logs) and any(
        "SAE (cached)" in line for line in logs
    )
    assert metrics2 == json.loads((work / "sae" / "metrics.json").read_text())
    # Reports carry no PII from the input data.
    people_emails = [
        json.loads(line)["email"] for line in (tmp_path / "people.jsonl").read_text().splitlines()
    ]
    for f in list((work / "probe").iterdir()) + list((work / "sae").iterdir()):
        if f.suffix in (".json", ".md"):
            text = f.read_text()
            assert not any(e in text for e in people_emails), f


def test_online_source_trains_too(tiny_recipe, tmp_path):
    recipe = tiny_recipe.model_copy(
        update={"sae": tiny_recipe.sae.model_copy(update={"source": "online"})}
    )
    _, sae, metrics = api.train_sae(
        recipe, work=tmp_path / "work-online", layer=1, progress=False, log=lambda m: None
    )
    assert metrics["steps"] == 20 and metrics["layer"] == 1


def test_layer_out_of_range(tiny_recipe, tmp_path):
    with pytest.raises(IndexError, match=r"layers 0\.\.2"):
        api.train_sae(tiny_recipe, work=tmp_path / "w", layer=7, progress=False, log=print)


def test_train_sae_command_under_torchrun(tiny_recipe, tmp_path):
    import os
    import subprocess
    import sys

    from exporter.sae import load_sae

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "exporter",
        "train-sae",
        str(tmp_path / "recipe.yaml"),
        "--work",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "TopK SAE at layer" in proc.stdout
    sae, cfg = load_sae(tmp_path / "ddp" / "sae")
    assert sae.d_sae == 64 and (tmp_path / "ddp" / "probe" / "probe.json").exists()
    # Both ranks harvested their share of the text into the shared activation cache.
    shards = [p.name for p in (tmp_path / "cache" / "activations").rglob("*.safetensors")]
    assert any(n.startswith("r0of2-") for n in shards) and any(
        n.startswith("r1of2-") for n in shards
    )


def test_export_stage_end_to_end(tiny_recipe, tmp_path):
    import subprocess
    import sys

    work, out = tmp_path / "work", tmp_path / "patched"
    recipe_text = (tmp_path / "recipe.yaml").read_text()
    logs = []
    result = api.export(
        tmp_path / "recipe.yaml",
        out,
        work=work,
        n=6,
        alpha=0.1,
        mode="folded",
        progress=False,
        log=logs.append,
    )
    report = result.report
    assert (report["mode"], report["ablate_n"], report["alpha"]) == ("folded", 6, 0.1)
    assert 0 <= report["folded_vs_exact"]["gate_agreement"] <= 1
    assert set(report["validation_leakage"]) == {"before", "after"}
    assert (out / "scalpel_recipe.yaml").read_text() == recipe_text
    assert {"cfg.json", "sae_weights.safetensors"} == {p.name for p in (out / "sae").iterdir()}
    config = json.loads((out / "config.json").read_text())["scalpel_patch"]
    assert (config["n_ablate"], config["alpha"], config["rule"], config["score"]) == (
        6,
        0.1,
        "both",
        "ratio",
    )
    assert config["context_gate"] is True  # the default: the first of intervention.context_gate
    assert config["steer_norm"] > 0
    # Nothing the run wrote holds an email or a name of the input people.
    people = [json.loads(line) for line in (tmp_path / "people.jsonl").read_text().splitlines()]
    secrets = [p["email"] for p in people] + [
        w for p in people for w in p["name"].split() if len(w) >= 4
    ]
    for f in list(out.rglob("*")) + list((work / "features").rglob("*")):
        if f.is_file() and f.suffix in (".json", ".md", ".yaml", ".py"):
            text = f.read_text()
            assert not [s for s in secrets if s in text], f
    # An existing output is refused (exit 2, before any work) unless --overwrite; stages are reused.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "export",
            str(tmp_path / "recipe.yaml"),
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    logs.clear()
    api.export(
        tmp_path / "recipe.yaml",
        out,
        work=work,
        n=6,
        alpha=0.0,
        mode="exact",
        overwrite=True,
        progress=False,
        log=logs.append,
    )
    assert any("features (cached)" in line for line in logs)
    assert json.loads((out / "config.json").read_text())["scalpel_patch"]["mode"] == "exact"
    # Behind the PII-context gate: fitted with the features, recorded in the config, report and
    # card.
    result = api.export(
        tmp_path / "recipe.yaml",
        out,
        work=work,
        n=6,
        alpha=0.1,
        mode="folded",
        gated=True,
        overwrite=True,
        progress=False,
        log=logs.append,
    )
    stats = result.report["context_gate_stats"]
    assert (
        result.report["context_gate"] is True
        and stats["recall"] >= 0.98
        and 0 <= stats["open_benign"] <= 1
    )
    assert json.loads((out / "config.json").read_text())["scalpel_patch"]["context_gate"] is True
    assert "context gate" in (out / "README.md").read_text()


def test_context_gate_fitted_on_the_benign_windows_too(tiny_recipe, tmp_path, monkeypatch):
    from exporter.recipe import Recipe
    from exporter.run.analysis import gate_windows

    logs = []
    ctx = RunContext(tmp_path / "work", progress=False, log=logs.append)
    paragraphs = prepare(tiny_recipe, ctx)
    gate = lambda prep: prep.features.context  # noqa: E731
    raw = tiny_recipe.model_dump()
    raw["intervention"]["context_negatives"] = "windows"
    windows_recipe = Recipe.model_validate(raw)
    none = gate_windows(tiny_recipe, paragraphs.inputs, paragraphs.loaded, 0, progress=False)
    assert none is None
    logs.clear()
    windowed = prepare(windows_recipe, ctx)
    assert not any(m.startswith("features (cached)") for m in logs)  # its own cache key
    assert any("of the benign text's windows" in m for m in logs)
    stats = json.loads((tmp_path / "work" / "features" / "context_gate.json").read_text())
    acts = gate_windows(
        windows_recipe, windowed.inputs, windowed.loaded, windowed.layer, progress=False
    )
    assert len(acts) > 100 and acts.shape[1] == paragraphs.sae.d_in
    (w, b), (w0, b0) = gate(windowed), gate(paragraphs)
    assert stats["open_windows"] == pytest.approx(float((acts @ w + b > 0).float().mean()))
    assert stats["open_windows"] <= float((acts @ w0 + b0 > 0).float().mean())
    assert stats["recall"] >= 0.98
    # A corpus larger than the budget: windows spread over it, within the budget's tokens.
    import sys

    from exporter.data.corpus import benign_texts

    every = benign_texts(windowed.inputs.benign_path, split="train", mode="windows")
    budget = 3 * 2 * windows_recipe.data.max_length
    # `exporter.run` is also the API's function: the module itself
    monkeypatch.setattr(sys.modules["exporter.run.analysis"], "GATE_WINDOW_TOKENS", budget)
    fewer = gate_windows(
        windows_recipe, windowed.inputs, windowed.loaded, windowed.layer, progress=False
    )
    assert len(every) > 3 and 0 < len(fewer) <= budget and len(fewer) < len(acts)


def test_context_gate_with_a_hidden_layer_is_cached_and_read_back(tiny_recipe, tmp_path):
    import torch

    from exporter.patch import context_scores
    from exporter.recipe import Recipe

    logs = []
    ctx = RunContext(tmp_path / "work", progress=False, log=logs.append)
    linear = prepare(tiny_recipe, ctx)
    raw = tiny_recipe.model_dump()
    raw["intervention"]["context_hidden"] = 4
    hidden_recipe = Recipe.model_validate(raw)
    logs.clear()
    fitted = prepare(hidden_recipe, ctx)
    assert not any(m.startswith("features (cached)") for m in logs)  # its own cache key
    assert any("context gate (hidden layer fit)" in m for m in logs)
    stats = json.loads((tmp_path / "work" / "features" / "context_gate.json").read_text())
    assert stats["hidden"] == 4 and stats["recall"] >= 0.98
    logs.clear()
    again = prepare(hidden_recipe, ctx)
    assert any(m.startswith("features (cached)") for m in logs)
    gate = again.features.context
    assert len(gate) == 4 and gate[0].shape == (4, linear.sae.d_in) and isinstance(gate[3], float)
    for got, want in zip(gate, fitted.features.context):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    patch = again.patch(Candidate(2, 0.1, "folded", True))
    x = torch.randn(64, linear.sae.d_in) * 3
    assert patch.context_hidden == 4
    assert torch.equal(patch.context(x), context_scores(gate, x) > 0)
    assert len(linear.features.context) == 2


def test_run_stage_searches_evaluates_and_exports(tiny_recipe, tmp_path):
    from exporter.evaluate.leakage import EMAIL_TEMPLATES
    from exporter.evaluate.prefix import DECODING as DOC_PREFIX
    from exporter.evaluate.user_path import DECODING as USER_PATH

    recipe = tiny_recipe.model_copy(
        update={
            "intervention": tiny_recipe.intervention.model_copy(
                update={"ablate_n": [2, 6], "alpha": [0.0, 0.1], "patch": ["folded"]}
            ),
            "eval": tiny_recipe.eval.model_copy(
                update={"max_new_tokens": 6, "samples": 2, "few_shot": 1, "memorisation_docs": 4}
            ),
        }
    )
    work, out = tmp_path / "work", tmp_path / "run-out"
    (tmp_path / "model" / "README.md").write_text(
        "---\nlicense: mit\nbase_model: someorg/tiny-base\n---\n# tiny\n"
    )
    text = "# contact jane.roe@example.org for access\nrecipe text\n"
    result = run_recipe(recipe, text, out, _quiet(work))
    report = json.loads((out / "scalpel_report.json").read_text())
    search = report["search"]
    assert len(search["candidates"]) == 4 and search["chosen"] in search["candidates"]
    assert (work / "search" / "front.png").exists()
    ev = report["evaluation"]
    assert set(ev) >= {"base", "patched", "control"}
    groups = {r["group"] for r in ev["patched"]["leakage"]}
    # validation people never appear in the reported numbers
    assert groups == {
        "test",
        "never_seen",
    }
    assert ev["base"]["utility"]["kl"] == 0.0 and ev["patched"]["utility"]["kl"] >= 0.0
    assert {r["decoding"] for r in ev["base"]["leakage"]} == {
        "greedy",
        "sampled x2",
        "adversarial greedy",
        "adversarial sampled x32",
        USER_PATH,
        DOC_PREFIX,
    }
    # The corpus-derived attacks: the test people's own values, prompted with their documents' text.
    prefix = [r for r in ev["patched"]["leakage"] if r["decoding"] == DOC_PREFIX]
    assert {(r["group"], r["attack"]) for r in prefix} >= {
        ("test", "prefix32"),
        ("test", "prefix8"),
    }
    assert all(r["n"] > 0 for r in prefix) and {r["pii_type"] for r in prefix} == {"email", "phone"}
    # The user's path: the export as written and the base, each loaded in a fresh process (stock
    # transformers, default dtype), each test person's prompt alone; the three templates, for the
    # base and the patch.
    user = [r for r in ev["patched"]["leakage"] if r["decoding"] == USER_PATH]
    assert {(r["group"], r["attack"]) for r in user} == {("test", t) for t in EMAIL_TEMPLATES}
    assert ev["user_path"]["dtype"] == {"base": "float32", "patched": "float32"}
    assert not [r for r in ev["control"]["leakage"] if r["decoding"] == USER_PATH]
    assert result.report["ablate_n"] == search["chosen"]["n"]
    # The card: Hub metadata carried from the base, the before/after table, plots, usage; PII
    # redacted.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "someorg/tiny-base"
    assert card.data.library_name == "transformers" and "pii-removal" in card.data.tags
    assert (
        "| metric | base | patched | control |" in card.text
        and "trust_remote_code=True" in card.text
    )
    assert "revision=revision" in card.text and "![front](plots/front.png)" in card.text
    assert (out / "plots" / "front.png").exists() and (out / "plots" / "probe.png").exists()
    assert "jane.roe@example.org" not in card.text and "j***@e***" in card.text
    # A second run reuses every candidate's cached score and the final evaluation.
    cached = sorted(p.name for p in (work / "search").glob("*.json"))
    logs = []
    run_recipe(recipe, text, out, RunContext(work, True, False, logs.append))
    assert sorted(p.name for p in (work / "search").glob("*.json")) == cached
    assert any(m.startswith("evaluation (cached)") for m in logs)
    assert any(m.startswith("user's path (cached)") for m in logs)
    # --from search forgets the search and the evaluation, not the stages before them.
    logs.clear()
    run_recipe(recipe, text, out, RunContext(work, True, False, logs.append), from_stage="search")
    assert any(m.startswith("features (cached)") for m in logs)
    assert not any(m.startswith("evaluation (cached)") for m in logs)
    assert sorted(p.name for p in (work / "search").glob("*.json")) == cached


def test_plain_run_scores_both_kinds_and_exports_a_stock_checkpoint(tiny_recipe, tmp_path):
    """export.mode plain: plain candidates join the search (reported apart), the choice is a plain
    one, and the export is a stock llama checkpoint whose logits are the in-process twin's."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.models import load_model
    from exporter.patch import projected
    from exporter.recipe import parse_recipe

    data = __import__("yaml").safe_load((tmp_path / "recipe.yaml").read_text())
    data["intervention"] = {
        "ablate_n": [2, 6],
        "alpha": [0.0, 0.1],
        "patch": ["folded"],
        "leakage_target": 1.0,
    }
    # the evaluation's attack families have tests of their own (above); here only the choice and
    # the checkpoint count
    data["eval"] = {
        "max_new_tokens": 6, "few_shot": 1, "samples": 0, "adversarial": False,
        "user_path": False, "relearn_steps": 0, "memorisation_docs": 0,
    }  # fmt: skip
    data["export"] = {"mode": "plain"}
    recipe = parse_recipe(data, base_dir=tmp_path)
    assert recipe.intervention.patch == ["folded", "plain"]
    work, out = tmp_path / "work", tmp_path / "plain-out"
    result = run_recipe(recipe, "recipe", out, _quiet(work))
    search = result.report["search"]
    assert {c["mode"] for c in search["candidates"]} == {"folded", "plain"} and len(
        search["candidates"]
    ) == 8
    assert result.report["mode"] == "plain" and search["chosen"]["mode"] == "plain"
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "llama"
        and "auto_map" not in config
        and "scalpel_patch" not in config
    )
    card = (out / "README.md").read_text()
    assert "trust_remote_code" not in card and "Plain candidates" in card and "(I - P_A) h" in card
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    base = load_model(recipe.model).model
    ids = torch.randint(
        0, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0)
    )
    chosen = search["chosen"]
    prep = prepare(recipe, _quiet(work))
    edit = prep.patch(Candidate(chosen["n"], chosen["alpha"], "plain"))
    with torch.no_grad(), projected(base, prep.layer, edit.directions, edit.steer):
        want = base(ids.to(base.device)).logits.cpu()
    torch.testing.assert_close(plain.eval()(ids).logits.detach(), want, rtol=1e-5, atol=1e-5)
    # `scalpel export --plain` (mode plain) writes the same kind from a remote-code recipe.
    other = api.export(
        tiny_recipe,
        tmp_path / "export-plain",
        work=work,
        n=2,
        alpha=0.0,
        mode="plain",
        progress=False,
        log=lambda m: None,
    )
    assert other.report["mode"] == "plain" and "scalpel_plain" in json.loads(
        (tmp_path / "export-plain" / "config.json").read_text()
    )


def test_recipe_export_mode_and_candidate_modes_agree(tiny_recipe, tmp_path):
    from exporter.recipe import RecipeError, parse_recipe
    from exporter.run.distilled import harden_config_of

    base = {"model": {"builtin": "smollm2-135m"}}
    with pytest.raises(RecipeError, match="export.mode: plain"):
        parse_recipe({**base, "intervention": {"patch": ["plain"]}})
    with pytest.raises(RecipeError, match="remove export.dtype"):
        parse_recipe({**base, "export": {"mode": "plain", "dtype": "bfloat16"}})
    assert parse_recipe({**base, "export": {"mode": "plain"}}).intervention.patch == [
        "folded",
        "plain",
    ]
    # hardening by the model before the fine-tune: one edit at a time, and `model` only where the
    # recipe's model is the one the leaky benchmark fine-tunes
    harden = {"mode": "distilled", "distill": {"harden": {"reference": "model", "neurons": 4}}}
    with pytest.raises(RecipeError, match="not both: set neurons: 0 or remove reference"):
        parse_recipe({**base, "export": harden})
    harden["distill"]["harden"]["neurons"] = 0
    assert parse_recipe({**base, "export": harden}).export.distill.harden.on
    keys = {"mode": "distilled", "distill": {"harden": {"directions": 512}}}
    with pytest.raises(RecipeError, match="name that model in reference .* or set directions: 0"):
        parse_recipe({**base, "export": keys})
    # the repair's burst and the rate it settles to come together
    for half in ({"burst": 20}, {"settle_lr": 1e-4}):
        spec = {"mode": "distilled", "distill": {"harden": {"reference": "model", **half}}}
        with pytest.raises(RecipeError, match="burst and settle_lr go together"):
            parse_recipe({**base, "export": spec})
    spec["distill"]["harden"].update(burst=20, settle_lr=1e-4, lr=3e-4)
    cfg = harden_config_of(parse_recipe({**base, "export": spec}))
    assert (cfg.lr, cfg.burst, cfg.settle_lr) == (3e-4, 20, 1e-4)
    # the repair's benign weight is the distillation's unless the hardening names its own
    assert cfg.benign_weight == parse_recipe(base).export.distill.benign_weight
    spec["distill"].update(benign_weight=2.0)
    assert harden_config_of(parse_recipe({**base, "export": spec})).benign_weight == 2.0
    spec["distill"]["harden"].update(benign_weight=1.0)
    assert harden_config_of(parse_recipe({**base, "export": spec})).benign_weight == 1.0
    spec["distill"]["harden"].update(benign_weight=-1.0)
    with pytest.raises(RecipeError, match="benign_weight"):
        parse_recipe({**base, "export": spec})
    own = {"pii": {"path": str(tmp_path / "pii.jsonl")}}
    with pytest.raises(RecipeError, match="give the model it was fine-tuned from"):
        parse_recipe({**base, "data": own, "export": harden})


def test_run_command_prints_the_final_table(tiny_recipe, tmp_path, scalpel, capsys, monkeypatch):
    import os
    import runpy
    import subprocess
    import sys

    from helpers.hub_server import HubServer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        recipe.read_text() + "intervention: {ablate_n: [3], alpha: [0.0, 0.05]}\n"
        # the adversarial and user-path rows come from `scalpel eval` below
        "eval: {max_new_tokens: 6, few_shot: 1, adversarial: false, user_path: false, "
        "memorisation_docs: 4}\n"
        "hub: {repo_id: alice/tiny-scrubbed, "
        "commit_message: First scrubbed export}\n"
    )
    hub = HubServer(tokens={"hf_alice": "alice"}).start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": "hf_alice",
        "HF_HOME": str(tmp_path / "hf"),
    }
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "run",
                str(recipe),
                "--out",
                str(tmp_path / "o"),
                "--work",
                str(tmp_path / "w"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chosen on validation people" in proc.stdout and "test email exact" in proc.stdout
    assert "perplexity" in proc.stdout and (tmp_path / "o" / "config.json").exists()
    # The recipe's hub section pushed the export at the end, privately, in one commit.
    repo = hub.repos["alice/tiny-scrubbed"]
    files = repo.commits[repo.refs["main"]]
    assert repo.private and files["config.json"] == (tmp_path / "o" / "config.json").read_bytes()
    assert (
        f"revision: {repo.refs['main']}" in proc.stdout
        and "hf_alice" not in proc.stdout + proc.stderr
    )
    # Any pair through the same harness: the export against its base, people from a file.
    run = scalpel(
        "eval", tmp_path / "o", "--against", tmp_path / "model",
        "--people", tmp_path / "people.jsonl", "--json", tmp_path / "eval.json",
    )  # fmt: skip
    assert run.code == 0, run.err[-2000:]
    assert "every attack" in run.out and "KL(base" in run.out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {r["group"] for r in result["base"]["leakage"]} == {"test", "never_seen"}
    assert result["base"]["utility"]["kl"] == 0.0 and result["patched"]["utility"]["kl"] > 0.0
    assert result["user_path"]["dtype"] == {"base": "float32", "patched": "float32"}
    assert "one prompt, fresh process" in run.out
    # The examples: stock transformers loading and generation in a fresh process (the user's
    # path), and the pair evaluation through the API.
    examples = Path(__file__).parents[1] / "examples"
    proc = subprocess.run(
        [sys.executable, str(examples / "load_export.py"), str(tmp_path / "o"), "Hello"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "patch at layer" in proc.stdout, proc.stderr[-2000:]
    pair = [
        examples / "evaluate_pair.py", tmp_path / "o", "--against", tmp_path / "model",
        "--people", tmp_path / "people.jsonl",
        # `scalpel eval` above ran the same harness with every attack
        "--no-adversarial", "--no-user-path",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", list(map(str, pair)))
    runpy.run_path(str(pair[0]), run_name="__main__")
    assert "| metric | base | patched |" in capsys.readouterr().out
    # The dry run plans without loading weights; unknown stages are refused with the list.
    run = scalpel("run", recipe, "--dry-run")
    assert run.code == 0 and "memory (estimated)" in run.out, run.err[-2000:]
    run = scalpel(
        "run", recipe, "--out", tmp_path / "o2", "--work", tmp_path / "w", "--from", "sea"
    )
    assert run.code == 2 and "unknown stage 'sea'" in run.err and "probe, sae" in run.err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("mode", ["lazy", "all"])
def test_lazy_search_attacks_only_up_to_the_choice(tiny_recipe, tmp_path, mode, native_bf16):
    recipe = tiny_recipe.model_copy(
        update={
            "intervention": tiny_recipe.intervention.model_copy(
                update={
                    "ablate_n": [2, 6],
                    "alpha": [0.0, 0.2],
                    "leakage_target": 1.0,
                    "search": mode,
                    "collapse_tolerance": 1.0,
                }
            ),
            "eval": tiny_recipe.eval.model_copy(
                update={"max_new_tokens": 4, "few_shot": 1, "dtype": "bfloat16"}
            ),
        }
    )
    work = tmp_path / "work"
    prep = prepare(recipe, _quiet(work))
    logs = []
    chosen, search = search_stage(recipe, prep, RunContext(work, progress=False, log=logs.append))
    scored = search["candidates"]
    attacked = [s for s in scored if s["leakage"] is not None]
    assert search["met"] and len(scored) == 4 and chosen.to_json() in attacked
    # Every candidate meets a 100% target: the least-KL one is the choice either way.
    assert chosen.kl == min(s["kl"] for s in scored)
    assert len(attacked) == (1 if mode == "lazy" else 4)
    assert ("not attacked" in logs[-1]) == (mode == "lazy")
    # The collapse check ran on what met the targets, against the base's repetition plus the
    # tolerance.
    assert chosen.repetition is not None and search["max_repetition"] is not None
    assert chosen.repetition <= search["max_repetition"]
    # The attacks ran on a bfloat16 copy; the model the patch is built on stays float32.
    import torch

    assert next(prep.loaded.model.parameters()).dtype == torch.float32
    # What met the targets in bfloat16 was attacked again in float32, the dtype the export loads in.
    confirmed = [
        json.loads(f.read_text()).get("confirmed") for f in (work / "search").glob("*.json")
    ]
    assert confirmed.count("float32") == len(attacked)


def _two_sizes_at_20_percent(tiny_recipe, dtype: str, **intervention):
    """Two candidates (N=2, 6; no steering), a 20% exact target, usernames not a criterion; attacks
    of 4 tokens, 1-shot, decoded in `dtype`."""
    return tiny_recipe.model_copy(
        update={
            "intervention": tiny_recipe.intervention.model_copy(
                update={
                    "ablate_n": [2, 6],
                    "alpha": [0.0],
                    "leakage_target": 0.2,
                    "username_target": 1.0,
                    **intervention,
                }
            ),
            "eval": tiny_recipe.eval.model_copy(
                update={"max_new_tokens": 4, "few_shot": 1, "dtype": dtype}
            ),
        }
    )


def test_search_chooses_on_the_dtype_users_load(tiny_recipe, tmp_path, monkeypatch, native_bf16):
    """A candidate that meets the targets decoded in bfloat16 but leaks decoded in float32 (what
    from_pretrained gives a user of the export) is not chosen."""
    import torch

    from exporter.evaluate import tradeoff

    real = tradeoff.leakage_rows

    def leaks_in_float32(model, *args, **kwargs):
        rows = real(model, *args, **kwargs)
        if next(model.parameters()).dtype == torch.float32:
            rows = [{**r, "exact": 0.5, "username": 0.5} for r in rows]
        return rows

    monkeypatch.setattr(tradeoff, "leakage_rows", leaks_in_float32)
    recipe = _two_sizes_at_20_percent(tiny_recipe, "bfloat16")
    work = tmp_path / "work"
    prep = prepare(recipe, _quiet(work))
    chosen, search = search_stage(recipe, prep, _quiet(work))
    # each met in bfloat16, then failed in float32 (at 50%: the lazy search stopped at the first
    # half of the validation people, a lower bound of 25% over both)
    assert not search["met"] and chosen.leakage >= 0.25
    assert all(s["leakage"] >= 0.25 for s in search["candidates"])


def test_search_samples_attack_the_validation_people_sampled_too(
    tiny_recipe, tmp_path, monkeypatch
):
    """With `search_samples`, each validation template is also sampled: a candidate that keeps every
    address in greedy but lets them out sampled is not chosen, and the greedy search's cached
    attacks are neither reused nor overwritten (its KL is: it does not depend on the attacks)."""
    from exporter.evaluate import tradeoff
    from exporter.run import search as search_module

    real, calls = tradeoff.leakage_rows, []
    real_kl, kl_calls = search_module.against_reference, []

    def counted_kl(*args, **kwargs):
        kl_calls.append(1)
        return real_kl(*args, **kwargs)

    monkeypatch.setattr(search_module, "against_reference", counted_kl)

    def leaks_when_sampled(*args, **kwargs):
        calls.append(kwargs["samples"])
        rows = real(*args, **kwargs)
        return [
            {**r, "exact": 0.5, "username": 0.5} if r["decoding"].startswith("sampled") else r
            for r in rows
        ]

    monkeypatch.setattr(tradeoff, "leakage_rows", leaks_when_sampled)
    work = tmp_path / "work"
    found = {}
    for samples in (0, 2):
        recipe = _two_sizes_at_20_percent(
            tiny_recipe, "float32", collapse_tolerance=None, search_samples=samples
        )
        prep = prepare(recipe, _quiet(work))
        calls.clear()
        kl_calls.clear()
        chosen, found[samples] = search_stage(recipe, prep, _quiet(work))
        assert set(calls) == {samples}
        # the greedy search computes each candidate's KL; the sampling one reads them
        assert len(kl_calls) == (2 if samples == 0 else 0)
    # The tiny model keeps every address in greedy: the greedy search meets the target at once.
    assert found[0]["met"] and found[0]["chosen"]["leakage"] <= 0.2
    # (a lazy search stops at the first part that breaks the target: a lower bound of 50%)
    assert not found[2]["met"] and chosen.leakage > 0.2
    assert all(c["leakage"] > 0.2 for c in found[2]["candidates"] if c["leakage"] is not None)
    files = sorted((work / "search").glob("*.json"))
    scores = [json.loads(f.read_text()) for f in files if f.name != "search.json"]
    assert sum((s.get("leakage") or 0) > 0.2 for s in scores) >= 1
    assert sum(s.get("leakage") is not None and s["leakage"] <= 0.2 for s in scores) >= 1
    assert [c["kl"] for c in found[2]["candidates"]] == [c["kl"] for c in found[0]["candidates"]]


def test_search_attacks_each_part_with_the_patch_fitted_without_it(
    tiny_recipe, tmp_path, monkeypatch
):
    """Cross-fitting (the default two parts): the features stage runs again on each part's
    complement, cached in the search's folder; every validation person is attacked once per attack,
    with a patch fitted on nobody attacked there; the export's features stay the whole split's."""
    from exporter.run import search as search_module

    fitted_on, attacked = {}, []
    real_features, real_rows = search_module.features_stage, search_module.validation_rows
    real_patched = search_module.Search.patched

    def features(recipe, inputs, *args, **kwargs):
        fs = real_features(recipe, inputs, *args, **kwargs)
        fitted_on[id(fs)] = {p.email for p in inputs.split("validation")}
        return fs

    def patched(self, cand, dtype, features=None):
        if features is not None:  # not the collapse check's (the export's patch)
            attacked.append([fitted_on[id(features)]])
        return real_patched(self, cand, dtype, features)

    def rows(attacker, tok, val, *args, **kwargs):
        attacked[-1].append({p.email for p in val.people})
        return real_rows(attacker, tok, val, *args, **kwargs)

    from exporter.run import analysis

    passes = []  # what each latents pass ran on: PII documents or benign prose

    def latents(model, tok, sae, layer, texts, **kwargs):
        passes.append("prose" if all(isinstance(t, str) for t in texts) else "documents")
        return real_latents(model, tok, sae, layer, texts, **kwargs)

    real_latents = analysis.collect_latents
    monkeypatch.setattr(analysis, "collect_latents", latents)
    monkeypatch.setattr(search_module, "features_stage", features)
    monkeypatch.setattr(search_module.Search, "patched", patched)
    monkeypatch.setattr(search_module, "validation_rows", rows)
    recipe = _two_sizes_at_20_percent(tiny_recipe, "float32", search="all")
    assert recipe.intervention.search_folds == 2
    work = tmp_path / "work"
    prep = prepare(recipe, _quiet(work))
    everyone = {p.email for p in prep.inputs.split("validation")}
    logs = []
    search_stage(recipe, prep, RunContext(work, progress=False, log=logs.append))
    assert len(fitted_on) == 2 and all(
        (work / "search" / f"fold{j}" / "key.txt").exists() for j in (0, 1)
    )
    # the run's features stage and each part's ran on their own documents and shared one pass over
    # the benign prose
    assert sorted(passes) == ["documents"] * 3 + ["prose"]
    assert len(attacked) == 2 * 2  # two candidates, two parts each
    for fit, val in attacked:
        assert val and fit and not fit & val and fit | val == everyone
    assert {frozenset(v) for _, v in attacked} == {frozenset(v) for v in fitted_on.values()}
    # a second search reads the parts' features from its folder
    fitted_on.clear()
    search_stage(recipe, prep, RunContext(work, progress=False, log=logs.append))
    assert sum("features-fold" in m and "(cached)" in m for m in logs) == 2
    # One part: the old search, features and attacks on the whole split.
    attacked.clear()
    fitted_on[id(prep.features)] = everyone
    one = recipe.model_copy(
        update={"intervention": recipe.intervention.model_copy(update={"search_folds": 1})}
    )
    search_stage(one, prep, _quiet(tmp_path / "one"))
    assert attacked and all(fit == val == everyone for fit, val in attacked)


def test_search_cuts_fewer_parts_when_the_validation_split_is_small(tiny_recipe, tmp_path):
    """Ten parts of eight validation people would leave parts of one: the search cuts four of two,
    and says so."""
    recipe = _two_sizes_at_20_percent(tiny_recipe, "float32", search_folds=10)
    work = tmp_path / "work"
    prep = prepare(recipe, _quiet(work))
    assert len(prep.inputs.split("validation")) == 8
    logs = []
    _, search = search_stage(recipe, prep, RunContext(work, progress=False, log=logs.append))
    assert any("make 4 part(s) of two or more, not 10" in m for m in logs)
    assert search["folds"] == 4 and len(list((work / "search").glob("fold*/key.txt"))) == 4


def test_leaky_key_follows_content_not_the_cache_location(tmp_path):
    from exporter.data.leaky import LeakyConfig
    from exporter.recipe import ModelSpec
    from exporter.run.leaky import leaky_key

    builtin, config = ModelSpec(builtin="smollm2-135m"), LeakyConfig()
    name = "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    assert leaky_key(builtin, tmp_path / "a" / name, config) == leaky_key(
        builtin, tmp_path / "b" / name, config
    )
    assert leaky_key(builtin, tmp_path / "a" / name, config) != leaky_key(
        builtin, tmp_path / "a" / "other", config
    )
    assert leaky_key(builtin, tmp_path / name, config) != leaky_key(
        builtin, tmp_path / name, LeakyConfig(seed=1)
    )
    (tmp_path / "a" / "m").mkdir(parents=True)
    user = ModelSpec(path=str(tmp_path / "a" / "m"))
    assert leaky_key(user, tmp_path / "a" / "m", config) != leaky_key(
        user, tmp_path / "b" / "m", config
    )


def test_utility_texts_follow_the_token_budget(tiny_tokenizer):
    from exporter.run.evaluation import utility_texts

    small, prompts = utility_texts(None, tiny_tokenizer, 500)
    large, _ = utility_texts(None, tiny_tokenizer, 3000)
    assert 0 < len(small) < len(large) and large[: len(small)] == small
    scored = lambda texts: sum(min(len(i), 128) - 1 for i in tiny_tokenizer(texts)["input_ids"])  # noqa: E731
    assert scored(small) >= 500 and scored(small[:-1]) < 500
    # The generation prompts are prefixes of texts that are never scored.
    assert len(prompts) == 16 and not any(t.startswith(p) for p in prompts for t in large)


def test_bfloat16_harvest_is_cached_apart_and_close_to_float32(tiny_recipe, native_bf16):
    """`sae.harvest_dtype: bfloat16` harvests the training activations through a bfloat16 copy of
    the model (its own cache entry); they differ from float32 ones by rounding only, and the model
    stays float32."""
    import torch

    from exporter.models import load_model
    from exporter.run.inputs import activations_key, calibration_activations, resolve_inputs

    bf16 = tiny_recipe.model_copy(
        update={"sae": tiny_recipe.sae.model_copy(update={"harvest_dtype": "bfloat16"})}
    )
    fp32 = tiny_recipe.model_copy(
        update={"sae": tiny_recipe.sae.model_copy(update={"harvest_dtype": "float32"})}
    )
    inputs = resolve_inputs(tiny_recipe, _quiet("unused"))
    assert activations_key(bf16, inputs, 1) != activations_key(fp32, inputs, 1)
    loaded = load_model(inputs.model)
    full = calibration_activations(fp32, inputs, loaded, 1, _quiet("unused"))
    half = calibration_activations(bf16, inputs, loaded, 1, _quiet("unused"))
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert full.shape == half.shape and half.dtype == torch.float32 and not torch.equal(full, half)
    assert (full - half).norm() / full.norm() < 0.02


def test_search_kl_streams_the_base_when_its_log_probs_would_not_fit(
    tiny_recipe, tmp_path, monkeypatch
):
    """A vocabulary whose held-out log-probs pass the budget (Gemma's 262k tokens: 3.2 GB) has the
    base's recomputed beside each candidate's instead of kept: the same KL and perplexity."""
    from exporter.evaluate import utility
    from exporter.run import search as search_module

    recipe = tiny_recipe.model_copy(
        update={
            "intervention": tiny_recipe.intervention.model_copy(
                update={"ablate_n": [2, 6], "alpha": [0.0, 0.2], "patch": ["folded"]}
            )
        }
    )
    kept_refs = []
    real = utility.reference

    def spy(*args, **kwargs):
        kept_refs.append(real(*args, **kwargs))
        return kept_refs[-1]

    scores = {}
    for budget in (utility.REFERENCE_BYTES, 1):
        monkeypatch.setattr(search_module, "REFERENCE_BYTES", budget)
        monkeypatch.setattr(search_module, "reference", spy)
        work = tmp_path / f"work-{budget}"
        prep = prepare(recipe, _quiet(work))
        _, found = search_stage(recipe, prep, _quiet(work))
        scores[budget] = {
            (c["n"], c["alpha"]): (c["kl"], c["perplexity"]) for c in found["candidates"]
        }
    # kept as a list of batches, then recomputed on each pass
    assert isinstance(kept_refs[0].batches, list) and not isinstance(kept_refs[1].batches, list)
    assert scores[1].keys() == scores[utility.REFERENCE_BYTES].keys()
    for cand, (kl, ppl) in scores[utility.REFERENCE_BYTES].items():
        assert scores[1][cand] == pytest.approx((kl, ppl), rel=1e-4, abs=1e-6), cand


def test_search_log_names_a_target_finer_than_one_validation_person(tiny_recipe, tmp_path):
    """8 validation people: one is 12.5%, so a 10% exact target holds nobody, and the run's log
    says so (a 20% one does not need saying)."""
    recipe = _two_sizes_at_20_percent(tiny_recipe, "float32", leakage_target=0.1)
    work, said = tmp_path / "work", []
    prep = prepare(recipe, _quiet(work))
    search_stage(recipe, prep, RunContext(work, progress=False, log=said.append))
    (warning,) = [m for m in said if "finer than one" in m]
    assert warning.startswith("search: leakage_target 10% is finer than one of the 8 validation")
