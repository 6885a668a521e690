"""Which items a task uses together: length-bucketed training batches and seeded subsets (text and speech tasks)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def length_bucketed_batches(lengths: Sequence[Any], batch_size: int, pool_batches: int,
                            generator: torch.Generator) -> list[list[int]]:
    """Full batches of indices of similar length: shuffle, sort pools of ``pool_batches`` batches by ``lengths``
    (any sort keys), cut each pool into full batches, shuffle the batches.

    Why: padding a short item to the long one next to it would waste most of a step; sorting within pools keeps
    the order random across pools. ``batch_size`` is capped at the number of items, so there is always a batch.
    """
    size = len(lengths)
    batch_size = min(batch_size, size)
    order = torch.randperm(size, generator=generator).tolist()
    pool = pool_batches * batch_size
    batches: list[list[int]] = []
    for start in range(0, size, pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def seeded_subset(count: int, limit: int | None, generator: torch.Generator) -> list[int]:
    """Sorted indices of at most ``limit`` of ``count`` items drawn with ``generator`` (all of them when ``limit`` is
    None or not below ``count``)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


__all__ = ["length_bucketed_batches", "seeded_subset"]
