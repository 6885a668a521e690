"""What an objective reads: the logits, hidden states and labels of a comparison, with clear errors.

These helpers are the public way for an objective (built-in or third-party, see :mod:`kdcore.api`) to read its
inputs, so that every objective answers a missing or misaligned input with the same message.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch
from kdcore.signals import IGNORE_INDEX, Signals, SparseLogits


def logits_of(signals: Signals, role: str, objective: str) -> Tensor | SparseLogits:
    """The model's logits, or the projection of its final hidden state when only that was returned.

    ``role`` ("student" or "teacher") and ``objective`` (its name) only word the error.
    """
    if signals.logits is not None:
        return signals.logits
    if signals.final_hidden is not None and signals.output_weight is not None:
        # Kept on the signals: a second dense objective of the same comparison reuses them instead of projecting again.
        signals.logits = F.linear(
            signals.final_hidden, signals.output_weight.to(signals.final_hidden.dtype),
            None if signals.output_bias is None else signals.output_bias.to(signals.final_hidden.dtype))
        return signals.logits
    raise KDUserError(
        f"The objective {objective!r} needs the {role}'s logits, but the {role} model returned neither 'logits' nor "
        f"'final_hidden' with 'output_weight'. Use a {role} that produces logits (a classifier or language model), "
        f"or remove this objective from the config's 'objectives'.")


def labels_of(batch: Batch, logits_shape: Sequence[int], objective: str) -> Tensor | None:
    """``batch["labels"]`` checked against the logit positions (``logits_shape[:-1]``); None when absent.

    Labels give one target id per logit position, or :data:`~kdcore.signals.IGNORE_INDEX` where no loss counts.
    """
    labels = batch.get("labels")
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(logits_shape[:-1]):
        raise KDUserError(
            f"The objective {objective!r} found batch['labels'] of shape {tuple(labels.shape)}, but the logits have "
            f"positions {tuple(logits_shape[:-1])}: labels must give one id (or -100) per logit position. The task's "
            f"collate or the model must align them (e.g. shift labels for a causal LM).")
    return labels


def hidden_states_of(signals: Signals, role: str, objective: str) -> tuple[Tensor, ...]:
    """The model's hidden states (a tuple of ``(B, T, D)``), or a clear error when it returned none."""
    if not signals.hidden_states:
        raise KDUserError(
            f"The objective {objective!r} compares hidden states, but the {role} model returned none. Use a "
            f"{role} that exposes hidden states or remove this objective from the config's 'objectives'.")
    return signals.hidden_states


def counted_positions(labels: Tensor | None, positions: int) -> float:
    """How many positions a loss averaged over: the labels that are not ignored, or all ``positions``."""
    return float(positions) if labels is None else float((labels != IGNORE_INDEX).sum())


__all__ = ["counted_positions", "hidden_states_of", "labels_of", "logits_of"]
