"""Text records to token-id items within the task's length limits (``data.max_source_tokens`` /
``max_target_tokens``): over-long examples are truncated, or skipped in training with ``data.overlong=skip``, and
both are counted and logged.

An item is ``{"id", "source", "target", "split", "source_ids", "target_ids"}``; the token ids end with the
end-of-sequence token the tokenizer appends. With a teacher tokenizer of its own (``data.teacher_vocab_size``) an
item also carries the teacher's reading of the same text, ``teacher_source_ids`` and ``teacher_target_ids``, and
the character offsets of each target token in the target text on both sides, ``target_offsets`` and
``teacher_target_offsets`` (what :mod:`kdcore.objectives.token_alignment` aligns). The end-of-sequence token gets
``(len(target), len(target))`` on both sides, so that "the text ends here" is an event both sides predict; where a
side was truncated its end-of-sequence token covers no text (``(0, 0)``) and the text it does not reach is in no
aligned group.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from kdcore.objectives.token_alignment import Span, encode_with_offsets

from .data_config import TextDataConfig
from .files import TextRecord

log = logging.getLogger(__name__)

#: The offsets of a token that covers no text (special tokens; see kdcore.objectives.token_alignment).
NO_TEXT: Span = (0, 0)
#: The keys a teacher tokenizer adds to an item.
TEACHER_ITEM_KEYS = ("teacher_source_ids", "teacher_target_ids", "target_offsets", "teacher_target_offsets")


def truncate_ids(ids: list[int], limit: int, eos_id: int | None) -> list[int]:
    """The first ``limit`` ids, still ending with eos (a truncated target must still teach the model to stop)."""
    if len(ids) <= limit:
        return ids
    if eos_id is not None and ids and ids[-1] == eos_id:
        return ids[:limit - 1] + [eos_id]
    return ids[:limit]


def target_offsets(ids: list[int], offsets: list[Span], limit: int, eos_id: int | None, text: str) -> list[Span]:
    """The offsets of the target tokens :func:`truncate_ids` keeps of ``ids``: the end-of-sequence token at the end of
    the text, ``(len(text), len(text))``, where the whole text was read, else covering no text."""
    kept = truncate_ids(list(offsets), limit, None)
    if eos_id is not None and ids and ids[-1] == eos_id:
        kept[-1] = (len(text), len(text)) if len(ids) <= limit else NO_TEXT
    return kept


class _Reading:
    """One tokenizer's token ids of the sources and targets of a list of records (targets with offsets)."""

    def __init__(self, tokenizer: Any, records: Sequence[TextRecord], *, offsets: bool) -> None:
        self.eos = tokenizer.eos_token_id
        self.sources = tokenizer([r["source"] for r in records], add_special_tokens=True)["input_ids"]
        targets = [r["target"] for r in records]
        if offsets:
            self.targets, self.offsets = encode_with_offsets(tokenizer, targets, target=True)
        else:
            self.targets = tokenizer(text_target=targets, add_special_tokens=True)["input_ids"]
            self.offsets = []

    def too_long(self, index: int, config: TextDataConfig) -> bool:
        return len(self.sources[index]) > config.max_source_tokens or \
            len(self.targets[index]) > config.max_target_tokens

    def ids(self, index: int, config: TextDataConfig) -> tuple[list[int], list[int]]:
        return (truncate_ids(list(self.sources[index]), config.max_source_tokens, self.eos),
                truncate_ids(list(self.targets[index]), config.max_target_tokens, self.eos))

    def target_offsets(self, index: int, config: TextDataConfig, text: str) -> list[Span]:
        return target_offsets(list(self.targets[index]), self.offsets[index], config.max_target_tokens, self.eos,
                              text)


def encode_records(records: Sequence[TextRecord], split: str, tokenizer: Any, config: TextDataConfig, *,
                   training: bool, teacher_tokenizer: Any = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Items with token ids for ``records``, and the counts ``{"examples", "truncated", "skipped_overlong"}``.

    ``teacher_tokenizer``: the teacher's own tokenizer; the items then carry its reading too (module docstring), and
    an example over the limits on either side counts as over-long (both sides keep the same examples).
    """
    if not records:
        return [], {"examples": 0, "truncated": 0, "skipped_overlong": 0}
    readings = [_Reading(tokenizer, records, offsets=teacher_tokenizer is not None)]
    if teacher_tokenizer is not None:
        readings.append(_Reading(teacher_tokenizer, records, offsets=True))
    items: list[dict[str, Any]] = []
    truncated = skipped = 0
    for index, record in enumerate(records):
        if any(reading.too_long(index, config) for reading in readings):
            if training and config.overlong == "skip":
                skipped += 1
                continue
            truncated += 1
        source_ids, target_ids = readings[0].ids(index, config)
        item = {"id": record["id"], "source": record["source"], "target": record["target"], "split": split,
                "source_ids": source_ids, "target_ids": target_ids}
        if teacher_tokenizer is not None:
            student, teacher = readings
            item["teacher_source_ids"], item["teacher_target_ids"] = teacher.ids(index, config)
            item["target_offsets"] = student.target_offsets(index, config, record["target"])
            item["teacher_target_offsets"] = teacher.target_offsets(index, config, record["target"])
        items.append(item)
    if truncated:
        log.warning("%s: truncated %d of %d examples to data.max_source_tokens=%d / max_target_tokens=%d "
                    "(the untruncated reference is still used for scoring).", split, truncated, len(records),
                    config.max_source_tokens, config.max_target_tokens)
    if skipped:
        log.warning("%s: skipped %d of %d examples over data.max_source_tokens=%d / max_target_tokens=%d "
                    "(data.overlong=skip).", split, skipped, len(records), config.max_source_tokens,
                    config.max_target_tokens)
    return items, {"examples": len(items), "truncated": truncated, "skipped_overlong": skipped}


def teacher_view(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` as the teacher reads it: its own token ids as ``source_ids`` / ``target_ids`` (an item without a
    teacher reading is returned as it is)."""
    if "teacher_source_ids" not in item:
        return item
    view = {key: value for key, value in item.items() if key not in TEACHER_ITEM_KEYS}
    view["source_ids"], view["target_ids"] = item["teacher_source_ids"], item["teacher_target_ids"]
    return view


__all__ = ["NO_TEXT", "TEACHER_ITEM_KEYS", "encode_records", "target_offsets", "teacher_view", "truncate_ids"]
