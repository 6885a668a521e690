"""Text items to batches: seq2seq batches and decoder-only prompt + completion batches (the keys
``kd_plugins.text.models`` documents for each), with the teacher's own reading of the batch where the items carry one
(:mod:`.encoding`), and left-padded prompts for decoder-only generation."""
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


def collate_causal(items: Sequence[Any], pad_token_id: int, teacher_pad_token_id: int | None = None) -> Batch:
    """Prompt + completion rows for a decoder-only model (the causal-LM keys of ``kd_plugins.text.models``).

    ``input_ids`` is each item's ``source_ids`` (the prompt) followed by its ``target_ids`` (the completion),
    right-padded with ``pad_token_id``; ``labels`` are aligned with ``input_ids``: -100 on the prompt (it is given,
    not learnt) and on padding, the completion's ids elsewhere. Items with the teacher's reading add
    ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_labels`` in the same layout and the character
    offsets of the completion tokens beside each side's labels (``(0, 0)``, no text, on the prompt).
    """
    def rows(prompt_key: str, completion_key: str) -> tuple[list[list[int]], list[list[int]]]:
        tokens = [item[prompt_key] + item[completion_key] for item in items]
        labels = [[IGNORE_INDEX] * len(item[prompt_key]) + item[completion_key] for item in items]
        return tokens, labels

    tokens, labels = rows("source_ids", "target_ids")
    batch = {"input_ids": pad_rows(tokens, pad_token_id), "attention_mask": pad_rows([[1] * len(t) for t in tokens], 0),
             "labels": pad_rows(labels, IGNORE_INDEX), "ids": [str(item["id"]) for item in items]}
    if items and "teacher_source_ids" in items[0]:
        teacher_tokens, teacher_labels = rows("teacher_source_ids", "teacher_target_ids")
        no_text = (0, 0)
        batch.update({
            "teacher_input_ids": pad_rows(teacher_tokens, pad_token_id if teacher_pad_token_id is None
                                          else teacher_pad_token_id),
            "teacher_attention_mask": pad_rows([[1] * len(t) for t in teacher_tokens], 0),
            "teacher_labels": pad_rows(teacher_labels, IGNORE_INDEX),
            "student_offsets": pad_offsets([[no_text] * len(item["source_ids"]) + list(item["target_offsets"])
                                            for item in items]),
            "teacher_offsets": pad_offsets([[no_text] * len(item["teacher_source_ids"])
                                            + list(item["teacher_target_offsets"]) for item in items])})
    return batch


def collate_prompts(items: Sequence[Any], pad_token_id: int) -> Batch:
    """The items' prompts (``source_ids``) left-padded, as a decoder-only model continues them: every row's next
    token goes in the same column."""
    prompts = [item["source_ids"] for item in items]
    return {"input_ids": pad_rows(prompts, pad_token_id, left=True),
            "attention_mask": pad_rows([[1] * len(p) for p in prompts], 0, left=True),
            "ids": [str(item["id"]) for item in items]}


__all__ = ["collate_causal", "collate_prompts", "collate_seq2seq", "pad_offsets"]
