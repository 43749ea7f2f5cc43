"""The kinds of patch and of export, as the recipe names them."""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """How a patch is carried: exact / folded (the remote-code module) or plain (baked into the
    weights)."""

    EXACT = "exact"
    FOLDED = "folded"
    PLAIN = "plain"

    def __str__(self) -> str:  # the recipe's word, in labels, keys and reports
        return self.value

    __format__ = str.__format__

    @property
    def remote(self) -> bool:
        """Whether an export of this candidate carries remote code (a plain one is the base's own
        type)."""
        return self is not Mode.PLAIN


class ExportKind(str, Enum):
    """The recipe's `export.mode`."""

    REMOTE_CODE = "remote_code"
    PLAIN = "plain"
    DISTILLED = "distilled"  # a remote-code patch (the teacher) learnt into the weights

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def of(cls, mode: "Mode | str") -> "ExportKind":
        return cls.PLAIN if Mode(mode) is Mode.PLAIN else cls.REMOTE_CODE

    def carries(self, mode: "Mode | str") -> bool:
        """Whether this export carries a candidate of `mode`: a plain export plain ones, a
        remote-code or distilled export the others."""
        return (Mode(mode) is Mode.PLAIN) == (self is ExportKind.PLAIN)
