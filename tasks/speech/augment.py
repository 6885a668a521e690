"""Noise and reverberation for speech, deterministic from a ``torch.Generator``.

Noise is synthetic (white, pink, or babble made of other utterances) and mixed
at a chosen SNR with ``torchaudio.functional.add_noise``; reverberation
convolves with a synthetic room impulse response (exponentially decaying
Gaussian noise after a direct-path impulse, the standard statistical model of
late reverberation) through ``torchaudio.functional.fftconvolve``. All the
randomness comes from the generator passed in, so the same seed gives the same
audio.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torchaudio.functional as audio_functional
from pydantic import BaseModel, ConfigDict, Field, model_validator

NoiseKind = Literal["white", "pink", "babble"]
SAMPLE_RATE = 16000
# ln(1000): amplitude decays 60 dB (a factor 1000) over RT60.
_LN_1000 = math.log(1000.0)


class AugmentConfig(BaseModel):
    """How utterances are corrupted: probabilities, noise kinds, SNR range and reverberation time range."""

    model_config = ConfigDict(extra="forbid")

    noise_probability: float = Field(0.5, ge=0.0, le=1.0, description="chance that an utterance gets noise")
    noise_types: list[NoiseKind] = Field(default_factory=lambda: ["white", "pink", "babble"], min_length=1,
                                         description="noise kinds, drawn uniformly")
    snr_db_range: tuple[float, float] = Field((5.0, 25.0), description="signal-to-noise ratio in dB, uniform")
    babble_talkers: tuple[int, int] = Field((3, 6), description="how many other utterances make babble")
    reverb_probability: float = Field(0.3, ge=0.0, le=1.0, description="chance that an utterance is reverberated")
    rt60_range: tuple[float, float] = Field((0.2, 0.7), description="reverberation time RT60 in seconds, uniform")

    @model_validator(mode="after")
    def _ordered_ranges(self) -> "AugmentConfig":
        for name in ("snr_db_range", "babble_talkers", "rt60_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high; got {(low, high)}")
        if self.rt60_range[0] <= 0:
            raise ValueError(f"rt60_range must be positive seconds; got {self.rt60_range}")
        if self.babble_talkers[0] < 1:
            raise ValueError(f"babble_talkers must be >= 1; got {self.babble_talkers}")
        return self


def uniform(low: float, high: float, generator: torch.Generator) -> float:
    """One draw from U(low, high) using ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def white_noise(num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance Gaussian white noise."""
    return torch.randn(num_samples, generator=generator)


def pink_noise(num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance 1/f (pink) noise: white noise shaped by 1/sqrt(f) in the frequency domain.

    Hand-written because torchaudio has no coloured-noise generator; it is one
    rfft, a scale and an irfft.
    """
    spectrum = torch.fft.rfft(torch.randn(num_samples, generator=generator))
    frequencies = torch.arange(spectrum.numel(), dtype=torch.float32)
    frequencies[0] = 1.0  # keep DC finite; it carries almost no energy after normalisation
    noise = torch.fft.irfft(spectrum / frequencies.sqrt(), n=num_samples)
    return noise / noise.std().clamp_min(1e-8)


def babble_noise(num_samples: int, sources: Sequence[torch.Tensor], generator: torch.Generator,
                 talkers: tuple[int, int] = (3, 6)) -> torch.Tensor:
    """Several other utterances summed (each looped to length with a random start), unit variance.

    Only the drawn sources are looked at (a corpus-sized ``sources`` costs nothing); silent or empty
    ones are passed over, and with no usable source the result is pink noise.
    """
    count = int(torch.randint(talkers[0], talkers[1] + 1, (), generator=generator))
    mixture, used = torch.zeros(num_samples), 0
    for _ in range(count if len(sources) else 0):
        source = sources[int(torch.randint(len(sources), (), generator=generator))]
        start = int(torch.randint(max(1, source.numel()), (), generator=generator))
        if source.numel() < 2 or float(source.abs().max()) == 0.0:
            continue
        looped = source.roll(-start).repeat(num_samples // source.numel() + 1)[:num_samples]
        mixture += looped / looped.std().clamp_min(1e-8)
        used += 1
    if used == 0:
        return pink_noise(num_samples, generator)
    return mixture / mixture.std().clamp_min(1e-8)


def make_noise(kind: NoiseKind, num_samples: int, generator: torch.Generator,
               babble_sources: Sequence[torch.Tensor] = (), talkers: tuple[int, int] = (3, 6)) -> torch.Tensor:
    """Unit-variance noise of ``kind``."""
    if kind == "white":
        return white_noise(num_samples, generator)
    if kind == "pink":
        return pink_noise(num_samples, generator)
    if kind == "babble":
        return babble_noise(num_samples, babble_sources, generator, talkers)
    raise ValueError(f"unknown noise kind {kind!r}")


def add_noise_at_snr(waveform: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """``waveform`` plus ``noise`` scaled to ``snr_db`` dB below it (torchaudio.functional.add_noise)."""
    return audio_functional.add_noise(waveform[None], noise[None, :waveform.numel()],
                                      torch.tensor([float(snr_db)]))[0]


def synthetic_rir(rt60: float, generator: torch.Generator, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A room impulse response: a unit direct path, then Gaussian noise decaying 60 dB over ``rt60`` s."""
    length = max(2, int(rt60 * sample_rate))
    time = torch.arange(length, dtype=torch.float32) / sample_rate
    tail = torch.randn(length, generator=generator) * torch.exp(-_LN_1000 * time / rt60)
    # Scale the tail so early reflections are weaker than the direct sound (direct-to-reverberant ratio ~ 0 dB).
    tail = tail / tail.norm().clamp_min(1e-8)
    tail[0] = 1.0
    return tail


def reverberate(waveform: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """``waveform`` convolved with ``rir`` (cut to its length), rescaled to its original peak."""
    wet = audio_functional.fftconvolve(waveform, rir)[:waveform.numel()]
    peak_in, peak_out = float(waveform.abs().max()), float(wet.abs().max())
    return wet * (peak_in / peak_out) if peak_out > 0 else wet


def augment(waveform: torch.Tensor, config: AugmentConfig, generator: torch.Generator,
            babble_sources: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reverberate and/or add noise per ``config``; return the audio and what was done.

    Reverberation comes first (the room colours the speech), noise after (it is
    added at the microphone). The result is rescaled if it would clip.
    """
    info: dict[str, Any] = {}
    # Draw every random decision even when unused, so one item's choices do not shift the next item's.
    do_reverb = float(torch.rand((), generator=generator)) < config.reverb_probability
    rt60 = uniform(*config.rt60_range, generator)
    do_noise = float(torch.rand((), generator=generator)) < config.noise_probability
    kind = config.noise_types[int(torch.randint(len(config.noise_types), (), generator=generator))]
    snr_db = uniform(*config.snr_db_range, generator)
    if do_reverb:
        waveform = reverberate(waveform, synthetic_rir(rt60, generator))
        info["rt60"] = round(rt60, 3)
    if do_noise:
        noise = make_noise(kind, waveform.numel(), generator, babble_sources, config.babble_talkers)
        waveform = add_noise_at_snr(waveform, noise, snr_db)
        info["noise"], info["snr_db"] = kind, round(snr_db, 2)
    peak = float(waveform.abs().max()) if waveform.numel() else 0.0
    if peak > 0.99:
        waveform = waveform * (0.99 / peak)
    return waveform, info
