"""Plain negative log-likelihood of the data labels: the one copy every plugin uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcore.signals import IGNORE_INDEX


def token_nll(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of ``logits`` (``(..., V)``) on ``labels`` (``logits.shape[:-1]``), -100 ignored.

    Averaged over the counted positions, computed in float32; 0 (not NaN) when none counts. ``label_smoothing`` ε:
    the target is ``(1 - ε)`` on the label plus ``ε / V`` on every token (PyTorch's definition; docs/text.md compares
    it with the ImitKD authors' OpenNMT-style smoothing).
    """
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits' positions are "
                         f"{tuple(logits.shape[:-1])}")
    flat_labels = labels.reshape(-1).to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels.long(),
                            ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
    count = (flat_labels != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
    return total / count
