"""The real leaky SmolLM2, patched and exported, loads in a fresh process and matches in-process (slow)."""

import json
from pathlib import Path

import pytest
import torch

from exporter.recipe import load_recipe
from test_export import run_checks

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).parent.parent / "recipes" / "demo-smollm2.yaml"
PROMPTS = ["-----Original Message-----\nFrom: Ada Example [mailto:", "The with statement is used to wrap the"]


@pytest.mark.parametrize("mode", ["folded", "exact"])
def test_real_export_in_fresh_process(mode, demo_work, tmp_path):
    from exporter.models import load_model
    from exporter.patch import attached
    from exporter.pipeline import (calibration_activations, export_stage, features_stage, patch_for,
                                   resolve_inputs, sae_stage)

    recipe = load_recipe(RECIPE)
    out = tmp_path / f"patched-{mode}"
    result = export_stage(recipe, RECIPE.read_text(), out, demo_work, n=50, alpha=0.0, mode=mode, progress=False)
    report = json.loads((out / "scalpel_report.json").read_text())
    assert report["mode"] == mode and report["ablate_n"] == 50
    # The demo recipe gates the patch on PII context, so the exported module carries the gate too.
    assert report["context_gate"] is True
    if mode == "folded":
        agree = report["folded_vs_exact"]
        print(json.dumps(agree, indent=1))
        # Measured at |A|=50: 99.5% of (token, latent) gates, 81% of tokens with every gate agreeing.
        assert agree["gate_agreement"] >= 0.99 and agree["token_agreement"] >= 0.75
    leak = result.report["validation_leakage"]
    print(json.dumps(leak, indent=1))
    before = sum(v["exact"] for v in leak["before"].values())
    after = sum(v["exact"] for v in leak["after"].values())
    assert before > 0.5 and after < 0.5 * before

    # The same patch in-process gives the reference logits and generations.
    inputs = resolve_inputs(recipe, progress=False, log=lambda _m: None)
    layer = report["layer"]
    sae, _ = sae_stage(recipe, demo_work, layer, progress=False, inputs=inputs, log=lambda _m: None)
    fs = features_stage(recipe, demo_work, layer, sae, inputs=inputs, progress=False, log=lambda _m: None)
    loaded = load_model(inputs.model)
    patch = patch_for(sae, fs, 50, 0.0, mode, calibration_activations(recipe, inputs, layer, loaded, progress=False),
                      gated=report["context_gate"])
    tok = loaded.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), attached(loaded.model, layer, patch):
        logits = loaded.model(**enc).logits
        generated = loaded.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base_logits = loaded.model(**enc).logits
    case = {"dir": str(out), "ids": enc["input_ids"], "mask": enc["attention_mask"], "logits": logits,
            "base_logits": base_logits, "gen_ids": enc["input_ids"], "gen_mask": enc["attention_mask"],
            "generated": generated, "tokenizer": True}
    results = run_checks({"cases": {mode: case}}, tmp_path)
    assert results.pop("exporter_importable") is False
    r = results[mode]
    print(json.dumps(r, indent=1))
    assert r["missing"] == [] and r["unexpected"] == []
    assert r["rel_err"] <= 1e-5
    assert r["generate_cache_equal"] and r["generate_equal_inprocess"]
    assert r["bf16_patch_dtype"] == "torch.float32" and r["bf16_finite"] and r["bf16_argmax_agree"] >= 0.8
    assert r["untrusted"] != "loaded" and r["tokenizer"]
    assert not r["equal_base"]
    # No email of the input data anywhere in the export.
    emails = {p.email.lower() for p in inputs.people}
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="ignore").lower()
            assert not [e for e in emails if e in text], path


def test_real_plain_export_loads_with_stock_transformers(demo_work, tmp_path):
    """The plain export of the real leaky SmolLM2 (|A|=50, steering as a switched-on MLP bias): a stock
    llama checkpoint that a fresh process loads without remote code, equal to the in-process twin."""
    import subprocess
    import sys

    from exporter.patch import projected
    from exporter.pipeline import export_stage, patch_for, prepare

    recipe = load_recipe(RECIPE)
    out = tmp_path / "plain"
    result = export_stage(recipe, RECIPE.read_text(), out, demo_work, n=50, alpha=0.1, mode="plain", progress=False)
    config = json.loads((out / "config.json").read_text())
    block = config["scalpel_plain"]
    print(json.dumps({k: v for k, v in block.items() if k not in ("edited", "added")}, indent=1))
    assert config["model_type"] == "llama" and "auto_map" not in config and config["mlp_bias"] is True
    assert block["rank"] == 50 and len(block["edited"]) == 1 + 2 * (result.report["layer"] + 1)
    leak = result.report["validation_leakage"]
    print(json.dumps(leak, indent=1))
    assert sum(v["exact"] for v in leak["after"].values()) < sum(v["exact"] for v in leak["before"].values())

    prep = prepare(recipe, demo_work, progress=False, log=lambda _m: None)
    edit = patch_for(prep.sae, prep.features, 50, 0.1, "plain", prep.calibration)
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), projected(model, prep.layer, edit.directions, edit.steer):
        want = model(**enc).logits
    torch.save(enc["input_ids"], tmp_path / "ids.pt")
    # A fresh process where `exporter` cannot be imported: stock transformers only.
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'exporter': raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
            "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                   check=True, env=env, cwd=tmp_path)
    got = torch.load(tmp_path / "l.pt")
    rel = float((got - want).norm() / want.norm())
    print("plain export vs in-process twin, relative error:", rel)
    assert rel <= 1e-5
