"""PII hygiene: a whole `scalpel run` on a tiny model and its synthetic PII, then every file it
wrote (export, card, reports, plots, work folder, caches) and everything it printed is searched for
every PII string of the input (emails, phone numbers, full names) and for the PII's token ids; only
redacted forms may appear."""

import json
import re

import numpy as np
from safetensors import safe_open

from exporter.data.people import read_people

INPUTS = {"model", "pii.jsonl", "people.jsonl", "benign.txt", "recipe.yaml"}


def _needles(ws) -> list[str]:
    people = read_people(ws / "people.jsonl")
    needles = {p.email for p in people} | {p.name for p in people}
    needles |= {p.phone for p in people if p.phone}
    needles |= {re.sub(r"\D", "", p.phone) for p in people if p.phone}  # the digits alone
    # and whatever else the detector finds in the corpus
    for line in (ws / "pii.jsonl").read_text().splitlines():
        needles |= set(re.findall(r"[\w.+-]+@[\w.-]+\.\w+", json.loads(line)["text"]))
    return sorted(needles)


def _int_arrays(path):
    with safe_open(str(path), "np") as f:
        for name in f.keys():
            a = f.get_tensor(name)
            if np.issubdtype(a.dtype, np.integer):
                yield name, a.reshape(-1)


def test_nothing_written_or_printed_holds_the_pii_or_its_tokens(ws, scalpel, tiny_tokenizer):
    someone = read_people(ws / "people.jsonl")[0]
    (ws / "recipe.yaml").write_text(
        f"# questions to {someone.email}\n"
        + (ws / "recipe.yaml").read_text()
        + "intervention: {ablate_n: [2, 4], alpha: [0.0, 0.1], context_gate: [true]}\n"
        + "eval: {max_new_tokens: 6, few_shot: 1, samples: 2, memorisation_docs: 4}\n"
    )
    printed = scalpel("run", ws / "recipe.yaml", "--out", ws / "out", "--work", ws / "work")
    assert printed.code == 0, printed.err[-2000:]
    needles = _needles(ws)
    assert len(needles) > 30
    token_seqs = [
        tiny_tokenizer(" " + n, add_special_tokens=False)["input_ids"] for n in needles if "@" in n
    ]
    files = [p for p in ws.rglob("*") if p.is_file() and p.relative_to(ws).parts[0] not in INPUTS]
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".png" for p in files)
    assert any(p.suffix == ".safetensors" and "activations" in p.parts for p in files)
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [(str(path.relative_to(ws)), n) for n in needles if n.encode() in data]
        text = data.decode("utf-8", "ignore")
        leaks += [
            (str(path.relative_to(ws)), "token ids")
            for ids in token_seqs
            if len(ids) > 2 and ", ".join(map(str, ids)) in text
        ]
        if path.suffix == ".safetensors":
            for name, arr in _int_arrays(path):
                for ids in token_seqs:
                    for dtype in (np.int64, np.int32):
                        if (
                            len(ids) > 2
                            and np.asarray(ids, dtype).tobytes() in arr.astype(dtype).tobytes()
                        ):
                            leaks.append((f"{path.relative_to(ws)}:{name}", "token ids"))
    leaks += [("stdout/stderr", n) for n in needles if n in printed.out + printed.err]
    assert not leaks, leaks[:10]
    # The recipe's comment reached the card (it carries the recipe) only in its redacted form.
    card = (ws / "out" / "README.md").read_text()
    assert f"# questions to {someone.email[0]}***@{someone.domain[0]}***" in card
