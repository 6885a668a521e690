"""Speech corpora on local disk: LibriSpeech, Speech Commands, and any folder of audio.

Every loader returns a :class:`SpeechCorpus`: :class:`SpeechItem`s (16 kHz mono
float32 waveforms with whatever labels the corpus has), the count of skipped
files by reason, and a manifest describing what was read. Nothing is ever
downloaded: LibriSpeech and Speech Commands are found through
``torchaudio.datasets`` with ``download=False`` in their usual layout, and a
missing directory is a :class:`~kdcore.errors.KDUserError` naming the path.
Audio is decoded by :func:`kd_tasks.speech.audio.read_audio` (soundfile +
torchaudio resampling), so bad files are skipped and counted, never fatal.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import KDUserError
from kdcore.progress import track

from .audio import AudioReadStats, SkipReason, find_audio_files, read_audio

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
# The ten SUPERB keyword-spotting commands (Speech Commands v1 task).
DEFAULT_KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
LIBRISPEECH_SUBSETS = ("dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360",
                       "train-other-500")
SPEECH_COMMANDS_SUBSETS = ("training", "validation", "testing")
SPEECH_COMMANDS_VERSIONS = ("speech_commands_v0.01", "speech_commands_v0.02")


@dataclass(frozen=True)
class SpeechItem:
    """One utterance: a 1-D float32 waveform at 16 kHz, mono, and its labels (None when unknown).

    ``text`` is the transcript (ASR), ``keyword`` the keyword-spotting class
    (including ``"_unknown_"`` and ``"_silence_"``), ``speaker`` a speaker id.
    """

    waveform: torch.Tensor
    utterance_id: str
    text: str | None = None
    keyword: str | None = None
    speaker: str | None = None

    @property
    def seconds(self) -> float:
        return self.waveform.numel() / SAMPLE_RATE


@dataclass
class SpeechCorpus:
    """Items loaded from one source, skipped files by reason, and a manifest (source, root, counts)."""

    items: list[SpeechItem]
    skipped: dict[str, int] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def _spread(count: int, limit: int | None) -> list[int]:
    """Indices 0..count-1, or ``limit`` of them evenly spread (sorted listings group speakers/labels,
    so the first ``limit`` files would all be one speaker or one word)."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit <= 0:
        return []
    return sorted({int(i * count / limit) for i in range(limit)})


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise KDUserError(f"The item limit must be a positive integer or unset; got {limit!r}.")


def _finish(source: str, root: Path, items: list[SpeechItem], stats: AudioReadStats, files_seen: int,
            extra: dict[str, Any] | None = None) -> SpeechCorpus:
    stats.log_summary(f"{source} {root}")
    if not items:
        raise KDUserError(
            f"No usable audio in {source} at '{root}': {files_seen} file(s) found, all skipped "
            f"({dict(stats.skipped) or 'none'}; e.g. {stats.examples}). Check that the files are audio that "
            f"soundfile can read (wav/flac/ogg/mp3) and are not empty, silent or corrupt.")
    manifest = {"source": source, "root": str(root), "files_seen": files_seen, "items": len(items),
                "seconds": round(sum(item.seconds for item in items), 3), "sample_rate": SAMPLE_RATE,
                **stats.as_dict(), **(extra or {})}
    return SpeechCorpus(items=items, skipped=dict(stats.skipped), manifest=manifest)


