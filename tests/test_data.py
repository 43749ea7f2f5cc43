import json

import pytest

from exporter.data.corpus import DataError, benign_texts, read_pii_jsonl
from exporter.data.detectors import PII_TYPES, Span
from exporter.data.labels import token_labels
from exporter.data.people import Person, assign_splits, read_people, write_people
from exporter.data.synthetic import SyntheticConfig, make_corpus


def test_token_labels_from_offsets(tiny_tokenizer):
    text = "Please reach Ann Lee at ann.lee@foo.com today."
    start = text.index("ann.lee")
    span = Span(start, start + len("ann.lee@foo.com"), "email")
    labels = token_labels(tiny_tokenizer, text, [span])
    enc = tiny_tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert labels.input_ids.tolist() == enc["input_ids"]
    for i, (a, b) in enumerate(offsets):
        assert bool(labels.pii[i]) == (a < span.end and b > span.start)
    first = int(labels.span_start.nonzero()[0])
    assert offsets[first][0] <= span.start < offsets[first][1]
    assert labels.span_start.sum() == 1 and labels.pre_span.sum() == 1
    assert int(labels.pre_span.nonzero()[0]) == first - 1
    assert not labels.pre_span[labels.pii].any()
    assert set(labels.type_id[labels.pii].tolist()) == {PII_TYPES.index("email")}
    assert (labels.type_id[~labels.pii] == -1).all()
    # The PII tokens decode back to (a superset of) the span text.
    decoded = tiny_tokenizer.decode(labels.input_ids[labels.pii])
    assert "ann.lee@foo.com" in decoded


def test_token_labels_reject_out_of_bounds(tiny_tokenizer):
    with pytest.raises(ValueError, match="outside the text"):
        token_labels(tiny_tokenizer, "short", [Span(2, 50, "email")])


def test_synthetic_corpus_spans_people_and_determinism():
    cfg = SyntheticConfig(n_memorised=20, n_never_seen=10, texts_per_person=5, seed=3)
    docs, people = make_corpus(cfg)
    assert len(docs) == 100
    corpus = "\n".join(d.text for d in docs)
    for doc in docs:
        assert doc.spans
        for s in doc.spans:
            value = doc.text[s.start : s.end]
            assert (s.type == "email") == ("@" in value)
    splits = [p.split for p in people]
    assert (
        splits.count("never_seen") == 10
        and splits.count("validation") == 10
        and splits.count("test") == 10
    )
    for p in people:
        if p.split == "never_seen":
            assert p.email not in corpus and p.name not in corpus
        else:
            assert corpus.count(p.email) >= 5 and f"From: {p.name} [mailto:{p.email}]" in corpus
    assert len({p.email for p in people}) == len(people)
    again, people2 = make_corpus(cfg)
    assert [d.text for d in again] == [d.text for d in docs] and people2 == people
    other, _ = make_corpus(SyntheticConfig(n_memorised=20, n_never_seen=10, seed=4))
    assert [d.text for d in other] != [d.text for d in docs]


def test_pii_jsonl_detects_missing_spans_and_reports_bad_lines(tmp_path):
    good = tmp_path / "pii.jsonl"
    good.write_text(
        json.dumps({"text": "mail a.b@c.com"})
        + "\n"
        + json.dumps({"text": "xx", "spans": [{"start": 0, "end": 2, "type": "phone"}]})
        + "\n"
    )
    docs = read_pii_jsonl(good)
    assert docs[0].spans == [Span(5, 14, "email")] and docs[1].spans == [Span(0, 2, "phone")]
    cases = {
        '{"txt": "a"}\n': 'needs a string "text"',
        '{"text": "ab", "spans": [{"start": 0, "end": 9}]}\n': "outside the text",
        "not json\n": "not valid JSON",
        '{"text": "no pii here"}\n': "no PII found",
        "\n": "no documents",
    }
    for content, needle in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=needle) as info:
            read_pii_jsonl(bad)
        assert str(bad) in str(info.value)


def test_people_file_and_split_assignment(tmp_path):
    people = [Person(f"P{i}", f"p{i}@x.com") for i in range(10)]
    texts = [f"mail p{i}@x.com" for i in range(8)]
    assigned = assign_splits(people, texts, seed=0)
    assert [p.split for p in assigned[8:]] == ["never_seen", "never_seen"]
    seen_splits = [p.split for p in assigned[:8]]
    assert seen_splits.count("validation") == 4 and seen_splits.count("test") == 4
    assert assign_splits(people, texts, seed=0) == assigned
    path = tmp_path / "people.jsonl"
    write_people(assigned, path)
    assert read_people(path) == assigned
    path.write_text('{"name": "A", "email": "a@b.c", "split": "train"}\n')
    with pytest.raises(DataError, match="split 'train' unknown"):
        read_people(path)
    path.write_text('{"name": "A"}\n')
    with pytest.raises(DataError, match="email"):
        read_people(path)


