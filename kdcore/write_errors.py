"""A failed write (full disk, read-only or vanished directory) becomes a user error that says how to go on."""
from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from kdcore.errors import KDUserError


@contextlib.contextmanager
def clear_write_errors(what: str, path: Path) -> Iterator[None]:
    """An OSError while writing ``what`` at ``path`` becomes a :class:`KDUserError` naming both and the remedy."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        hint = ("free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT)
                else "make the directory writable or choose another --out")
        raise KDUserError(f"Could not write {what} at '{path}': {reason} (errno {error.errno}). Nothing was "
                          f"half-written: earlier checkpoints are intact. {hint.capitalize()}, then continue with "
                          f"kd run --out <run dir> --resume.") from None