def load_audio_folder(root: str | Path, limit: int | None = None) -> SpeechCorpus:
    """Every wav/flac/ogg/mp3 file under ``root`` (recursively, sorted) as unlabelled items.

    ``utterance_id`` is the path relative to ``root`` without its suffix. Bad
    files are skipped and counted (see :mod:`kd_tasks.speech.audio`); ``limit``
    stops after that many usable items.
    """
    _check_limit(limit)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KDUserError(f"The audio folder '{root}' does not exist or is not a directory. Give a directory "
                          f"holding .wav/.flac/.ogg/.mp3 files (searched recursively).")
    files = find_audio_files(root)
    if not files:
        raise KDUserError(f"The audio folder '{root}' holds no .wav/.flac/.ogg/.mp3 files (searched recursively).")
    stats, items = AudioReadStats(), []
    for path in track(files, f"reading {root}", unit="file"):
        if limit is not None and len(items) >= limit:
            break
        waveform = read_audio(path, SAMPLE_RATE, stats)
        if isinstance(waveform, SkipReason):
            continue
        items.append(SpeechItem(waveform=waveform, utterance_id=path.relative_to(root).with_suffix("").as_posix()))
    return _finish("audio folder", root, items, stats, files_seen=len(files))


def _dataset_root(root: str | Path, folder_in_archive: str, subset_dir: str) -> Path:
    """The directory that holds ``folder_in_archive`` (users often give the inner folder itself)."""
    root = Path(root).expanduser()
    if not (root / folder_in_archive / subset_dir).is_dir() and root.name == folder_in_archive \
            and (root / subset_dir).is_dir():
        return root.parent
    return root


def load_librispeech(root: str | Path, subset: str = "train-clean-100", limit: int | None = None) -> SpeechCorpus:
    """LibriSpeech ``subset`` from ``root/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac`` (torchaudio layout).

    Items carry the transcript (as in the corpus: upper case) and the speaker id.
    ``limit`` keeps that many utterances spread evenly over the sorted list (so
    over many speakers).
    """
    import torchaudio.datasets  # heavy; only needed here

    _check_limit(limit)
    if subset not in LIBRISPEECH_SUBSETS:
        raise KDUserError(f"Unknown LibriSpeech subset {subset!r}; expected one of {', '.join(LIBRISPEECH_SUBSETS)}.")
    base = _dataset_root(root, "LibriSpeech", subset)
    expected = base / "LibriSpeech" / subset
    if not expected.is_dir():
        raise KDUserError(
            f"LibriSpeech {subset} not found: '{expected}' is not a directory. Give as root the directory that "
            f"contains 'LibriSpeech/{subset}/<speaker>/<chapter>/*.flac' (what extracting {subset}.tar.gz from "
            f"openslr.org/12 creates); kd never downloads it.")
    dataset = torchaudio.datasets.LIBRISPEECH(str(base), url=subset, download=False)
    stats, items = AudioReadStats(), []
    indices = _spread(len(dataset), limit)
    for index in track(indices, f"reading LibriSpeech {subset}", unit="file"):
        try:
            relative, _rate, transcript, speaker, chapter, utterance = dataset.get_metadata(index)
        except (OSError, ValueError) as error:  # a missing or malformed .trans.txt line
            stats.add_skip(f"{subset} item {index}", SkipReason("unreadable", f"transcript: {error}"))
            continue
        path = base / "LibriSpeech" / relative
        waveform = read_audio(path, SAMPLE_RATE, stats)
        if isinstance(waveform, SkipReason):
            continue
        items.append(SpeechItem(waveform=waveform, utterance_id=f"{speaker}-{chapter}-{utterance:04d}",
                                text=transcript, speaker=str(speaker)))
    return _finish("LibriSpeech", expected, items, stats, files_seen=len(indices),
                   extra={"subset": subset, "speakers": len({item.speaker for item in items})})


