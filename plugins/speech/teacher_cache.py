"""Teacher hidden states computed once, then read from disk (fp16 safetensors shards).

Speech distillation runs the frozen teacher on the same clips every epoch, and
every run of a sweep repeats it. :class:`CachedSpeechTeacher` wraps any speech
teacher: each utterance is keyed by a hash of its samples, every batch's misses
go through the inner teacher once and are written as one new shard, and hits are
read back. Layout::

    <cache_dir>/speech-teacher-states/<teacher hash>-<layer tag>/shard-<time>-<size>-<sha256>.safetensors

The directory is a verified, appendable cache entry (:mod:`kdcore.cache`): its ``kd-cache.json`` names the
teacher hash and layers it holds states of, and every shard is written once, atomically, named by its size and
sha256 (:func:`kdcore.cache.write_shard`), so each shard verifies itself.

* teacher hash: blake2b over the teacher's class, its ``cache_identity()`` (input
  options such as waveform normalisation) and every tensor of its state dict, so
  other weights never read these states;
* layer tag: ``all`` or the stored layers (``l4-8-12``);
* a shard holds ``<utterance hash>/<layer>`` tensors ``(frames, D)`` in float16. Its size is checked on every
  read and its sha256 once per process; a shard that fails either, or whose header cannot be read, is deleted
  (with a warning naming it) and its utterances recomputed.

Values are float16-rounded on the first pass too, so a run sees the same
targets whether or not the cache was warm. Disk use is bounded
(``max_bytes``): the least recently used shards are deleted first (reads
refresh a shard's time).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Teacher
from kdcore.cache import CacheEntryDamaged, ensure_entry, touch_shard, verify_shard, write_shard
from kdcore.signals import Signal, SignalRequest, Signals
from kd_plugins.speech.waveforms import waveform_lengths

log = logging.getLogger(__name__)

#: /2: shards named by their size and sha256 (kdcore.cache) instead of per-utterance checksums in their metadata.
CACHE_FORMAT = "kd-speech-teacher-states/2"
#: The kind of the states' cache entries (kdcore.cache), and the pattern of their shards.
STATES_KIND = "speech-teacher-states"
SHARD_PATTERN = "shard-*.safetensors"


def waveform_key(samples: torch.Tensor) -> str:
    """Stable id of one utterance: blake2b of its float32 samples (valid part only, little-endian)."""
    data = samples.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """Hash of what determines a teacher's outputs: class, ``cache_identity()`` and all state-dict tensors."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(teacher).__module__}.{type(teacher).__qualname__}".encode())
    identity = teacher.cache_identity() if hasattr(teacher, "cache_identity") else {}
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # Hash the raw bytes through the buffer protocol (no copy of a large teacher's weights).
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class CachedSpeechTeacher(Teacher):
    """A speech teacher whose hidden states are cached on disk per utterance.

    ``layers``: the teacher layers to store (None: all). With a subset, a
    request must name its layers, and exactly those are returned in order.
    ``max_bytes``: the bound on the cache directory of this teacher and layer set.
    """

    def __init__(self, teacher: Teacher, cache_dir: str | Path, layers: Sequence[int] | None = None,
                 max_bytes: int = 2 * 1024 ** 3) -> None:
        super().__init__()
        self.inner = teacher
        self.cache_root = Path(cache_dir) / "speech-teacher-states"
        self.layers: tuple[int, ...] | None = tuple(sorted(set(layers))) if layers is not None else None
        self.max_bytes = int(max_bytes)
        self._directory: Path | None = None
        self._index: dict[str, Path] = {}  # utterance key -> shard
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ passthrough for students and tasks

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.inner, "hidden_size", None)

    @property
    def directory(self) -> Path:
        """This teacher's shard directory (computing the teacher hash on first use)."""
        if self._directory is None:
            tag = "all" if self.layers is None else "l" + "-".join(map(str, self.layers))
            fingerprint = teacher_fingerprint(self.inner)
            directory = self.cache_root / f"{fingerprint[:24]}-{tag}"
            built_from = {"format": CACHE_FORMAT, "teacher_fingerprint": fingerprint, "layers": self.layers,
                          "teacher_class": type(self.inner).__name__}
            # An empty entry whose shards come as batches miss; an older or damaged one is moved aside first.
            ensure_entry(directory, STATES_KIND, built_from, lambda staging: None,
                         what="the speech teacher-state cache", shards=SHARD_PATTERN, load=lambda _: None)
            self._directory = directory
            self._load_index()
        return self._directory

    # ------------------------------------------------------------------ index

    def _load_index(self) -> None:
        assert self._directory is not None
        self._index.clear()
        for shard in sorted(self._directory.glob(SHARD_PATTERN)):  # oldest first: names start with the time
            self._add_shard(shard)

    def _add_shard(self, shard: Path) -> bool:
        try:
            verify_shard(shard)
            with safe_open(str(shard), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = list(handle.keys())
            if metadata.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}")
        except CacheEntryDamaged as damage:
            self._drop_shard(shard, damage.reason)
            return False
        except Exception as error:  # noqa: BLE001 - any unreadable shard is dropped and recomputed
            self._drop_shard(shard, f"unreadable header ({error})")
            return False
        for key in {name.split("/", 1)[0] for name in names}:
            self._index[key] = shard
        return True

    def _drop_shard(self, shard: Path, reason: str) -> None:
        log.warning("The speech teacher-state shard %s is damaged (%s): deleted; its utterances will be recomputed.",
                    shard, reason)
        for key in [key for key, value in self._index.items() if value == shard]:
            del self._index[key]
        shard.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading and writing

    def _read(self, keys: Sequence[str]) -> dict[str, dict[int, torch.Tensor]]:
        """Stored layers of the cached ``keys`` whose shards verify; missing or damaged ones are left out."""
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self._index[key], []).append(key)
        found: dict[str, dict[int, torch.Tensor]] = {}
        for shard, shard_keys in by_shard.items():
            try:
                verify_shard(shard)  # its size on every read, its sha256 once per process
                with safe_open(str(shard), framework="pt") as handle:
                    names = list(handle.keys())
                    states = {key: {int(name.split("/", 1)[1]): handle.get_tensor(name)
                                    for name in names if name.split("/", 1)[0] == key} for key in shard_keys}
            except CacheEntryDamaged as damage:
                self._drop_shard(shard, damage.reason)
                continue
            except Exception as error:  # noqa: BLE001 - e.g. a shard evicted by another process: recompute
                self._drop_shard(shard, f"unreadable ({error})")
                continue
            touch_shard(shard)  # least-recently-used eviction
            found.update(states)
        return found

    def _write(self, states: dict[str, dict[int, torch.Tensor]]) -> None:
        tensors = {f"{key}/{layer}": tensor for key, layers in states.items() for layer, tensor in layers.items()}
        shard = write_shard(self.directory, "shard", ".safetensors", save(tensors, metadata={"format": CACHE_FORMAT}))
        for key in states:
            self._index[key] = shard
        self._evict(keep=shard)

    def _evict(self, keep: Path) -> None:
        shards = sorted(self.directory.glob(SHARD_PATTERN), key=lambda path: path.stat().st_mtime)
        total = sum(shard.stat().st_size for shard in shards)
        for oldest in shards:
            if total <= self.max_bytes:
                break
            if oldest == keep:  # the batch just written stays (its states are being returned)
                continue
            total -= oldest.stat().st_size
            for key in [key for key, value in self._index.items() if value == oldest]:
                del self._index[key]
            oldest.unlink(missing_ok=True)
            log.info("teacher cache over %.2f GB: evicted %s", self.max_bytes / 1024 ** 3, oldest.name)

    def _compute(self, batch: Batch, rows: Sequence[int], keys: Sequence[str], lengths: torch.Tensor
                 ) -> dict[str, dict[int, torch.Tensor]]:
        """Run the inner teacher on the utterances in ``rows`` and store their (float16) states."""
        index = torch.tensor(rows)
        sub_lengths = lengths[index]
        waveform = batch["waveform"][index.to(batch["waveform"].device), :int(sub_lengths.max())]
        request = SignalRequest(frozenset({Signal.HIDDEN_STATES}), self.layers)
        signals = self.inner.signals({"waveform": waveform, "waveform_lengths": sub_lengths}, request)
        hidden = signals.hidden_states
        if not hidden:
            raise KDUserError(f"The teacher {type(self.inner).__name__} returned no hidden states; only speech "
                              f"teachers that expose hidden layers can be cached.")
        if self.layers is None:
            layer_ids = list(range(len(hidden)))
        elif len(hidden) > max(self.layers):  # the teacher returned every layer: keep the chosen ones
            layer_ids, hidden = list(self.layers), tuple(hidden[layer] for layer in self.layers)
        elif len(hidden) == len(self.layers):
            layer_ids = list(self.layers)
        else:
            raise KDUserError(f"teacher.args.cache_layers {list(self.layers)} name layers the teacher does not have "
                              f"(it returned {len(hidden)} hidden states).")
        frame_mask = signals.extra.get("frame_mask")
        frames = frame_mask.sum(1).cpu() if frame_mask is not None else \
            torch.full((len(rows),), hidden[0].shape[1], dtype=torch.long)
        computed = {key: {layer: state[position, :int(frames[position])].detach().to("cpu", torch.float16)
                          .contiguous() for layer, state in zip(layer_ids, hidden)}
                    for position, key in enumerate(keys)}
        self._write(computed)
        return computed

    # ------------------------------------------------------------------ the teacher interface

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        waveform = batch["waveform"]
        lengths = waveform_lengths(waveform, batch.get("waveform_lengths"))
        samples = waveform.detach().to("cpu", torch.float32)  # one device-to-host copy for all the hashes
        keys = [waveform_key(samples[row, :int(length)]) for row, length in enumerate(lengths)]
        _ = self.directory  # computes the teacher hash and reads the index on first use
        unique = list(dict.fromkeys(keys))
        found = self._read([key for key in unique if key in self._index])
        missing = [key for key in unique if key not in found]
        self.hits += sum(key in found for key in keys)
        self.misses += len(keys) - sum(key in found for key in keys)
        if missing:
            found.update(self._compute(batch, [keys.index(key) for key in missing], missing, lengths))
        return self._assemble([found[key] for key in keys], self._output_layers(request, found[keys[0]]),
                              waveform.device)

    def _output_layers(self, request: SignalRequest, stored: dict[int, torch.Tensor]) -> list[int]:
        if self.layers is None:
            return sorted(stored)  # every layer, index = layer number (the speech teacher contract)
        if request.hidden_layers is None:
            raise KDUserError(f"The teacher cache stores only layers {list(self.layers)} (teacher.args.cache_layers), "
                              f"but the method asked for all hidden layers; set cache_layers: null.")
        missing = sorted(set(request.hidden_layers) - set(self.layers))
        if missing:
            raise KDUserError(f"The method asks the teacher for layers {list(request.hidden_layers)}, but the "
                              f"teacher cache stores only {list(self.layers)} (teacher.args.cache_layers); add "
                              f"{missing} or set cache_layers: null.")
        return list(request.hidden_layers)  # exactly the requested layers, in order

    @staticmethod
    def _assemble(states: Sequence[dict[int, torch.Tensor]], layer_ids: Sequence[int],
                  device: torch.device) -> Signals:
        frames = torch.tensor([next(iter(utterance.values())).shape[0] for utterance in states])
        max_frames = int(frames.max())
        layers = []
        for layer in layer_ids:
            padded = torch.zeros(len(states), max_frames, states[0][layer].shape[-1])
            for row, utterance in enumerate(states):
                padded[row, :utterance[layer].shape[0]] = utterance[layer].float()
            layers.append(padded.to(device))
        mask = torch.arange(max_frames)[None, :] < frames[:, None]
        return Signals(hidden_states=tuple(layers), extra={"frame_mask": mask.to(device)})

    def cache_identity(self) -> dict[str, Any]:
        return {"inner": teacher_fingerprint(self.inner), "layers": self.layers}


__all__ = ["CACHE_FORMAT", "STATES_KIND", "CachedSpeechTeacher", "teacher_fingerprint", "waveform_key"]
