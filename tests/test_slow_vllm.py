"""vLLM serves both kinds of checkpoint as transformers runs them: a stock one (the base, a plain
export) through its own Llama, a remote-code export through its Transformers backend with the patch
inside the decoder stack (slow; skipped unless SCALPEL_VLLM_PYTHON names an interpreter with vLLM,
which pins its own torch and transformers and so lives in a venv of its own: see the README's
"Serving" section)."""

import os

import pytest
import torch
from conftest import tiny_model
from test_generation_paths import LAYER, _patches, _prompts

from exporter.evaluate.user_path import continuations, has_module
from exporter.models import LoadedModel, architecture_of
from exporter.patch.export import write_export
from exporter.patch.plain import write_plain

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.environ.get("SCALPEL_VLLM_PYTHON", "")


@pytest.mark.skipif(
    not (VLLM_PYTHON and has_module(VLLM_PYTHON, "vllm")),
    reason="SCALPEL_VLLM_PYTHON does not name a python with vLLM installed",
)
def test_vllm_generates_what_transformers_generates_for_base_and_export(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = _prompts(tok)
    # vLLM's CPU attention needs a head size of at least 32; an untied head, so the export's head
    # must be found where vLLM looks for it
    model = tiny_model(
        "llama", len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    folders = {"base": base}
    for (mode, gated), patch in _patches(model, tok, prompts).items():
        if gated:
            folders[f"{mode} gated"] = write_export(
                LoadedModel(model, tok, architecture_of(model), "tiny", str(base)),
                patch,
                LAYER,
                tmp_path / f"export-{mode}",
            )
    # a plain export: a stock Llama whose layer-LAYER MLP carries the steering as its bias
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    folders["plain"] = write_plain(base, tmp_path / "plain", torch.randn(4, d, generator=g), LAYER,
                                   steer=torch.randn(d, generator=g))  # fmt: skip
    want = continuations(folders, prompts, 12)["continuations"]
    got = continuations(folders, prompts, 12, python=VLLM_PYTHON, client="vllm")["continuations"]

    def text(found: dict) -> dict:
        # a random model's last token may end inside a UTF-8 character: transformers decodes the
        # lone byte as U+FFFD, vLLM's incremental detokenizer holds it back
        return {k: [t.rstrip("\ufffd") for t in v] for k, v in found.items()}

    assert text(got) == text(want), (got, want)
    for name in folders:
        if name != "base":
            assert want[name] != want["base"], name  # the patch changes what is generated