def load_speech_commands(root: str | Path, subset: str, limit: int | None = None,
                         keywords: Sequence[str] = DEFAULT_KEYWORDS, silence_clips: int | None = None,
                         version: str = "speech_commands_v0.02") -> SpeechCorpus:
    """Speech Commands ``subset`` (training/validation/testing) as SUPERB keyword-spotting items.

    Layout (torchaudio): ``root/SpeechCommands/<version>/<word>/<speaker>_nohash_<n>.wav`` with
    ``validation_list.txt`` and ``testing_list.txt``. Words in ``keywords`` keep their label, every other
    word becomes ``"_unknown_"`` (``text`` keeps the spoken word), and ``"_silence_"`` items are 1 s
    windows cut from ``_background_noise_/*.wav``: window k of a file goes to testing when k % 10 == 0,
    validation when k % 10 == 1, training otherwise (so splits never share noise). ``silence_clips``
    caps them (default: the size of an average keyword class). ``limit`` keeps that many word
    utterances spread over the sorted list.
    """
    import torchaudio.datasets

    _check_limit(limit)
    if subset not in SPEECH_COMMANDS_SUBSETS:
        raise KDUserError(f"Unknown Speech Commands subset {subset!r}; expected one of "
                          f"{', '.join(SPEECH_COMMANDS_SUBSETS)}.")
    if version not in SPEECH_COMMANDS_VERSIONS:
        raise KDUserError(f"Unknown Speech Commands version {version!r}; expected one of "
                          f"{', '.join(SPEECH_COMMANDS_VERSIONS)}.")
    if silence_clips is not None and silence_clips < 0:
        raise KDUserError(f"silence_clips must be >= 0 or unset; got {silence_clips}.")
    base = _dataset_root(root, "SpeechCommands", version)
    expected = base / "SpeechCommands" / version
    if not expected.is_dir():
        raise KDUserError(
            f"Speech Commands not found: '{expected}' is not a directory. Give as root the directory that contains "
            f"'SpeechCommands/{version}/<word>/*.wav' plus validation_list.txt and testing_list.txt (what "
            f"extracting {version}.tar.gz creates there); kd never downloads it.")
    for listing in ("validation_list.txt", "testing_list.txt"):
        if not (expected / listing).is_file():
            raise KDUserError(f"Speech Commands at '{expected}' has no {listing}; it defines the {subset} split.")
    dataset = torchaudio.datasets.SPEECHCOMMANDS(str(base), url=version, download=False, subset=subset)
    keyword_set = set(keywords)
    stats, items = AudioReadStats(), []
    indices = _spread(len(dataset), limit)
    for index in track(indices, f"reading Speech Commands {subset}", unit="file"):
        relative, _rate, label, speaker, number = dataset.get_metadata(index)
        waveform = read_audio(base / "SpeechCommands" / relative, SAMPLE_RATE, stats)
        if isinstance(waveform, SkipReason):
            continue
        items.append(SpeechItem(waveform=waveform, utterance_id=f"{label}/{speaker}_nohash_{number}", text=label,
                                keyword=label if label in keyword_set else UNKNOWN, speaker=speaker))
    counts = Counter(item.keyword for item in items)
    if silence_clips is None:
        silence_clips = round(len(items) / max(1, len(keyword_set) + 1))
    silence = _background_windows(expected / "_background_noise_", subset, silence_clips, stats)
    items.extend(silence)
    return _finish("Speech Commands", expected, items, stats, files_seen=len(indices),
                   extra={"subset": subset, "version": version, "keywords": list(keywords),
                          "labels": dict(sorted({**counts, SILENCE: len(silence)}.items()))})


def _background_windows(folder: Path, subset: str, count: int, stats: AudioReadStats) -> list[SpeechItem]:
    """Up to ``count`` one-second ``_silence_`` items from the background-noise recordings of ``subset``."""
    if count == 0 or not folder.is_dir():
        return []
    wanted = {"testing": {0}, "validation": {1}, "training": set(range(2, 10))}[subset]
    windows: list[SpeechItem] = []
    for path in sorted(folder.glob("*.wav")):
        waveform = read_audio(path, SAMPLE_RATE, stats)
        if isinstance(waveform, SkipReason):
            continue
        for k in range(waveform.numel() // SAMPLE_RATE):
            if k % 10 in wanted:
                windows.append(SpeechItem(waveform=waveform[k * SAMPLE_RATE:(k + 1) * SAMPLE_RATE].clone(),
                                          utterance_id=f"{SILENCE}/{path.stem}/{k}", keyword=SILENCE))
    return [windows[i] for i in _spread(len(windows), count)]

