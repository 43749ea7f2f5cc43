"""llama.cpp runs a weights-edited export as transformers runs it: the base and a plain export,
converted to GGUF by llama.cpp's own converter (`scalpel gguf`), generate token for token what
transformers generates (slow; skipped unless SCALPEL_LLAMA_CPP_PYTHON names an interpreter with
llama-cpp-python and LLAMA_CPP_DIR a llama.cpp source tree: see the README's "Serving" section)."""

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from exporter.evaluate.user_path import continuations, has_module
from exporter.gguf import CONVERTER, write_gguf
from exporter.models import ModelSpec, resolve_local_path
from exporter.patch.plain import write_plain

pytestmark = pytest.mark.slow

LLAMA_PYTHON = os.environ.get("SCALPEL_LLAMA_CPP_PYTHON", "")
LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR", "")


def _ready() -> bool:
    if not (LLAMA_CPP_DIR and (Path(LLAMA_CPP_DIR) / CONVERTER).is_file()):
        return False
    return bool(LLAMA_PYTHON) and has_module(LLAMA_PYTHON, "llama_cpp")


@pytest.mark.skipif(
    not _ready(),
    reason="SCALPEL_LLAMA_CPP_PYTHON (a python with llama-cpp-python) and LLAMA_CPP_DIR (a "
    "llama.cpp source tree) are not both set",
)
def test_llama_cpp_generates_what_transformers_generates_for_base_and_plain_export(tmp_path):
    from transformers import AutoTokenizer

    # llama.cpp's converter accepts only tokenizers it knows: SmolLM2's, on a tiny random Llama
    tok = AutoTokenizer.from_pretrained(resolve_local_path(ModelSpec(builtin="smollm2-135m")))
    model = tiny_model(
        "llama", len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    plain = write_plain(base, tmp_path / "plain", torch.randn(4, d, generator=g), 1,
                        steer=torch.randn(d, generator=g))  # fmt: skip
    folders = {"base": base, "plain": plain}
    for folder in folders.values():
        write_gguf(folder, llama_cpp=Path(LLAMA_CPP_DIR))
    prompts = [
        "The email address of Jane Doe is",
        "-----Original Message-----\nFrom: John Smith [mailto:",
        "Call Ann Lee on",
        "def main():",
    ]
    want = continuations(folders, prompts, 12)
    got = continuations(folders, prompts, 12, python=LLAMA_PYTHON, client="llama_cpp")
    print(f"\nllama-cpp-python {got['llama_cpp']}, GGUF {got['dtype']}")
    assert got["dtype"] == {"base": "float32", "plain": "float32"}
    print({name: [t[:40] for t in texts] for name, texts in want["continuations"].items()})
    assert all(len(t) > 0 for texts in want["continuations"].values() for t in texts)
    assert got["continuations"] == want["continuations"]
    assert want["continuations"]["plain"] != want["continuations"]["base"]
