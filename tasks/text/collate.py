"""Text items to a seq2seq batch: the keys ``kd_plugins.text.models`` documents for seq2seq models, and the
teacher's own reading of the batch where the items carry one (:mod:`.encoding`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdcore.interfaces import Batch
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX


def pad_offsets(rows: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """``(len(rows), width, 2)`` character offsets, padded with ``(0, 0)`` (no text)."""
    return torch.stack([pad_rows([[span[side] for span in row] for row in rows], 0) for side in (0, 1)], dim=-1)


def collate_seq2seq(items: Sequence[Any], pad_token_id: int, teacher_pad_token_id: int | None = None) -> Batch:
    """``input_ids`` (padded with ``pad_token_id``), ``attention_mask``, ``labels`` (padded with ``IGNORE_INDEX``)
    and ``ids`` (the items' ids as strings: the seq-kd cache key).

    Items with the teacher's reading add ``teacher_input_ids`` (padded with ``teacher_pad_token_id``),
    ``teacher_attention_mask``, ``teacher_labels`` (-100 padded) and the character offsets of the targets,
    ``student_offsets`` ``(B, T, 2)`` beside ``labels`` and ``teacher_offsets`` beside ``teacher_labels`` (padded with
    ``(0, 0)``): what the objective ``cross_tokenizer`` reads.
    """
    sources = [item["source_ids"] for item in items]
    batch = {"input_ids": pad_rows(sources, pad_token_id),
             "attention_mask": pad_rows([[1] * len(source) for source in sources], 0),
             "labels": pad_rows([item["target_ids"] for item in items], IGNORE_INDEX),
             "ids": [str(item["id"]) for item in items]}
    if items and "teacher_source_ids" in items[0]:
        teacher_sources = [item["teacher_source_ids"] for item in items]
        batch.update({
            "teacher_input_ids": pad_rows(teacher_sources, pad_token_id if teacher_pad_token_id is None
                                          else teacher_pad_token_id),
            "teacher_attention_mask": pad_rows([[1] * len(source) for source in teacher_sources], 0),
            "teacher_labels": pad_rows([item["teacher_target_ids"] for item in items], IGNORE_INDEX),
            "student_offsets": pad_offsets([item["target_offsets"] for item in items]),
            "teacher_offsets": pad_offsets([item["teacher_target_offsets"] for item in items])})
    return batch


__all__ = ["collate_seq2seq", "pad_offsets"]
