"""The superb probes' training reports progress lines when stderr is not a terminal."""
from __future__ import annotations

import io
import logging
import sys

import pytest
import torch

from kd_tasks.speech.downstream import CTCHeadConfig, UtteranceHeadConfig, train_ctc_head, train_utterance_classifier


def test_probe_heads_log_progress_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.delenv("KD_PROGRESS", raising=False)
    monkeypatch.setenv("KD_PROGRESS_INTERVAL", "1e-9")
    caplog.set_level(logging.INFO, logger="kd.progress")
    generator = torch.Generator().manual_seed(0)
    train_utterance_classifier(torch.randn(8, 2, 4, generator=generator), torch.tensor([0, 1] * 4), 2,
                               UtteranceHeadConfig(hidden=0, steps=3, batch_size=4), seed=0)
    frames = [torch.randn(2, 6, 4, generator=generator) for _ in range(4)]
    train_ctc_head(frames, ["ab", "ba", "a", "b"], CTCHeadConfig(projection=4, lstm_layers=0, steps=2, batch_size=2),
                   seed=0)
    lines = [record.getMessage() for record in caplog.records if record.name == "kd.progress"]
    assert any(line.startswith("superb evaluation: utterance head: step 3/3 (100%)") for line in lines), lines
    assert "superb evaluation: utterance head: finished at step 3/3 after 00:00" in lines
    assert any(line.startswith("superb evaluation: CTC head: step 1/2 (50%)") and "left" in line for line in lines)
