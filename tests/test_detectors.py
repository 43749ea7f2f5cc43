import json
from pathlib import Path

import pytest

from exporter.data.detectors import PII_TYPES, Span, detect, redact, redact_text

FIXTURE = Path(__file__).parent / "fixtures" / "pii_labelled.jsonl"


def labelled():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_fixture_is_large_and_mixed():
    rows = labelled()
    assert len(rows) >= 50
    kinds = {p["type"] for r in rows for p in r["pii"]}
    assert kinds == set(PII_TYPES)
    assert sum(not r["pii"] for r in rows) >= 15  # negatives and near-misses


def test_precision_and_recall_per_type():
    tp = {k: 0 for k in PII_TYPES}
    fp = dict(tp)
    fn = dict(tp)
    for row in labelled():
        gold = {(p["value"], p["type"]) for p in row["pii"]}
        found = {(row["text"][s.start : s.end], s.type) for s in detect(row["text"])}
        for value, kind in found:
            if (value, kind) in gold:
                tp[kind] += 1
            else:
                fp[kind] += 1
        for value, kind in gold - found:
            fn[kind] += 1
    for kind in PII_TYPES:
        precision = tp[kind] / max(tp[kind] + fp[kind], 1)
        recall = tp[kind] / max(tp[kind] + fn[kind], 1)
        assert tp[kind] > 0
        assert precision >= 0.95 and recall >= 0.9, (kind, precision, recall)
    micro_p = sum(tp.values()) / (sum(tp.values()) + sum(fp.values()))
    micro_r = sum(tp.values()) / (sum(tp.values()) + sum(fn.values()))
    assert micro_p >= 0.97 and micro_r >= 0.95, (micro_p, micro_r)


def test_spans_sorted_non_overlapping_and_filterable():
    text = "a@b.com 713-555-1234 123-45-6789"
    spans = detect(text)
    assert spans == sorted(spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    assert [s.type for s in detect(text, ["phone"])] == ["phone"]
    with pytest.raises(ValueError, match="unknown PII types"):
        detect(text, ["passport"])


def test_redaction_hides_values():
    assert redact("john.doe@example.com") == "j***@e***.com"
    assert redact("713-853-4521") == "7**-***-***1"
    text = "mail john.doe@example.com or 713-853-4521"
    out = redact_text(text)
    assert "john.doe" not in out and "853-4521" not in out and out.startswith("mail j***@")
    assert Span(0, 3, "email").to_json() == {"start": 0, "end": 3, "type": "email"}
