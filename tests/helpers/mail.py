"""A mail archive laid out as Enron's (`maildir/<user>/<folder>/<n>.`), generated offline with
Faker: every sender and recipient named in the headers, a phone number and a signature in each body,
an attachment in the first message of each folder (which a reader must skip)."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

from faker import Faker


def message(fake: Faker, i: int, attachment: bool = False) -> EmailMessage:
    msg = EmailMessage()
    sender, to = fake.name(), fake.name()
    msg["From"] = f"{sender} <{fake.user_name()}{i}@{fake.domain_name()}>"
    msg["To"] = f"{to} <{fake.user_name()}@{fake.domain_name()}>"
    msg["Subject"] = fake.sentence(nb_words=4)
    msg["Message-ID"] = f"<{i}.{fake.uuid4()}@mail>"
    body = f"{fake.paragraph()}\n\nCall me at {fake.numerify('###-###-####')}.\n\n{sender}"
    msg.set_content(body)
    if attachment:
        msg.add_attachment(b"secret-in-attachment@example.com", maintype="application",
                           subtype="octet-stream", filename="dump.bin")  # fmt: skip
    return msg


def write_maildir(
    root: Path,
    users: tuple[str, ...] = ("allen-p", "lay-k", "skilling-j"),
    per_folder: int = 50,
    seed: int = 3,
) -> Path:
    """`root` filled with len(users) x 2 folders x `per_folder` messages, and one note that is not a
    message; returns `root`."""
    fake = Faker()
    Faker.seed(seed)
    n = 0
    for user in users:
        for folder in ("inbox", "sent_items"):
            (root / user / folder).mkdir(parents=True)
            for k in range(1, per_folder + 1):
                n += 1
                (root / user / folder / f"{k}.").write_bytes(bytes(message(fake, n, k == 1)))
    (root / users[0] / "notes.txt").write_text("not a message, no headers at all\n")
    return root
