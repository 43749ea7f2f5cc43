"""Every way a user generates text, checked step by step against one full no-cache forward pass.

For each path (a single prompt greedy, seeded sampling, beam search, batches with and without
padding, a static cache, `pipeline()`, no cache), every decode step's logits must equal the logits
of the patched model's own full forward pass (no cache) over the finished sequence at that position:
then every generated token was patched exactly as a prompt token is. Each path also reports whether
its steps differ from the unpatched base, so a patch that does nothing cannot pass.

Imports only torch and transformers: `main` runs in a fresh process that cannot import `exporter`
(the user's side), and the test imports the same paths to run them in-process on
`exporter.patch.attached`.

usage: python generation_paths.py CASES.pt   (written by tests/test_generation_paths.py)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

NEW_TOKENS = 6


@dataclass
class Row:
    """One generated sequence: its ids (prompt + new, pads included), attention mask and position
    ids as generate used them, where the prompt ends, and the raw logits of each decode step."""

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    steps: list


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate derives them from a (left-padded) attention mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _rows(out, enc: dict, beams: int = 1) -> list[Row]:
    """Rows of a `generate(..., output_logits=True, return_dict_in_generate=True)` result; with
    beams, each returned sequence's steps are taken from the beam that produced them."""
    seqs, prompt_len = out.sequences, enc["input_ids"].shape[1]
    assert seqs.shape[1] == prompt_len + NEW_TOKENS, (
        "generate returned another number of new tokens"
    )
    rows = []
    for j in range(seqs.shape[0]):
        source = j // beams if beams > 1 else j
        mask = torch.cat(
            [
                enc["attention_mask"][source],
                torch.ones(seqs.shape[1] - prompt_len, dtype=torch.long),
            ]
        )
        steps = []
        for t, logits in enumerate(out.logits):
            beam = int(out.beam_indices[j, t]) if beams > 1 else j
            if beam < 0:  # a finished beam: no more steps
                break
            steps.append(logits[beam].float())
        rows.append(Row(seqs[j], mask, prompt_len, steps))
    return rows


def _encode(tok, prompts: list[str]) -> dict:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _generate(model, tok, prompts: list[str], beams: int = 1, **kwargs) -> list[Row]:
    enc = _encode(tok, prompts)
    out = model.generate(
        **enc,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        num_beams=beams,
        num_return_sequences=beams,
        **kwargs,
    )
    return _rows(out, enc, beams)


def _pipeline(model, tok, prompts: list[str]) -> list[Row]:
    from transformers import LogitsProcessor, LogitsProcessorList, pipeline

    class Record(LogitsProcessor):
        def __init__(self):
            self.steps = []

        def __call__(self, input_ids, scores):
            self.steps.append(scores[0].float().clone())
            return scores

    record = Record()
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    out = generator(
        prompts[0],
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_tensors=True,
        logits_processor=LogitsProcessorList([record]),
    )
    ids = torch.tensor(out[0]["generated_token_ids"])
    return [Row(ids, torch.ones_like(ids), len(ids) - NEW_TOKENS, record.steps)]


def _seeded_sampling(model, tok, prompts):
    torch.manual_seed(0)
    return _generate(model, tok, prompts[:1], do_sample=True)


PATHS = {
    "greedy, one prompt": lambda m, t, p: _generate(m, t, p[:1], do_sample=False),
    "sampling, seeded": _seeded_sampling,
    "beam search x3": lambda m, t, p: _generate(m, t, p[:1], beams=3, do_sample=False),
    # equal lengths
    "batch, no padding": lambda m, t, p: _generate(m, t, [p[0], p[2]], do_sample=False),
    "batch, left-padded": lambda m, t, p: _generate(m, t, [p[0], p[1]], do_sample=False),
    "static cache": lambda m, t, p: _generate(
        m, t, p[:1], do_sample=False, cache_implementation="static"
    ),
    "pipeline()": _pipeline,
    "use_cache=False": lambda m, t, p: _generate(m, t, p[:1], do_sample=False, use_cache=False),
}


@torch.no_grad()
def _full_logits(model, row: Row) -> torch.Tensor:
    """The logits of one forward pass without a cache over the finished sequence: [T, V]."""
    out = model(
        input_ids=row.ids.unsqueeze(0),
        attention_mask=row.mask.unsqueeze(0),
        position_ids=_positions(row.mask).unsqueeze(0),
        use_cache=False,
    )
    return out.logits[0].float()


@torch.no_grad()
def check_path(model, tok, prompts: list[str], path: str, base=None) -> dict:
    """{steps, rel_err (worst over every decode step), moved (steps whose logits differ from the
    base's)}."""
    rows = PATHS[path](model, tok, prompts)
    n, worst, moved = 0, 0.0, 0
    for row in rows:
        full = _full_logits(model, row)
        ref_base = _full_logits(base, row) if base is not None else None
        for t, step in enumerate(row.steps):
            ref = full[row.prompt_len - 1 + t]
            # a logits processor ahead of pipeline()'s recorder may rule tokens out
            kept = torch.isfinite(step)
            worst = max(worst, float((step - ref)[kept].abs().max() / ref.abs().max()))
            if ref_base is not None:
                b = ref_base[row.prompt_len - 1 + t]
                moved += float((ref - b).abs().max() / b.abs().max()) > 1e-4
            n += 1
    return {"steps": n, "rel_err": worst, "moved": moved}


def main(cases_file: str) -> None:
    class _BlockExporter:
        def find_spec(self, name, path=None, target=None):
            if name == "exporter" or name.startswith("exporter."):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, _BlockExporter())
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = torch.load(cases_file)
    results = {"transformers": transformers.__version__}
    for name, case in spec["cases"].items():
        model = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True).eval()
        base = AutoModelForCausalLM.from_pretrained(case["base_dir"]).eval()
        tok = AutoTokenizer.from_pretrained(case["dir"])
        results[name] = {
            path: check_path(model, tok, spec["prompts"], path, base) for path in PATHS
        }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
