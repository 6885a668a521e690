"""Which examples form each training batch (seeded, resumable) and moving a batch to the device."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kdcore.errors import KDUserError


class EpochSampler:
    """A seeded permutation per epoch (or the task's own ``epoch_batches``); its position is part of the checkpoint."""

    def __init__(self, size: int, batch_size: int, seed: int,
                 epoch_batches: Callable[[torch.Generator], list[list[int]] | None] | None = None) -> None:
        if size == 0:
            raise KDUserError("The training set is empty: there is nothing to distil on. Check the task's data config.")
        self.size = size
        self.batch_size = min(batch_size, size)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._epoch_batches = epoch_batches
        self._batches = self._epoch()

    def _epoch(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self._epoch_batches is not None:
            batches = self._epoch_batches(generator)
            if batches is not None:
                batches = [batch for batch in batches if batch]
                if not batches:
                    raise KDUserError("The task's epoch_batches() returned no batches for a non-empty training set.")
                return batches
        order = torch.randperm(self.size, generator=generator).tolist()
        # Drop the ragged tail: every step sees a full batch.
        return [order[start:start + self.batch_size]
                for start in range(0, self.size - self.batch_size + 1, self.batch_size)]

    def next_indices(self) -> list[int]:
        """The next batch's dataset indices (``position`` counts batches within the epoch)."""
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch()
        indices = self._batches[self.position]
        self.position += 1
        return indices

    def state(self) -> dict[str, int]:
        """Epoch and position, for a checkpoint."""
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a checkpointed :meth:`state`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch()


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors (also inside dicts and tensor lists/tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
