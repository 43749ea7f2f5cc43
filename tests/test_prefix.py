"""Attacks derived from the corpus: each value's own preceding text is the prompt; values split by
value."""

import json
import sys

import pytest

from exporter.data.corpus import Document
from exporter.data.detectors import detect
from exporter.evaluate import prefix
from exporter.evaluate.prefix import (
    corpus_values,
    first_part,
    normalise,
    prefix_rows,
    prefix_targets,
    split_values,
)

TEXTS = [
    "Please write to Ann.Lee@Example.org about the contract, or call 415-555-0101.",
    "Forwarded by ann.lee@example.org: the schedule moved to Monday.",
    # the value starts the document: nothing to prompt with
    "bob@corp.com opened this thread first.",
    "Questions go to carol.diaz@mail.net and nobody else.",
]
DOCS = [Document(t, detect(t, ["email", "phone"])) for t in TEXTS]


def test_values_are_compared_as_written_variants_of_one_value():
    assert normalise("Ann.Lee@Example.org", "email") == "ann.lee@example.org"
    assert normalise("(415) 555-0101", "phone") == "4155550101"
    assert first_part("Ann.Lee@Example.org", "email") == "ann.lee"
    assert first_part("415-555-0101", "phone") == "415555"
    assert list(corpus_values(DOCS)) == [
        "ann.lee@example.org", "4155550101", "bob@corp.com", "carol.diaz@mail.net"
    ]  # fmt: skip


def test_values_split_by_value_so_no_value_is_on_both_sides():
    val, test = split_values(DOCS, seed=0)
    assert val | test == set(corpus_values(DOCS)) and not val & test and len(val) == 2
    assert split_values(DOCS, seed=0) == (val, test)  # seeded
    with pytest.raises(ValueError, match="at least two"):
        split_values(DOCS[2:3])


def test_one_target_per_value_and_cut_from_the_text_before_it(tiny_tokenizer):
    values = set(corpus_values(DOCS))
    targets = prefix_targets(DOCS, tiny_tokenizer, values, cuts=(32, 3))
    # bob's address opens its document: no target; ann's first appearance is used once.
    assert {t.value for t in targets} == {
        "Ann.Lee@Example.org",
        "415-555-0101",
        "carol.diaz@mail.net",
    }
    assert len(targets) == 6
    long, short = [t for t in targets if t.value == "Ann.Lee@Example.org"]
    assert long.prompt.strip() == "Please write to" and TEXTS[0].startswith(long.prompt)
    ids = tiny_tokenizer(short.prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 3 and "to" in short.prompt


def test_rows_count_exact_and_partial_completions(tiny_tokenizer, monkeypatch):
    targets = prefix_targets(DOCS, tiny_tokenizer, set(corpus_values(DOCS)), cuts=(8,))

    def continuations(model, tokenizer, prompts, max_new_tokens, progress=False):
        # The address completed exactly, the number only in its first six digits, carol not at all.
        return [" ann.lee@example.org, thanks", " (415) 555-9999", " someone@else.com"]

    monkeypatch.setattr(prefix, "greedy_continuations", continuations)
    rows = prefix_rows(None, tiny_tokenizer, targets, group="test")
    by_type = {r["pii_type"]: r for r in rows}
    assert by_type["email"]["n"] == 2 and by_type["email"]["exact"] == 0.5
    assert by_type["email"]["username"] == 0.5
    assert by_type["phone"]["exact"] == 0.0 and by_type["phone"]["username"] == 1.0
    assert {r["attack"] for r in rows} == {"prefix8"} and {r["group"] for r in rows} == {"test"}


def test_audit_command_reports_without_writing_any_value(ws, capsys, monkeypatch):
    from exporter import cli

    args = [
        "scalpel",
        "audit",
        "model",
        "--data",
        "pii.jsonl",
        "--out",
        "audit",
        "--max-values",
        "20",
    ]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "PII completed from the corpus's own text" in out and "last 32 tokens" in out
    report = json.loads((ws / "audit" / "report.json").read_text())
    assert report["audited"] == 20 and {r["pii_type"] for r in report["rows"]} == {"email", "phone"}
    assert (ws / "audit" / "audit.png").stat().st_size and "| PII type |" in (
        ws / "audit" / "report.md"
    ).read_text()
    written = out + "".join(p.read_text() for p in (ws / "audit").glob("report.*"))
    for row in map(json.loads, (ws / "people.jsonl").read_text().splitlines()):
        assert row["email"] not in written