def test_benign_pydoc_prose_splits_are_disjoint():
    train, held = benign_texts(split="train"), benign_texts(split="heldout")
    assert len(train) > 250 and len(held) > 60
    assert not set(train) & set(held)
    assert all(len(t) >= 200 for t in held)


def test_benign_windows_never_hold_a_heldout_paragraph(tmp_path):
    """Utility is measured on the held-out prose paragraphs; the windows the SAE and the
    distillation train on (code and tables too) are cut from the text without them, so no window of
    either split holds one, while the paragraphs' own split is what it was."""
    held = benign_texts(split="heldout")
    windows = " ".join(benign_texts(mode="windows"))
    assert not [p for p in held if p[:120] in windows]
    train = set(benign_texts(split="train"))
    assert sum(p[:120] in windows for p in train) > 0.5 * len(train)  # the rest is still there

    path = tmp_path / "benign.txt"
    path.write_text(
        "\n\n".join(f"Paragraph {i}: " + "words of plain prose " * 12 for i in range(23))
    )
    held = benign_texts(path, split="heldout")
    assert len(held) == 4 and len(benign_texts(path, split="train")) == 19
    windows = benign_texts(path, split="train", mode="windows") + benign_texts(
        path, split="heldout", mode="windows"
    )
    joined = " ".join(windows)
    assert not [p for p in held if p in joined]
    assert all(f"Paragraph {i}:" in joined for i in range(23) if i % 5 != 4)


def test_validation_folds_keep_people_whole_and_set_the_others_aside(tmp_path):
    """The search's cross-fitting parts: disjoint, covering the validation split, balanced, a
    person's address and phone in one part; keeping a part sets the other validation people
    aside (not fitted on, not attacked, never test) and its documents are about its people only."""
    from exporter.evaluate.prefix import document_values, normalise, split_values
    from exporter.recipe import ModelSpec
    from exporter.run.inputs import SET_ASIDE, Inputs, selection_docs

    docs, people = make_corpus(SyntheticConfig(n_memorised=20, n_never_seen=4, seed=3))
    model = ModelSpec(path=str(tmp_path))
    inputs = Inputs(model, "m", docs, people, None)
    val = inputs.split("validation")
    parts = inputs.folds(2, seed=3)
    assert parts == inputs.folds(2, seed=3) and parts != inputs.folds(2, seed=4)
    assert not parts[0] & parts[1] and parts[0] | parts[1] == inputs.values("validation")
    sizes = [sum(normalise(p.email, "email") in part for p in val) for part in parts]
    assert sizes == [5, 5]
    for p in val:
        own = {normalise(p.email, "email"), *([normalise(p.phone, "phone")] if p.phone else [])}
        assert sum(own <= part for part in parts) == 1
    kept = inputs.keeping(parts[0])
    assert kept.values("validation") == parts[0]
    assert len(kept.split("validation")) == 5 and len(kept.split(SET_ASIDE)) == 5
    assert kept.split("test") == inputs.split("test") and len(kept.people) == len(people)
    mine = {p.email.lower() for p in kept.split("validation")}
    others = {p.email.lower() for p in people} - mine
    fitted = selection_docs(kept)
    assert fitted and len(fitted) < len(selection_docs(inputs))
    for d in fitted:
        emails = {d.text[s.start : s.end].lower() for s in d.spans if s.type == "email"}
        assert emails & mine and not emails & others
    # With no people file: by value
    value_split = split_values(docs, seed=0)
    by_value = Inputs(model, "m", docs, None, None, value_split)
    parts = by_value.folds(3, seed=0)
    assert set().union(*parts) == value_split[0]
    assert sum(map(len, parts)) == len(value_split[0])
    kept = by_value.keeping(parts[1])
    assert kept.values("validation") == parts[1] and kept.values("test") == value_split[1]
    assert all(document_values(d) <= parts[1] for d in selection_docs(kept))
    with pytest.raises(ValueError, match="search_folds"):
        by_value.folds(len(value_split[0]), seed=0)
