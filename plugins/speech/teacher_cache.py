"""Teacher hidden states computed once, then read from disk: the speech teachers' run-time store.

Speech distillation runs the frozen teacher on the same clips every epoch, and every run of a sweep repeats it.
:class:`CachedSpeechTeacher` wraps any speech teacher: each utterance is keyed by a hash of its samples, every
batch's misses go through the inner teacher once and are written as one new shard, and hits are read back. It is
an appendable teacher store (:class:`kdcore.teacher_shards.AppendableStore`): the same shard format, reader and
invalidation rule as ``kd teacher capture``'s stores, kept in the kd cache::

    <cache_dir>/speech-teacher-states/<identity hash>-<layer tag>/shard-<time>-<size>-<sha256>.safetensors

* identity: the teacher's weights sha256, class and ``cache_identity()`` (input options such as waveform
  normalisation) and the stored layers, recorded in the entry's ``kd-cache.json``, so other weights, options or
  layers never read these states; layer tag: ``all`` or the stored layers (``l4-8-12``);
* a shard holds the ``hidden_states`` signal of a batch's new utterances, ``(frames, layers, D)`` float16 per
  utterance. Its size is checked on every read and its sha256 once per process; a shard that fails either, or
  whose header cannot be read, is deleted (with a warning naming it) and its utterances recomputed.

Values are float16-rounded on the first pass too, so a run sees the same targets whether or not the cache was
warm. Disk use is bounded (``max_bytes``): the least recently used shards are deleted first (reads refresh a
shard's time).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdcore.interfaces import Batch, Teacher
from kdcore.provenance import weights_sha256
from kdcore.signals import Signal, SignalRequest, Signals
from kdcore.teacher_shards import (
    AppendableStore, batch_keys, hidden_state_signals, identity_name, per_example_states, served_layers,
)
from kd_plugins.speech.waveforms import waveform_lengths

#: /3: the shards are teacher-store signal shards (kdcore.teacher_shards); /2 named its own per-layer tensors.
CACHE_FORMAT = "kd-speech-teacher-states/3"
#: The kind of the states' cache entries (kdcore.cache).
STATES_KIND = "speech-teacher-states"


def teacher_identity(teacher: torch.nn.Module) -> dict[str, Any]:
    """What determines a teacher's outputs: its class, ``cache_identity()`` and weights sha256."""
    return {"teacher_class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
            "teacher_options": teacher.cache_identity() if hasattr(teacher, "cache_identity") else {},
            "teacher_sha256": weights_sha256(teacher)}


class CachedSpeechTeacher(Teacher):
    """A speech teacher whose hidden states are stored on disk per utterance.

    ``layers``: the teacher layers to store (None: all). With a subset, a request must name its layers, and
    exactly those are returned in order. ``max_bytes``: the bound on the store of this teacher and layer set.
    """

    def __init__(self, teacher: Teacher, cache_dir: str | Path, layers: Sequence[int] | None = None,
                 max_bytes: int = 2 * 1024 ** 3) -> None:
        super().__init__()
        self.inner = teacher
        self.cache_root = Path(cache_dir) / "speech-teacher-states"
        self.layers: tuple[int, ...] | None = tuple(sorted(set(layers))) if layers is not None else None
        self.max_bytes = int(max_bytes)
        self._store: AppendableStore | None = None
        self.hits = 0
        self.misses = 0

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.inner, "hidden_size", None)

    @property
    def store(self) -> AppendableStore:
        """This teacher's store of states (the teacher's weights are hashed on first use)."""
        if self._store is None:
            tag = "all" if self.layers is None else "l" + "-".join(map(str, self.layers))
            identity = {"format": CACHE_FORMAT, **teacher_identity(self.inner), "layers": self.layers}
            self._store = AppendableStore(self.cache_root / f"{identity_name(identity)}-{tag}", STATES_KIND,
                                          identity, what="the speech teacher-state cache",
                                          label="speech teacher-state shard", examples_label="utterances",
                                          max_bytes=self.max_bytes)
        return self._store

    @property
    def directory(self) -> Path:
        """This teacher's shard directory."""
        return self.store.directory

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        waveform = batch["waveform"]
        lengths = waveform_lengths(waveform, batch.get("waveform_lengths"))
        keys = batch_keys({"waveform": waveform, "waveform_lengths": lengths})  # the content: key and digest alike
        unique = list(dict.fromkeys(keys))
        found = {key: example["hidden_states"] for key, example in self.store.lookup(unique, unique).items()}
        missing = [key for key in unique if key not in found]
        self.hits += sum(key in found for key in keys)
        self.misses += sum(key not in found for key in keys)
        if missing:
            found.update(self._compute(batch, [keys.index(key) for key in missing], missing, lengths))
        states = [found[key] for key in keys]
        positions = served_layers(self.layers, int(states[0].shape[1]), request, "teacher cache",
                                  "teacher.args.cache_layers")
        return hidden_state_signals(states, positions, waveform.device)

    def _compute(self, batch: Batch, rows: Sequence[int], keys: Sequence[str], lengths: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        """Run the inner teacher on the utterances in ``rows`` and store their (float16) states."""
        index = torch.tensor(rows)
        sub_lengths = lengths[index]
        waveform = batch["waveform"][index.to(batch["waveform"].device), :int(sub_lengths.max())]
        request = SignalRequest(frozenset({Signal.HIDDEN_STATES}), self.layers)
        signals = self.inner.signals({"waveform": waveform, "waveform_lengths": sub_lengths}, request)
        states = per_example_states(signals, self.layers, "teacher.args.cache_layers", torch.float16)
        self.store.append(keys, keys, [{"hidden_states": state} for state in states])
        return dict(zip(keys, states))

    def cache_identity(self) -> dict[str, Any]:
        return {"inner": teacher_identity(self.inner), "layers": self.layers}


__all__ = ["CACHE_FORMAT", "STATES_KIND", "CachedSpeechTeacher", "teacher_identity"]
