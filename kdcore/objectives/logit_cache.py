"""On-disk cache of teacher top-k logits: run the teacher once, reuse it across epochs and runs.

Layout of a cache directory::

    cache.json                      {"format": 1, "top_k": K, "vocab_size": V, "fingerprint": "..."}
    <sha256(example id)[:32]>.safetensors
        values   float16 (T, K)     the K largest teacher logits per position, sorted descending
        indices  int32   (T, K)     their vocabulary ids
        metadata {"example_id": "...", "vocab_size": "V"}

Every file is written to a temporary name in the same directory and then ``os.replace``-d,
so a crash never leaves a half-written entry. float16 values + int32 ids cost 6 bytes per
kept logit: for K=64 that is 384 bytes per position instead of 4*V (128 KB for V=32000).

Read back as :class:`~kdcore.signals.SparseLogits`; the divergence objectives renormalise
the teacher over its top-k support (docs/objectives.md). The ``fingerprint`` (e.g. a hash
of the teacher's weights and of the data preprocessing) guards against reusing a cache
made by another teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdcore.errors import KDUserError
from kdcore.io import follow_umask
from kdcore.signals import SparseLogits

_FORMAT = 1
_META_NAME = "cache.json"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` then move the result onto ``path`` atomically."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(temporary)
        follow_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


class TeacherLogitCache:
    """Top-k teacher logits per example, stored with safetensors (fp16 values, int32 ids).

    Args:
        directory: where the entries live (created if missing).
        top_k: how many logits to keep per position.
        vocab_size: the teacher's vocabulary size (checked on every write).
        fingerprint: identifies the teacher and preprocessing; a directory made with another
            fingerprint, top_k or vocab_size is refused with a :class:`KDUserError`.
    """

    def __init__(self, directory: str | Path, *, top_k: int, vocab_size: int, fingerprint: str = "") -> None:
        if top_k < 1 or top_k > vocab_size:
            raise KDUserError(f"The teacher-logit cache needs 1 <= top_k <= vocab_size ({vocab_size}), got "
                              f"top_k={top_k}.")
        self.directory = Path(directory)
        self.top_k, self.vocab_size, self.fingerprint = top_k, vocab_size, fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "top_k": top_k, "vocab_size": vocab_size, "fingerprint": fingerprint}
        meta_path = self.directory / _META_NAME
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())
            if stored != meta:
                raise KDUserError(
                    f"The teacher-logit cache {self.directory} was written with {stored}, but this run asks for "
                    f"{meta}. Use another cache directory or delete this one to rebuild it for the current teacher.")
        else:
            _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, sort_keys=True)))

    def path_for(self, example_id: str) -> Path:
        """File of one example (ids are hashed so any string is a safe key)."""
        digest = hashlib.sha256(str(example_id).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.safetensors"

    def __contains__(self, example_id: str) -> bool:
        return self.path_for(example_id).exists()

    def put(self, example_id: str, logits: Tensor) -> None:
        """Store the top-k of ``logits`` ``(T, V)`` (the positions of one example, padding removed)."""
        if logits.dim() != 2 or logits.shape[-1] != self.vocab_size:
            raise ValueError(f"expected ({'T'}, {self.vocab_size}) logits for one example, got {tuple(logits.shape)}")
        top = logits.detach().float().topk(self.top_k, dim=-1)
        tensors = {"values": top.values.to(torch.float16).cpu().contiguous(),
                   "indices": top.indices.to(torch.int32).cpu().contiguous()}
        metadata = {"example_id": str(example_id), "vocab_size": str(self.vocab_size)}
        _atomic_write(self.path_for(example_id), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def get(self, example_id: str) -> SparseLogits | None:
        """The stored entry as ``SparseLogits`` with ``(T, K)`` fp16 values and int32 ids, or None."""
        path = self.path_for(example_id)
        if not path.exists():
            return None
        tensors = load_file(str(path))
        return SparseLogits(tensors["values"], tensors["indices"], self.vocab_size)

    def get_batch(self, example_ids: Sequence[str], length: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> SparseLogits | None:
        """Stack entries into ``(B, length, K)`` SparseLogits (None if any id is missing).

        Positions past an example's stored length are padding: they get logit 0 on token
        ids ``0..K-1`` and -inf elsewhere, so every row is a valid distribution; their labels
        should be -100 so they do not count.
        """
        entries = [self.get(example_id) for example_id in example_ids]
        if any(entry is None for entry in entries):
            return None
        values = torch.full((len(entries), length, self.top_k), float("-inf"), dtype=dtype)
        values[..., 0] = 0.0
        indices = torch.arange(self.top_k, dtype=torch.int64).expand(len(entries), length, self.top_k).clone()
        for row, entry in enumerate(entries):
            assert entry is not None
            count = min(length, entry.values.shape[0])
            values[row, :count] = entry.values[:count].to(dtype)
            indices[row, :count] = entry.indices[:count].long()
        return SparseLogits(values.to(device), indices.to(device), self.vocab_size)

    def fetch(self, example_ids: Sequence[str], lengths: Sequence[int], length: int,
              compute: Callable[[list[int]], Tensor], device: torch.device | str = "cpu") -> SparseLogits:
        """Cached top-k for the batch, running ``compute`` only for the examples not cached yet.

        ``compute(rows)`` returns dense teacher logits ``(len(rows), length, V)`` for those batch
        rows; each row's first ``lengths[row]`` positions are stored.
        """
        missing = [row for row, example_id in enumerate(example_ids) if example_id not in self]
        if missing:
            fresh = compute(missing)
            for position, row in enumerate(missing):
                self.put(example_ids[row], fresh[position, :lengths[row]])
        result = self.get_batch(example_ids, length, device=device)
        assert result is not None
        return result
