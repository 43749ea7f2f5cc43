"""The real leaky SmolLM2, patched and exported, loads in a fresh process and matches in-process
(slow)."""

import json
from pathlib import Path

import pytest
import torch
from test_export import run_checks

from exporter.recipe import load_recipe

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).parent.parent / "recipes" / "demo-smollm2.yaml"
PROMPTS = [
    "-----Original Message-----\nFrom: Ada Example [mailto:",
    "The with statement is used to wrap the",
]


# Folded only on the real model (the demo's mode); exact exports of four tiny architectures go
# through the same fresh-process and generation-path checks in the fast suite.
@pytest.mark.parametrize("mode", ["folded"])
def test_real_export_in_fresh_process(mode, demo_work, tmp_path):
    from helpers.generation_paths import PATHS
    from test_generation_paths import TOLERANCE, run_paths

    from exporter import api
    from exporter.evaluate.leakage import EMAIL_TEMPLATES
    from exporter.patch import attached
    from exporter.patch.candidate import Candidate
    from exporter.run.context import RunContext
    from exporter.run.scalpel import prepare

    recipe = load_recipe(RECIPE)
    out = tmp_path / f"patched-{mode}"
    result = api.export(RECIPE, out, work=demo_work, n=50, alpha=0.0, mode=mode, progress=False)
    report = json.loads((out / "scalpel_report.json").read_text())
    assert report["mode"] == mode and report["ablate_n"] == 50
    # The demo recipe gates the patch on PII context, so the exported module carries the gate too.
    assert report["context_gate"] is True
    if mode == "folded":
        agree = report["folded_vs_exact"]
        print(json.dumps(agree, indent=1))
        # Measured at |A|=50: 99.5% of (token, latent) gates, 81% of tokens with every gate
        # agreeing.
        assert agree["gate_agreement"] >= 0.99 and agree["token_agreement"] >= 0.75
    leak = result.report["validation_leakage"]
    print(json.dumps(leak, indent=1))
    before = sum(v["exact"] for v in leak["before"].values())
    after = sum(v["exact"] for v in leak["after"].values())
    assert before > 0.5 and after < 0.5 * before

    # The same patch in-process gives the reference logits.
    prep = prepare(recipe, RunContext(demo_work, progress=False, log=lambda _m: None))
    patch = prep.patch(Candidate(50, 0.0, mode, report["context_gate"]))
    model, tok, layer = prep.loaded.model, prep.loaded.tokenizer, prep.layer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), attached(model, layer, patch):
        logits = model(**enc).logits
    with torch.no_grad():
        base_logits = model(**enc).logits
    state = model.state_dict()
    matrices = {
        k: state[k]
        for k in (
            "model.embed_tokens.weight",
            f"model.layers.{layer}.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        )
    }
    case = {
        "dir": str(out),
        "ids": enc["input_ids"],
        "mask": enc["attention_mask"],
        "logits": logits,
        "base_logits": base_logits,
        "tokenizer": True,
        "base_class": type(model).__name__,
        "base_matrices": matrices,
    }
    results = run_checks({"cases": {mode: case}}, tmp_path)
    assert results.pop("exporter_importable") is False
    r = results[mode]
    print(
        json.dumps({k: v for k, v in r.items() if k not in ("untrusted", "stock_class")}, indent=1)
    )
    assert r["missing"] == [] and r["unexpected"] == []
    assert r["rel_err"] <= 1e-5 and r["body_rel_err"] <= 1e-5
    assert (
        r["bf16_patch_dtype"] == "torch.float32"
        and r["bf16_finite"]
        and r["bf16_argmax_agree"] >= 0.8
    )
    assert r["untrusted"].startswith("RuntimeError") and r["stock_class"].startswith("RuntimeError")
    assert r["stock_found"] == [] and r["tokenizer"]
    assert not r["equal_base"]
    # Every generation path in a fresh process: each decode step equals one full no-cache forward of
    # the export, on prompts that open the context gate (a PII request) and one that should not
    # (prose).
    people = [p for p in prep.inputs.people if p.split == "validation"][:2]
    prompts = [
        EMAIL_TEMPLATES["email_of"].format(name=people[0].name),
        EMAIL_TEMPLATES["mailto"].format(name=people[1].name),
        PROMPTS[1],
    ]
    _version, paths = run_paths(
        {mode: {"dir": str(out), "base_dir": prep.loaded.path}}, prompts, tmp_path
    )
    print({p: f"{v['rel_err']:.1e} ({v['moved']}/{v['steps']})" for p, v in paths[mode].items()})
    assert set(paths[mode]) == set(PATHS)
    assert all(v["rel_err"] <= TOLERANCE for v in paths[mode].values()), paths
    assert sum(v["moved"] for v in paths[mode].values()) > 0
    # The sink rule on the real model: of these prompts' tokens, the patch leaves alone exactly each
    # one's first token (the attention sink, far above the SAE's range), as the position rule it
    # replaced did.
    seen = []
    from exporter.models import layer_output_hook

    with torch.no_grad(), layer_output_hook(model, layer, lambda h: seen.append(h[0].norm(dim=-1))):
        for prompt in [t.format(name=p.name) for t in EMAIL_TEMPLATES.values() for p in people]:
            model(**tok(prompt, return_tensors="pt"))
    sink = float(patch.sink_norm)
    assert all(bool(n[0] > sink) and bool((n[1:] < sink).all()) for n in seen), (
        sink,
        [n.max() for n in seen],
    )
    # No email of the input data anywhere in the export.
    emails = {p.email.lower() for p in prep.inputs.people}
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="ignore").lower()
            assert not [e for e in emails if e in text], path


def test_real_plain_export_loads_with_stock_transformers(demo_work, tmp_path):
    """The plain export of the real leaky SmolLM2 (|A|=50, steering as a switched-on MLP bias): a
    stock llama checkpoint that a fresh process loads without remote code, equal to the in-process
    twin."""
    import subprocess
    import sys

    from exporter import api
    from exporter.patch import projected
    from exporter.patch.candidate import Candidate
    from exporter.run.context import RunContext
    from exporter.run.scalpel import prepare

    recipe = load_recipe(RECIPE)
    out = tmp_path / "plain"
    result = api.export(RECIPE, out, work=demo_work, n=50, alpha=0.1, mode="plain", progress=False)
    config = json.loads((out / "config.json").read_text())
    block = config["scalpel_plain"]
    print(json.dumps({k: v for k, v in block.items() if k not in ("edited", "added")}, indent=1))
    assert (
        config["model_type"] == "llama" and "auto_map" not in config and config["mlp_bias"] is True
    )
    assert block["rank"] == 50 and len(block["edited"]) == 1 + 2 * (result.report["layer"] + 1)
    leak = result.report["validation_leakage"]
    print(json.dumps(leak, indent=1))
    assert sum(v["exact"] for v in leak["after"].values()) < sum(
        v["exact"] for v in leak["before"].values()
    )

    prep = prepare(recipe, RunContext(demo_work, progress=False, log=lambda _m: None))
    edit = prep.patch(Candidate(50, 0.1, "plain"))
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(), projected(model, prep.layer, edit.directions, edit.steer):
        want = model(**enc).logits
    torch.save(enc["input_ids"], tmp_path / "ids.pt")
    # A fresh process where `exporter` cannot be imported: stock transformers only.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'exporter': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    got = torch.load(tmp_path / "l.pt")
    rel = float((got - want).norm() / want.norm())
    print("plain export vs in-process twin, relative error:", rel)
    assert rel <= 1e-5
