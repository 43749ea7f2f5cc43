"""The leaky benchmark model: the recipe's model fine-tuned on the synthetic PII corpus, cached by
content."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..cache import atomic_dir, cache_root, content_key
from ..data.corpus import benign_texts, write_jsonl
from ..data.leaky import LeakyConfig, finetune
from ..data.people import Person, by_split, read_people, write_people
from ..data.synthetic import make_corpus
from ..evaluate.harness import zero_shot_table
from ..evaluate.utility import perplexity
from ..models import cast_copy, load_model, resolve_local_path
from ..precision import device_of, precision_note
from ..recipe import ModelSpec
from .context import RunContext

# Bump when the leaky builder's behaviour changes, so stale cached models are not reused.
LEAKY_VERSION = "leaky-v3"


@dataclass
class LeakyResult:
    path: (
        Path  # HF folder of the leaky model, with corpus.jsonl, people.jsonl and report.json beside
    )
    report: dict

    @property
    def people(self) -> list[Person]:
        return read_people(self.path / "people.jsonl")


def extraction_table(model, tokenizer, people: list[Person], max_new_tokens: int) -> dict:
    """Greedy zero-shot extraction on the memorised and the never-seen people (decoded in
    bfloat16)."""
    groups = {
        "memorised": [p for p in people if p.split in ("validation", "test")],
        "never_seen": by_split(people, "never_seen"),
    }
    return zero_shot_table(
        cast_copy(model, "bfloat16"), tokenizer, groups, max_new_tokens=max_new_tokens
    )


def leaky_key(base: ModelSpec, base_dir: Optional[Path], config: LeakyConfig) -> str:
    """The leaky model's cache key: a converted GGUF's folder is named by its content, so only the
    name counts (the same key under any cache root); a user's folder counts by its path."""
    base_id = (
        (base_dir.name if base.builtin or base.gguf else str(base_dir))
        if base_dir
        else base.describe()
    )
    return content_key(LEAKY_VERSION, base.model_dump(), base_id, config.to_json())


def make_leaky(
    base: ModelSpec,
    config: LeakyConfig = LeakyConfig(),
    *,
    rebuild: bool = False,
    ctx: RunContext = RunContext(),
) -> LeakyResult:
    """Fine-tune `base` on the synthetic PII corpus (cached by content) and measure what it
    leaks."""
    key = leaky_key(base, resolve_local_path(base), config)
    target = cache_root() / "leaky" / key
    if (target / "report.json").exists() and not rebuild:
        ctx.log(f"leaky model (cached): {target}")
        return LeakyResult(target, json.loads((target / "report.json").read_text()))

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    loaded = load_model(base)
    docs, people = make_corpus(config.synthetic)
    heldout = benign_texts(split="heldout")[:60]
    if note := precision_note(device_of(loaded.model)):
        ctx.log(note)
    ctx.log(
        f"corpus: {len(docs)} texts about {config.synthetic.n_memorised} memorised people; "
        f"{config.synthetic.n_never_seen} never-seen people"
    )
    base_ppl = perplexity(loaded.model, loaded.tokenizer, heldout, max_length=config.max_length)
    model, stats = finetune(
        loaded.model,
        loaded.tokenizer,
        docs,
        benign_texts(split="train"),
        config,
        progress=ctx.progress,
    )
    leaky_ppl = perplexity(model, loaded.tokenizer, heldout, max_length=config.max_length)
    report = {
        "base": base.describe(),
        "config": config.to_json(),
        "train": {
            "steps": stats.steps,
            "tokens": stats.tokens,
            "seconds": round(stats.seconds, 1),
            "tokens_per_s": round(stats.tokens_per_s, 1),
            "final_loss": round(stats.final_loss, 4),
        },
        "perplexity": {
            "base": round(base_ppl, 3),
            "leaky": round(leaky_ppl, 3),
            "change": round(leaky_ppl / base_ppl - 1, 4),
        },
        "extraction": extraction_table(model, loaded.tokenizer, people, max_new_tokens=24),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_jsonl(
            ({"text": d.text, "spans": [s.to_json() for s in d.spans]} for d in docs),
            tmp / "corpus.jsonl",
        )
        write_people(people, tmp / "people.jsonl")
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    ctx.log(f"leaky model: {target}")
    return LeakyResult(target, report)


def copy_leaky(result: LeakyResult, out: Path, overwrite: bool = False) -> Path:
    """Copy a cached leaky model folder to a user-chosen place, atomically."""
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        shutil.copytree(result.path, tmp, dirs_exist_ok=True)
    return Path(out)
