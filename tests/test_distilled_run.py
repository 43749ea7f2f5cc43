"""export.mode distilled end to end on a tiny Llama: the chosen remote-code patch is learnt into the
weights, evaluated as the weights alone beside its teacher and its control, and written as a stock
checkpoint whose card states the threat model; a remote-code export's own weights are the base's."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RECIPE

from exporter.recipe import load_recipe
from exporter.run.context import RunContext
from exporter.run.methods import run_recipe

DISTILLED = """
intervention: {ablate_n: [2, 6], alpha: [0.1], leakage_target: 1.0}
eval: {max_new_tokens: 6, few_shot: 1, samples: 0, adversarial: false, user_path: false,
       relearn_steps: 6, memorisation_docs: 4}
export: {mode: distilled, distill: {steps: 12, batch_size: 4, max_length: 48}}
"""


def test_distilled_run_writes_a_stock_checkpoint_with_its_threat_model(ws):
    from transformers import AutoModelForCausalLM

    (ws / "recipe.yaml").write_text(TINY_RECIPE + DISTILLED)
    recipe = load_recipe(ws / "recipe.yaml")
    logs = []
    out, work = ws / "out", ws / "work"
    result = run_recipe(recipe, "recipe", out, RunContext(work, False, False, logs.append))
    report = result.report
    assert report["export"] == "distilled" and report["mode"] in ("exact", "folded")
    evaluation = report["evaluation"]
    relearned = {"relearned on benign prose", "relearned on other people's PII documents"}
    assert {"base", "teacher", "patched", "control"} | relearned <= set(evaluation)
    summary = evaluation["distill"]["patched"]
    assert summary["settings"]["steps"] == 12 and len(summary["curve"]) == 12
    assert summary["changed_tensors"] > 0 and "curve" not in report["distill"]
    assert (work / "distill" / "curve.png").exists()
    assert (work / "distill-control" / "student.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["scalpel_distilled"]["layer"] == report["layer"]
    assert not list(out.glob("*.py"))
    card = (out / "README.md").read_text()
    assert "## Threat model" in card and "trust_remote_code" not in card
    assert "white-box" in card and (out / "plots" / "distill.png").exists()
    assert "relearning: the export relearned on benign prose" in card
    # Stock transformers loads it with nothing missing, in a fresh process.
    check = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        "m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)\n"
        "assert not any(info.values()), info\n"
    )
    subprocess.run([sys.executable, "-c", check, str(out)], check=True)
    # The checkpoint holds the distilled weights: they differ from the base where it says.
    base = AutoModelForCausalLM.from_pretrained(ws / "model")
    student = AutoModelForCausalLM.from_pretrained(out)
    b, s = dict(base.named_parameters()), dict(student.named_parameters())
    changed = [n for n in b if not torch.equal(b[n], s[n])]
    assert len(changed) == report["distill"]["changed_tensors"]
    assert all(f"layers.{report['layer'] + 1}." not in n for n in changed)
    # A second run reuses both distillations and the evaluation.
    logs.clear()
    run_recipe(recipe, "recipe", ws / "out2", RunContext(work, False, False, logs.append))
    assert any(m.startswith("distill (cached)") for m in logs)
    assert any(m.startswith("evaluation (cached)") for m in logs)


def test_a_distilled_run_with_its_later_layers_trained_says_so(ws):
    """distill.late_steps (defence in depth): the layers after the patch's change too, the summary
    keeps that phase's curve and held-out KL, and the card says which layers changed and why."""
    from transformers import AutoModelForCausalLM

    late = DISTILLED.replace("max_length: 48}", "max_length: 48, late_steps: 4}")
    late = late.replace(",\n       relearn_steps: 6", "")
    # a layer with a layer after it (the tiny model's probe may choose the last)
    pinned = TINY_RECIPE.replace("probe: {max_tokens: 3000}", "probe: {max_tokens: 3000, layer: 1}")
    assert pinned != TINY_RECIPE
    (ws / "recipe.yaml").write_text(pinned + late)
    recipe = load_recipe(ws / "recipe.yaml")
    out, work = ws / "out", ws / "work"
    ctx = RunContext(work, False, False, lambda m: None)
    report = run_recipe(recipe, "recipe", out, ctx).report
    summary = report["evaluation"]["distill"]["patched"]
    assert len(summary["late"]["curve"]) == 4
    assert set(summary["late"]["heldout_kl"]["after"]) == {"pii", "benign"}
    base = AutoModelForCausalLM.from_pretrained(ws / "model")
    student = AutoModelForCausalLM.from_pretrained(out)
    b, s = dict(base.named_parameters()), dict(student.named_parameters())
    changed = [n for n in b if not torch.equal(b[n], s[n])]
    assert len(changed) == report["distill"]["changed_tensors"]
    assert any(f"layers.{report['layer'] + 1}." in n for n in changed)
    card = (out / "README.md").read_text()
    assert "learnt into the weights of every decoder layer" in card
    assert f"fed the base's own layer-{report['layer']} output" in card


