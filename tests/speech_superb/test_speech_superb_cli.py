"""The real ``kd`` command on the superb task: paper dry-runs, the tiny end-to-end run, a folder of bad audio."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

TINY = ("run", "--task", "superb", "--preset", "tiny", "--set", "trainer.progress=off")


def _plan(run_kd, plugin: str, out: Path) -> dict:  # noqa: ANN001
    result = run_kd("run", "--task", "superb", "--plugin", plugin, "--preset", "paper", "--dry-run",
                    "--out", str(out), "--set", "data.synthetic.clips_per_keyword=2",
                    "--set", "data.synthetic.asr_utterances=10")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "plan.json").read_text())


#: WavLM Base+ as transformers builds it (94.38M; the WavLM paper says 94.70M).
WAVLM_BASE_PLUS_PARAMETERS = 94_381_936


def test_distilhubert_paper_preset_has_23_49m_parameters(run_kd, tmp_path: Path) -> None:
    params = _plan(run_kd, "distilhubert", tmp_path)["params"]
    assert params["teacher"] == WAVLM_BASE_PLUS_PARAMETERS  # built from its config, random weights
    assert abs(params["student"] - 23.49e6) <= 0.01e6, params


def test_gendistiller_paper_preset_is_at_least_80_percent_below_the_teacher(run_kd, tmp_path: Path) -> None:
    params = _plan(run_kd, "gendistiller", tmp_path)["params"]
    assert params["teacher"] == WAVLM_BASE_PLUS_PARAMETERS
    assert params["student"] <= 16.4e6 and params["student"] <= 0.2 * params["teacher"], params
    assert params["student"] <= 0.7 * 23.49e6  # at least 30% below DistilHuBERT's 23.49M


def test_default_gendistiller_is_at_least_30_percent_below_default_distilhubert(run_kd, tmp_path: Path) -> None:
    """The embedded default's two students (docs/speech.md, results table): the papers' size ratio holds."""
    params = {}
    for plugin in ("gendistiller", "distilhubert"):
        out = tmp_path / plugin
        result = run_kd("run", "--task", "superb", "--plugin", plugin, "--dry-run", "--out", str(out),
                        "--set", "data.synthetic.clips_per_keyword=2", "--set", "data.synthetic.asr_utterances=10")
        assert result.returncode == 0, result.stderr[-3000:]
        params[plugin] = json.loads((out / "plan.json").read_text())["params"]["student"]
    assert params["gendistiller"] <= 0.7 * params["distilhubert"], params


def test_tiny_end_to_end_run_writes_metrics_for_teacher_and_student(run_kd, tmp_path: Path) -> None:
    from kdcore.significance import read_items

    out = tmp_path / "run"
    result = run_kd(*TINY, "--plugin", "gendistiller", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # the student's per-item results for the paired bootstrap reproduce its test metrics
    for metric in ("keyword_accuracy", "speaker_accuracy", "asr_wer", "asr_cer"):
        items = read_items(out, metric)
        assert items is not None, metric
        assert items.score()[0] == pytest.approx(metrics["student"][metric], abs=1e-6), metric
    for role in ("teacher", "student"):
        assert {"keyword_accuracy", "asr_wer", "asr_cer", "speaker_accuracy"} <= set(metrics[role]), metrics[role]
        assert 0.0 <= metrics[role]["keyword_accuracy"] <= 1.0
    assert metrics["params"]["student"] < metrics["params"]["teacher"]
    assert (out / "report.md").exists() and (out / "best" / "student.safetensors").exists()
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    valid = [record for record in evals if record["type"] == "eval"]
    assert valid and all("asr_wer" not in record for record in valid)  # only the cheap suite during training


def _write_bad_folder(folder: Path) -> None:
    rate = 16000
    generator = np.random.default_rng(0)
    time_axis = np.arange(int(1.2 * rate)) / rate
    speechlike = (0.3 * np.sin(2 * np.pi * 220 * time_axis) * (1 + np.sin(2 * np.pi * 3 * time_axis))
                  + 0.02 * generator.standard_normal(time_axis.shape)).astype(np.float32)
    folder.mkdir()
    (folder / "nested").mkdir()
    soundfile.write(folder / "good.wav", speechlike, rate)
    soundfile.write(folder / "nested" / "good.flac", speechlike[::-1].copy(), rate)
    soundfile.write(folder / "stereo.wav", np.stack([speechlike, 0.5 * speechlike], axis=1), rate)
    soundfile.write(folder / "rate8k.wav", speechlike[::2].copy(), 8000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "unreadable.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    with_nan = speechlike.copy()
    with_nan[100:200] = np.nan
    soundfile.write(folder / "nan.wav", with_nan, rate, subtype="FLOAT")
    soundfile.write(folder / "silence.wav", np.zeros(rate, dtype=np.float32), rate)


def test_a_folder_of_bad_audio_distils_with_skips_counted(run_kd, tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    _write_bad_folder(folder)
    out = tmp_path / "run"
    result = run_kd(*TINY, "--plugin", "distilhubert", "--out", str(out), "--set", f"data.audio_folder={folder}",
                    "--set", "data.distill_on=folder", "--set", "trainer.batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    # 4 usable files (good, good.flac, stereo down-mixed, 8 kHz resampled); 4 skipped and counted
    assert "superb: audio_folder" in log and "4 item(s) loaded, 4 file(s) skipped" in log, log[-3000:]
    for reason in ("empty.wav", "unreadable.wav", "nan.wav", "silence.wav"):
        assert reason in log, (reason, log[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nonfinite_steps"] == 0 and "keyword_accuracy" in metrics["student"]


@pytest.mark.slow
def test_default_run_finishes_within_budget(run_kd, tmp_path: Path) -> None:
    """``kd run --task superb --plugin gendistiller`` as a user starts it (the issue's 15 min on 2 CPU cores)."""
    out = tmp_path / "default"
    started = time.perf_counter()
    result = run_kd("run", "--task", "superb", "--plugin", "gendistiller", "--out", str(out),
                    "--set", "trainer.progress=off", timeout=1800)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert elapsed < 15 * 60, elapsed
    # the embedded teacher is a real model (measured 0.91 keyword accuracy); every downstream reports both
    assert metrics["teacher"]["keyword_accuracy"] > 0.8 and metrics["teacher"]["asr_wer"] < 0.8
    for role in ("teacher", "student"):
        assert {"keyword_accuracy", "asr_wer", "speaker_accuracy"} <= set(metrics[role])
    # the student is scored above chance (12 keyword classes); docs/speech.md has its numbers against the floor
    assert metrics["student"]["keyword_accuracy"] > 1 / 12
