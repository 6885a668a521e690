"""Hostile data files through the public loaders, property-based (hypothesis).

Text (``kd_tasks.text.files``): arbitrary bytes as source/reference/TSV/CSV/JSONL files
give either records with a non-empty source and target each, or a
:class:`~kdcore.errors.KDUserError` — never another exception, never a misaligned pair.

Audio (``kd_tasks.speech.audio``): arbitrary bytes and arbitrary waveforms (NaN/inf,
silence, clipping, 1-3 channels, 8-48 kHz, int16 or float files) give either a clean
16 kHz mono float32 waveform or a counted skip reason; a folder with nothing usable is a
``KDUserError``. The fixed bad-file cases (empty, truncated, non-UTF-8, mismatched
lengths, stereo, 8 kHz, ...) are in tests/text_tasks and tests/speech_data; these tests
try thousands of variations of them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcore.errors import KDUserError

text_files = pytest.importorskip("kd_tasks.text.files")
audio = pytest.importorskip("kd_tasks.speech.audio")
corpora = pytest.importorskip("kd_tasks.speech.corpora")

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

LINE_PIECES = ["hello world", "", " ", "\t", "ünïcödé", "\u202e", "\x00", "a\tb", "a,b", '"', '{"source": "x"}',
               '{"source": "x", "target": "y"}', "[1]", "\r", "\ufeff", "x" * 500]
text_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(LINE_PIECES), max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8")),
    st.lists(st.sampled_from(LINE_PIECES), max_size=12).map(lambda lines: "\n".join(lines).encode("latin-1", "replace")),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))


def _check_records(records: list[dict]) -> None:
    for record in records:
        assert isinstance(record["source"], str) and record["source"].strip()
        assert isinstance(record["target"], str) and record["target"].strip()


@FUZZ
@given(source=text_bytes, reference=text_bytes, empty=st.sampled_from(["error", "skip"]))
def test_parallel_text_files(tmp_path_factory: pytest.TempPathFactory, figures, source: bytes, reference: bytes,
                             empty: str) -> None:
    figures.update(hypothesis_inputs=1, hostile_files=2)
    folder = tmp_path_factory.mktemp("text")
    (folder / "src.txt").write_bytes(source)
    (folder / "ref.txt").write_bytes(reference)
    try:
        records = text_files.read_parallel_lines(folder / "src.txt", folder / "ref.txt", empty=empty)
    except KDUserError as error:
        assert "src.txt" in str(error) or "ref.txt" in str(error)  # the message names the file
        return
    _check_records(records)
    # Pairs stay aligned: record i comes from line n of both files, with the same n.
    source_lines = source.decode("utf-8-sig").splitlines()
    reference_lines = reference.decode("utf-8-sig").splitlines()
    assert len(source_lines) == len(reference_lines)
    for record in records:
        line = int(record["origin"].rsplit(":", 1)[1])
        assert record["source"] == source_lines[line - 1].strip()
        assert record["target"] == reference_lines[line - 1].strip()


LAYOUTS = [text_files.Layout("pair", "source", "target"), text_files.Layout("tsv", "0", "1")]


@FUZZ
@given(data=text_bytes, reader=st.sampled_from(["read_tsv_rows", "read_csv_rows", "read_jsonl_rows"]))
def test_row_files(tmp_path_factory: pytest.TempPathFactory, figures, data: bytes, reader: str) -> None:
    figures.update(hypothesis_inputs=1, hostile_files=1)
    path = tmp_path_factory.mktemp("rows") / "data.txt"
    path.write_bytes(data)
    try:
        rows = getattr(text_files, reader)(path)
        records = text_files.records_from_rows(rows, LAYOUTS, prefix="fuzz", stats=text_files.ReadStats())
    except KDUserError as error:
        assert str(path) in str(error) or "columns" in str(error)
        return
    _check_records(records)


def _write_waveform(path: Path, samples: np.ndarray, rate: int, subtype: str) -> None:
    soundfile.write(str(path), samples, rate, subtype=subtype, format="WAV")


waveforms = st.builds(
    lambda frames, channels, seed, kind: (frames, channels, seed, kind),
    st.integers(0, 6000), st.integers(1, 3), st.integers(0, 2**31 - 1),
    st.sampled_from(["speech-like", "silent", "clipped", "nan", "inf", "quiet", "dc", "huge"]))


def _samples(frames: int, channels: int, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    samples = (0.3 * rng.standard_normal((frames, channels))).astype(np.float32)
    if kind == "silent":
        samples[:] = 0.0
    elif kind == "clipped":
        samples = np.clip(samples * 20, -1.0, 1.0)
    elif kind == "nan" and frames:
        samples[rng.integers(0, frames), 0] = np.nan
    elif kind == "inf" and frames:
        samples[rng.integers(0, frames), 0] = np.inf
    elif kind == "quiet":
        samples *= 1e-6
    elif kind == "dc":
        samples[:] = 0.5
    elif kind == "huge":
        samples *= 1e6
    return samples


def _check_audio(result: object) -> None:
    if isinstance(result, audio.SkipReason):
        assert result.kind in ("empty", "unreadable", "non_finite", "silent", "too_short")
        return
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32 and result.dim() == 1
    assert result.numel() >= audio.MIN_SAMPLES and bool(torch.isfinite(result).all())
    assert float(result.abs().max()) >= audio.SILENCE_PEAK


@FUZZ
@given(wave=waveforms, rate=st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
       subtype=st.sampled_from(["FLOAT", "PCM_16", "DOUBLE"]))
def test_generated_audio(tmp_path_factory: pytest.TempPathFactory, figures, wave: tuple, rate: int,
                         subtype: str) -> None:
    figures.update(hypothesis_inputs=1, hostile_files=1)
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    samples = _samples(*wave)
    if subtype == "PCM_16":
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)  # integer files cannot hold NaN
    _write_waveform(path, samples, rate, subtype)
    stats = audio.AudioReadStats()
    result = audio.read_audio(path, stats=stats)
    _check_audio(result)
    assert stats.read + sum(stats.skipped.values()) == 1  # every file is either used or counted as skipped
    if wave[3] in ("nan", "inf") and wave[0] and subtype != "PCM_16":
        assert isinstance(result, audio.SkipReason) and result.kind == "non_finite"
    if wave[3] == "silent" and wave[0] >= math.ceil(audio.MIN_SAMPLES * rate / audio.TARGET_RATE) + 1:
        assert isinstance(result, audio.SkipReason) and result.kind == "silent"


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), st.binary(min_size=44, max_size=44).map(lambda b: b"RIFF" + b[4:]),
                      st.just(b"")),
       suffix=st.sampled_from([".wav", ".flac", ".ogg", ".mp3"]))
def test_arbitrary_bytes_as_audio(tmp_path_factory: pytest.TempPathFactory, figures, data: bytes,
                                  suffix: str) -> None:
    figures.update(hypothesis_inputs=1, hostile_files=1)
    path = tmp_path_factory.mktemp("bytes") / f"clip{suffix}"
    path.write_bytes(data)
    _check_audio(audio.read_audio(path))


def test_truncated_wav_and_a_folder_of_only_bad_audio(tmp_path: Path, figures) -> None:
    good = np.random.default_rng(0).standard_normal((16000, 1)).astype(np.float32) * 0.3
    _write_waveform(tmp_path / "whole.wav", good, 16000, "FLOAT")
    data = (tmp_path / "whole.wav").read_bytes()
    # Half a file: libsndfile reads the samples that are there (a usable, shorter clip).
    (tmp_path / "half.wav").write_bytes(data[: len(data) // 2])
    half = audio.read_audio(tmp_path / "half.wav")
    _check_audio(half)
    assert isinstance(half, torch.Tensor) and half.numel() < 16000
    bad = tmp_path / "bad"
    bad.mkdir()
    for cut in (10, 44, 100):
        (bad / f"cut-{cut}.wav").write_bytes(data[:cut])
    (bad / "empty.wav").write_bytes(b"")
    _write_waveform(bad / "zeros-stereo.wav", np.zeros((16000, 2), np.float32), 16000, "FLOAT")
    nan = good.copy()
    nan[100] = np.nan
    _write_waveform(bad / "nan.wav", nan, 16000, "FLOAT")
    figures.update(hostile_files=7)
    for path in sorted(bad.iterdir()):
        assert isinstance(audio.read_audio(path), audio.SkipReason), path
    with pytest.raises(KDUserError, match="No usable audio"):
        corpora.load_audio_folder(bad)


HOSTILE_TRAINING_PAIRS = {
    "not UTF-8": (b"ein Satz\n\xff\xfe kaputt\n", b"a sentence\nbroken\n", "not valid UTF-8"),
    "different lengths": (b"eins\nzwei\ndrei\n", b"one\ntwo\n", "has 3 lines but"),
    "empty source file": (b"", b"one\n", "is empty"),
    "only blank lines": (b"\n \n\t\n", b"\n\n\n", "is empty"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TRAINING_PAIRS))
def test_hostile_training_files_through_kd_run(case: str, tmp_path: Path, figures,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``kd run --task wmt`` with the user's own training files: exit 2, the file named, no traceback."""
    from kdcore import cli

    source, reference, expected = HOSTILE_TRAINING_PAIRS[case]
    (tmp_path / "train.de").write_bytes(source)
    (tmp_path / "train.en").write_bytes(reference)
    figures.update(hostile_files=2)
    code = cli.main(["run", "--task", "wmt", "--plugin", "vanilla", "--preset", "tiny", "--dry-run",
                     "--set", "data.corpus=files", "--set", f"data.train.source={tmp_path / 'train.de'}",
                     "--set", f"data.train.reference={tmp_path / 'train.en'}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert expected in err and "train." in err
