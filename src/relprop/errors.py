"""Every error relprop raises on purpose, each telling the user what to do.

``exit_code`` is what the command line returns for it: 2 for a usage error (an argument, a
path or a model the user must change), 1 for a failure while working (an unreadable input,
a run folder in use).
"""
from __future__ import annotations

import difflib


class RelpropError(ValueError):
    """Base class of relprop's errors (a ValueError, so existing handlers keep working)."""

    exit_code = 2


class UsageError(RelpropError):
    """A command-line argument or option that cannot work."""


class UnsupportedModelError(RelpropError, TypeError):
    pass


class InputError(RelpropError):
    pass


class UnknownMethodError(RelpropError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptionError(RelpropError, TypeError):
    pass


class ModelLoadError(RelpropError):
    """A model (or its tokenizer / preprocessing) that cannot be loaded as given."""


class RunFailure(RelpropError):
    """Work that started and could not finish (inputs that failed, a folder in use)."""

    exit_code = 1


def did_you_mean(name: str, choices, cutoff: float = 0.5) -> str:
    """" Did you mean 'x'?" for the (at most three) choices at least ``cutoff`` alike to ``name``
    (difflib's ratio), else ""."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=cutoff)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class RunIdentityError(UsageError):
    """An output folder that holds results of another run (other model weights, data or settings):
    resuming would mix them, so the run is refused."""


class Interrupted(RunFailure):
    """A run stopped by Ctrl-C; everything it finished is kept for the rerun."""

    exit_code = 130


class UnknownModelError(UsageError):
    """A model name the explorer was not started with (``relprop serve --model``)."""


class TooLargeError(InputError):
    """An upload over the explorer's byte or pixel limit."""
