"""The signals that flow from models to objectives.

Teachers and students both answer a :class:`SignalRequest` with a
:class:`Signals` object; objectives read what they declared they need.
Teacher logits may be dense tensors or :class:`SparseLogits` (top-k values and
their vocabulary ids, e.g. from the on-disk teacher-logit cache).
"""
from __future__ import annotations

import enum
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


@dataclass(frozen=True)
class SparseLogits:
    """Top-k teacher logits per position.

    ``values`` and ``indices`` have shape ``(..., k)``; ``vocab_size`` is the
    size of the full vocabulary. Entries outside the top k are treated as -inf
    unless the consumer renormalises differently (see docs/objectives.md).
    """

    values: torch.Tensor
    indices: torch.Tensor
    vocab_size: int

    def to_dense(self, fill: float = float("-inf")) -> torch.Tensor:
        """Scatter back to a ``(..., vocab_size)`` tensor filled with ``fill``."""
        dense = self.values.new_full((*self.values.shape[:-1], self.vocab_size), fill)
        return dense.scatter(-1, self.indices.long(), self.values)


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
