"""PII documents from a corpus (JSONL, plain text, a mail archive) and benign prose (built-in pydoc
topics or a text file)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

from .detectors import PII_TYPES, Span, detect
from .mail import read_mail


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line and the fix."""


@dataclass
class Document:
    text: str
    spans: list[Span] = field(default_factory=list)


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """(file:line, parsed row) for each non-blank line, with a clear error on a malformed one."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object"
                ) from None


def _spans(where: str, text: str, raw: object) -> list[Span]:
    spans = []
    for s in raw if isinstance(raw, list) else [None]:
        try:
            span = Span(int(s["start"]), int(s["end"]), str(s.get("type", "email")))
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f'{where}: "spans" must be a list of {{"start": int, "end": int, "type": str}}'
            ) from None
        if not 0 <= span.start < span.end <= len(text):
            raise DataError(
                f"{where}: span {span.start}..{span.end} is outside the text (length {len(text)})"
            )
        if span.type not in PII_TYPES:
            raise DataError(
                f"{where}: span type {span.type!r} unknown; known: {', '.join(PII_TYPES)}"
            )
        spans.append(span)
    return sorted(spans)


def read_pii_jsonl(path: str | Path, types: Iterable[str] = PII_TYPES) -> list[Document]:
    """Lines {"text": ..., "spans": [{"start", "end", "type"}]}; spans are detected when absent."""
    path = Path(path)
    docs: list[Document] = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(
                f'{where}: each line needs a string "text" field, e.g. {{"text": "..."}}'
            )
        text = row["text"]
        spans = _spans(where, text, row["spans"]) if "spans" in row else detect(text, types)
        docs.append(Document(text, spans))
    if not docs:
        raise DataError(
            f"{path}: no documents; the PII file must have at least one JSONL line with text"
        )
    if not any(d.spans for d in docs):
        raise DataError(
            f"{path}: no PII found in any document (types: {', '.join(types)}); nothing to remove"
        )
    return docs


MAIL_SUFFIXES = (".mbox", ".eml")


def read_text_file(path: Path) -> str:
    """A text file as UTF-8; a byte that is not names its file and line, and the fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); convert the file, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name}"
        ) from None


def _with_pii(path: Path, docs: list[Document], types: Iterable[str]) -> list[Document]:
    if not docs:
        raise DataError(f"{path}: no documents; give text, JSONL lines or e-mail messages")
    if not any(d.spans for d in docs):
        raise DataError(
            f"{path}: no PII found in any of its {len(docs)} documents (types: "
            f"{', '.join(types)}); nothing to remove"
        )
    return docs


def corpus_texts(path: str | Path) -> list[tuple[str, str]]:
    """(where, text) of every document of a corpus: a JSONL file's "text" fields (file:line), a mail
    archive's messages (a maildir folder, an .mbox or .eml file) or a plain text file's
    blank-line-separated paragraphs (file:line where each starts)."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: file not found; give a JSONL, text or mail file, or a maildir folder"
        )
    if path.suffix.lower() == ".jsonl":
        return [(where, str(row.get("text", "")) if isinstance(row, dict) else "")
                for where, row in iter_jsonl(path)]  # fmt: skip
    if path.is_dir() or path.suffix.lower() in MAIL_SUFFIXES:
        return read_mail(path)
    out, line = [], 1
    for block in re.split(r"(\n\s*\n)", read_text_file(path)):
        if block.strip() and not block.isspace():
            lead = len(block) - len(block.lstrip("\n"))
            out.append((f"{path}:{line + lead}", block.strip()))
        line += block.count("\n")
    return out


def read_corpus(path: str | Path, types: Iterable[str] = PII_TYPES) -> list[Document]:
    """The PII documents of a corpus (see `corpus_texts`); a JSONL file's own spans are kept, others
    are detected."""
    path = Path(path)
    types = list(types)
    if path.suffix.lower() == ".jsonl":
        return read_pii_jsonl(path, types)
    docs = [Document(text, detect(text, types)) for _where, text in corpus_texts(path)]
    return _with_pii(path, docs, types)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


Block = tuple[str, str]  # a blank-line-separated block as written, and its one-line form


def _blocks(text: str, one_line) -> list[Block]:
    return [(b, one_line(b)) for b in re.split(r"\n\s*\n", text) if b.strip()]


def _sources(path: Optional[str | Path]) -> list[list[Block]]:
    """The benign text's blocks, grouped by where they come from (a pydoc topic; a file is one)."""
    if path is None:
        from pydoc_data.topics import topics

        def one_line(b):
            return " ".join(ln.strip() for ln in b.splitlines() if ln.strip())

        return [_blocks(topics[key], one_line) for key in sorted(topics)]
    raw = Path(path).read_text(encoding="utf-8")
    return [_blocks(raw, lambda b: " ".join(b.split()))]


def _prose(block: Block) -> bool:
    """A pydoc block that is prose: not a code listing (indented), grammar rule or table."""
    raw, text = block
    if len(text) < 200 or "::=" in text:
        return False
    if any(ln.startswith("   ") for ln in raw.splitlines() if ln.strip()):
        return False
    return sum(ch.isalpha() or ch == " " for ch in text) / len(text) >= 0.85


def _paragraphs(path: Optional[str | Path], sources: list[list[Block]]) -> list[str]:
    keep = [b[1] for group in sources for b in group if path is not None or _prose(b)]
    return list(dict.fromkeys(keep))  # ordered and de-duplicated: pydoc topics repeat paragraphs


def _fifth(items: list[str], split: str) -> list[str]:
    """`items` (all), every fifth of them (heldout) or the rest (train)."""
    if split == "all":
        return items
    return [p for i, p in enumerate(items) if (i % 5 == 4) == (split == "heldout")]


def _windows(text: str, chars: int) -> list[str]:
    """Consecutive windows of about `chars` characters, cut at whitespace."""
    words, out, current = text.split(), [], []
    size = 0
    for w in words:
        current.append(w)
        size += len(w) + 1
        if size >= chars:
            out.append(" ".join(current))
            current, size = [], 0
    if current:
        out.append(" ".join(current))
    return out


def benign_texts(
    path: Optional[str | Path] = None,
    split: Literal["train", "heldout", "all"] = "all",
    mode: Literal["paragraphs", "windows"] = "paragraphs",
    window_chars: int = 1000,
) -> list[str]:
    """Benign text from a text file (blank-line separated) or the stdlib's pydoc topics.

    paragraphs: prose paragraphs only (utility is measured on these); windows: all of the text cut
    into windows (code and tables too; more tokens, for activations and distillation). Every fifth
    item is held out, so utility is measured on text no stage trained on; the held-out paragraphs
    are cut out of the text before it is windowed, so no window of either split holds one.
    """
    sources = _sources(path)
    items = _paragraphs(path, sources)
    if not items:
        raise DataError(
            f"{path}: the benign text file is empty; give prose separated by blank lines"
        )
    if mode == "windows":
        cut = set(_fifth(items, "heldout"))
        items = [
            w
            for group in sources
            for w in _windows(
                "\n\n".join(raw for raw, text in group if text not in cut), window_chars
            )
        ]
    return _fifth(items, split)
