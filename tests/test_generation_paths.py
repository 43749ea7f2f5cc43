"""The patch acts on every token a user generates, on every generation path, in a fresh process with
stock transformers and in-process: each decode step's logits equal one full no-cache forward pass of
the patched model (tests/helpers/generation_paths.py). `.ci/run` runs this file on the newest and
the oldest transformers we support, and with exports written here but loaded by the oldest
(SCALPEL_LOADER_PYTHON)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers.generation_paths import PATHS, check_path

from exporter.models import LoadedModel, architecture_of, layer_output_hook
from exporter.patch import attached, build_patch, calibrate_gates, steering_vector
from exporter.patch.export import write_export
from exporter.sae import TopKSAE

HERE = Path(__file__).parent
ARCHS = ["llama", "gemma2", "qwen2", "gpt2"]
VARIANTS = [(mode, gated) for mode in ("folded", "exact") for gated in (False, True)]
LAYER = 1
TOLERANCE = 1e-5  # relative, float32


def _prompts(tok) -> list[str]:
    """A prompt, a longer one (left padding) and one of the first one's token length (a batch with
    no padding)."""
    prompts = [
        "the email address of Jane Doe is",
        "-----Original Message-----\nFrom: John Smith [mailto:",
        "the phone number of Ann Lee is",
    ]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    while lengths[2] != lengths[0]:
        prompts[2] = prompts[2][:-1] if lengths[2] > lengths[0] else prompts[2] + " ok"
        lengths[2] = len(tok(prompts[2])["input_ids"])
    assert lengths[1] > lengths[0]
    return prompts


def _patches(model, tok, prompts) -> dict:
    """Folded and exact, with and without a context gate (opening on about half the tokens), and a
    sink norm that leaves the largest tenth of the tokens alone, so the norm rule is at work on
    every path too."""
    d = architecture_of(model).hidden_size(model)
    torch.manual_seed(0)
    sae = TopKSAE(d, 4 * d, 8, norm_scale=1.2)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
    seen = []
    with torch.no_grad(), layer_output_hook(model, LAYER, lambda h: seen.append(h.reshape(-1, d))):
        model(**tok(prompts, return_tensors="pt", padding=True))
    acts = torch.cat(seen)
    sink = float(acts.norm(dim=1).quantile(0.9))
    gate = (
        torch.randn(d, generator=torch.Generator().manual_seed(1)),
        -float(acts.mean(0) @ torch.zeros(d)),
    )
    A = [0, 5, 17, 30]
    steer = steering_vector(sae, torch.randn(sae.d_sae), 0.3, float(acts.norm(dim=1).mean()))
    gates = calibrate_gates(sae, torch.randn(4000, d) * float(acts.std()), A)
    return {
        (mode, gated): build_patch(
            sae,
            A,
            steer,
            mode=mode,
            gates=gates if mode == "folded" else None,
            context=gate if gated else None,
            sink=sink,
        )
        for mode, gated in VARIANTS
    }


def _name(arch: str, mode: str, gated: bool) -> str:
    return f"{arch} {mode}{' gated' if gated else ''}"


def _table(results: dict, title: str) -> str:
    paths = list(PATHS)
    lines = [title, "| export | " + " | ".join(paths) + " |", "|---|" + "---:|" * len(paths)]
    for name, row in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{row[p]['rel_err']:.0e} ({row[p]['moved']}/{row[p]['steps']})" for p in paths
            )
            + " |"
        )
    return "\n".join(lines)


def _assert_conforms(results: dict) -> None:
    for name, row in results.items():
        for path, r in row.items():
            assert r["steps"] >= 6, (name, path, r)
            assert r["rel_err"] <= TOLERANCE, (name, path, r)
            assert r["moved"] > 0, (name, path, r)  # the patch changed what these steps predict


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tokenizer):
    tok = tiny_tokenizer
    tok.padding_side = "left"
    prompts = _prompts(tok)
    root = tmp_path_factory.mktemp("conformance")
    cases, models = {}, {}
    for arch in ARCHS:
        model = tiny_model(arch, vocab_size=len(tok))
        model.generation_config.pad_token_id = tok.pad_token_id
        base_dir = root / f"base-{arch}"
        model.save_pretrained(base_dir)
        patches = _patches(model, tok, prompts)
        models[arch] = (model, patches, base_dir)
        for (mode, gated), patch in patches.items():
            out = root / f"export-{arch}-{mode}-{int(gated)}"
            write_export(
                LoadedModel(model, tok, architecture_of(model), "tiny", str(base_dir)),
                patch,
                LAYER,
                out,
            )
            cases[_name(arch, mode, gated)] = {"dir": str(out), "base_dir": str(base_dir)}
    return {"cases": cases, "prompts": prompts, "models": models, "root": root, "tok": tok}


def run_paths(
    cases: dict, prompts: list[str], root: Path, python: str | None = None
) -> tuple[str, dict]:
    """(transformers version, results) of generation_paths.py over `cases` ({name: {dir, base_dir}})
    in a fresh process that cannot import exporter (`python`: another interpreter, e.g. an older
    transformers)."""
    path = root / "cases.pt"
    torch.save({"cases": cases, "prompts": prompts}, path)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(root / "hf-modules"),
        "PYTHONPATH": "",
    }
    proc = subprocess.run(
        [python or sys.executable, str(HERE / "helpers" / "generation_paths.py"), str(path)],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.rsplit("RESULTS ", 1)[1])
    return results.pop("transformers"), results


def test_every_generation_path_patches_every_token_in_a_fresh_process(exports):
    version, results = run_paths(
        exports["cases"],
        exports["prompts"],
        exports["root"],
        os.environ.get("SCALPEL_LOADER_PYTHON"),
    )
    print(
        _table(
            results,
            f"\nfresh process, stock transformers {version} (worst relative error of a decode "
            "step's logits vs one full no-cache forward; in brackets: steps the patch changed / "
            "steps)",
        )
    )
    assert set(results) == set(exports["cases"])
    _assert_conforms(results)


def test_every_generation_path_patches_every_token_in_process(exports):
    import transformers
    from transformers import AutoModelForCausalLM

    tok, prompts = exports["tok"], exports["prompts"]
    results = {}
    for arch, (model, patches, base_dir) in exports["models"].items():
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        for (mode, gated), patch in patches.items():
            with attached(model, LAYER, patch):
                results[_name(arch, mode, gated)] = {
                    p: check_path(model, tok, prompts, p, base) for p in PATHS
                }
    print(_table(results, f"\nin-process attached(), transformers {transformers.__version__}"))
    _assert_conforms(results)


def test_the_harness_decodes_what_a_user_gets_one_prompt_at_a_time(exports):
    """The harness decodes prompts in left-padded batches with the patch attached in-process; a user
    loads the export in a fresh process and generates one prompt at a time. The continuations are
    the same text."""
    from exporter.evaluate.leakage import EMAIL_TEMPLATES, greedy_continuations
    from exporter.evaluate.user_path import continuations

    tok = exports["tok"]
    names = ["Jane Doe", "John Smith", "Ann Lee", "Mary-Kate O'Neil"]
    prompts = [t.format(name=n) for t in EMAIL_TEMPLATES.values() for n in names]
    batched, folders = {}, {}
    for arch in ("llama", "gpt2"):
        model, patches, _base_dir = exports["models"][arch]
        for (mode, gated), patch in patches.items():
            name = _name(arch, mode, gated)
            with attached(model, LAYER, patch):
                batched[name] = greedy_continuations(
                    model, tok, prompts, max_new_tokens=8, progress=False
                )
            folders[name] = Path(exports["cases"][name]["dir"])
    alone = continuations(folders, prompts, 8)["continuations"]
    for name in folders:
        assert alone[name] == batched[name], name
    assert len({tuple(texts) for texts in batched.values()}) > 1  # the patches do differ
