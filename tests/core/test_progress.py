"""kdcore.progress: a bar on a terminal (or when forced), timed log lines elsewhere, nothing when off."""
from __future__ import annotations

import io
import logging
import os
import sys

import pytest

from kdcore.errors import KDUserError
from kdcore.progress import Progress, display_for, progress_interval, quiet_library_bars, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KD_PROGRESS", raising=False)
    monkeypatch.delenv("KD_PROGRESS_INTERVAL", raising=False)


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - returns the setter below
    """``stderr(stream)`` makes ``stream`` sys.stderr; called in the test body because pytest puts its own
    capture in sys.stderr when the body starts, after the fixtures."""
    def use(stream: io.StringIO) -> io.StringIO:
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    return use


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "kd.progress"]


def test_lines_at_the_interval_with_time_left(stderr, caplog: pytest.LogCaptureFixture) -> None:
    pipe = stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    with Progress("wmt teacher stage", 20, unit="step", interval=10, clock=clock) as progress:
        for step in range(1, 21):
            clock.now += 2.5  # one step every 2.5 s: a line every 4 steps
            progress.update(1, loss=4.0 - step / 10)
    lines = _lines(caplog)
    assert lines[0] == "wmt teacher stage: step 4/20 (20%), 00:10 elapsed, ~00:40 left, loss 3.6"
    assert lines[1] == "wmt teacher stage: step 8/20 (40%), 00:20 elapsed, ~00:30 left, loss 3.2"
    assert len(lines) == 6  # steps 4, 8, 12, 16, 20 and the closing line
    assert lines[-1] == "wmt teacher stage: finished at step 20/20 after 00:50"
    assert pipe.getvalue() == ""  # no bar characters in a log file


def test_no_line_before_the_interval_and_no_closing_line(stderr, caplog: pytest.LogCaptureFixture) -> None:
    stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    with Progress("tokenizer", 100, interval=30, clock=clock) as progress:
        for _ in range(100):
            clock.now += 0.29
            progress.update()
    assert _lines(caplog) == []


def test_resumed_work_does_not_count_towards_the_rate(stderr, caplog: pytest.LogCaptureFixture) -> None:
    stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    progress = Progress("run", 100, unit="step", initial=50, interval=5, clock=clock)
    clock.now += 10
    progress.update(10, loss="0.5000")
    progress.close()
    # 10 steps in 10 s, 40 to go: 40 s left (counting the 50 resumed steps would say 8 s)
    assert _lines(caplog)[0] == "run: step 60/100 (60%), 00:10 elapsed, ~00:40 left, loss 0.5000"


def test_unknown_total_has_no_percentage_or_time_left(stderr, caplog: pytest.LogCaptureFixture) -> None:
    stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    progress = Progress("corpus", unit="sentence", interval=1, clock=clock)
    clock.now += 61
    progress.update(7)
    progress.close(finished=False)
    assert _lines(caplog) == ["corpus: sentence 7, 01:01 elapsed", "corpus: stopped at sentence 7 after 01:01"]


def test_interval_from_the_environment(stderr, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    assert progress_interval() == 30.0
    monkeypatch.setenv("KD_PROGRESS_INTERVAL", "2")
    clock = FakeClock()
    progress = Progress("x", 10, clock=clock)
    clock.now += 1.5
    progress.update()
    assert _lines(caplog) == []
    clock.now += 0.5
    progress.update()
    assert len(_lines(caplog)) == 1
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("KD_PROGRESS_INTERVAL", bad)
        with pytest.raises(KDUserError, match="KD_PROGRESS_INTERVAL"):
            progress_interval()


def test_bar_on_a_terminal(stderr, caplog: pytest.LogCaptureFixture) -> None:
    terminal = stderr(Terminal())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    with Progress("wmt/imitation", 3, unit="step", interval=0.001, clock=clock) as progress:
        for _ in range(3):
            clock.now += 100
            progress.update(1, loss=1.25)
    assert _lines(caplog) == []
    shown = terminal.getvalue()
    assert "wmt/imitation" in shown and "3/3" in shown and "loss=1.25" in shown


def test_forced_modes(stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, terminal = io.StringIO(), Terminal()
    stderr(pipe)
    assert display_for("auto") == "lines"
    assert display_for("on") == "bar"
    assert display_for("off") == "none"
    stderr(terminal)
    assert display_for("auto") == "bar"
    monkeypatch.setenv("KD_PROGRESS", "off")
    assert display_for("auto") == "none"
    assert display_for("on") == "bar"  # an explicit setting wins over the environment
    monkeypatch.setenv("KD_PROGRESS", "sometimes")
    with pytest.raises(KDUserError, match="KD_PROGRESS"):
        display_for("auto")
    with pytest.raises(KDUserError, match="'loud'"):
        display_for("loud")


def test_forced_bar_on_a_pipe_and_off_shows_nothing(stderr, caplog: pytest.LogCaptureFixture) -> None:
    pipe = stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    with Progress("forced", 2, mode="on", interval=1, clock=clock) as progress:
        clock.now += 5
        progress.update(2)
    assert "forced" in pipe.getvalue() and _lines(caplog) == []
    pipe = stderr(io.StringIO())
    with Progress("quiet", 2, mode="off", interval=1, clock=clock) as progress:
        clock.now += 5
        progress.update(2)
    assert pipe.getvalue() == "" and _lines(caplog) == []


def test_track_yields_everything_and_takes_the_length(stderr, caplog: pytest.LogCaptureFixture) -> None:
    stderr(io.StringIO())
    caplog.set_level(logging.INFO, logger="kd.progress")
    clock = FakeClock()
    seen = []
    for item in track(["a", "b", "c"], "clips", unit="clip", interval=1, clock=clock):
        clock.now += 1
        seen.append(item)
    assert seen == ["a", "b", "c"]
    assert _lines(caplog)[-1] == "clips: finished at clip 3/3 after 00:03"
    assert _lines(caplog)[0] == "clips: clip 1/3 (33%), 00:01 elapsed, ~00:02 left"


def test_a_nested_bar_can_clear_itself(stderr) -> None:
    terminal = stderr(Terminal())
    with Progress("kept", 2) as progress:
        progress.update(2)
    kept = terminal.getvalue()
    assert kept.endswith("\n")
    with Progress("cleared", 2, leave=False) as progress:
        progress.update(2)
    assert not terminal.getvalue()[len(kept):].endswith("\n")


def test_library_bars_follow_kds_display(stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    stderr(Terminal())
    quiet_library_bars()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    stderr(io.StringIO())
    quiet_library_bars()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's own choice stays
    quiet_library_bars()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
