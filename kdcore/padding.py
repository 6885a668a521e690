"""Padding token-id rows into one tensor: the one copy every collate function and text method uses."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool = False,
             device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` as a ``(len(rows), width)`` long tensor filled with ``value`` around them.

    ``width`` is the longest row's length, at least 1 (so an all-empty batch still has a column). Rows are
    right-aligned when ``left`` (left padding, e.g. prompts a decoder-only model continues), else left-aligned.
    """
    width = max(1, max((len(row) for row in rows), default=0))
    padded = torch.full((len(rows), width), value, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if len(row):
            values = torch.as_tensor(row, dtype=torch.long, device=device)
            if left:
                padded[index, width - len(row):] = values
            else:
                padded[index, :len(row)] = values
    return padded


__all__ = ["pad_rows"]
