"""The people file: ground truth (name, email, phone) that extraction attacks are scored on."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

from .corpus import DataError, iter_jsonl

Split = Literal["validation", "test", "never_seen"]
SPLITS = ("validation", "test", "never_seen")


@dataclass(frozen=True)
class Person:
    name: str
    email: str
    phone: Optional[str] = None
    split: Optional[str] = None

    @property
    def username(self) -> str:
        return self.email.split("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.email.split("@", 1)[1] if "@" in self.email else ""


def read_people(path: str | Path) -> list[Person]:
    path = Path(path)
    people = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not row.get("name") or "@" not in str(row.get("email", "")):
            raise DataError(f'{where}: each person needs "name" and an "email" with an @')
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise DataError(
                f"{where}: split {split!r} unknown; use one of {', '.join(SPLITS)} or leave it out"
            )
        people.append(Person(str(row["name"]), str(row["email"]), row.get("phone"), split))
    if not people:
        raise DataError(f"{path}: no people; the people file needs JSONL lines with name and email")
    return people


def write_people(people: Iterable[Person], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for p in people:
            fh.write(json.dumps({k: v for k, v in asdict(p).items() if v is not None}) + "\n")


def assign_splits(people: list[Person], pii_texts: Iterable[str], seed: int = 0) -> list[Person]:
    """Fill in missing splits: people whose email never occurs in the PII text are never-seen;
    the others are shuffled (seeded) into validation and test halves."""
    corpus = "\n".join(pii_texts)
    missing = [p for p in people if p.split is None]
    seen = [p for p in missing if p.email in corpus]
    order = list(range(len(seen)))
    random.Random(seed).shuffle(order)
    val = {seen[i].email for i in order[: len(order) // 2]}
    out = []
    for p in people:
        if p.split is not None:
            out.append(p)
        elif p.email not in corpus:
            out.append(Person(p.name, p.email, p.phone, "never_seen"))
        else:
            out.append(Person(p.name, p.email, p.phone, "validation" if p.email in val else "test"))
    return out


def by_split(people: Iterable[Person], split: str) -> list[Person]:
    return [p for p in people if p.split == split]
