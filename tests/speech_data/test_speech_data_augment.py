"""Noise at a measured SNR, pink/babble noise, synthetic reverberation; all deterministic from a generator."""
from __future__ import annotations

import math

import pytest
import torch

from kd_tasks.speech.augment import (
    AugmentConfig, add_noise_at_snr, augment, babble_noise, make_noise, pink_noise, reverberate, synthetic_rir,
)


def _speechlike(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
    return 0.3 * envelope * torch.sin(2 * math.pi * 180 * t + torch.randn(t.shape, generator=generator).cumsum(0) * 0.01)


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
def test_noise_is_mixed_at_the_requested_snr(kind: str) -> None:
    clean = _speechlike()
    sources = [_speechlike(0.7, seed) for seed in range(1, 5)]
    noise = make_noise(kind, clean.numel(), torch.Generator().manual_seed(0), sources)
    assert abs(float(noise.std()) - 1.0) < 0.05
    noisy = add_noise_at_snr(clean, noise, 10.0)
    added = noisy - clean
    snr = 10 * math.log10(float(clean.pow(2).sum()) / float(added.pow(2).sum()))
    assert abs(snr - 10.0) < 0.01


def test_pink_noise_has_falling_spectrum_and_babble_uses_sources() -> None:
    power = torch.fft.rfft(pink_noise(64000, torch.Generator().manual_seed(0))).abs().pow(2)
    low, high = float(power[40:400].mean()), float(power[4000:8000].mean())  # ~10-100 Hz vs 1-2 kHz
    assert low / high > 10  # 1/f: about 20x between these bands; white noise would give ~1
    tone = torch.sin(2 * math.pi * 1000 * torch.arange(8000) / 16000)
    babble = babble_noise(16000, [tone], torch.Generator().manual_seed(0), talkers=(2, 2))
    spectrum = torch.fft.rfft(babble).abs()
    assert abs(int(spectrum.argmax()) - 1000) <= 2  # made of the source: its 1 kHz tone dominates


def test_reverberation_extends_energy_and_keeps_peak() -> None:
    click = torch.zeros(16000)
    click[1000] = 0.5
    rir = synthetic_rir(0.5, torch.Generator().manual_seed(0))
    assert rir.numel() == 8000 and rir[0] == 1.0
    # The tail decays about 60 dB over RT60: late energy far below early energy.
    early, late = float(rir[1:800].pow(2).mean()), float(rir[7200:].pow(2).mean())
    assert 10 * math.log10(early / late) > 40
    wet = reverberate(click, rir)
    assert wet.numel() == click.numel() and abs(float(wet.abs().max()) - 0.5) < 1e-6
    assert float(wet[1200:9000].abs().sum()) > 0  # energy after the click: the room's tail
    assert float(wet[:1000].abs().max()) < 1e-6  # nothing before it (causal)


def test_augment_is_deterministic_from_the_generator() -> None:
    clean = _speechlike()
    config = AugmentConfig(noise_probability=1.0, reverb_probability=1.0)
    first, info = augment(clean, config, torch.Generator().manual_seed(3))
    again, info_again = augment(clean, config, torch.Generator().manual_seed(3))
    other, _ = augment(clean, config, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and info == info_again and not torch.equal(first, other)
    assert set(info) == {"rt60", "noise", "snr_db"} and float(first.abs().max()) <= 0.99 + 1e-6
    untouched, nothing = augment(clean, AugmentConfig(noise_probability=0.0, reverb_probability=0.0),
                                 torch.Generator().manual_seed(3))
    assert torch.equal(untouched, clean) and nothing == {}


def test_config_validates_ranges() -> None:
    with pytest.raises(ValueError):
        AugmentConfig(snr_db_range=(20.0, 5.0))
    with pytest.raises(ValueError):
        AugmentConfig(noise_types=["brown"])
