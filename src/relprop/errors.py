"""Errors raised for bad input, each telling the user what to do."""
from __future__ import annotations

import difflib


class RelpropError(ValueError):
    """Base class of relprop's errors (a ValueError, so existing handlers keep working)."""


class UnsupportedModelError(RelpropError, TypeError):
    pass


class InputError(RelpropError):
    pass


class UnknownMethodError(RelpropError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptionError(RelpropError, TypeError):
    pass


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
