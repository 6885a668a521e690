"""SUPERB-style downstream probing of a frozen speech upstream (teacher or student).

The protocol (Yang et al., "SUPERB", Interspeech 2021), scaled to CPU budgets:

1. the upstream is frozen; its hidden states (every layer it exposes) are
   extracted **once** per evaluation for all items a downstream needs;
2. each downstream learns its own softmax-weighted sum of those layers
   (:class:`WeightedLayerSum`) jointly with a light head;
3. heads: keyword spotting and speaker identification are utterance-level
   classifiers over mean-pooled features (accuracy); ASR is a small BiLSTM (or
   linear) CTC head over characters with greedy decoding (WER with jiwer).

Each layer is layer-normalised (no parameters) before the weighted sum, as
s3prl's featurizer does with ``layer_norm: True``: upstream layers differ in
scale by orders of magnitude (Whisper's in particular) and the softmax weights
should choose layers, not compensate scales.

Exact shortcut for utterance-level heads: the weighted sum, the optional linear
projection of s3prl's utterance-level model and mean pooling over time are all
linear, so pooling each (normalised) layer first and then taking the weighted
sum gives the same features. Keyword and speaker heads therefore train on
``(items, layers, width)`` tensors, which makes them cost almost nothing; only
ASR keeps frame-level features.

Everything here is seeded: the same upstream, data and config give the same
numbers (tests/speech_superb/test_speech_superb_downstream.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn
from torch.nn import functional as F

from kdcore.config import StrictModel
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Model
from kdcore.progress import track
from kdcore.signals import Signal, SignalRequest
from kd_tasks.sampling import seeded_subset

log = logging.getLogger(__name__)

ALL_HIDDEN_STATES = SignalRequest(frozenset({Signal.HIDDEN_STATES}))


# --------------------------------------------------------------------------- configs


class UtteranceHeadConfig(StrictModel):
    """An utterance-level classifier (keyword spotting, speaker identification) and its training budget."""

    hidden: NonNegativeInt = Field(256, description="width of the MLP's hidden layer; 0 = a linear classifier")
    steps: PositiveInt = Field(400, description="optimiser steps (Adam) on the pooled training features")
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3
    weight_decay: NonNegativeFloat = 1e-4
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_items: PositiveInt | None = Field(
        None, description="train the head on at most this many items (a seeded subset); None: all")


class CTCHeadConfig(StrictModel):
    """The ASR head: projection, optional BiLSTM, linear CTC output over characters, and its budget."""

    projection: PositiveInt = Field(128, description="width of the linear projection of the weighted sum")
    lstm_hidden: PositiveInt = Field(128, description="hidden units per direction of the BiLSTM")
    lstm_layers: NonNegativeInt = Field(1, description="BiLSTM layers; 0 = a linear CTC head")
    steps: PositiveInt = Field(400, description="optimiser steps (Adam)")
    batch_size: PositiveInt = 16
    lr: PositiveFloat = 2e-3
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_items: PositiveInt | None = Field(None, description="at most this many training utterances")


# --------------------------------------------------------------------------- layer sum


class WeightedLayerSum(nn.Module):
    """SUPERB's learnable weighted sum of an upstream's layers: ``sum_l softmax(w)_l * h_l``.

    The weights start equal (zeros before the softmax). ``layers`` has the layer
    axis at ``dim`` (default 1: ``(batch, layers, ...)``).
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))

    def weights(self) -> torch.Tensor:
        """The current layer weights (they sum to 1)."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, layers: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if layers.shape[dim] != self.logits.numel():
            raise ValueError(f"expected {self.logits.numel()} layers on dim {dim}, got {layers.shape[dim]}")
        shape = [1] * layers.dim()
        shape[dim] = -1
        return (layers * self.weights().view(shape).to(layers.dtype)).sum(dim)


# --------------------------------------------------------------------------- extraction


@dataclass
class UpstreamFeatures:
    """Hidden states of one upstream for a list of items.

    ``pooled[i]`` is ``(layers, width)``: each layer normalised then averaged
    over the item's valid frames. ``frames[i]`` (only where requested) is
    ``(layers, frames, width)`` in float16.
    """

    pooled: torch.Tensor
    frames: dict[int, torch.Tensor]

    @property
    def num_layers(self) -> int:
        return int(self.pooled.shape[1])


@torch.no_grad()
def extract_features(model: Model, items: Sequence[Any], collate: Callable[[Sequence[Any]], Batch],
                     device: torch.device, batch_size: int, keep_frames: Sequence[bool] | None = None,
                     normalize: bool = True, length: Callable[[Any], int] | None = None) -> UpstreamFeatures:
    """Run the frozen ``model`` once over ``items`` and keep what the downstream heads need.

    Items are batched by length (fewer padded samples); ``keep_frames[i]`` says
    whether item ``i``'s frame-level states are kept (ASR items) besides the
    pooled ones. ``collate`` must return ``waveform``/``waveform_lengths``.
    """
    count = len(items)
    keep = list(keep_frames) if keep_frames is not None else [False] * count
    order = sorted(range(count), key=(lambda i: length(items[i])) if length else (lambda i: 0))
    pooled: list[torch.Tensor | None] = [None] * count
    frames: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for start in track(range(0, count, batch_size), "superb evaluation: upstream hidden states", unit="batch",
                           leave=False):
            indices = order[start:start + batch_size]
            batch = collate([items[i] for i in indices])
            batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                     for key, value in batch.items()}
            signals = model.forward_signals(batch, ALL_HIDDEN_STATES)
            hidden = signals.hidden_states
            if not hidden:
                raise KDUserError(f"The upstream {type(model).__name__} returned no hidden states; the superb task "
                                  f"probes hidden layers, so use a teacher/student that exposes them.")
            widths = {int(layer.shape[-1]) for layer in hidden}
            if len(widths) != 1:
                raise KDUserError(f"The upstream {type(model).__name__} returned layers of different widths "
                                  f"{sorted(widths)}; SUPERB's weighted sum needs one width.")
            stacked = torch.stack([layer.float() for layer in hidden], dim=1)  # (B, L, T, D)
            if normalize:
                stacked = F.layer_norm(stacked, stacked.shape[-1:])
            mask = signals.extra.get("frame_mask")
            if mask is None:
                mask = torch.ones(stacked.shape[0], stacked.shape[2], dtype=torch.bool, device=stacked.device)
            mask = mask[:, :stacked.shape[2]].bool()
            weights = mask.to(stacked.dtype)[:, None, :, None]
            means = (stacked * weights).sum(2) / weights.sum(2).clamp(min=1.0)
            for row, index in enumerate(indices):
                pooled[index] = means[row].cpu()
                if keep[index]:
                    valid = int(mask[row].sum())
                    frames[index] = stacked[row, :, :valid].to(torch.float16).cpu()
    finally:
        model.train(was_training)
    if count == 0:
        return UpstreamFeatures(torch.zeros(0, 0, 0), {})
    return UpstreamFeatures(torch.stack([p for p in pooled if p is not None]), frames)


# --------------------------------------------------------------------------- utterance-level heads


class UtteranceClassifier(nn.Module):
    """Weighted layer sum of pooled features -> (MLP or linear) -> class logits."""

    def __init__(self, num_layers: int, width: int, num_classes: int, config: UtteranceHeadConfig) -> None:
        super().__init__()
        self.layer_sum = WeightedLayerSum(num_layers)
        if config.hidden:
            self.head: nn.Module = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU(),
                                                 nn.Dropout(config.dropout), nn.Linear(config.hidden, num_classes))
        else:
            self.head = nn.Linear(width, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, layers, width)`` -> ``(B, classes)``."""
        return self.head(self.layer_sum(pooled))


