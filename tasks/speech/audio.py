"""Reading audio files robustly: 16 kHz mono float32, or a reason to skip the file.

A folder of user audio may hold anything: empty files, files that are not
audio, stereo or 8 kHz recordings, float WAVs with NaN samples, digital silence,
clipped recordings. :func:`read_audio` never raises for such a file: it returns
the waveform (down-mixed and resampled, which are *fixes*) or a
:class:`SkipReason`. Clipped audio is kept and counted as a warning. Callers
pass an :class:`AudioReadStats` to count skips and fixes and log one summary,
so a long run never crashes on file 9,000 of 10,000.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3 with
libsndfile >= 1.1), resampling ``torchaudio.functional.resample``.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import soundfile
import torch
import torchaudio.functional as audio_functional

log = logging.getLogger(__name__)

TARGET_RATE = 16000
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3"})

SkipKind = Literal["empty", "unreadable", "non_finite", "silent", "too_short"]
FixKind = Literal["downmixed", "resampled", "clipped"]

# Peak below this is treated as digital silence (-80 dBFS): nothing to distil from.
SILENCE_PEAK = 1e-4
# A sample at or beyond this magnitude counts as clipped; a file is "clipped"
# when more than CLIPPED_FRACTION of its samples are (a single full-scale peak is not clipping).
CLIP_LEVEL = 0.999
CLIPPED_FRACTION = 1e-3
# 25 ms at 16 kHz: the receptive field of the wav2vec2/HuBERT CNN front end (400 samples).
MIN_SAMPLES = 400


@dataclass(frozen=True)
class SkipReason:
    """Why a file was not used: ``kind`` is one of :data:`SkipKind`, ``detail`` says what was seen."""

    kind: SkipKind
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class AudioReadStats:
    """Counts of files read, skipped (by reason) and fixed (down-mixed, resampled, clipped), with examples."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def _example(self, key: str, text: str) -> None:
        bucket = self.examples.setdefault(key, [])
        if len(bucket) < self.max_examples:
            bucket.append(text)

    def add_skip(self, path: str | Path, reason: SkipReason) -> None:
        self.skipped[reason.kind] += 1
        self._example(reason.kind, f"{path} ({reason.detail})" if reason.detail else str(path))

    def add_fix(self, path: str | Path, kind: FixKind) -> None:
        self.fixed[kind] += 1
        self._example(kind, str(path))

    def as_dict(self) -> dict[str, object]:
        return {"read": self.read, "skipped": dict(self.skipped), "fixed": dict(self.fixed),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def log_summary(self, source: str) -> None:
        """One INFO line with the counts, one WARNING per skip reason or clipped files, with example paths."""
        log.info("%s: %d files used, skipped %s, fixed %s", source, self.read, dict(self.skipped) or "none",
                 dict(self.fixed) or "none")
        for kind, count in sorted(self.skipped.items()):
            log.warning("%s: skipped %d file(s) as %s, e.g. %s", source, count, kind,
                        "; ".join(self.examples.get(kind, [])))
        if self.fixed.get("clipped"):
            log.warning("%s: %d clipped file(s) kept, e.g. %s", source, self.fixed["clipped"],
                        "; ".join(self.examples.get("clipped", [])))


def read_audio(path: str | Path, target_rate: int = TARGET_RATE,
               stats: AudioReadStats | None = None) -> torch.Tensor | SkipReason:
    """The file as a 1-D float32 tensor at ``target_rate`` Hz, mono, or the reason it is skipped.

    Stereo/multichannel audio is averaged to mono and other rates are resampled
    (counted in ``stats.fixed``); empty, unreadable, too short, non-finite and
    all-silent files give a :class:`SkipReason` (counted in ``stats.skipped``);
    clipped files are kept, clamped to [-1, 1], and counted as ``clipped``.
    """
    result, fixes = _read_checked(Path(path), target_rate)
    if stats is not None:
        if isinstance(result, SkipReason):
            stats.add_skip(path, result)
        else:
            stats.read += 1
            for fix in fixes:
                stats.add_fix(path, fix)
    return result


def _read_checked(path: Path, target_rate: int) -> tuple[torch.Tensor | SkipReason, list[FixKind]]:
    try:
        if path.stat().st_size == 0:
            return SkipReason("empty", "0 bytes"), []
        # always_2d: (frames, channels) for mono and multichannel alike.
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, EOFError, TypeError) as error:
        # soundfile raises LibsndfileError (a RuntimeError) for corrupt/unknown formats,
        # OSError for permissions, TypeError/ValueError for some malformed headers.
        return SkipReason("unreadable", f"{type(error).__name__}: {str(error).strip()[:200]}"), []
    waveform = torch.from_numpy(samples).T.contiguous()  # (channels, frames)
    if waveform.numel() == 0:
        return SkipReason("empty", "no samples"), []
    if not bool(torch.isfinite(waveform).all()):
        bad = int((~torch.isfinite(waveform)).sum())
        return SkipReason("non_finite", f"{bad} NaN/inf samples"), []
    fixes: list[FixKind] = []
    clipped = float((waveform.abs() >= CLIP_LEVEL).float().mean())
    if clipped > CLIPPED_FRACTION:
        fixes.append("clipped")
        waveform = waveform.clamp(-1.0, 1.0)
    if waveform.shape[0] > 1:
        fixes.append("downmixed")
        waveform = waveform.mean(dim=0, keepdim=True)
    waveform = waveform[0]
    if rate != target_rate:
        fixes.append("resampled")
        waveform = audio_functional.resample(waveform, int(rate), int(target_rate))
    if waveform.numel() < MIN_SAMPLES:
        seconds = waveform.numel() / target_rate
        return SkipReason("too_short", f"{seconds * 1000:.1f} ms < {MIN_SAMPLES / target_rate * 1000:.0f} ms"), []
    peak = float(waveform.abs().max())
    if peak < SILENCE_PEAK:
        level = "-inf" if peak == 0 else f"{20 * math.log10(peak):.1f}"
        return SkipReason("silent", f"peak {level} dBFS"), []
    return waveform.to(torch.float32).contiguous(), fixes


def find_audio_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively) whose suffix is an audio format we read, sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