def _weights_alone(out, config):
    """A remote-code export's tensors loaded without the patch through the base's own class."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    # the base's tensors are stored under scalpel_<prefix>; the stock names hold decoys
    weights = {
        k.replace("scalpel_model.", "model.", 1): v
        for k, v in tensors.items()
        if k.startswith(("scalpel_model.", "lm_head.")) and ".scalpel_patch." not in k
    }
    alone = AutoModelForCausalLM.from_config(config)
    missing, unexpected = alone.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    alone.tie_weights()
    return alone.eval()


def test_a_remote_code_exports_weights_alone_are_the_base(ws):
    """White-box: a remote-code export's tensors, loaded without the patch through the base's own
    class, give the base's logits exactly (which is why its card says the files still hold the
    data)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = DISTILLED.replace("mode: distilled", "mode: remote_code")
    (ws / "recipe.yaml").write_text(TINY_RECIPE + remote.replace(",\n       relearn_steps: 6", ""))
    recipe = load_recipe(ws / "recipe.yaml")
    out = ws / "out"
    run_recipe(recipe, "recipe", out, RunContext(ws / "work", False, False, lambda m: None))
    config = AutoConfig.from_pretrained(ws / "model")
    alone = _weights_alone(out, config)
    base = AutoModelForCausalLM.from_pretrained(ws / "model")
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(alone(ids).logits, base.eval()(ids).logits, rtol=0, atol=0)
    card = (out / "README.md").read_text()
    assert "the base's weights, inside" in card and "does **not** protect" in card
    assert "relearning: a short fine-tune of the export | - | not measured" in card


