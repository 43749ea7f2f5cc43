"""Shared fixtures: tiny random models of real architectures and a real (tiny) fast tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Tests use the user cache dir (or SCALPEL_CACHE_DIR), so the converted and leaky SmolLM2 built by
# `scalpel demo` are reused rather than rebuilt. Under pytest-xdist the cores are shared between
# the workers: one thread each (two per process would oversubscribe the cores, and OpenMP threads
# that spin-wait for a busy core slow everything down), for the processes the tests start too.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, torch.get_num_threads()) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Real-model tests (-m slow) in this one process: each already uses every core, and their
    session fixture (the demo's stages) is built once."""
    expr = config.option.markexpr or ""
    if "slow" in expr and "not slow" not in expr and getattr(config.option, "numprocesses", None):
        config.option.numprocesses, config.option.dist, config.option.tx = 0, "no", []


ARCH_TYPES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
]


def tiny_config(model_type: str, vocab_size: int = 128, **overrides):
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=128,
            **overrides,
        )
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        # the 3-shot attack prompts run past 128 tokens of the tiny tokenizer
        max_position_embeddings=512,
    )
    if model_type != "gpt_neox":
        kwargs["num_key_value_heads"] = 2
    if model_type in ("qwen3", "gemma2", "gemma3_text"):
        kwargs["head_dim"] = 8
    if model_type == "phi3":
        kwargs["pad_token_id"] = 0
    # an override replaces a default (a wider model, an untied head)
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def tiny_model(model_type: str, vocab_size: int = 128, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, vocab_size, **overrides), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE fast tokenizer trained on the synthetic corpus: real offsets, tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from exporter.data.synthetic import SyntheticConfig, make_corpus

    docs, _ = make_corpus(SyntheticConfig(n_memorised=30, n_never_seen=5, seed=1))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([d.text for d in docs], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    return fast


@dataclass(frozen=True)
class CliRun:
    code: int  # the exit status
    out: str
    err: str


@pytest.fixture
def scalpel(capsys, monkeypatch):
    """`scalpel(*ARGS)` runs `scalpel ARGS` through the real entry point in this process (a fresh
    Python costs seconds of imports; the tests of the user's path start one on purpose)."""
    import sys

    from exporter import cli

    def run(*args) -> CliRun:
        monkeypatch.setattr(sys, "argv", ["scalpel", *map(str, args)])
        capsys.readouterr()  # what came before is not this command's
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        printed = capsys.readouterr()
        return CliRun(code, printed.out, printed.err)

    return run


@pytest.fixture
def cpu_caps(monkeypatch):
    """Set what the CPU reports to `exporter.precision` (its answer is cached per process, so the
    cache is cleared on the way in and out)."""
    from exporter import precision

    def set_caps(caps: dict) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        precision.fast_bfloat16.cache_clear()

    yield set_caps
    precision.fast_bfloat16.cache_clear()


@pytest.fixture
def native_bf16(cpu_caps):
    """A CPU that computes bfloat16 natively, whatever this one does: the tests of what bfloat16
    settings do (casts, cache keys, the search's confirmation in float32) need them to take
    effect; `exporter.precision` runs them in float32 where bfloat16 is emulated."""
    cpu_caps({**torch.cpu.get_capabilities(), "architecture": "x86_64", "avx512_bf16": True})


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory):
    """One stage folder for the slow real-model tests, so the probe and SAE are built once per
    session.

    SCALPEL_TEST_WORK names a folder to keep between sessions (stages are reused when their keys
    match)."""
    import os
    from pathlib import Path

    kept = os.environ.get("SCALPEL_TEST_WORK")
    return Path(kept) if kept else tmp_path_factory.mktemp("demo-work")


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed one can still be held
    by an earlier run's socket)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_RECIPE = """
model: {path: model}
data: {pii: {path: pii.jsonl}, benign: {path: benign.txt}, people: {path: people.jsonl},
       max_length: 64}
probe: {max_tokens: 3000}
sae: {expansion: 2, k: 4, k_aux: 8, batch_size: 256, train_tokens: 5120, harvest_tokens: 3000,
      dead_tokens: 2000}
"""


def recipe_without_people(corpus: str, extra: str = "") -> str:
    """TINY_RECIPE on `corpus` (a path in the workspace) with no people file, plus `extra`
    sections."""
    text = TINY_RECIPE.replace("{pii: {path: pii.jsonl}", f"{{pii: {{path: {corpus}}}")
    return text.replace(" people: {path: people.jsonl},", "") + extra


# SCALPEL_TEST_DEVICE=cuda runs every tiny workspace recipe (probe to export) on that device
# (tests/test_device.py holds the rest of the device checks).
TEST_DEVICE = os.environ.get("SCALPEL_TEST_DEVICE", "cpu")


def on_test_device(recipe: str) -> str:
    if TEST_DEVICE == "cpu":
        return recipe
    return recipe.replace("model: {path: model}", f"model: {{path: model, device: {TEST_DEVICE}}}")


def write_workspace(
    folder,
    tokenizer,
    *,
    n_memorised: int,
    n_never_seen: int,
    texts_per_person: int,
    seed: int,
    benign: str,
    paragraphs: int,
    recipe: str,
) -> None:
    """A tiny Llama folder with `tokenizer`, a synthetic PII corpus, its people, benign text and a
    recipe."""
    from exporter.data.corpus import write_jsonl
    from exporter.data.people import write_people
    from exporter.data.synthetic import SyntheticConfig, make_corpus

    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    docs, people = make_corpus(
        SyntheticConfig(
            n_memorised=n_memorised,
            n_never_seen=n_never_seen,
            texts_per_person=texts_per_person,
            seed=seed,
        )
    )
    write_jsonl(({"text": d.text} for d in docs), folder / "pii.jsonl")
    write_people(people, folder / "people.jsonl")
    (folder / "benign.txt").write_text(
        "\n\n".join(f"Paragraph {i} {benign}" * 3 for i in range(paragraphs))
    )
    (folder / "recipe.yaml").write_text(on_test_device(recipe))


@pytest.fixture
def ws(tmp_path, tiny_tokenizer, monkeypatch):
    """A workspace (the current folder): tiny Llama, PII corpus, people, benign text and a recipe
    that works."""
    monkeypatch.setenv("SCALPEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_workspace(
        tmp_path,
        tiny_tokenizer,
        n_memorised=12,
        n_never_seen=3,
        texts_per_person=2,
        seed=3,
        benign="is about names and values.",
        paragraphs=30,
        recipe=TINY_RECIPE,
    )
    return tmp_path
