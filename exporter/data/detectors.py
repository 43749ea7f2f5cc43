"""Regex PII detectors returning character spans and types."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

PII_TYPES = ("email", "phone", "ssn", "credit_card", "ip")


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    type: str

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "type": self.type}


_EMAIL = re.compile(
    r"(?<![\w.+\-%'])[A-Za-z0-9][A-Za-z0-9._%+'\-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w\-])"
)
# North American numbers in the common written forms, with optional +1 and extension.
_PHONE = re.compile(
    r"(?<![\w\-.])(?:\+?1[\s.\-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.\-])\d{3}[\s.\-]\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w\-])"
)
_SSN = re.compile(r"(?<![\w\-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w\-])")
_CARD = re.compile(r"(?<![\w\-])(?:\d[ \-]?){12,18}\d(?![\w\-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cards(text: str) -> Iterable[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            yield Span(m.start(), m.end(), "credit_card")


def _ips(text: str) -> Iterable[Span]:
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield Span(m.start(), m.end(), "ip")


def _regex(pattern: re.Pattern, kind: str):
    return lambda text: (Span(m.start(), m.end(), kind) for m in pattern.finditer(text))


# Order matters: earlier detectors win overlaps (an SSN is not also a phone fragment).
DETECTORS = {
    "email": _regex(_EMAIL, "email"),
    "credit_card": _cards,
    "ssn": _regex(_SSN, "ssn"),
    "phone": _regex(_PHONE, "phone"),
    "ip": _ips,
}


def detect(text: str, types: Iterable[str] = PII_TYPES) -> list[Span]:
    """All PII spans of the given types, non-overlapping, sorted by start."""
    wanted = set(types)
    unknown = wanted - set(PII_TYPES)
    if unknown:
        raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(PII_TYPES)}")
    taken: list[Span] = []
    for kind, finder in DETECTORS.items():
        if kind not in wanted:
            continue
        for span in finder(text):
            if all(span.end <= t.start or span.start >= t.end for t in taken):
                taken.append(span)
    return sorted(taken)


def redact(value: str) -> str:
    """A PII string shown safely: first character of each part kept (j***@e***.com,
    7***-***-***1)."""
    if "@" in value:
        local, _, domain = value.partition("@")
        host, dot, tld = domain.rpartition(".")
        return f"{local[:1]}***@{(host or tld)[:1]}***{dot}{tld if host else ''}"
    keep = [i for i, ch in enumerate(value) if ch.isalnum()]
    if len(keep) <= 2:
        return "***"
    first, last = keep[0], keep[-1]
    return "".join(
        ch if i in (first, last) or not ch.isalnum() else "*" for i, ch in enumerate(value)
    )


def redact_text(text: str, types: Iterable[str] = PII_TYPES) -> str:
    """The text with every detected PII span replaced by its redacted form."""
    out, pos = [], 0
    for span in detect(text, types):
        out.append(text[pos : span.start])
        out.append(redact(text[span.start : span.end]))
        pos = span.end
    out.append(text[pos:])
    return "".join(out)