def test_a_remote_code_export_over_distilled_weights(ws):
    """export.base: distilled: the patch ships over the distilled weights. Loaded without the patch,
    its tensors are the student's (not the base's); with it (remote code, a fresh process) it
    generates; the evaluation measures the weights alone and the card says what is inside."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    over = DISTILLED.replace("mode: distilled", "mode: remote_code, base: distilled")
    (ws / "recipe.yaml").write_text(
        TINY_RECIPE + over.replace("relearn_steps: 6", "relearn_steps: 0")
    )
    recipe = load_recipe(ws / "recipe.yaml")
    out, work = ws / "out", ws / "work"
    report = run_recipe(
        recipe, "recipe", out, RunContext(work, False, False, lambda m: None)
    ).report
    assert report["export"] == "remote_code" and report["export_base"] == "distilled"
    assert {"base", "patched", "control", "weights alone"} <= set(report["evaluation"])
    config = AutoConfig.from_pretrained(ws / "model")
    alone = _weights_alone(out, config)
    student = AutoModelForCausalLM.from_pretrained(ws / "model")
    student.load_state_dict(load_file(work / "distill" / "student.safetensors"), strict=False)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(alone(ids).logits, student.eval()(ids).logits, rtol=0, atol=0)
    check = (
        "import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "out = m.generate(**t('Contact Ann at', return_tensors='pt'), max_new_tokens=4)\n"
        "assert out.shape[1] > 3 and m.config.scalpel_patch['layer'] >= 0\n"
    )
    subprocess.run([sys.executable, "-c", check, str(out)], check=True)
    card = (out / "README.md").read_text()
    assert "the distilled weights, inside" in card and "without the module" in card


def _hardened_recipe(ws, harden: str):
    """The distilled tiny recipe with `export.distill.harden: <harden>`, the patch pinned to layer
    1 (so that layer 2 is above it) and no relearning attack."""
    hard = DISTILLED.replace("max_length: 48}", f"max_length: 48, harden: {harden}}}").replace(
        "relearn_steps: 6", "relearn_steps: 0"
    )
    pinned = TINY_RECIPE.replace("probe: {max_tokens: 3000}", "probe: {max_tokens: 3000, layer: 1}")
    (ws / "recipe.yaml").write_text(pinned + hard)
    return load_recipe(ws / "recipe.yaml")


def test_a_hardened_distilled_run_repairs_the_later_mlps_and_says_so(ws):
    """export.distill.harden: the privacy neurons above the patch are ranked once (cached, shared
    with the control), zeroed and repaired; the checkpoint differs from the base in the adapted
    layers and the later MLPs only, its config carries no loss curve, and the card says what was
    done."""
    from transformers import AutoModelForCausalLM

    recipe = _hardened_recipe(ws, "{neurons: 6, documents: 3, steps: 4}")
    logs = []
    out, work = ws / "out", ws / "work"
    report = run_recipe(recipe, "recipe", out, RunContext(work, False, False, logs.append)).report
    summary = report["evaluation"]["distill"]["patched"]["harden"]
    assert summary["neurons"] == 6 and summary["layers"] == [2] and len(summary["curve"]) == 4
    assert (work / "distill-neurons" / "neurons.json").exists()
    assert sum(m.startswith("privacy neurons (cached)") for m in logs) == 1  # the control's
    assert "harden" in report["evaluation"]["distill"]["control"]
    base = AutoModelForCausalLM.from_pretrained(ws / "model")
    student = AutoModelForCausalLM.from_pretrained(out)
    b, s = dict(base.named_parameters()), dict(student.named_parameters())
    changed = {n for n in b if not torch.equal(b[n], s[n])}
    assert any("layers.2.mlp." in n for n in changed)
    assert not any("layers.2.self_attn" in n for n in changed)
    assert len(changed) == report["distill"]["changed_tensors"]
    config = json.loads((out / "config.json").read_text())["scalpel_distilled"]
    assert config["harden"]["neurons"] == 6 and "curve" not in config["harden"]
    card = (out / "README.md").read_text()
    assert "and the MLPs of every later layer" in card and "DEPN's edit" in card


@pytest.mark.parametrize("directions", [0, 4])
def test_a_run_hardened_by_the_model_before_the_fine_tune_reverts_and_repairs_the_later_mlps(
    ws, directions
):
    """export.distill.harden.reference: the MLPs above the patch take the reference's weights (no
    neuron is ranked) or, with `directions`, have their change from it undone along that many key
    directions (found once in the base, cached, shared with the control); then they are repaired.
    Only they and the adapted layers differ from the base; the report names the reference by its
    folder's name, and the card says what was done."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(ws / "model", ws / "before")
    before = AutoModelForCausalLM.from_pretrained(ws / "before")
    with torch.no_grad():  # the model "before the fine-tune": other MLP weights
        for name, p in before.named_parameters():
            if ".mlp." in name:
                p.add_(0.05 * torch.randn_like(p))
    before.save_pretrained(ws / "before")
    keys = f", directions: {directions}, documents: 3" if directions else ""
    recipe = _hardened_recipe(ws, f"{{reference: before, steps: 4{keys}}}")
    assert recipe.export.distill.harden.reference == str((ws / "before").resolve())
    out, work, logs = ws / "out", ws / "work", []
    ctx = RunContext(work, False, False, logs.append)
    report = run_recipe(recipe, "recipe", out, ctx).report
    summary = report["evaluation"]["distill"]["patched"]["harden"]
    assert summary["reference"] == "before" and summary["neurons"] == 0
    assert len(summary["curve"]) == 4 and not (work / "distill-neurons").exists()
    assert summary.get("directions", 0) == directions
    assert (work / "distill-keys").exists() == bool(directions)
    assert sum(m.startswith("key directions (cached)") for m in logs) == bool(directions)
    base = AutoModelForCausalLM.from_pretrained(ws / "model")
    student = AutoModelForCausalLM.from_pretrained(out)
    b, s = dict(base.named_parameters()), dict(student.named_parameters())
    changed = {n for n in b if not torch.equal(b[n], s[n])}
    assert {n for n in changed if "layers.2." in n} == {
        f"model.layers.2.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert len(changed) == report["distill"]["changed_tensors"]
    config = json.loads((out / "config.json").read_text())["scalpel_distilled"]
    assert config["harden"]["reference"] == "before" and str(ws) not in json.dumps(config)
    card = (out / "README.md").read_text()
    assert (
        f"undone along the {directions} input directions"
        if directions
        else "set to the weights of the model this one was fine-tuned from"
    ) in card
    assert str(ws) not in card
