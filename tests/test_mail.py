"""Real corpus formats: a maildir tree laid out as Enron's, an .mbox, an .eml, plain text; read with
the standard library, PII detected, attachments skipped, bad archives refused with the file
named."""

import mailbox

import pytest
from conftest import recipe_without_people
from faker import Faker
from helpers.mail import message, write_maildir

from exporter.data.corpus import DataError, corpus_texts, read_corpus
from exporter.data.mail import MailError, read_mail


@pytest.fixture
def maildir(tmp_path):
    """Enron's layout: maildir/<user>/<folder>/<n>. files, a few hundred messages."""
    return write_maildir(tmp_path / "maildir")


def test_an_enron_style_maildir_is_one_document_per_message(maildir):
    found = read_mail(maildir)
    assert len(found) == 300  # the note that is not a message is left out
    where, text = found[0]
    assert where.endswith("1.") and text.startswith("From: ") and "\nSubject: " in text
    assert not any("secret-in-attachment" in t for _, t in found)  # attachments skipped
    docs = read_corpus(maildir, ["email", "phone"])
    assert len(docs) == 300 and all({"email", "phone"} <= {s.type for s in d.spans} for d in docs)


def test_mbox_eml_and_text_corpora(tmp_path):
    fake = Faker()
    Faker.seed(4)
    box = mailbox.mbox(str(tmp_path / "archive.mbox"))
    for i in range(5):
        box.add(message(fake, i))
    box.flush()
    assert len(read_corpus(tmp_path / "archive.mbox", ["email"])) == 5
    (tmp_path / "one.eml").write_bytes(bytes(message(fake, 9)))
    assert len(read_corpus(tmp_path / "one.eml", ["email"])) == 1
    (tmp_path / "notes.txt").write_text(
        "Ask jane.roe@example.org about it.\n\n\nNothing here.\nStill nothing.\n\nmail "
        "bob@example.com\n"
    )
    texts = corpus_texts(tmp_path / "notes.txt")
    assert [w.rsplit(":", 1)[1] for w, _ in texts] == ["1", "4", "7"]  # where each paragraph starts
    assert [len(d.spans) for d in read_corpus(tmp_path / "notes.txt")] == [1, 0, 1]


def test_bad_corpora_are_refused_with_the_file_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme").write_text("no mail here")
    with pytest.raises(MailError, match="holds no e-mail message"):
        read_corpus(tmp_path / "empty")
    (tmp_path / "latin.txt").write_bytes("line one\ncaf\xe9 at x@y.org\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt:2: not UTF-8 .*iconv"):
        read_corpus(tmp_path / "latin.txt")
    (tmp_path / "clean.txt").write_text("Nothing personal in this text.\n")
    with pytest.raises(DataError, match="no PII found in any of its 1 documents"):
        read_corpus(tmp_path / "clean.txt")


def test_detect_summarises_a_maildir_with_values_redacted(maildir, scalpel):
    run = scalpel("detect", maildir, "--show")
    assert run.code == 0, run.err
    out = run.out
    assert "300 documents" in out and "email" in out and "phone" in out
    first = read_mail(maildir)[0][1]
    address = first.split("<", 1)[1].split(">", 1)[0]
    assert address not in out and "***" in out


def test_a_recipe_naming_only_a_maildir_is_patched_and_exported(ws, maildir):
    """probe → SAE → features → patch → export on a tiny Llama from a maildir corpus, no people
    file."""
    import json

    from exporter import api

    recipe = recipe_without_people("maildir")
    assert "maildir" in recipe and "people.jsonl" not in recipe
    (ws / "recipe.yaml").write_text(recipe)
    result = api.export(ws / "recipe.yaml", ws / "out", work=ws / "work", n=4, progress=False,
                        log=lambda m: None)  # fmt: skip
    # No people file: the senders and recipients named in the headers are the people attacked.
    table = result.report["validation_leakage"]
    assert set(table) == {"before", "after"} and "mailto" in table["before"]
    assert result.report["ablate_n"] == 4
    config = json.loads((ws / "out" / "config.json").read_text())
    assert config["scalpel_patch"]["n_ablate"] == 4
    written = "\n".join(p.read_text(errors="ignore") for p in (ws / "out").rglob("*.md"))
    sender = read_mail(maildir)[0][1].split("<", 1)[1].split(">", 1)[0]
    assert sender not in written


def test_named_addresses_become_people_split_like_the_values(maildir):
    from exporter.data.corpus import Document
    from exporter.data.names import named_addresses, people_from_corpus
    from exporter.evaluate.prefix import corpus_values, split_values

    texts = [
        "From: Jane Roe <Jane.Roe@x.org>\nTo: bob@y.com\n\nhi",
        "-----Original Message-----\nFrom: Mark Taylor [mailto:mark.taylor@enron.com]\nSent: Mon",
        "Name: Ann Lee\nPhone: 555 0101\nEmail: ann.lee@example.org\n",
        "Thanks,\nKen Lay\nChairman\nken.lay@enron.com\n",
        'To: "Carol Diaz" <carol@mail.net>',
    ]
    assert named_addresses([Document(t) for t in texts]) == {
        "jane.roe@x.org": "Jane Roe", "mark.taylor@enron.com": "Mark Taylor",
        "ann.lee@example.org": "Ann Lee", "ken.lay@enron.com": "Ken Lay",
        "carol@mail.net": "Carol Diaz",
    }  # fmt: skip
    docs = read_corpus(maildir, ["email"])
    validation, test = split_values(docs, seed=0)
    people = people_from_corpus(docs, validation)
    emails = [v for v, kind in corpus_values(docs).items() if kind == "email"]
    assert len(people) == len(emails) == 600  # every sender and recipient is named in a header
    assert {p.split for p in people} == {"validation", "test"}
    assert all((p.split == "validation") == (p.email in validation) for p in people)


def test_scalpel_run_on_a_maildir_with_no_people_file(ws, maildir):
    """The whole run on a user's mail archive: the people attacked are the corpus's named addresses,
    the choice is made on validation ones and the reported rows are on test ones."""
    import json

    from exporter import api

    recipe = recipe_without_people(
        "maildir",
        "intervention: {ablate_n: [2, 4], alpha: [0.0], leakage_target: 1.0}\n"
        "eval: {max_new_tokens: 6, few_shot: 1, adversarial: false, user_path: false, "
        "memorisation_docs: 0}\n",
    )
    (ws / "recipe.yaml").write_text(recipe)
    logs = []
    result = api.run(
        ws / "recipe.yaml", ws / "out", work=ws / "work", progress=False, log=logs.append
    )
    assert any("600 addresses have a name" in m for m in logs)
    groups = {r["group"] for r in result.report["evaluation"]["patched"]["leakage"]}
    assert groups == {"test"}  # no never-seen people in a corpus: every address is in it
    report = (ws / "out" / "scalpel_report.json").read_text()
    assert json.loads(report)["search"]["met"]
    senders = [text.split("<", 1)[1].split(">", 1)[0] for _, text in read_mail(maildir)[:20]]
    card = (ws / "out" / "README.md").read_text()
    assert not any(s in report or s in card for s in senders)
