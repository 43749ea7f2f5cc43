"""Mail archives as documents: a maildir tree (Enron's `maildir/<user>/<folder>/<n>.` layout or a
standard Maildir), an `.mbox` file or a single `.eml` message, read with the standard library. Each
message becomes one document: its address headers and subject, then its plain-text body; attachments
and non-text parts are skipped."""

from __future__ import annotations

import email
import mailbox
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

HEADERS = ("From", "To", "Cc", "Subject")
MAX_MESSAGE_BYTES = 1 << 20  # a larger file in a mail tree is not a message (an attachment dump)


class MailError(ValueError):
    """A mail archive that cannot be read; the message names the file and the fix."""


def _body(msg: EmailMessage) -> str:
    """The message's plain-text parts, attachments left out."""
    parts = []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment" or part.get_content_subtype() != "plain":
            continue
        try:
            parts.append(part.get_content())
        except (LookupError, UnicodeError):  # an unknown charset: the bytes as Latin-1, never lost
            parts.append(part.get_payload(decode=True).decode("latin-1"))
    return "\n".join(p.strip("\n") for p in parts)


def message_text(msg: EmailMessage) -> str:
    """One document: `Header: value` lines for the address headers and subject, a blank line, the
    body."""
    head = [f"{h}: {' '.join(str(msg[h]).split())}" for h in HEADERS if msg[h] is not None]
    return "\n".join(head) + "\n\n" + _body(msg)


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)


def _looks_like_mail(msg: EmailMessage) -> bool:
    return any(msg[h] is not None for h in ("From", "To", "Message-ID", "Date"))


def _tree(folder: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.stat().st_size > MAX_MESSAGE_BYTES:
            continue
        msg = _parse(path.read_bytes())
        if _looks_like_mail(msg):
            yield str(path), message_text(msg)


def _mbox(path: Path) -> Iterator[tuple[str, str]]:
    box = mailbox.mbox(str(path), factory=lambda f: _parse(f.read()), create=False)
    for i, msg in enumerate(box):
        if msg is not None and _looks_like_mail(msg):
            yield f"{path} message {i + 1}", message_text(msg)


def read_mail(path: str | Path) -> list[tuple[str, str]]:
    """(where, text) for every message of a maildir tree, an `.mbox` file or an `.eml` file."""
    path = Path(path)
    if path.is_dir():
        found = list(_tree(path))
    elif path.suffix.lower() == ".mbox":
        found = list(_mbox(path))
    else:
        msg = _parse(path.read_bytes())
        found = [(str(path), message_text(msg))] if _looks_like_mail(msg) else []
    if not found:
        kind = "folder" if path.is_dir() else "file"
        raise MailError(
            f"{path}: this {kind} holds no e-mail message (no From, To, Message-ID or Date "
            "header); give a maildir folder, an .mbox or .eml file, a JSONL file or a text file"
        )
    return found
