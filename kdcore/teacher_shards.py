"""Teacher outputs on disk: one shard format, one reader and one invalidation rule for every place kd keeps them.

Three things keep a teacher's outputs: ``kd teacher capture``'s stores (:mod:`kdcore.teacher_store`), and the two
run-time caches filled while training, the speech teachers' hidden states
(:class:`kd_plugins.speech.teacher_cache.CachedSpeechTeacher`) and seq-kd's beam outputs
(:class:`kd_plugins.text.baselines.SeqKDCache`). All three write and read *signal shards* through this module.

A shard is a safetensors file of some examples' signals. Each signal tensor is the examples' tensors concatenated
along their first (position, frame or token) axis, with its own ``<name>.offsets`` ``(n + 1,)`` int64: example ``i``
is rows ``offsets[i]:offsets[i + 1]``. The names kd writes::

    values, indices      (P, k)     the logits signal: the k largest logits per target position and their ids
    tail_log_mass        (P,)       ... and the log of the probability outside them
    logits               (P, V)     ... every logit (stores captured with --full-logits)
    hidden_states        (T, L, D)  the hidden-states signal: one row per frame, the stored layers on axis 1
    sequences            (N,)       the sequences signal: the teacher's output tokens (int32)

The header's metadata entry ``kd-teacher-shard`` holds, as JSON, the ``format`` and the ``keys`` and ``digests``
of the examples (one each, in order).

**The invalidation rule** (the same for captured stores and run-time caches):

1. *What* the outputs are of (the teacher's weights sha256 and options, the signal settings) names the store; a
   teacher or setting that differs reads another store (run-time caches keep one entry per identity) or is
   refused (a captured store is checked against the run at planning).
2. An example is found by its *key* (:func:`batch_keys`): the batch's ``ids`` where the task names its examples
   (text), else the hash of the waveform the teacher reads (speech batches carry no ids; the key is then the
   content itself). Each stored example carries the *digest* of what the teacher read; a stored example whose
   digest differs from the current one is not used (a run-time cache computes it again; a captured store is
   refused at planning).
3. A shard is read only after its size and sha256 match a trusted record (the store's manifest, or the shard's
   own name in a cache entry, :func:`kdcore.cache.write_shard`). A damaged shard is refused naming it (a captured
   store cannot recompute it) or deleted with a warning and its examples computed again (a run-time cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from kdcore.cache import CacheEntryDamaged, ensure_entry, touch_shard, verify_shard, write_shard
from kdcore.errors import KDUserError
from kdcore.signals import Signal, SignalRequest, Signals, SparseLogits

log = logging.getLogger(__name__)

#: The format of a shard's header, and the metadata entry that holds it (JSON: format, keys, digests).
SHARD_FORMAT = "kd-teacher-shard/1"
HEADER_KEY = "kd-teacher-shard"
#: The shards of a run-time cache entry (named by :func:`kdcore.cache.write_shard`).
SHARD_PATTERN = "shard-*.safetensors"
#: The tensors of each signal in a shard (the logits signal's full ``logits`` only where captured).
SIGNAL_TENSORS: dict[str, tuple[str, ...]] = {
    Signal.LOGITS.value: ("values", "indices", "tail_log_mass"),
    Signal.HIDDEN_STATES.value: ("hidden_states",),
    Signal.SEQUENCES.value: ("sequences",),
}
#: Where speech teachers put the mask of each utterance's frames in their :class:`Signals` (``extra``).
FRAME_MASK = "frame_mask"


# ----------------------------------------------------------------------------------------------- keys and digests


def content_key(samples: torch.Tensor) -> str:
    """Key of an example that has no id: blake2b of its float32 samples (little-endian)."""
    data = samples.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _waveform_of(item: Any) -> torch.Tensor | None:
    waveform = item.get("waveform") if isinstance(item, Mapping) else getattr(item, "waveform", None)
    return None if waveform is None else torch.as_tensor(waveform, dtype=torch.float32)


def example_key(item: Any, index: int) -> str:
    """The key of one dataset item, as :func:`batch_keys` gives it for the item's batch row: its ``id``, else the
    hash of its waveform, else its position in the split."""
    if isinstance(item, Mapping) and "id" in item:
        return str(item["id"])
    waveform = _waveform_of(item)
    return content_key(waveform) if waveform is not None else str(index)


def batch_keys(batch: Mapping[str, Any]) -> list[str]:
    """The keys of a batch's examples: its ``ids``, else the hash of each row's waveform (up to its length)."""
    if "ids" in batch:
        return [str(identifier) for identifier in batch["ids"]]
    waveform = batch.get("waveform")
    if isinstance(waveform, torch.Tensor):
        lengths = batch.get("waveform_lengths")
        samples = waveform.detach().to("cpu", torch.float32)  # one device-to-host copy for all the hashes
        ends = [samples.shape[1]] * samples.shape[0] if lengths is None else [int(n) for n in lengths]
        return [content_key(samples[row, :end]) for row, end in enumerate(ends)]
    raise KDUserError(f"Teacher outputs on disk are looked up by the batch key 'ids' (text tasks) or by the hash of "
                      f"the batch's 'waveform' (speech); this task's batches have {sorted(batch)}.")


def _digest_value(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"tensor:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value):
            digest.update(f"{key}\0".encode())
            _digest_value(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}\0".encode())
        for element in value:
            _digest_value(digest, element)
    else:
        digest.update(json.dumps(value, ensure_ascii=False, default=str).encode())
        digest.update(b"\0")


def example_digest(item: Any) -> str:
    """sha256 of what the teacher reads of one example: the item as the task prepared it (token ids, texts), or,
    for an item with a waveform and no id (speech), its waveform's key."""
    if not (isinstance(item, Mapping) and "id" in item):
        waveform = _waveform_of(item)
        if waveform is not None:
            return content_key(waveform)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        item = {field.name: getattr(item, field.name) for field in dataclasses.fields(item)}
    digest = hashlib.sha256()
    _digest_value(digest, item)
    return digest.hexdigest()


