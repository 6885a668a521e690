"""The signals that flow from models to objectives.

Teachers and students both answer a :class:`SignalRequest` with a
:class:`Signals` object; objectives read what they declared they need.
Teacher logits may be dense tensors or :class:`SparseLogits` (top-k values and
their vocabulary ids, with the tail mass, e.g. from a teacher store: kdcore.teacher_store).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

#: Label value of a position that no loss scores (padding, prompts): PyTorch's and Hugging Face's convention.
#: The one definition in kd; every module that masks labels imports it from here (or from kdcore.api).
IGNORE_INDEX = -100


class Signal(str, enum.Enum):
    """A kind of model output an objective can ask for."""

    LOGITS = "logits"
    HIDDEN_STATES = "hidden_states"
    SEQUENCES = "sequences"
    FINAL_HIDDEN = "final_hidden"  # last hidden state before the output projection (fused path)


#: Signals an objective may ask for and still work without: a logit objective asks for the final hidden state to take
#: the fused path and falls back to logits when a method cannot hand it over.
OPTIONAL_SIGNALS: frozenset[Signal] = frozenset({Signal.FINAL_HIDDEN})


# float32 working copy of the logits in SparseLogits.from_dense, per block of rows
_FROM_DENSE_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class SparseLogits:
    """Top-k teacher logits per position, optionally with the log of the probability mass they leave out.

    ``values`` and ``indices`` have shape ``(..., k)`` (raw logits, temperature 1, and their vocabulary
    ids); ``vocab_size`` is the size of the full vocabulary. ``tail_log_mass`` (shape ``values.shape[:-1]``)
    is ``log(1 - sum of the top-k probabilities)`` of the teacher at temperature ``tail_temperature``.
    Without it the divergences renormalise the teacher over its top k; with it they compare the
    (k+1)-atom distributions top-k + rest (docs/objectives.md, "Sparse (top-k) teachers and tail mass").
    """

    values: torch.Tensor
    indices: torch.Tensor
    vocab_size: int
    tail_log_mass: torch.Tensor | None = None
    tail_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.values.shape != self.indices.shape or self.values.dim() < 1:
            raise ValueError(f"SparseLogits values {tuple(self.values.shape)} and indices "
                             f"{tuple(self.indices.shape)} must have the same shape (..., k)")
        if self.tail_log_mass is not None and self.tail_log_mass.shape != self.values.shape[:-1]:
            raise ValueError(f"SparseLogits tail_log_mass {tuple(self.tail_log_mass.shape)} must have the shape of "
                             f"the positions, {tuple(self.values.shape[:-1])}")
        if not (self.tail_temperature > 0 and math.isfinite(self.tail_temperature)):
            raise ValueError(f"SparseLogits tail_temperature must be a positive finite number, got "
                             f"{self.tail_temperature}")

    @property
    def k(self) -> int:
        """Number of kept logits per position."""
        return int(self.values.shape[-1])

    def to_dense(self, fill: float = float("-inf")) -> torch.Tensor:
        """Scatter back to a ``(..., vocab_size)`` tensor filled with ``fill``."""
        dense = self.values.new_full((*self.values.shape[:-1], self.vocab_size), fill)
        return dense.scatter(-1, self.indices.long(), self.values)

    @classmethod
    def from_dense(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> "SparseLogits":
        """The top ``k`` of ``(..., V)`` logits with the exact log tail mass at ``temperature``.

        ``values`` keep the dtype of ``logits`` (unscaled), ``indices`` are int64 and sorted by
        decreasing logit, ``tail_log_mass`` is float32: ``logsumexp`` of the other logits minus
        ``logsumexp`` of all (both divided by ``temperature``), ``-inf`` when nothing is left out.
        Computed row block by row block so that only a bounded float32 copy of the logits exists.
        """
        vocab = int(logits.shape[-1])
        if not 1 <= k <= vocab:
            raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        top = logits.topk(k, dim=-1)
        flat = logits.reshape(-1, vocab)
        flat_indices = top.indices.reshape(-1, k)
        tail = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        rows = max(1, _FROM_DENSE_BLOCK_BYTES // (4 * vocab))
        for start in range(0, flat.shape[0], rows):
            scaled = flat[start:start + rows].to(torch.float32, copy=True).div_(temperature)
            log_total = torch.logsumexp(scaled, -1)
            scaled.scatter_(-1, flat_indices[start:start + rows], float("-inf"))
            log_rest = torch.logsumexp(scaled, -1)
            # a row with no finite logit has no distribution: nothing is left out of it
            tail[start:start + rows] = torch.where(torch.isfinite(log_total), log_rest - log_total,
                                                   torch.full_like(log_total, float("-inf")))
        return cls(top.values, top.indices, vocab, tail.reshape(logits.shape[:-1]), float(temperature))


def next_token_aligned(per_label: torch.Tensor, fill: int, is_encoder_decoder: bool) -> torch.Tensor:
    """``per_label`` ``(B, T, ...)``, given per label position, moved to the logit position that predicts that label;
    ``fill`` where no label is predicted. Encoder-decoder: unchanged; causal LM: logits at t predict token t+1 (the
    shift Hugging Face does inside its loss). The one copy: text models and stored teachers call it."""
    if is_encoder_decoder:
        return per_label
    return torch.cat([per_label[:, 1:], per_label.new_full((per_label.shape[0], 1, *per_label.shape[2:]), fill)], dim=1)


@dataclass(frozen=True)
class SignalRequest:
    """What an objective (or a method) needs from a model's forward pass."""

    signals: frozenset[Signal] = frozenset()
    hidden_layers: tuple[int, ...] | None = None  # None: all layers

    def __or__(self, other: "SignalRequest") -> "SignalRequest":
        # Layers only matter for requests that want hidden states; None means "all".
        wanting = [r for r in (self, other) if Signal.HIDDEN_STATES in r.signals]
        if not wanting or any(r.hidden_layers is None for r in wanting):
            layers = None
        else:
            layers = tuple(sorted({layer for r in wanting for layer in r.hidden_layers or ()}))
        return SignalRequest(self.signals | other.signals, layers)

    def wants(self, signal: Signal) -> bool:
        return signal in self.signals

    @property
    def required(self) -> frozenset[Signal]:
        """The signals without which the asker cannot work (all but :data:`OPTIONAL_SIGNALS`)."""
        return frozenset(self.signals - OPTIONAL_SIGNALS)


def request(*signals: Signal, hidden_layers: tuple[int, ...] | None = None) -> SignalRequest:
    """A :class:`SignalRequest` for the given signals, e.g. ``request(Signal.LOGITS)``."""
    return SignalRequest(frozenset(signals), hidden_layers)


@dataclass
class Signals:
    """Outputs of one forward pass, only those that were requested."""

    logits: torch.Tensor | SparseLogits | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    sequences: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None  # output projection weight, for the fused path
    output_bias: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def detached(self) -> "Signals":
        """A copy whose tensors carry no autograd history (teacher outputs)."""

        def _detach(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.detach()
            if isinstance(value, tuple):
                return tuple(_detach(v) for v in value)
            return value

        return replace(self, **{f.name: _detach(getattr(self, f.name)) for f in fields(self) if f.name != "extra"})
