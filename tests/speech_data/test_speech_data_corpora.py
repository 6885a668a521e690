"""LibriSpeech and Speech Commands loaders on tiny fake trees in torchaudio's layout (nothing downloaded)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from kd_tasks.speech.corpora import SILENCE, UNKNOWN, load_librispeech, load_speech_commands
from kdcore.errors import KDUserError


def _tone(seconds: float, freq: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def make_librispeech(root: Path, subset: str = "dev-clean") -> Path:
    """root/LibriSpeech/<subset>/<speaker>/<chapter>/<spk>-<chap>-<utt>.flac + <spk>-<chap>.trans.txt."""
    for speaker, chapter in ((19, 198), (26, 495)):
        folder = root / "LibriSpeech" / subset / str(speaker) / str(chapter)
        folder.mkdir(parents=True)
        lines = []
        for utterance in range(3):
            name = f"{speaker}-{chapter}-{utterance:04d}"
            soundfile.write(folder / f"{name}.flac", _tone(0.3 + 0.1 * utterance, 200 + speaker), 16000)
            lines.append(f"{name} HELLO WORLD NUMBER {utterance}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    # One corrupt file: skipped and counted, the rest still loads.
    (root / "LibriSpeech" / subset / "26" / "495" / "26-495-0002.flac").write_bytes(b"not a flac")
    return root


def make_speech_commands(root: Path) -> Path:
    """root/SpeechCommands/speech_commands_v0.02/<word>/<speaker>_nohash_<n>.wav + split lists + background noise."""
    base = root / "SpeechCommands" / "speech_commands_v0.02"
    files = []
    for word in ("yes", "no", "bed", "marvin"):
        (base / word).mkdir(parents=True)
        for speaker in ("0a1b2c3d", "1e2f3a4b", "2c3d4e5f"):
            relative = f"{word}/{speaker}_nohash_0.wav"
            rate = 8000 if word == "marvin" else 16000
            soundfile.write(base / relative, _tone(1.0, 300.0, rate), rate, subtype="PCM_16")
            files.append(relative)
    (base / "validation_list.txt").write_text("\n".join(f for f in files if f.split("/")[1].startswith("1e")) + "\n")
    (base / "testing_list.txt").write_text("\n".join(f for f in files if f.split("/")[1].startswith("2c")) + "\n")
    (base / "_background_noise_").mkdir()
    noise = np.random.default_rng(0).normal(0, 0.1, 16000 * 25).astype(np.float32)
    soundfile.write(base / "_background_noise_" / "white_noise.wav", noise, 16000, subtype="PCM_16")
    return root


def test_librispeech_items_transcripts_speakers_and_skips(tmp_path: Path) -> None:
    root = make_librispeech(tmp_path / "data")
    corpus = load_librispeech(root, subset="dev-clean")
    assert [item.utterance_id for item in corpus.items] == [
        "19-198-0000", "19-198-0001", "19-198-0002", "26-495-0000", "26-495-0001"]
    assert corpus.items[1].text == "HELLO WORLD NUMBER 1" and corpus.items[3].speaker == "26"
    assert corpus.skipped == {"unreadable": 1}
    assert corpus.manifest["subset"] == "dev-clean" and corpus.manifest["speakers"] == 2
    assert all(item.waveform.dtype == torch.float32 and item.keyword is None for item in corpus.items)
    assert corpus.items[2].waveform.numel() == int(0.5 * 16000)
    # Giving the inner LibriSpeech folder works too; limit spreads over speakers.
    limited = load_librispeech(root / "LibriSpeech", subset="dev-clean", limit=2)
    assert {item.speaker for item in limited.items} == {"19", "26"}


def test_librispeech_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(KDUserError, match=str(tmp_path / "nowhere" / "LibriSpeech" / "train-clean-100")):
        load_librispeech(tmp_path / "nowhere")
    with pytest.raises(KDUserError, match="Unknown LibriSpeech subset"):
        load_librispeech(tmp_path, subset="train-clean-1000")


def test_speech_commands_splits_labels_and_silence(tmp_path: Path) -> None:
    root = make_speech_commands(tmp_path / "data")
    train = load_speech_commands(root, "training")
    labels = sorted((item.utterance_id.split("/")[0], item.keyword) for item in train.items if item.keyword != SILENCE)
    assert labels == [("bed", UNKNOWN), ("marvin", UNKNOWN), ("no", "no"), ("yes", "yes")]
    assert {item.speaker for item in train.items if item.keyword != SILENCE} == {"0a1b2c3d"}
    marvin = next(item for item in train.items if item.text == "marvin")
    assert marvin.waveform.numel() == 16000  # 8 kHz file resampled
    assert train.manifest["fixed"] == {"resampled": 1}
    # 4 words / (10 keywords + 1) -> round(0.36) = 0 silence by default; ask for some explicitly.
    with_silence = load_speech_commands(root, "training", silence_clips=5)
    silence = [item for item in with_silence.items if item.keyword == SILENCE]
    assert len(silence) == 5 and all(item.waveform.numel() == 16000 and item.speaker is None for item in silence)
    test = load_speech_commands(root, "testing", silence_clips=10)
    test_silence = {item.utterance_id for item in test.items if item.keyword == SILENCE}
    # 25 one-second windows: k % 10 == 0 go to testing (k = 0, 10, 20), never shared with training.
    assert test_silence == {f"{SILENCE}/white_noise/{k}" for k in (0, 10, 20)}
    assert not test_silence & {item.utterance_id for item in silence}
    assert {item.speaker for item in test.items if item.speaker} == {"2c3d4e5f"}
    assert test.manifest["labels"] == {SILENCE: 3, UNKNOWN: 2, "no": 1, "yes": 1}


def test_speech_commands_errors(tmp_path: Path) -> None:
    with pytest.raises(KDUserError, match="Speech Commands not found"):
        load_speech_commands(tmp_path, "training")
    with pytest.raises(KDUserError, match="Unknown Speech Commands subset"):
        load_speech_commands(tmp_path, "train")
    root = make_speech_commands(tmp_path / "data")
    (root / "SpeechCommands" / "speech_commands_v0.02" / "testing_list.txt").unlink()
    with pytest.raises(KDUserError, match="testing_list.txt"):
        load_speech_commands(root, "validation")
