"""Text items to a seq2seq batch: the keys ``kd_plugins.text.models`` documents for seq2seq models."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdcore.interfaces import Batch
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX


def collate_seq2seq(items: Sequence[Any], pad_token_id: int) -> Batch:
    """``input_ids`` (padded with ``pad_token_id``), ``attention_mask``, ``labels`` (padded with ``IGNORE_INDEX``)
    and ``ids`` (the items' ids as strings: the seq-kd cache key)."""
    sources = [item["source_ids"] for item in items]
    return {"input_ids": pad_rows(sources, pad_token_id),
            "attention_mask": pad_rows([[1] * len(source) for source in sources], 0),
            "labels": pad_rows([item["target_ids"] for item in items], IGNORE_INDEX),
            "ids": [str(item["id"]) for item in items]}


__all__ = ["collate_seq2seq"]