def train_utterance_classifier(pooled: torch.Tensor, labels: torch.Tensor, num_classes: int,
                               config: UtteranceHeadConfig, seed: int) -> UtteranceClassifier:
    """Fit an :class:`UtteranceClassifier` on ``pooled`` ``(N, layers, width)`` features (seeded)."""
    if pooled.shape[0] == 0:
        raise ValueError("no training items for the utterance classifier")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.tensor(seeded_subset(pooled.shape[0], config.max_train_items, generator))
    pooled, labels = pooled[chosen], labels[chosen]
    # enable_grad: the runner evaluates under no_grad, but the heads are trained here.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = UtteranceClassifier(pooled.shape[1], pooled.shape[2], num_classes, config)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        model.train()
        batch = min(config.batch_size, pooled.shape[0])
        for _ in track(range(config.steps), "superb evaluation: utterance head", unit="step", leave=False):
            index = torch.randint(0, pooled.shape[0], (batch,), generator=generator)
            loss = F.cross_entropy(model(pooled[index]), labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    model.eval()
    return model


@torch.no_grad()
def classifier_hits(model: UtteranceClassifier, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per item, whether its argmax class equals its label (bool, one per row of ``pooled``)."""
    return model(pooled).argmax(-1) == labels


def classifier_accuracy(model: UtteranceClassifier, pooled: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pooled`` items whose argmax class equals ``labels``."""
    if pooled.shape[0] == 0:
        return float("nan")
    return float(classifier_hits(model, pooled, labels).float().mean())


# --------------------------------------------------------------------------- ASR (CTC over characters)


class CharVocabulary:
    """Characters of the training transcripts; index 0 is the CTC blank."""

    def __init__(self, texts: Sequence[str]) -> None:
        characters = sorted({char for text in texts for char in normalize_transcript(text)})
        self.characters = characters
        self.index = {char: position + 1 for position, char in enumerate(characters)}

    def __len__(self) -> int:
        return len(self.characters) + 1  # + blank

    def encode(self, text: str) -> list[int]:
        """Character ids of ``text`` (characters unseen in training are dropped)."""
        return [self.index[char] for char in normalize_transcript(text) if char in self.index]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.characters[i - 1] for i in ids if i > 0)


def normalize_transcript(text: str) -> str:
    """Lower case, single spaces (the form WER is computed on)."""
    return " ".join(text.lower().split())


def greedy_ctc_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path per utterance: argmax per frame, repeats merged, blanks (0) removed."""
    best = log_probs.argmax(-1)
    decoded = []
    for row, length in zip(best, lengths.tolist()):
        path = torch.unique_consecutive(row[:length]).tolist()
        decoded.append([token for token in path if token != 0])
    return decoded


class CTCHead(nn.Module):
    """Weighted layer sum -> projection -> BiLSTM (optional) -> character logits."""

    def __init__(self, num_layers: int, width: int, vocabulary_size: int, config: CTCHeadConfig) -> None:
        super().__init__()
        self.layer_sum = WeightedLayerSum(num_layers)
        self.projection = nn.Linear(width, config.projection)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = (nn.LSTM(config.projection, config.lstm_hidden, num_layers=config.lstm_layers,
                             batch_first=True, bidirectional=True) if config.lstm_layers else None)
        self.output = nn.Linear(2 * config.lstm_hidden if self.lstm is not None else config.projection,
                                vocabulary_size)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, layers, T, width)`` -> log-probabilities ``(B, T, vocabulary)``."""
        hidden = self.dropout(F.relu(self.projection(self.layer_sum(frames))))
        if self.lstm is not None:
            packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths.cpu(), batch_first=True, enforce_sorted=False)
            output, _ = self.lstm(packed)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=frames.shape[2])
            hidden = self.dropout(hidden)
        return self.output(hidden).log_softmax(-1)


