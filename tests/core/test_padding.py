"""kdcore.padding.pad_rows: the one helper that pads token-id rows (task collation, text methods)."""
from __future__ import annotations

import torch

from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX


def test_rows_are_left_aligned_and_padded_to_the_longest() -> None:
    padded = pad_rows([[5, 6, 7], [8], []], IGNORE_INDEX)
    assert padded.dtype == torch.long
    assert padded.tolist() == [[5, 6, 7], [8, -100, -100], [-100, -100, -100]]


def test_left_padding_right_aligns_each_row() -> None:
    assert pad_rows([[1, 2], [3]], 0, left=True).tolist() == [[1, 2], [0, 3]]


def test_all_empty_rows_still_give_one_column() -> None:
    assert pad_rows([[], []], 9).tolist() == [[9], [9]]
    assert pad_rows([(4, 5)], 0).tolist() == [[4, 5]]  # any sequence of ints
