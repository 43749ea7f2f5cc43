"""The people of a corpus that has no people file: an address is given the name written beside it
(`Name <address>` in mail headers, `Name [mailto:address]` in quoted Outlook headers, `Name: … /
Email: …` records, a signature: a name line closely followed by the address alone). Each named
address becomes a person, so the template attacks can run on a user's own corpus."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Sequence

from .corpus import Document
from .people import Person

_NAME = r"[A-Z][A-Za-z'\-]+(?:[ \t]+[A-Z]\.?)?(?:[ \t]+[A-Z][A-Za-z'\-]+){1,2}"
_ADDR = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,24}"
_LINE = r"[ \t]*\r?\n"
PATTERNS = (
    # `Jane Roe <jane@x.org>`, `"Jane Roe" <jane@x.org>`, `"Ken Roe Jr." <ken@x.org>` (headers)
    re.compile(rf'"?(?P<name>{_NAME})\.?"?[ \t]*<(?P<email>{_ADDR})>'),  # "Jr." too
    # `Jane Roe [mailto:jane@x.org]` (quoted Outlook headers, as in Enron)
    re.compile(rf"(?P<name>{_NAME})[ \t]*\[mailto:(?P<email>{_ADDR})\]"),
    # `Name: Jane Roe` then, within two lines, `Email: jane@x.org`
    re.compile(rf"(?im)^name:[ \t]*(?P<name>{_NAME}){_LINE}(?:.*\r?\n){{0,2}}?e-?mail:[ \t]*"
               rf"(?P<email>{_ADDR})"),
    # a signature: a name line, then within two lines the address alone
    re.compile(rf"(?m)^[ \t]*(?P<name>{_NAME}){_LINE}(?:[^\n@]*\r?\n){{0,2}}[ \t]*"
               rf"(?P<email>{_ADDR})[ \t]*$"),
)  # fmt: skip


def named_addresses(docs: Sequence[Document]) -> dict[str, str]:
    """{address (lower-case): the name most often written beside it}."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for d in docs:
        for pattern in PATTERNS:
            for m in pattern.finditer(d.text):
                seen[m.group("email").lower()][" ".join(m.group("name").split())] += 1
    return {addr: names.most_common(1)[0][0] for addr, names in seen.items()}


def people_from_corpus(docs: Sequence[Document], validation: set[str]) -> list[Person]:
    """A person for every named address the corpus's spans hold: in `validation` (normalised values,
    see `evaluate.prefix.split_values`) or else test, so both attack families split alike."""
    in_spans = {d.text[s.start : s.end].lower() for d in docs for s in d.spans if s.type == "email"}
    named = named_addresses(docs)
    return [
        Person(name, addr, None, "validation" if addr in validation else "test")
        for addr, name in sorted(named.items())
        if addr in in_spans
    ]
