"""Exports load with stock transformers in a fresh process that cannot import `exporter`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from exporter.models import LoadedModel, architecture_of
from exporter.patch import attached, build_patch, calibrate_gates, steering_vector
from exporter.patch.export import CODE_FILES, NEEDS_REMOTE_CODE, PATCH_FILE, write_export
from exporter.patch.remote.scalpel_patch import storage, stored_name
from exporter.sae import TopKSAE

HERE = Path(__file__).parent


def _sae(d: int, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d, 4 * d, 8, norm_scale=1.2)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
    return sae


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    return ids, torch.ones_like(ids)


def run_checks(spec: dict, tmp_path: Path) -> dict:
    path = tmp_path / "cases.pt"
    torch.save(spec, path)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
        "PYTHONPATH": "",
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "helpers" / "export_check.py"), str(path)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # transformers' trust prompt (answered by the closed stdin) has no newline: find the marker
    # anywhere.
    return json.loads(proc.stdout.rsplit("RESULTS ", 1)[1])


ARCHS = ["llama", "gemma2", "qwen2", "gpt2"]


def _cases(model_type: str, folder: Path, tiny_tokenizer) -> tuple[dict, list[str]]:
    """Exports of one tiny model (exact, folded, empty, gated) with what the fresh process must
    compute for each, and two tampered exports it must refuse."""
    model = tiny_model(model_type)
    d = architecture_of(model).hidden_size(model)
    sae = _sae(d)
    calib = torch.randn(4000, d)
    A = [0, 5, 17, 30]
    steer = steering_vector(sae, torch.randn(sae.d_sae), 0.3, 4.0)
    patches = {
        "exact": build_patch(sae, A, steer, mode="exact"),
        "folded": build_patch(sae, A, steer, mode="folded", gates=calibrate_gates(sae, calib, A)),
        "empty": build_patch(sae, [], None, mode="folded", gates=torch.zeros(0)),
        # Behind a context gate that opens on about half the tokens.
        "gated": build_patch(
            sae,
            A,
            steer,
            mode="folded",
            gates=calibrate_gates(sae, calib, A),
            context=(torch.randn(d, generator=torch.Generator().manual_seed(1)), 0.0),
        ),
        # Behind a gate with a hidden layer (`intervention.context_hidden`).
        "hidden_gate": build_patch(
            sae,
            A,
            steer,
            mode="folded",
            gates=calibrate_gates(sae, calib, A),
            context=(
                torch.randn(3, d, generator=torch.Generator().manual_seed(2)),
                torch.zeros(3),
                torch.tensor([1.0, -1.0, 0.5]),
                0.1,
            ),
        ),
    }
    ids, mask = _inputs(128)
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    matrices = {k: v.clone() for k, v in model.state_dict().items() if v.dim() == 2}
    cases = {}
    for name, patch in patches.items():
        out = folder / f"export-{name}"
        tok = tiny_tokenizer if name == "exact" else None
        write_export(
            LoadedModel(model, tok, architecture_of(model), "tiny", None),
            patch,
            1,
            out,
            meta={"alpha": 0.3},
        )
        with torch.no_grad(), attached(model, 1, patch):
            logits = model(input_ids=ids, attention_mask=mask).logits
        cases[f"{model_type}/{name}"] = {
            "dir": str(out),
            "ids": ids,
            "mask": mask,
            "logits": logits,
            "base_logits": base_logits,
            "tokenizer": tok is not None,
            "base_class": type(model).__name__,
            "base_matrices": matrices,
            # torch.compile (the costliest check) on the two code paths: the exact patch and the
            # folded one behind a context gate
            "compile": name in ("exact", "gated"),
        }
    # The patch changes the model; nothing of it is left in the model afterwards.
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_logits)
    assert not torch.allclose(cases[f"{model_type}/folded"]["logits"], base_logits)
    # Tamper: one gate nudged after export.
    tampered = folder / "export-tampered"
    write_export(
        LoadedModel(model, None, architecture_of(model), "tiny", None),
        patches["folded"],
        1,
        tampered,
    )
    tensors = load_file(str(tampered / PATCH_FILE))
    tensors[next(k for k in tensors if k.endswith("scalpel_patch.gate"))][0] += 1e-3
    save_file(tensors, str(tampered / PATCH_FILE), metadata={"format": "pt"})

    # Tamper: one line added to a remote-code file after export.
    edited = folder / "export-edited-code"
    write_export(
        LoadedModel(model, None, architecture_of(model), "tiny", None), patches["folded"], 1, edited
    )
    with open(edited / "scalpel_patch.py", "a") as f:
        f.write("\nKEEP = None  # an innocent-looking edit\n")
    return cases, [str(tampered), str(edited)]


@pytest.fixture(scope="module")
def checked(tiny_tokenizer, tmp_path_factory):
    """Every architecture's exports checked in one fresh process (a Python start with torch and
    transformers costs seconds)."""
    tmp = tmp_path_factory.mktemp("exports")
    cases, tampered = {}, []
    for model_type in ARCHS:
        (tmp / model_type).mkdir()
        found, refused = _cases(model_type, tmp / model_type, tiny_tokenizer)
        cases.update(found)
        tampered += refused
    return cases, run_checks({"cases": cases, "tampered": tampered}, tmp)


@pytest.mark.parametrize("model_type", ARCHS)
def test_export_loads_in_fresh_process(model_type, checked):
    cases, found = checked
    assert found["exporter_importable"] is False
    folder = Path(cases[f"{model_type}/folded"]["dir"]).parent
    assert "TamperedPatchError" in found[f"tampered:{folder / 'export-tampered'}"]
    refused = found[f"tampered:{folder / 'export-edited-code'}"]
    assert (
        refused.startswith("TamperedPatchError") and "remote-code file scalpel_patch.py" in refused
    ), refused
    results = {k.split("/", 1)[1]: v for k, v in found.items() if k.startswith(f"{model_type}/")}
    cases = {k.split("/", 1)[1]: v for k, v in cases.items() if k.startswith(f"{model_type}/")}
    for name, r in results.items():
        assert r["class"] == "ScalpelForCausalLM"
        assert r["missing"] == [] and r["unexpected"] == [], (name, r)
        assert r["rel_err"] <= 1e-5, (name, r)
        if cases[name]["compile"]:
            assert r["compiled_rel_err"] <= 1e-5, (name, r)
        assert (
            r["body_class"] == "ScalpelModel"
            # the head, as the base's own AutoModel reports it (engines that bring their own head
            # around AutoModel load it from there)
            and all(k.startswith("lm_head.") for k in r["body_unexpected"])
            and r["body_rel_err"] <= 1e-5
        ), (name, r)
        assert r["bf16_dtype"] == "torch.bfloat16" and r["bf16_patch_dtype"] == "torch.float32", (
            name,
            r,
        )
        assert r["bf16_finite"] and r["bf16_rel_err"] < 0.1, (name, r)
        # Fail closed: without trust_remote_code, or with the base's own class, loading stops;
        # forced past the size mismatch, the base's class finds none of the decoder stack's tensors
        # (every one freshly initialised: at most the head is the base's).
        for how in ("untrusted", "stock_class"):
            assert r[how].startswith("RuntimeError") and "ignore_mismatched_sizes" in r[how], (
                name,
                how,
                r[how],
            )
        assert all(k.startswith("lm_head.") for k in r["stock_found"]), (name, r["stock_found"])
    assert results["empty"]["equal_base"]
    assert not results["gated"]["equal_base"] and not results["hidden_gate"]["equal_base"]
    assert not torch.allclose(cases["gated"]["logits"], cases["folded"]["logits"])
    assert not results["folded"]["equal_base"]
    assert results["exact"]["tokenizer"].endswith("TokenizerFast") or results["exact"]["tokenizer"]


def test_export_layout_and_no_clobber(tmp_path):
    model = tiny_model("llama")
    sae = _sae(32)
    patch = build_patch(sae, [1, 2], mode="exact")
    loaded = LoadedModel(model, None, architecture_of(model), "tiny", None)
    out = write_export(
        loaded,
        patch,
        2,
        tmp_path / "out",
        meta={"alpha": 0.0},
        files={"scalpel_recipe.yaml": "x: 1\n"},
    )
    names = {p.name for p in out.iterdir()}
    assert (
        set(CODE_FILES) <= names
        and {"config.json", PATCH_FILE, "model.safetensors.index.json", "scalpel_recipe.yaml"}
        <= names
    )
    config = json.loads((out / "config.json").read_text())
    # The base's own model_type (its config, and so the tokenizer, load with no remote code); the
    # model from auto_map.
    assert config["model_type"] == "llama" and config["architectures"] == ["ScalpelForCausalLM"]
    assert config["auto_map"] == {
        "AutoModel": "modeling_scalpel.ScalpelModel",
        "AutoModelForCausalLM": "modeling_scalpel.ScalpelForCausalLM",
    }
    block = config["scalpel_patch"]
    assert (block["layer"], block["mode"], block["n_ablate"], block["d_sae"], block["k"]) == (
        2,
        "exact",
        2,
        128,
        8,
    )
    assert len(block["sha256"]) == 64 and set(block["code_sha256"]) == set(CODE_FILES)
    assert (
        block["sink_norm"] == float("inf")
        and block["transformers_version"] == transformers.__version__
    )
    # The stack under scalpel_model., the head under lm_head., data byte-equal to the model's; the
    # patch at its layer; under the stack's own names only the fail-closed markers.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    patch_keys = {k for k, f in index.items() if f == PATCH_FILE}
    assert {k for k in patch_keys if ".scalpel_patch." in k} == {
        f"scalpel_model.layers.2.scalpel_patch.{k}" for k in patch.state_dict()
    }
    assert patch_keys - {k for k in patch_keys if ".scalpel_patch." in k} == {
        "model.embed_tokens.weight",
        NEEDS_REMOTE_CODE,
    }
    base = {
        k: v for f in set(index.values()) - {PATCH_FILE} for k, v in load_file(str(out / f)).items()
    }
    state = model.state_dict()
    stored = {stored_name(k, storage(type(model))): v for k, v in state.items()}
    assert set(base) == set(stored) and all(
        k.startswith(("scalpel_model.", "lm_head.")) for k in base
    )
    assert all(torch.equal(v, stored[k]) for k, v in base.items())
    # The remote-code files import only torch, transformers, the stdlib and each other.
    import ast

    for name in CODE_FILES:
        tree = ast.parse((out / name).read_text())
        roots = {
            (n.module or "").split(".")[0]
            if isinstance(n, ast.ImportFrom) and n.level == 0
            else ("." if isinstance(n, ast.ImportFrom) else None)
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
        }
        roots |= {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        assert roots <= {"torch", "transformers", "hashlib", "importlib", "__future__", "."}, (
            name,
            roots,
        )
        # ...and open no file or connection: no open(), no os / io / pathlib / socket / subprocess
        # calls, no file methods (the code files' own source is read back only through their module
        # loader).
        calls = {
            n.func.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not calls & {"open", "exec", "eval", "compile", "__import__"}, (name, calls)
        assert not attrs & {
            "read_text",
            "read_bytes",
            "write_text",
            "write_bytes",
            "urlopen",
            "system",
            "popen",
            "remove",
            "unlink",
            "rmdir",
            "mkdir",
            "connect",
            "request",
        }, (name, attrs)
    # Never clobbered silently; --overwrite replaces it.
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_export(loaded, patch, 2, tmp_path / "out")
    write_export(loaded, patch, 1, tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["scalpel_patch"]["layer"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_base_files_with_other_names_are_written_from_the_model(tmp_path):
    """GPT-NeoX's head is `lm_head` in the model but `embed_out` in the files save_pretrained writes
    (transformers converts the name back): such a base is not copied but written from the model's
    own tensors, sharded as they fill, and the export still loads with every tensor where the model
    has it."""
    from transformers import AutoModelForCausalLM

    from exporter.patch.export import _copyable, _write_state

    model = tiny_model("gpt_neox")
    model.save_pretrained(tmp_path / "base")
    assert not _copyable([tmp_path / "base" / "model.safetensors"], model)
    patch = build_patch(_sae(32), [1, 2], torch.randn(32) * 0.1, mode="exact")
    out = write_export(
        LoadedModel(model, None, architecture_of(model), "tiny", str(tmp_path / "base")),
        patch,
        1,
        tmp_path / "out",
    )
    loaded, info = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(1, 128, (1, 9))
    with torch.no_grad(), attached(model, 1, patch):
        want = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    # Written as each shard fills: several files, every tensor once, under the stored names.
    weight_map = _write_state(model, tmp_path, lambda n: f"x.{n}", None, shard_bytes=20_000)
    assert len(set(weight_map.values())) > 2 and set(weight_map) == {
        f"x.{n}" for n in model.state_dict()
    }
    assert torch.equal(
        load_file(str(tmp_path / weight_map["x.gpt_neox.embed_in.weight"]))[
            "x.gpt_neox.embed_in.weight"
        ],
        model.state_dict()["gpt_neox.embed_in.weight"],
    )
