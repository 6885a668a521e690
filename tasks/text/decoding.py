"""Decoding a text task's items for evaluation: greedy or beam search in length-sorted batches, detokenised, with
the decoding speed (sentences/s, generated tokens/s) measured on the same pass."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdcore.interfaces import Batch
from kdcore.progress import track

from .data_config import TextDataConfig


def decode_items(model: Any, items: Sequence[Any], collate: Callable[[Sequence[Any]], Batch], tokenizer: Any,
                 config: TextDataConfig, device: torch.device, batch_size: int,
                 num_beams: int) -> tuple[list[str], dict[str, float]]:
    """Hypotheses for every item (in ``items`` order) and the decoding speed of this pass.

    ``model`` is a :class:`~kd_plugins.text.models.HFTextModel`. Each batch decodes at most
    ``data.max_length_ratio`` x its longest source + ``data.max_length_offset`` tokens, never more than
    ``data.max_new_tokens``.
    """
    from kd_plugins.text.generation import decode, generation_length_limit

    # Sorted by length so each batch pads little; the hypotheses are put back in item order.
    order = sorted(range(len(items)), key=lambda i: len(items[i]["source_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def run(indices: list[int]) -> Any:
        batch = collate([items[i] for i in indices])
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        limit = generation_length_limit(int(mask.sum(dim=1).max()), config.max_new_tokens, config.max_length_ratio,
                                        config.max_length_offset)
        return decode(model, input_ids, mask, num_beams=num_beams, max_new_tokens=limit)

    if chunks:
        run(chunks[0][:8])  # untimed warm-up: one-off allocator/kernel costs would skew small sets
    hypotheses: list[str] = [""] * len(items)
    tokens = 0
    started = time.perf_counter()
    what = "text evaluation: greedy decoding" if num_beams == 1 else f"text evaluation: beam-{num_beams} decoding"
    for indices in track(chunks, what, unit="batch", leave=False):
        generated = run(indices)
        tokens += int(generated.lengths.sum())
        texts = tokenizer.batch_decode(generated.to_lists(), skip_special_tokens=True)
        for index, text in zip(indices, texts):
            hypotheses[index] = text.strip()
    seconds = max(time.perf_counter() - started, 1e-9)
    speed = {"sentences_per_second": len(items) / seconds, "tokens_per_second": tokens / seconds,
             "decode_seconds": seconds}
    return hypotheses, speed


__all__ = ["decode_items"]
