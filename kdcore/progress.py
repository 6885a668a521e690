"""Progress of a long stage: a tqdm bar on a terminal, a log line at a steady interval elsewhere.

Every long loop (training, a teacher stage, a corpus build, teacher caching, evaluation) reports through
:class:`Progress` so that a run whose stderr is a file or a pipe still shows it is moving: every
``interval`` seconds one INFO line on the ``kd.progress`` logger says what is done of what, the time
spent, the estimated time left and the caller's own numbers (a loss, a metric)::

    INFO kd.progress: wmt teacher stage: step 120/2000 (6%), 02:05 elapsed, ~32:40 left, loss 3.21

The display is chosen by ``mode``: ``on`` always draws the bar, ``off`` shows nothing, and ``auto`` draws the
bar when stderr is a terminal and writes the lines otherwise. ``auto`` can be overridden for every stage by the
environment variable ``KD_PROGRESS`` (``auto``/``on``/``off``); ``KD_PROGRESS_INTERVAL`` sets the seconds between
lines (default 30).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Literal, TypeVar

from tqdm import tqdm

from kdcore.errors import KDUserError

ProgressMode = Literal["auto", "on", "off"]
MODES: tuple[str, ...] = ("auto", "on", "off")
DEFAULT_INTERVAL = 30.0
MODE_VARIABLE = "KD_PROGRESS"
INTERVAL_VARIABLE = "KD_PROGRESS_INTERVAL"

log = logging.getLogger("kd.progress")
T = TypeVar("T")


def progress_interval() -> float:
    """Seconds between progress lines: ``$KD_PROGRESS_INTERVAL``, or 30."""
    raw = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise KDUserError(f"The environment variable {INTERVAL_VARIABLE}={raw!r} must be a positive number of "
                          f"seconds between progress lines (default {DEFAULT_INTERVAL:g}); e.g. "
                          f"{INTERVAL_VARIABLE}=60.")
    return seconds


def display_for(mode: str) -> Literal["bar", "lines", "none"]:
    """How progress is shown for ``mode``: ``bar`` (tqdm), ``lines`` (log lines) or ``none``.

    ``auto`` takes ``$KD_PROGRESS`` when set, then the bar on a terminal and lines elsewhere.
    """
    if mode not in MODES:
        raise KDUserError(f"Progress mode {mode!r} is not one of {', '.join(MODES)}.")
    if mode == "auto":
        override = os.environ.get(MODE_VARIABLE, "").strip().lower()
        if override and override not in MODES:
            raise KDUserError(f"The environment variable {MODE_VARIABLE}={override!r} must be one of "
                              f"{', '.join(MODES)} (auto: a bar on a terminal, log lines elsewhere).")
        mode = override or "auto"
    if mode == "on":
        return "bar"
    if mode == "off":
        return "none"
    stream = sys.stderr
    return "bar" if stream is not None and stream.isatty() else "lines"


def quiet_library_bars() -> None:
    """Let the Hugging Face libraries draw their own bars (weights loaded, shards written) only where kd draws its.

    Off a terminal their bars would write carriage-return redraws into the log. Sets ``HF_HUB_DISABLE_PROGRESS_BARS``
    (which transformers follows too), so it must run before they are imported; a value the user set is kept.
    """
    if display_for("auto") != "bar":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_seconds(seconds: float) -> str:
    return tqdm.format_interval(max(0.0, seconds))


class Progress:
    """Progress of one stage; use as a context manager, call :meth:`update` as work is done.

    ``what`` names the stage in the bar and the lines; ``total`` is the amount of work (None when unknown: the
    lines then carry no percentage or time left); ``initial`` is what was already done before (a resumed run),
    which does not count towards the rate. ``interval`` overrides ``$KD_PROGRESS_INTERVAL``; ``clock`` is the
    monotonic clock the lines are timed with. ``leave=False`` clears the bar when done (a stage nested in another,
    such as an evaluation during training, so the terminal keeps one bar).
    """

    def __init__(self, what: str, total: int | None = None, *, unit: str = "it", initial: int = 0,
                 mode: str = "auto", interval: float | None = None, leave: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = self.initial = initial
        self.fields: dict[str, str] = {}
        self.display = display_for(mode)
        self.interval = progress_interval() if interval is None else interval
        self._clock = clock
        self._started = self._last_line = clock()
        self._lines_written = 0
        self._bar = (tqdm(total=total, initial=initial, desc=what, unit=unit, dynamic_ncols=True, file=sys.stderr,
                          leave=leave) if self.display == "bar" else None)
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(finished=kind is None)

    def set_fields(self, **fields: object) -> None:
        """Numbers shown with the progress from now on (they replace the earlier ones); floats get 4 digits."""
        self.fields = {name: _format_value(value) for name, value in fields.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.fields, refresh=False)

    def set_total(self, total: int) -> None:
        """The amount of work changed (e.g. a time budget lowered the steps)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1, **fields: object) -> None:
        """``n`` more units done; ``fields`` as in :meth:`set_fields`. Writes a line when the interval has passed."""
        self.done += n
        if fields:
            self.set_fields(**fields)
        if self._bar is not None:
            self._bar.update(n)
        elif self.display == "lines":
            now = self._clock()
            if now - self._last_line >= self.interval:
                self._last_line = now
                self._lines_written += 1
                log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be logged at ``now`` (default: the clock's time)."""
        elapsed = (self._clock() if now is None else now) - self._started
        parts = []
        if self.total:
            parts.append(f"{self.unit} {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(f"{self.unit} {self.done}")
        parts.append(f"{_format_seconds(elapsed)} elapsed")
        counted = self.done - self.initial
        if self.total and counted > 0:
            left = elapsed / counted * max(0, self.total - self.done)
            parts.append(f"~{_format_seconds(left)} left")
        parts.extend(f"{name} {value}" for name, value in self.fields.items())
        return f"{self.what}: " + ", ".join(parts)

    def close(self, finished: bool = True) -> None:
        """End the display; a stage that wrote lines ends with one saying it finished (or stopped) and when."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines_written:
            elapsed = _format_seconds(self._clock() - self._started)
            amount = f"{self.done}/{self.total}" if self.total else f"{self.done}"
            log.info("%s: %s at %s %s after %s", self.what, "finished" if finished else "stopped", self.unit, amount,
                     elapsed)


def track(items: Iterable[T], what: str, total: int | None = None, **options: object) -> Iterator[T]:
    """Yield ``items`` while showing their progress (``options`` as for :class:`Progress`).

    ``total`` defaults to ``len(items)`` where the iterable has a length.
    """
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(what, total, **options) as progress:  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.update(1)
