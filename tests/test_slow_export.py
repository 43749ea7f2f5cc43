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
