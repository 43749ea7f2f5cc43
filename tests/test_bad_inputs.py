"""The bad-input catalogue: each case runs the real command line (in-process) on a tiny model and
its data with one thing wrong, and asserts exit status 2, one message naming the problem and the
fix, and no output left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE as RECIPE
from conftest import recipe_without_people, tiny_model


def _recipe(ws: Path, text: str) -> Path:
    (ws / "recipe.yaml").write_text(text)
    return ws / "recipe.yaml"


def _edit(ws: Path, old: str, new: str) -> Path:
    return _recipe(ws, RECIPE.replace(old, new))


# Each case: (setup(ws) -> the command's arguments, what the message must say). The command writes
# (if it got that far) to ws/"out" and ws/"work"; "out" must never exist afterwards.
CASES = {
    "recipe file missing": (lambda ws: ["check", ws / "nope.yaml"], "recipe file not found"),
    "malformed YAML": (
        lambda ws: ["check", _recipe(ws, "model: {path: [model\n")],
        "not valid YAML at line",
    ),
    "empty recipe": (lambda ws: ["check", _recipe(ws, "")], "model"),
    "a section written twice": (
        lambda ws: ["check", _recipe(ws, RECIPE + "eval: {samples: 0}\neval: {few_shot: 1}\n")],
        "'eval' is written twice (first at line 8); merge the two into one",
    ),
    "unknown key with a typo": (
        lambda ws: ["check", _edit(ws, "probe: {max_tokens", "probe: {max_tokenz")],
        "did you mean 'max_tokens'",
    ),
    "unknown section": (
        lambda ws: ["check", _recipe(ws, RECIPE + "evaluation: {samples: 2}\n")],
        "evaluation",
    ),
    "mistyped value": (lambda ws: ["check", _edit(ws, "k: 4,", "k: four,")], "sae.k"),
    "negative ablation size": (
        lambda ws: ["check", _recipe(ws, RECIPE + "intervention: {ablate_n: [-5]}\n")],
        "ablate_n must be a non-empty list of sizes >= 0",
    ),
    "missing model path": (
        lambda ws: ["check", _edit(ws, "{path: model}", "{path: no-such-model}")],
        "file not found",
    ),
    "two model sources": (
        lambda ws: ["check", _edit(ws, "{path: model}", "{path: model, builtin: smollm2-135m}")],
        "give exactly one model source",
    ),
    "unknown built-in model": (
        lambda ws: ["check", _edit(ws, "{path: model}", "{builtin: gpt-5}")],
        "smollm2-135m",
    ),
    "folder without config.json": (
        lambda ws: (
            (ws / "model" / "config.json").unlink()
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "not a Hugging Face model folder (no config.json)",
    ),
    "hub model offline and not cached": (
        lambda ws: [
            "probe",
            _edit(ws, "{path: model}", "{hub: someorg/not-cached-anywhere}"),
            "--work",
            ws / "work",
        ],
        "download it first on a connected machine",
    ),
    "unsupported architecture": (
        lambda ws: _retype(ws, "bloom") or ["probe", ws / "recipe.yaml", "--work", ws / "work"],
        "is not supported; supported model_type values",
    ),
    "layer out of range": (
        lambda ws: ["probe", ws / "recipe.yaml", "--work", ws / "work", "--layer", 9],
        "out of range",
    ),
    "corrupt safetensors weights": (
        lambda ws: (
            _truncate(ws / "model" / "model.safetensors")
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "could not load the model in",
    ),
    "empty PII file": (
        lambda ws: (
            (ws / "pii.jsonl").write_text("")
            and None
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "no documents",
    ),
    "PII-free data": (
        lambda ws: (
            _jsonl(ws, [{"text": "nothing personal here at all"}])
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "no PII found in any document",
    ),
    "one PII value in a corpus with no people file": (
        lambda ws: (
            _jsonl(ws, [{"text": f"note {i}: write to ann.lee@example.org"} for i in range(5)])
            or _run_without_people(ws)
        ),
        "holds 1 PII value(s); choosing on some values and reporting on others needs at least two",
    ),
    "a mail archive that is not one": (
        lambda ws: _run_without_people(ws, _file(ws, "mail/1.", b"just a note, no headers\n")),
        "holds no e-mail message",
    ),
    "a corpus not in UTF-8": (
        lambda ws: _run_without_people(
            ws, _file(ws, "notes.txt", "first line\ncaf\xe9 x@y.org\n".encode("latin-1"))
        ),
        "notes.txt:2: not UTF-8",
    ),
    "a tokenizer that cuts every prompt": (
        lambda ws: _max_length(ws, 8) or ["run", ws / "recipe.yaml", "--out", ws / "out"],
        "the model takes 8 tokens (tokenizer.model_max_length), and every one of the",
    ),
    "JSONL line without text": (
        lambda ws: (
            _jsonl(ws, [{"body": "x@y.org"}])
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        'needs a string "text" field',
    ),
    "JSONL line not JSON": (
        lambda ws: (
            (ws / "pii.jsonl").write_text("{broken\n")
            and None
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "not valid JSON",
    ),
    "span out of bounds": (
        lambda ws: (
            _jsonl(
                ws, [{"text": "mail a@b.org", "spans": [{"start": 5, "end": 99, "type": "email"}]}]
            )
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "is outside the text",
    ),
    "unknown span type": (
        lambda ws: (
            _jsonl(
                ws,
                [{"text": "mail a@b.org", "spans": [{"start": 5, "end": 12, "type": "shoe size"}]}],
            )
            or ["probe", ws / "recipe.yaml", "--work", ws / "work"]
        ),
        "span type 'shoe size' unknown",
    ),
    "person without an email": (
        lambda ws: (
            (ws / "people.jsonl").write_text('{"name": "A B", "email": "none"}\n')
            and None
            or ["run", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work"]
        ),
        'needs "name" and an "email" with an @',
    ),
    "unknown people split": (
        lambda ws: (
            (ws / "people.jsonl").write_text(
                '{"name": "A B", "email": "a@b.org", "split": "train"}\n'
            )
            and None
            or ["run", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work"]
        ),
        "split 'train' unknown",
    ),
    "empty benign text": (
        lambda ws: (
            (ws / "benign.txt").write_text("")
            and None
            or ["train-sae", ws / "recipe.yaml", "--work", ws / "work", "--layer", 1]
        ),
        "benign text file is empty",
    ),
    "k larger than the SAE": (
        lambda ws: ["train-sae", _edit(ws, "k: 4,", "k: 400,"), "--work", ws / "work"],
        "k=400 must be between 1 and the number of latents",
    ),
    "NaN activations": (
        lambda ws: (
            _nan_weights(ws)
            or ["train-sae", ws / "recipe.yaml", "--work", ws / "work", "--layer", 1]
        ),
        "NaN",
    ),
    "output folder exists": (
        lambda ws: (
            (ws / "out").mkdir()
            or ["export", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work"]
        ),
        "already exists; choose another output folder or pass --overwrite",
    ),
    "plain export of a post-norm architecture": (
        lambda ws: (
            _gemma2(ws)
            or [
                "export",
                ws / "recipe.yaml",
                "--out",
                ws / "out",
                "--work",
                ws / "work",
                "--plain",
                "--n",
                2,
            ]
        ),
        "no edit of the weights can project a direction",
    ),
    "plain layers past the patch's layer": (
        lambda ws: [
            "export",
            _recipe(
                ws,
                RECIPE.replace("probe: {max_tokens: 3000}", "probe: {layer: 1}")
                + "intervention: {plain_from: 2, ablate_n: [2]}\n",
            ),
            "--out",
            ws / "out",
            "--work",
            ws / "work",
            "--plain",
        ],
        "plain_from is 2",
    ),
    "contradicting flags": (
        lambda ws: [
            "export",
            ws / "recipe.yaml",
            "--out",
            ws / "out",
            "--plain",
            "--mode",
            "exact",
        ],
        "contradict each other",
    ),
    "unknown stage": (
        lambda ws: ["run", ws / "recipe.yaml", "--out", ws / "out", "--from", "sea"],
        "unknown stage 'sea'",
    ),
    "push of a folder that is not an export": (
        lambda ws: ["push", ws / "model", "--repo-id", "me/model"],
        "not a scalpel-exporter export",
    ),
    "push with a malformed repo id": (
        lambda ws: ["push", ws / "model", "--repo-id", "no-owner"],
        "not OWNER/NAME",
    ),
    "detect on a missing file": (lambda ws: ["detect", ws / "nope.txt"], "file not found"),
    "audit of a corpus that is not there": (
        lambda ws: ["audit", ws / "model", "--data", ws / "nope.txt"],
        "file not found",
    ),
    "eval with no people to attack": (
        lambda ws: ["eval", ws / "model", "--against", ws / "model"],
        "pass --people FILE",
    ),
    "eval through an engine that is not one": (
        lambda ws: ["eval", ws / "model", "--against", ws / "model", "--client", "tgi"],
        "unknown client 'tgi'",
    ),
    "eval through an engine's venv that is not there": (
        lambda ws: [
            "eval",
            ws / "model",
            "--against",
            ws / "model",
            "--client",
            "vllm=nope/python",
        ],
        "no interpreter at nope/python",
    ),
    "gguf without llama.cpp's converter": (
        lambda ws: ["gguf", ws / "model", "--llama-cpp", ws],
        "has no convert_hf_to_gguf.py",
    ),
    "gguf of a folder that is no checkpoint": (
        lambda ws: ["gguf", ws / "work", "--llama-cpp", ws],
        "has no config.json",
    ),
    "make-leaky onto an existing folder": (
        lambda ws: (ws / "out").mkdir() or ["make-leaky", "--out", ws / "out"],
        "already exists; choose another --out folder or pass --overwrite",
    ),
    "demo onto a folder that is not an export": (
        lambda ws: (ws / "out").mkdir() or ["demo", "--out", ws / "out"],
        "is not an earlier export",
    ),
}


def _run_without_people(ws: Path, corpus: str = "pii.jsonl") -> list:
    """`scalpel run` on a recipe naming only the model and `corpus` (and the benign text)."""
    path = _recipe(ws, recipe_without_people(corpus))
    return ["run", path, "--out", ws / "out", "--work", ws / "work"]


def _file(ws: Path, name: str, data: bytes) -> str:
    """Write `data` to ws/`name`; the corpus path a recipe names: its top folder or the file."""
    (ws / name).parent.mkdir(parents=True, exist_ok=True)
    (ws / name).write_bytes(data)
    return name.split("/")[0]


def _max_length(ws: Path, tokens: int) -> None:
    config = ws / "model" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": tokens}))


def _jsonl(ws: Path, rows: list[dict]) -> None:
    (ws / "pii.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _retype(ws: Path, model_type: str) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=32, n_layer=2, n_head=4
    ).save_pretrained(ws / "model")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ws / "model")).save_pretrained(
        ws / "model"
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weights(ws: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ws / "model")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(ws / "model")


def _gemma2(ws: Path) -> None:
    tok_files = {p.name: p.read_bytes() for p in (ws / "model").iterdir() if "token" in p.name}
    model = tiny_model(
        "gemma2", vocab_size=json.loads((ws / "model" / "config.json").read_text())["vocab_size"]
    )
    model.save_pretrained(ws / "model")
    for name, data in tok_files.items():
        (ws / "model" / name).write_bytes(data)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_message_and_leaves_nothing(case, ws, scalpel, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    setup, message = CASES[case]
    args = setup(ws)
    existed = (ws / "out").exists()
    run = scalpel(*args)
    code, err = run.code, run.err
    assert code == 2, (case, err)
    assert message in " ".join(err.split()), (case, err)
    assert "Traceback" not in err
    assert (
        (ws / "out").exists() == existed
        and not list(ws.glob(".tmp-*"))
        and not list(ws.glob(".out*"))
    )


def test_every_command_has_bad_input_cases(ws, tmp_path_factory):
    """A command added to the CLI without a case of bad input here fails this test."""
    import shutil

    from exporter.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    copies = tmp_path_factory.mktemp("cases")  # outside the workspace: a copy must not hold itself
    covered = set()
    for i, (setup, _) in enumerate(CASES.values()):  # each setup on its own copy of the workspace
        covered.add(str(setup(shutil.copytree(ws, copies / str(i)))[0]))
    assert commands <= covered, sorted(commands - covered)


def test_disk_full_during_export_leaves_no_partial_folder(ws, scalpel, monkeypatch):
    import errno

    from exporter.patch import export

    def full(*args, **kwargs):
        raise OSError(
            errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None
        )

    monkeypatch.setattr(export, "save_file", full)
    run = scalpel(
        "export", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work", "--n", 2
    )
    code, err = run.code, run.err
    assert code == 2 and "No space left on device" in err and "free space" in err, err
    assert "Traceback" not in err
    assert not (ws / "out").exists() and not list(ws.glob(".tmp-*"))
    monkeypatch.undo()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("SCALPEL_CACHE_DIR", str(ws / "cache"))
    run = scalpel(
        "export", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work", "--n", 2
    )
    code, err = run.code, run.err
    # space freed: the re-run finishes
    assert code == 0 and (ws / "out" / "config.json").exists(), err


def test_an_sae_of_another_width_is_refused_before_the_model_runs():
    from exporter.patch import applied, build_patch
    from exporter.sae import TopKSAE

    model = tiny_model("llama")  # 32 wide
    patch = build_patch(TopKSAE(64, 128, 4), [1, 2], mode="exact")
    with pytest.raises(ValueError, match="is 64 wide, but this model's residual stream is 32 wide"):
        with applied(model, 1, patch):
            pass


def test_an_export_missing_its_remote_code_is_refused_on_load(ws, scalpel):
    run = scalpel(
        "export", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work", "--n", 2
    )
    code, err = run.code, run.err
    assert code == 0, err
    (ws / "out" / "scalpel_patch.py").unlink()
    run = scalpel("eval", ws / "out", "--against", ws / "model", "--people", ws / "people.jsonl")
    code, err = run.code, run.err
    assert code == 2 and "scalpel_patch.py" in err and "Traceback" not in err, err