def split_examples(items: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Keys and digests of a split's examples, in order. A key given to two different examples is refused (the
    stores are keyed by it); the same content twice (two equal waveforms) shares its key."""
    keys = [example_key(item, index) for index, item in enumerate(items)]
    digests = [example_digest(item) for item in items]
    seen: dict[str, str] = {}
    for key, digest in zip(keys, digests):
        if seen.setdefault(key, digest) != digest:
            raise KDUserError(f"Teacher outputs on disk are keyed by each example's id, but the split has the id "
                              f"{key!r} on two different examples. Give every example a unique 'id' in the data "
                              f"files.")
    return keys, digests


# ----------------------------------------------------------------------------------------------- the shard format


def encode_shard(keys: Sequence[str], digests: Sequence[str],
                 examples: Sequence[Mapping[str, torch.Tensor]]) -> bytes:
    """The bytes of a shard holding ``examples`` (each a dict of signal tensors with the same names)."""
    if not examples or len(keys) != len(examples) or len(digests) != len(examples):
        raise ValueError(f"a shard needs one key and digest per example: {len(keys)} keys, {len(digests)} digests, "
                         f"{len(examples)} examples")
    names = list(examples[0])
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [example[name] for example in examples]
        lengths = torch.tensor([0, *(int(part.shape[0]) for part in parts)], dtype=torch.int64)
        tensors[name] = torch.cat(parts).contiguous()
        tensors[f"{name}.offsets"] = lengths.cumsum(0)
    # One metadata entry: safetensors writes several in an order that changes from process to process, and a
    # shard must have the same bytes whoever computes it (resumed and parallel captures).
    header = {"format": SHARD_FORMAT, "keys": list(keys), "digests": list(digests)}
    return save_safetensors(tensors, metadata={HEADER_KEY: json.dumps(header)})


class Shard:
    """One shard: its examples' keys and digests (from its header) and its rows, read on demand.

    ``legacy``: the keys and digests of a shard written before headers carried them (a teacher store of format
    ``kd-teacher-store/1``, whose tensors share one ``offsets``).
    """

    def __init__(self, path: Path, keys: list[str], digests: list[str], names: list[str]) -> None:
        self.path = Path(path)
        self.keys = keys
        self.digests = digests
        self.names = names
        self._offsets: dict[str, torch.Tensor] = {}

    @classmethod
    def open(cls, path: Path, legacy: tuple[list[str], list[str]] | None = None) -> "Shard":
        """Read a shard's header; ``ValueError`` (or safetensors' own error) when it is not a readable shard."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = [name for name in handle.keys() if not name.endswith("offsets")]
        header = json.loads(metadata[HEADER_KEY]) if HEADER_KEY in metadata else {}
        if header.get("format") == SHARD_FORMAT:
            keys, digests = header["keys"], header["digests"]
        elif legacy is not None:
            keys, digests = list(legacy[0]), list(legacy[1])
        else:
            raise ValueError(f"its header says format {header.get('format')!r}, not {SHARD_FORMAT!r}")
        if len(keys) != len(digests):
            raise ValueError(f"its header has {len(keys)} keys and {len(digests)} digests")
        return cls(Path(path), [str(key) for key in keys], [str(digest) for digest in digests], names)

    def read(self, rows: Sequence[int], names: Iterable[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """The tensors of the examples at ``rows`` (all signals, or only ``names``)."""
        wanted = list(self.names if names is None else names)
        loaded = _loaded_tensors(self.path)
        if loaded is not None:
            return [{name: loaded[name][_rows(loaded, name, row)] for name in wanted} for row in rows]
        examples: list[dict[str, torch.Tensor]] = [{} for _ in rows]
        with safe_open(str(self.path), framework="pt") as handle:
            present = set(handle.keys())
            for name in wanted:
                if name not in self._offsets:
                    own = f"{name}.offsets"
                    self._offsets[name] = handle.get_tensor(own if own in present else "offsets")
                offsets = self._offsets[name]
                tensor = handle.get_slice(name)
                for example, row in zip(examples, rows):
                    example[name] = tensor[int(offsets[row]):int(offsets[row + 1])]
        return examples


#: Shards up to this size are read whole and kept in memory (reading rows one by one costs more per row than
#: reading a small shard whole); larger ones (hidden states of long clips) are read row by row.
WHOLE_SHARD_BYTES = 64 << 20
#: The memory the kept shards may take in one process; the least recently used are let go first.
KEPT_SHARD_BYTES = 512 << 20
_kept: OrderedDict[tuple[str, int, int], dict[str, torch.Tensor]] = OrderedDict()


def _loaded_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor of a small shard, from memory or read now (None for a large shard)."""
    stat = path.stat()
    if stat.st_size > WHOLE_SHARD_BYTES:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _kept:
        _kept.move_to_end(key)
        return _kept[key]
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    _kept[key] = tensors
    total = sum(sum(t.nbytes for t in kept.values()) for kept in _kept.values())
    while total > KEPT_SHARD_BYTES and len(_kept) > 1:
        _, dropped = _kept.popitem(last=False)
        total -= sum(t.nbytes for t in dropped.values())
    return tensors


def _rows(tensors: Mapping[str, torch.Tensor], name: str, row: int) -> slice:
    offsets = tensors.get(f"{name}.offsets", tensors.get("offsets"))
    assert offsets is not None
    return slice(int(offsets[row]), int(offsets[row + 1]))


# ----------------------------------------------------------------------------------------------- logits


def sparse_logits_batch(examples: Sequence[Mapping[str, torch.Tensor]], width: int, vocab_size: int,
                        temperature: float, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> SparseLogits:
    """Stored top-k logits of a batch (``values``, ``indices``, ``tail_log_mass`` per example) as ``(B, width, k)``
    :class:`SparseLogits`; positions past an example's stored length hold a valid filler distribution (logit 0 on
    ids ``0..k-1``, no tail; their labels are -100)."""
    k = int(examples[0]["values"].shape[-1])
    values = torch.full((len(examples), width, k), float("-inf"), dtype=dtype)
    values[..., 0] = 0.0
    indices = torch.arange(k, dtype=torch.int64).expand(len(examples), width, k).clone()
    tail = torch.full((len(examples), width), float("-inf"), dtype=torch.float32)
    for row, example in enumerate(examples):
        count = min(width, int(example["values"].shape[0]))
        values[row, :count] = example["values"][:count].to(dtype)
        indices[row, :count] = example["indices"][:count].long()
        tail[row, :count] = example["tail_log_mass"][:count]
    return SparseLogits(values.to(device), indices.to(device), vocab_size, tail_log_mass=tail.to(device),
                        tail_temperature=temperature)


# ----------------------------------------------------------------------------------------------- hidden states


def select_layers(hidden: Sequence[torch.Tensor], layers: Sequence[int] | None, what: str) -> list[torch.Tensor]:
    """The hidden states of ``layers`` (None: all) from a speech teacher's answer, which holds either every layer
    (index = layer number) or exactly the requested ones, in order."""
    if layers is None:
        return list(hidden)
    if len(hidden) > max(layers):
        return [hidden[layer] for layer in layers]
    if len(hidden) == len(layers):
        return list(hidden)
    raise KDUserError(f"{what} {list(layers)} name layers the teacher does not have (it returned {len(hidden)} "
                      f"hidden states, layer 0 = pre-transformer features).")


def per_example_states(signals: Signals, layers: Sequence[int] | None, what: str,
                       dtype: torch.dtype) -> list[torch.Tensor]:
    """A speech teacher's answer cut into one ``(frames, layers, D)`` tensor per example, on the CPU in ``dtype``:
    each example keeps its own frames (the teacher's frame mask)."""
    hidden = signals.hidden_states
    if not hidden:
        raise KDUserError("The teacher returned no hidden states; only teachers that expose their hidden layers "
                          "(the speech teachers) can store them.")
    stacked = torch.stack(select_layers(hidden, layers, what), dim=2)  # (B, T, L, D)
    mask = signals.extra.get(FRAME_MASK)
    frames = mask.sum(1).cpu() if mask is not None else torch.full((stacked.shape[0],), stacked.shape[1])
    return [stacked[row, :int(frames[row])].detach().to("cpu", dtype).contiguous()
            for row in range(stacked.shape[0])]


def served_layers(stored: Sequence[int] | None, count: int, request: SignalRequest, where: str,
                  choice: str) -> list[int]:
    """Positions on the stored layer axis that answer ``request``: every stored layer when all were stored (the
    speech teachers' contract: index = layer number), else exactly the requested ones, in order. ``where`` names
    the stored states and ``choice`` the setting that chose their layers, for the refusal."""
    if stored is None:
        return list(range(count))
    if request.hidden_layers is None:
        raise KDUserError(f"The {where} stores only layers {list(stored)} ({choice}), but the method asked for all "
                          f"hidden layers; store all of them.")
    missing = sorted(set(request.hidden_layers) - set(stored))
    if missing:
        raise KDUserError(f"The method asks the teacher for layers {list(request.hidden_layers)}, but the {where} "
                          f"stores only {list(stored)} ({choice}); add {missing} there, or store all layers.")
    return [list(stored).index(layer) for layer in request.hidden_layers]


def hidden_state_signals(examples: Sequence[torch.Tensor], positions: Sequence[int],
                         device: torch.device | str) -> Signals:
    """Stored ``(frames, layers, D)`` states of a batch as a speech teacher answers: one ``(B, frames, D)`` float32
    tensor per layer position, zero after each example's frames, and the frame mask."""
    frames = torch.tensor([int(example.shape[0]) for example in examples])
    width = int(frames.max()) if len(examples) else 0
    chosen = torch.tensor(list(positions), dtype=torch.long)
    padded = torch.zeros(len(examples), width, len(chosen), int(examples[0].shape[-1]))
    for row, example in enumerate(examples):
        padded[row, :example.shape[0]] = example.index_select(1, chosen).float()
    padded = padded.to(device)
    mask = torch.arange(width)[None, :] < frames[:, None]
    return Signals(hidden_states=tuple(padded.unbind(2)), extra={FRAME_MASK: mask.to(device)})


# ----------------------------------------------------------------------------------------------- run-time caches


def identity_name(identity: Mapping[str, Any], length: int = 24) -> str:
    """A directory name for a store's identity: the start of the sha256 of its JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:length]


class AppendableStore:
    """Teacher outputs computed on first use and kept for later epochs and runs: a verified, appendable kd cache
    entry (:mod:`kdcore.cache`) whose shards are signal shards named by their size and sha256.

    ``built_from`` is the store's identity (rule 1 above): an entry at ``directory`` built from anything else is
    replaced. ``max_bytes`` bounds the shards' disk use (the least recently used are deleted first; reads refresh
    a shard). ``label`` and ``examples_label`` name the shards and their examples in the warning about a damaged
    shard (e.g. "speech teacher-state shard", "utterances").
    """

    def __init__(self, directory: Path, kind: str, built_from: Mapping[str, Any], *, what: str, label: str,
                 examples_label: str, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.label = label
        self.examples_label = examples_label
        # An empty entry whose shards come as examples miss; an older or damaged one is moved aside first.
        ensure_entry(self.directory, kind, built_from, lambda staging: None, what=what, shards=SHARD_PATTERN,
                     load=lambda _: None)
        self._index: dict[str, tuple[Shard, int]] = {}
        for path in sorted(self.directory.glob(SHARD_PATTERN)):  # oldest first (names start with the time): the
            self._add(path)                                       # newest copy of a key wins

    def _add(self, path: Path) -> Shard | None:
        try:
            verify_shard(path)
            shard = Shard.open(path)
        except CacheEntryDamaged as damage:
            self._drop(path, damage.reason)
            return None
        except Exception as error:  # noqa: BLE001 - any unreadable header: the shard is dropped and recomputed
            self._drop(path, f"unreadable header ({error})")
            return None
        for row, key in enumerate(shard.keys):
            self._index[key] = (shard, row)
        return shard

    def _forget(self, path: Path) -> None:
        for key in [key for key, (shard, _) in self._index.items() if shard.path == path]:
            del self._index[key]

    def _drop(self, path: Path, reason: str) -> None:
        log.warning("The %s %s is damaged (%s): deleted; its %s will be computed again.", self.label, path, reason,
                    self.examples_label)
        self._forget(path)
        path.unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def lookup(self, keys: Sequence[str], digests: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The stored signals of those ``keys`` whose stored digest equals the given one and whose shard verifies;
        the others are missing from the answer (compute them and :meth:`append` them)."""
        by_shard: dict[Path, tuple[Shard, list[tuple[str, int]]]] = {}
        for key, digest in zip(keys, digests):
            found = self._index.get(key)
            if found is not None and found[0].digests[found[1]] == digest:
                by_shard.setdefault(found[0].path, (found[0], []))[1].append((key, found[1]))
        answer: dict[str, dict[str, torch.Tensor]] = {}
        for path, (shard, wanted) in by_shard.items():
            try:
                verify_shard(path)  # its size on every read, its sha256 once per process
                examples = shard.read([row for _, row in wanted])
            except CacheEntryDamaged as damage:
                self._drop(path, damage.reason)
                continue
            except Exception as error:  # noqa: BLE001 - e.g. a shard another process evicted: compute again
                self._drop(path, f"unreadable ({error})")
                continue
            touch_shard(path)  # least-recently-used eviction
            answer.update({key: example for (key, _), example in zip(wanted, examples)})
        return answer

    def append(self, keys: Sequence[str], digests: Sequence[str],
               examples: Sequence[Mapping[str, torch.Tensor]]) -> Path:
        """Write ``examples`` as one new shard (then evict the least recently used ones over ``max_bytes``)."""
        path = write_shard(self.directory, "shard", ".safetensors", encode_shard(keys, digests, examples))
        self._add(path)
        if self.max_bytes is not None:
            self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        assert self.max_bytes is not None
        shards = sorted(self.directory.glob(SHARD_PATTERN), key=lambda path: path.stat().st_mtime)
        total = sum(shard.stat().st_size for shard in shards)
        for oldest in shards:
            if total <= self.max_bytes:
                break
            if oldest == keep:  # the examples just written stay (they are being returned)
                continue
            total -= oldest.stat().st_size
            self._forget(oldest)
            oldest.unlink(missing_ok=True)
            log.info("%s over %.2f GB: evicted %s", self.label, self.max_bytes / 1024 ** 3, oldest.name)


__all__ = ["AppendableStore", "FRAME_MASK", "SHARD_FORMAT", "SHARD_PATTERN", "SIGNAL_TENSORS", "Shard", "batch_keys",
           "content_key", "encode_shard", "example_digest", "example_key", "hidden_state_signals", "identity_name",
           "per_example_states", "select_layers", "served_layers", "sparse_logits_batch", "split_examples"]
