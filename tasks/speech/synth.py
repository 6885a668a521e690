"""The embedded speech corpus: keywords, phrases and digit strings spoken by espeak-ng, cached on disk.

Real recorded speech cannot be installed from PyPI, so kd's default speech data
is synthesised: espeak-ng (from the pip package ``espeakng-loader``) speaks
SUPERB-style material with many voices and voice variants, each a *speaker*
with its own base speaking rate, pitch and intonation range, jittered per
utterance; clips are resampled 22,050 -> 16,000 Hz with torchaudio, placed and
levelled, then reverberated and mixed with noise (:mod:`kd_tasks.speech.augment`).

Material, per split (train/valid/test):

* keyword spotting: ``keywords`` (default the ten SUPERB commands), ``"_unknown_"`` (other
  words) and ``"_silence_"`` (noise only), as 1 s clips;
* ASR: short command phrases from a small grammar and digit strings (``text``);
* speaker identification: every spoken item carries ``speaker`` = ``voice+variant``;
  every speaker of valid/test also speaks in train (SUPERB SID is closed-set).

Everything is decided by ``SynthConfig.seed``: the plan (which speaker says
what, rates, pitches, splits) comes from a seeded generator, espeak-ng runs in a
fresh worker process with its random generators seeded per utterance (see
:mod:`kd_tasks.speech.espeak` for why), and each utterance's augmentation
draws from a generator seeded by (seed, utterance id).

The cache: ``<cache_dir>/speech-synth/<config hash>/`` holds ``<split>.safetensors``
(int16 samples of all clips concatenated, plus offsets), ``<split>.jsonl``
(labels and how each clip was made) and the entry's manifest ``kd-cache.json`` (config, versions,
counts, size and sha256 of every file), written last (:mod:`kdcore.cache`). A damaged cache is moved aside and
rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torchaudio
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from kdcore.cache import ensure_entry
from kdcore.errors import KDUserError
from kdcore.io import atomic_write_text
from kdcore.progress import track

from ..text.manifest import corpus_manifest, jsonl_text
from .augment import AugmentConfig, augment, make_noise, uniform
from .corpora import DEFAULT_KEYWORDS, SAMPLE_RATE, SILENCE, UNKNOWN, SpeechItem
from .espeak import EspeakVoiceError, SynthRequest, synthesize

log = logging.getLogger(__name__)

# Bump when planning, post-processing or storage change: cached corpora are then rebuilt.
BUILDER_VERSION = "speech-synth/3"
#: The kind of its cache entries (kdcore.cache).
SPEECH_CORPUS_KIND = "speech-corpus"
SPLITS = ("train", "valid", "test")
ASR = "asr"

# Speech Commands' auxiliary words: spoken, but not keywords (class "_unknown_").
DEFAULT_UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine",
                         "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
# en-029 (Caribbean) is left out: Whisper tiny.en transcribed it worst by far (WER 0.67 against 0.28-0.50
# for the others on clean phrases; docs/speech-data.md), so it would mostly add confusion, not diversity.
DEFAULT_VOICES = ("en-US", "en", "en-GB-x-rp", "en-GB-scotland", "en-US-nyc", "en-GB-x-gbcwmd")
DEFAULT_VARIANTS = ("m1", "m3", "f2", "f4")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twenty", "thirty")
# A small command grammar: each template is a sequence of alternatives, one word group drawn from each.
PHRASE_TEMPLATES: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("turn",), ("on", "off"), ("the",), ("light", "lights", "radio", "heater", "fan", "television")),
    (("open", "close", "lock"), ("the",), ("door", "window", "garage", "gate", "curtains")),
    (("set",), ("the",), ("timer", "alarm"), ("for",), NUMBERS, ("minutes", "seconds", "hours")),
    (("move", "go", "walk", "drive"), ("left", "right", "up", "down", "forward", "back"), NUMBERS,
     ("steps", "meters", "miles")),
    (("play", "stop", "pause"), ("the",), ("music", "song", "video", "radio", "podcast")),
    (("what is the",), ("weather", "time", "temperature", "date"), ("in",),
     ("london", "paris", "boston", "tokyo", "berlin", "madrid", "sydney")),
    (("call",), ("mom", "dad", "anna", "peter", "the office", "the doctor"), ("now", "later", "tomorrow", "tonight")),
    (("show", "read", "delete"), ("my",), ("messages", "emails", "notes", "calendar", "photos")),
    (("make",), ("the",), ("room", "house", "kitchen", "bedroom"), ("warmer", "cooler", "brighter", "darker")),
)
ESPEAK_RATE_LIMITS = (80, 450)  # words per minute espeak-ng accepts


class SynthConfig(AugmentConfig):
    """What to synthesise (all counts are totals over the three splits) and how to vary and corrupt it."""

    seed: int = Field(0, description="decides everything: plan, espeak noise, augmentation")
    keywords: list[str] = Field(default_factory=lambda: list(DEFAULT_KEYWORDS), min_length=1)
    unknown_words: list[str] = Field(default_factory=lambda: list(DEFAULT_UNKNOWN_WORDS),
                                     description="words spoken for the '_unknown_' class")
    clips_per_keyword: int = Field(100, ge=0, description="clips of each keyword")
    unknown_clips: int = Field(100, ge=0, description="clips of '_unknown_' (words drawn from unknown_words)")
    silence_clips: int = Field(100, ge=0, description="clips of '_silence_' (noise only)")
    asr_utterances: int = Field(600, ge=0, description="ASR utterances: command phrases and digit strings")
    digit_string_fraction: float = Field(0.4, ge=0.0, le=1.0, description="share of ASR utterances that are digits")
    digit_string_length: tuple[int, int] = Field((3, 6), description="digits per digit string, uniform")
    voices: list[str] = Field(default_factory=lambda: list(DEFAULT_VOICES), min_length=1,
                              description="espeak-ng voice names (see available_voices())")
    variants: list[str] = Field(default_factory=lambda: list(DEFAULT_VARIANTS), min_length=1,
                                description="espeak-ng variants ('' = the voice's own); speakers = voices x variants")
    rate_range: tuple[int, int] = Field((130, 210), description="speaker base rate, words per minute")
    pitch_range: tuple[int, int] = Field((25, 75), description="speaker base pitch, espeak 0-100")
    intonation_range: tuple[int, int] = Field((30, 80), description="speaker pitch range (intonation), 0-100")
    rate_jitter: int = Field(12, ge=0, description="per-utterance rate change, +- words per minute")
    pitch_jitter: int = Field(6, ge=0, description="per-utterance pitch change, +-")
    level_dbfs_range: tuple[float, float] = Field((-20.0, -3.0), description="speech peak level, dBFS, uniform")
    silence_level_dbfs_range: tuple[float, float] = Field((-55.0, -25.0),
                                                          description="'_silence_' noise RMS level, dBFS")
    keyword_clip_seconds: float = Field(1.0, gt=0, description="keyword clips are padded to this length")
    asr_padding_seconds: tuple[float, float] = Field((0.05, 0.25), description="silence before/after a phrase")
    # Half of every class is test material: synthetic clips are cheap, and a test set of hundreds of items per
    # downstream is what lets two students be told apart (one keyword item of 96 was a whole point of accuracy).
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.5, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        for name in ("digit_string_length", "rate_range", "pitch_range", "intonation_range", "level_dbfs_range",
                     "silence_level_dbfs_range", "asr_padding_seconds"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high; got {(low, high)}")
        if not (ESPEAK_RATE_LIMITS[0] <= self.rate_range[0] and self.rate_range[1] <= ESPEAK_RATE_LIMITS[1]):
            raise ValueError(f"rate_range must lie in {ESPEAK_RATE_LIMITS} words per minute; got {self.rate_range}")
        for name in ("pitch_range", "intonation_range"):
            low, high = getattr(self, name)
            if low < 0 or high > 100:
                raise ValueError(f"{name} must lie in 0..100; got {(low, high)}")
        if self.digit_string_length[0] < 1:
            raise ValueError("digit_string_length must be >= 1")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("valid_fraction + test_fraction must be < 1 (train needs items)")
        if self.level_dbfs_range[1] > 0:
            raise ValueError("level_dbfs_range must be <= 0 dBFS")
        words = [w.strip().lower() for w in self.keywords]
        if len(set(words)) != len(words) or any(not w or w.startswith("_") for w in words):
            raise ValueError(f"keywords must be distinct, non-empty and not start with '_'; got {self.keywords}")
        overlap = set(words) & {w.strip().lower() for w in self.unknown_words}
        if overlap:
            raise ValueError(f"unknown_words must not contain keywords; both have {sorted(overlap)}")
        if self.unknown_clips and not self.unknown_words:
            raise ValueError("unknown_clips > 0 needs unknown_words")
        if len(set(self.voices)) != len(self.voices) or len(set(self.variants)) != len(self.variants):
            raise ValueError("voices and variants must not repeat")
        return self

    def config_hash(self) -> str:
        """sha256 of everything that defines the corpus (config, builder and espeak package versions)."""
        payload = {"builder": BUILDER_VERSION, "espeakng_loader": _espeak_package_version(),
                   "config": self.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class _Planned:
    """One clip to make: labels, split, and how to speak it (request None for silence)."""

    utterance_id: str
    split: str
    group: str
    text: str | None
    keyword: str | None
    speaker: str | None
    request: SynthRequest | None
    seed: int
    details: dict[str, Any] = field(default_factory=dict)


def _espeak_package_version() -> str:
    try:
        return metadata.version("espeakng-loader")
    except metadata.PackageNotFoundError:
        return "missing"


def _espeak_data_dir() -> Path:
    try:
        import espeakng_loader
    except ImportError as error:
        raise KDUserError("Synthetic speech needs espeak-ng from the pip package 'espeakng-loader' "
                          "(pip install 'kd[speech]' or pip install espeakng-loader).") from error
    return Path(espeakng_loader.get_data_path())


def available_voices() -> list[str]:
    """English espeak-ng voice names shipped by espeakng-loader (files under ``lang/gmw``)."""
    return sorted(p.name for p in (_espeak_data_dir() / "lang" / "gmw").iterdir() if p.name.startswith("en"))


def available_variants() -> list[str]:
    """espeak-ng voice variants (``voice+variant``), e.g. m1..m8, f1..f5, klatt, whisper."""
    return sorted(p.name for p in (_espeak_data_dir() / "voices" / "!v").iterdir() if p.is_file())


def _item_seed(seed: int, utterance_id: str) -> int:
    """A 31-bit seed for one utterance (stable across runs and platforms, unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{utterance_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _pick(options: Sequence[str], generator: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def _phrase(config: SynthConfig, generator: torch.Generator) -> str:
    if float(torch.rand((), generator=generator)) < config.digit_string_fraction:
        length = _randint(*config.digit_string_length, generator)
        return " ".join(_pick(DIGITS, generator) for _ in range(length))
    template = PHRASE_TEMPLATES[int(torch.randint(len(PHRASE_TEMPLATES), (), generator=generator))]
    return " ".join(_pick(slot, generator) for slot in template)


def _speakers(config: SynthConfig, generator: torch.Generator) -> dict[str, dict[str, Any]]:
    """Each voice x variant with its own base rate, pitch and intonation range (its identity)."""
    speakers = {}
    for voice in config.voices:
        for variant in config.variants:
            name = f"{voice}+{variant}" if variant else voice
            speakers[name] = {"voice": name, "rate": _randint(*config.rate_range, generator),
                              "pitch": _randint(*config.pitch_range, generator),
                              "range": _randint(*config.intonation_range, generator)}
    return speakers


def _plan(config: SynthConfig) -> tuple[list[_Planned], dict[str, dict[str, Any]]]:
    """Every clip of the corpus, in synthesis order, from the seed alone."""
    generator = torch.Generator().manual_seed(config.seed)
    speakers = _speakers(config, generator)
    names = list(speakers)
    groups: list[tuple[str, int]] = [(k, config.clips_per_keyword) for k in config.keywords]
    groups += [(UNKNOWN, config.unknown_clips), (SILENCE, config.silence_clips), (ASR, config.asr_utterances)]
    plan: list[_Planned] = []
    for group, count in groups:
        if count == 0:
            continue
        # Speakers round-robin over a shuffled order: each group is spread evenly over speakers.
        speaker_order = torch.randperm(len(names), generator=generator).tolist()
        # Splits by position in a random permutation: exact fractions within every group (stratified).
        split_position = torch.randperm(count, generator=generator).tolist()
        n_test, n_valid = round(count * config.test_fraction), round(count * config.valid_fraction)
        words = torch.randperm(max(1, len(config.unknown_words)), generator=generator).tolist()
        for index in range(count):
            position = split_position[index]
            split = "test" if position < n_test else "valid" if position < n_test + n_valid else "train"
            speaker = names[speaker_order[index % len(names)]]
            if group == ASR:
                utterance_id, keyword, text = f"asr-{index:05d}", None, _phrase(config, generator)
            elif group == UNKNOWN:
                word = config.unknown_words[words[index % len(words)]].strip().lower()
                utterance_id, keyword, text = f"unknown-{index:05d}", UNKNOWN, word
            elif group == SILENCE:
                utterance_id, keyword, text, speaker = f"silence-{index:05d}", SILENCE, None, None
            else:
                utterance_id, keyword, text = f"kw-{group}-{index:05d}", group, group.strip().lower()
            seed = _item_seed(config.seed, utterance_id)
            request = None
            if speaker is not None and text is not None:
                base = speakers[speaker]
                rate = base["rate"] + _randint(-config.rate_jitter, config.rate_jitter, generator)
                pitch = base["pitch"] + _randint(-config.pitch_jitter, config.pitch_jitter, generator)
                request = SynthRequest(voice=base["voice"], text=text, seed=seed, range=base["range"],
                                       rate=min(max(rate, ESPEAK_RATE_LIMITS[0]), ESPEAK_RATE_LIMITS[1]),
                                       pitch=min(max(pitch, 0), 100))
            plan.append(_Planned(utterance_id, split, group, text, keyword, speaker, request, seed))
    _close_speaker_set(plan)
    return plan, speakers


def _close_speaker_set(plan: list[_Planned]) -> None:
    """Move one valid/test item of any speaker missing from train into train (SID is closed-set)."""
    in_train = {p.speaker for p in plan if p.split == "train"}
    for item in plan:
        if item.speaker is not None and item.speaker not in in_train:
            item.split = "train"
            in_train.add(item.speaker)


def _trim(waveform: torch.Tensor) -> torch.Tensor:
    """Drop espeak-ng's leading and trailing silence (samples below 1% of the peak)."""
    peak = float(waveform.abs().max()) if waveform.numel() else 0.0
    loud = torch.nonzero(waveform.abs() > 0.01 * peak).flatten()
    return waveform[int(loud[0]):int(loud[-1]) + 1] if peak > 0 and loud.numel() else waveform


def _db_to_gain(db: float) -> float:
    return 10.0 ** (db / 20.0)


def _place(item: _Planned, speech: torch.Tensor, config: SynthConfig, generator: torch.Generator) -> torch.Tensor:
    """Trimmed speech levelled to a random peak and placed in its clip (1 s for keywords, padded for ASR)."""
    speech = _trim(speech)
    speech = speech * (_db_to_gain(uniform(*config.level_dbfs_range, generator)) / float(speech.abs().max()))
    if item.group == ASR:
        before = int(uniform(*config.asr_padding_seconds, generator) * SAMPLE_RATE)
        after = int(uniform(*config.asr_padding_seconds, generator) * SAMPLE_RATE)
        total, offset = before + speech.numel() + after, before
    else:
        total = max(int(config.keyword_clip_seconds * SAMPLE_RATE), speech.numel())
        offset = _randint(0, total - speech.numel(), generator)
    clip = torch.zeros(total)
    clip[offset:offset + speech.numel()] = speech
    return clip


def _silence_clip(config: SynthConfig, generator: torch.Generator) -> torch.Tensor:
    """Background noise only. Babble is left out even when configured: '_silence_' must hold no speech
    (Speech Commands' silence is cut from recordings of machines and running water)."""
    length = int(config.keyword_clip_seconds * SAMPLE_RATE)
    kinds = [kind for kind in config.noise_types if kind != "babble"] or ["pink"]
    kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
    noise = make_noise(kind, length, generator)
    return noise * _db_to_gain(uniform(*config.silence_level_dbfs_range, generator))


class _Excluding(Sequence[torch.Tensor]):
    """A split's clean clips without one utterance, as a view (a copied list per item would be quadratic)."""

    def __init__(self, clips: list[torch.Tensor], excluded: int | None) -> None:
        self._clips = clips
        self._skip = len(clips) if excluded is None else excluded
        self._length = len(clips) - (self._skip < len(clips))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < self._length:
            raise IndexError(index)
        return self._clips[index + (index >= self._skip)]


def _synthesize_plan(plan: list[_Planned], config: SynthConfig) -> tuple[dict[str, list[torch.Tensor]], str]:
    """All clips (float, 16 kHz, augmented) grouped by split in plan order, and the espeak-ng version."""
    spoken = [p for p in plan if p.request is not None]
    _espeak_data_dir()  # a missing espeakng-loader is a user error here, not a traceback from the worker
    try:
        batch = synthesize([p.request for p in spoken])  # type: ignore[misc]
    except EspeakVoiceError as error:
        raise KDUserError(
            f"espeak-ng has no voice '{error.voice}' (synthetic speech: voices={config.voices}, "
            f"variants={config.variants}). English voices: {', '.join(available_voices())}; variants are "
            f"added as voice+variant, e.g. m1..m8, f1..f5, klatt.") from error
    clean: dict[str, torch.Tensor] = {}
    # One Resample module: its sinc kernel is computed once, not per clip (that was 60% of resampling time).
    resample = torchaudio.transforms.Resample(batch.sample_rate, SAMPLE_RATE)
    for item, samples in track(zip(spoken, batch.clips), "synthetic speech: placing clips", total=len(spoken),
                               unit="clip"):
        generator = torch.Generator().manual_seed(item.seed)
        speech = torch.from_numpy(samples).to(torch.float32) / 32768.0
        speech = resample(speech)
        if speech.numel() == 0 or float(speech.abs().max()) == 0.0:
            raise RuntimeError(f"espeak-ng produced no audio for {item.request}")
        clean[item.utterance_id] = _place(item, speech, config, generator)
    # Babble for an item is made of other clean utterances of its own split (no leakage across splits).
    split_ids = {s: [p.utterance_id for p in spoken if p.split == s] for s in SPLITS}
    split_clips = {s: [clean[u] for u in ids] for s, ids in split_ids.items()}
    position = {u: i for ids in split_ids.values() for i, u in enumerate(ids)}
    final: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for item in track(plan, "synthetic speech: augmenting clips", unit="clip"):
        # A second stream for augmentation, so changing placement does not change the noise drawn.
        generator = torch.Generator().manual_seed(item.seed ^ 0x5A5A5A5A)
        if item.request is None:
            waveform = _silence_clip(config, generator)
            item.details = {}
        else:
            others = _Excluding(split_clips[item.split], position.get(item.utterance_id))
            waveform, item.details = augment(clean[item.utterance_id], config, generator, others)
            item.details.update(rate=item.request.rate, pitch=item.request.pitch)
        final[item.split].append(waveform)
    return final, batch.espeak_version


def _to_int16(waveform: torch.Tensor) -> torch.Tensor:
    return (waveform * 32767.0).round().clamp(-32768, 32767).to(torch.int16)


def _write(directory: Path, plan: list[_Planned], audio: dict[str, list[torch.Tensor]]) -> None:
    """The split shards and their labels, into the cache entry's staging directory (its manifest comes last)."""
    for split in SPLITS:
        items = [p for p in plan if p.split == split]
        clips = [_to_int16(w) for w in audio[split]]
        offsets = torch.zeros(len(clips) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([c.numel() for c in clips], dtype=torch.int64).cumsum(0)
        save_file({"audio": torch.cat(clips) if clips else torch.zeros(0, dtype=torch.int16), "offsets": offsets},
                  str(directory / f"{split}.safetensors"))
        records = [{"utterance_id": p.utterance_id, "keyword": p.keyword, "text": p.text, "speaker": p.speaker,
                    **p.details} for p in items]
        atomic_write_text(directory / f"{split}.jsonl", jsonl_text(records))


def _read(directory: Path) -> dict[str, list[SpeechItem]]:
    splits: dict[str, list[SpeechItem]] = {}
    for split in SPLITS:
        tensors = load_file(str(directory / f"{split}.safetensors"))
        audio, offsets = tensors["audio"], tensors["offsets"].tolist()
        with open(directory / f"{split}.jsonl", encoding="utf-8") as stream:
            records = [json.loads(line) for line in stream if line.strip()]
        if len(records) != len(offsets) - 1:
            raise ValueError(f"{directory}: {split} has {len(records)} labels but {len(offsets) - 1} clips")
        splits[split] = [
            SpeechItem(waveform=audio[offsets[i]:offsets[i + 1]].to(torch.float32) / 32768.0,
                       utterance_id=r["utterance_id"], text=r["text"], keyword=r["keyword"], speaker=r["speaker"])
            for i, r in enumerate(records)]
    return splits


def _counts(plan: list[_Planned], audio: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for split in SPLITS:
        items = [p for p in plan if p.split == split]
        counts[split] = {
            "items": len(items), "seconds": round(sum(w.numel() for w in audio[split]) / SAMPLE_RATE, 2),
            "keywords": dict(sorted(Counter(p.keyword for p in items if p.keyword).items())),
            "asr": sum(p.group == ASR for p in items), "speakers": len({p.speaker for p in items if p.speaker}),
            "noisy": sum("noise" in p.details for p in items), "reverberant": sum("rt60" in p.details for p in items)}
    return counts


def synthetic_speech_corpus(config: SynthConfig, cache_dir: str | Path) -> tuple[dict[str, list[SpeechItem]],
                                                                                  dict[str, Any]]:
    """The synthetic splits and their manifest, from the cache when valid, else built (and cached) now."""
    config_hash = config.config_hash()
    directory = Path(cache_dir).expanduser() / "speech-synth" / config_hash[:16]
    expected = {"builder": BUILDER_VERSION, "config_hash": config_hash}

    def build(staging: Path) -> dict[str, Any]:
        started = time.perf_counter()
        plan, speakers = _plan(config)
        audio, espeak_version = _synthesize_plan(plan, config)
        seconds = time.perf_counter() - started
        _write(staging, plan, audio)
        counts = _counts(plan, audio)
        log.info("Synthesised %d speech clips (%d speakers) in %.1f s into %s",
                 sum(v["items"] for v in counts.values()), len(speakers), seconds, directory)
        return {"espeak_ng": espeak_version, "espeakng_loader": _espeak_package_version(),
                "licence": "audio generated by kd with espeak-ng (GPL-3.0+) used as a tool; the audio is kd's data",
                "config": config.model_dump(mode="json"), "speakers": speakers, "counts": counts,
                "build_seconds": round(seconds, 2)}

    return ensure_entry(directory, SPEECH_CORPUS_KIND, expected, build, what="the synthetic speech corpus",
                        load=lambda manifest: (_read(directory), corpus_manifest(manifest)))


def build_synthetic_speech(config: SynthConfig, cache_dir: str | Path) -> dict[str, list[SpeechItem]]:
    """Splits ``train``/``valid``/``test`` of :class:`SpeechItem` (see the module docstring); cached on disk."""
    return synthetic_speech_corpus(config, cache_dir)[0]


def describe(manifest: dict[str, Any]) -> str:
    """A short human summary of a synthetic corpus manifest (for logs and reports)."""
    parts = []
    for split, counts in manifest["counts"].items():
        parts.append(f"{split}: {counts['items']} clips, {counts['seconds']:.0f} s, {counts['speakers']} speakers")
    return f"synthetic speech ({manifest['espeak_ng']}, seed {manifest['config']['seed']}): " + "; ".join(parts)

