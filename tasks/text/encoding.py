"""Text records to token-id items within the task's length limits (``data.max_source_tokens`` /
``max_target_tokens``): over-long examples are truncated, or skipped in training with ``data.overlong=skip``, and
both are counted and logged.

An item is ``{"id", "source", "target", "split", "source_ids", "target_ids"}``; the token ids end with the
end-of-sequence token the tokenizer appends.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .data_config import TextDataConfig
from .files import TextRecord

log = logging.getLogger(__name__)


def truncate_ids(ids: list[int], limit: int, eos_id: int | None) -> list[int]:
    """The first ``limit`` ids, still ending with eos (a truncated target must still teach the model to stop)."""
    if len(ids) <= limit:
        return ids
    if eos_id is not None and ids and ids[-1] == eos_id:
        return ids[:limit - 1] + [eos_id]
    return ids[:limit]


def encode_records(records: Sequence[TextRecord], split: str, tokenizer: Any, config: TextDataConfig, *,
                   training: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Items with token ids for ``records``, and the counts ``{"examples", "truncated", "skipped_overlong"}``."""
    if not records:
        return [], {"examples": 0, "truncated": 0, "skipped_overlong": 0}
    sources = tokenizer([r["source"] for r in records], add_special_tokens=True)["input_ids"]
    targets = tokenizer(text_target=[r["target"] for r in records], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    items: list[dict[str, Any]] = []
    truncated = skipped = 0
    for record, source_ids, target_ids in zip(records, sources, targets):
        too_long = len(source_ids) > config.max_source_tokens or len(target_ids) > config.max_target_tokens
        if too_long:
            if training and config.overlong == "skip":
                skipped += 1
                continue
            truncated += 1
        items.append({"id": record["id"], "source": record["source"], "target": record["target"],
                      "split": split, "source_ids": truncate_ids(list(source_ids), config.max_source_tokens, eos),
                      "target_ids": truncate_ids(list(target_ids), config.max_target_tokens, eos)})
    if truncated:
        log.warning("%s: truncated %d of %d examples to data.max_source_tokens=%d / max_target_tokens=%d "
                    "(the untruncated reference is still used for scoring).", split, truncated, len(records),
                    config.max_source_tokens, config.max_target_tokens)
    if skipped:
        log.warning("%s: skipped %d of %d examples over data.max_source_tokens=%d / max_target_tokens=%d "
                    "(data.overlong=skip).", split, skipped, len(records), config.max_source_tokens,
                    config.max_target_tokens)
    return items, {"examples": len(items), "truncated": truncated, "skipped_overlong": skipped}


__all__ = ["encode_records", "truncate_ids"]
