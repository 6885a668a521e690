"""User-facing errors.

Anything the user can fix (a bad name, key, value, file) is raised as
:class:`KDUserError`. The CLI prints its one-paragraph message and exits with
code 2, without a traceback. Bugs stay ordinary exceptions so they keep theirs.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_USER_ERROR = 2


class KDUserError(Exception):
    """An error caused by the user's input; the message says what to change."""

    exit_code = EXIT_USER_ERROR


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Names from ``choices`` that look like ``word`` (for "did you mean" hints)."""
    return difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A " Did you mean 'x'?" suffix, or an empty string when nothing is close."""
    matches = close_matches(word, choices)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