def _pad_frames(frames: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``(layers, T_i, width)`` -> ``(B, layers, T_max, width)`` float32 and lengths."""
    lengths = torch.tensor([f.shape[1] for f in frames])
    padded = torch.zeros(len(frames), frames[0].shape[0], int(lengths.max()), frames[0].shape[2])
    for row, item in enumerate(frames):
        padded[row, :, :item.shape[1]] = item.float()
    return padded, lengths


def train_ctc_head(frames: Sequence[torch.Tensor], texts: Sequence[str], config: CTCHeadConfig,
                   seed: int) -> tuple[CTCHead, CharVocabulary]:
    """Fit a :class:`CTCHead` on frame features ``(layers, T_i, width)`` and their transcripts (seeded)."""
    if not frames:
        raise ValueError("no training utterances for the CTC head")
    generator = torch.Generator().manual_seed(seed)
    chosen = seeded_subset(len(frames), config.max_train_items, generator)
    frames = [frames[i] for i in chosen]
    texts = [texts[i] for i in chosen]
    vocabulary = CharVocabulary(texts)
    targets = [torch.tensor(vocabulary.encode(text), dtype=torch.long) for text in texts]
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = CTCHead(frames[0].shape[0], frames[0].shape[2], len(vocabulary), config)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        model.train()
        batch = min(config.batch_size, len(frames))
        for _ in track(range(config.steps), "superb evaluation: CTC head", unit="step", leave=False):
            index = torch.randint(0, len(frames), (batch,), generator=generator).tolist()
            padded, lengths = _pad_frames([frames[i] for i in index])
            log_probs = model(padded, lengths)
            target = [targets[i] for i in index]
            loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(target), lengths,
                              torch.tensor([len(t) for t in target]), blank=0, zero_infinity=True)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
    model.eval()
    return model, vocabulary


@torch.no_grad()
def transcribe(model: CTCHead, vocabulary: CharVocabulary, frames: Sequence[torch.Tensor],
               batch_size: int = 32) -> list[str]:
    """Greedy CTC transcripts of frame features."""
    hypotheses: list[str] = []
    for start in range(0, len(frames), batch_size):
        padded, lengths = _pad_frames(frames[start:start + batch_size])
        for ids in greedy_ctc_decode(model(padded, lengths), lengths):
            hypotheses.append(vocabulary.decode(ids))
    return hypotheses


def _error_rate(references: Sequence[str], hypotheses: Sequence[str],
                measure: Callable[[list[str], list[str]], float]) -> float:
    """``measure`` (a jiwer corpus rate) on normalised transcripts; empty references are left out (nan if all are)."""
    pairs = [(normalize_transcript(r), normalize_transcript(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return float("nan")
    return float(measure([r for r, _ in pairs], [h for _, h in pairs]))


def error_counts(references: Sequence[str], hypotheses: Sequence[str], unit: str) -> list[tuple[int, list[float]]]:
    """Per scored pair (empty references are left out, as in the corpus rates): its position and
    ``[errors, reference length]`` in ``unit`` (``words`` or ``characters``). Summed, errors over length is
    :func:`word_error_rate` / :func:`character_error_rate` (the paired bootstrap's statistics)."""
    import jiwer

    process = jiwer.process_words if unit == "words" else jiwer.process_characters
    counts = []
    for position, (reference, hypothesis) in enumerate(zip(references, hypotheses)):
        reference, hypothesis = normalize_transcript(reference), normalize_transcript(hypothesis)
        if not reference:
            continue
        output = process(reference, hypothesis)
        errors = output.substitutions + output.deletions + output.insertions
        counts.append((position, [float(errors), float(output.substitutions + output.deletions + output.hits)]))
    return counts


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (jiwer) on normalised transcripts; empty references are left out."""
    import jiwer

    return _error_rate(references, hypotheses, jiwer.wer)


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER (jiwer) on normalised transcripts; empty references are left out."""
    import jiwer

    return _error_rate(references, hypotheses, jiwer.cer)


__all__ = [
    "ALL_HIDDEN_STATES", "CTCHead", "CTCHeadConfig", "CharVocabulary", "UpstreamFeatures", "UtteranceClassifier",
    "UtteranceHeadConfig", "WeightedLayerSum", "character_error_rate", "classifier_accuracy", "classifier_hits",
    "error_counts",
    "extract_features",
    "greedy_ctc_decode", "normalize_transcript", "train_ctc_head", "train_utterance_classifier", "transcribe",
    "word_error_rate",
]
