"""The teacher store: a teacher's signals on a task's data, captured once and streamed by every run that learns from
it (``kd teacher capture``, then ``teacher: store``).

Layout of a store directory (docs/teacher-store.md)::

    capture.json                    what is captured: teacher and data fingerprints, settings, shard plan
    shard-00000-of-00004.safetensors
                                    the signals of examples j*S .. (j+1)*S-1 in the signal-shard format
                                    (kdcore.teacher_shards): per signal, its tensor concatenated along the
                                    position/frame axis with ``<name>.offsets``; the examples' keys and digests
        values, indices (P, k), tail_log_mass (P,)   logits: top-k and the log tail mass (temperature t)
        logits          (P, V)                       every logit (only with --full-logits)
        hidden_states   (T, L, D)                    hidden states: the stored layers of each frame
        sequences       (N,) int32                   sequences: the teacher's beam-search outputs
    shard-00000-of-00004.json       receipt: the shard's size and sha256
    kd-store.json                   the manifest, written last: every shard with its size and sha256
    teacher-metrics.json            the teacher's test scores (unless --no-evaluate), reported by runs from it

Why this shape: a shard is the unit of work and of resumption. Shard ``j`` holds examples ``j*S .. (j+1)*S-1`` of
the split in the task's order, so any process can compute any shard, a capture killed with SIGKILL restarts at the
first shard without a receipt, several processes (``--shard i/n`` or torchrun ranks) fill disjoint shards of one
store, and whichever finds every receipt present writes the manifest. Every file is written to a temporary name
and renamed into place, and no file carries a time stamp, so an interrupted and an uninterrupted capture leave the
same bytes. The store's identity (``store_id``) is the sha256 of the teacher's weight fingerprint, its config, the
data fingerprint of the split and the capture settings: a store is refused by a run whose data differ and by a
capture that would write other signals into it. The run-time caches (speech teacher states, seq-kd's outputs) use
the same shards, reader and invalidation rule (:mod:`kdcore.teacher_shards`).

Top-k values with the log tail mass (:meth:`kdcore.signals.SparseLogits.from_dense`) keep the teacher a proper
distribution: the divergences treat the tail as one more outcome (docs/objectives.md, "Sparse (top-k) teachers").
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.batches import move_to_device
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, BuildContext, ModelFactory, Teacher
from kdcore.io import atomic_write_bytes, atomic_write_json, sha256_file
from kdcore.progress import Progress
from kdcore.provenance import weights_sha256
from kdcore.signals import (
    IGNORE_INDEX, OPTIONAL_SIGNALS, Signal, SignalRequest, Signals, SparseLogits, next_token_aligned,
)
from kdcore.teacher_shards import (
    Shard, batch_keys, encode_shard, example_digest, hidden_state_signals, per_example_states, served_layers,
    sparse_logits_batch, split_examples,
)

log = logging.getLogger(__name__)

#: /2: any named signals (logits, hidden states, sequences) in the signal-shard format, each tensor with its own
#: offsets and the examples' keys in the shard's header. Stores of /1 (logits only) are still read.
STORE_FORMAT = "kd-teacher-store/2"
READABLE_FORMATS = ("kd-teacher-store/1", STORE_FORMAT)
CAPTURE_FILE = "capture.json"
MANIFEST_FILE = "kd-store.json"
METRICS_FILE = "teacher-metrics.json"
VALUE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}
#: The signals a store can hold, in the order they are computed.
STORE_SIGNALS: tuple[str, ...] = (Signal.LOGITS.value, Signal.HIDDEN_STATES.value, Signal.SEQUENCES.value)

#: What makes a teacher's output sequences for ``kd teacher capture --signals sequences``: a method class (seq-kd)
#: with a ``decode_teacher_sequences(teacher, method_config, batch) -> list[list[int]]`` classmethod and a
#: ``decoding_settings(method_config) -> dict`` one (recorded in the store, compared by the method at planning).
SequenceDecoder = Callable[[Teacher, Batch], list[list[int]]]


def teacher_fingerprint(teacher: Teacher) -> str:
    """The weights' sha256 (the teacher's own fingerprint when it has one, e.g. a stored teacher's)."""
    own = getattr(teacher, "store_teacher_fingerprint", None)
    return str(own) if own else weights_sha256(teacher)


def data_fingerprint(keys: Sequence[str], digests: Sequence[str]) -> str:
    """sha256 over the split's (key, digest) pairs in order."""
    digest = hashlib.sha256()
    for key, item_digest in zip(keys, digests):
        digest.update(f"{key}\0{item_digest}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CaptureSettings:
    """What a capture writes (part of the store's identity)."""

    split: str = "train"
    signals: tuple[str, ...] = (Signal.LOGITS.value,)
    top_k: int = 64
    values_dtype: str = "float16"  # of the logits' values and of the hidden states
    full_logits: bool = False
    temperature: float = 1.0  # of the tail log-mass
    shard_examples: int = 512
    layers: tuple[int, ...] | None = None  # hidden-state layers kept (None: all)
    sequences: Mapping[str, Any] | None = None  # the decoding settings of captured sequences

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CaptureSettings":
        """Settings as a manifest records them (a store of format /1 has logits only)."""
        values = dict(data)
        values["signals"] = tuple(values.get("signals") or (Signal.LOGITS.value,))
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def check(self) -> None:
        unknown = [signal for signal in self.signals if signal not in STORE_SIGNALS]
        if unknown or not self.signals or len(set(self.signals)) != len(self.signals):
            raise KDUserError(f"kd teacher capture: --signals must be a comma list of distinct signals among "
                              f"{', '.join(STORE_SIGNALS)}, got {','.join(self.signals) or 'none'}.")
        if self.top_k < 1:
            raise KDUserError(f"kd teacher capture: --top-k must be at least 1, got {self.top_k}.")
        if self.values_dtype not in VALUE_DTYPES:
            raise KDUserError(f"kd teacher capture: --dtype must be one of {', '.join(VALUE_DTYPES)}, got "
                              f"{self.values_dtype!r}.")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise KDUserError(f"kd teacher capture: --temperature must be a positive number, got {self.temperature}.")
        if self.shard_examples < 1:
            raise KDUserError(f"kd teacher capture: --shard-examples must be at least 1, got {self.shard_examples}.")
        if self.layers is not None:
            if Signal.HIDDEN_STATES.value not in self.signals:
                raise KDUserError("kd teacher capture: --layers chooses hidden-state layers, but --signals does not "
                                  "include hidden_states.")
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
                raise KDUserError(f"kd teacher capture: --layers must be distinct, increasing layer numbers (0 = "
                                  f"the pre-transformer features), got {','.join(map(str, self.layers))}.")
        if (self.sequences is not None) != (Signal.SEQUENCES.value in self.signals):
            raise ValueError("decoding settings are recorded exactly when sequences are captured")

    def has(self, signal: Signal | str) -> bool:
        return Signal(signal).value in self.signals


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def _store_id(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- capture


def scored_length(labels: torch.Tensor) -> int:
    """Positions kept for one example: up to its last scored (label != -100) position."""
    scored = (labels != IGNORE_INDEX).nonzero()
    return int(scored[-1, 0]) + 1 if scored.numel() else 0


@dataclass
class CaptureResult:
    """What :func:`capture` did: the store, how many shards it wrote now, and whether the store is complete."""

    directory: Path
    store_id: str
    written_shards: int
    skipped_shards: int
    complete: bool
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


def _receipt_ok(directory: Path, name: str) -> bool:
    receipt_path, shard_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not receipt_path.is_file() or not shard_path.is_file():
        return False
    try:
        receipt = json.loads(receipt_path.read_text(encoding="utf-8"))
        return shard_path.stat().st_size == receipt["size"] and sha256_file(shard_path) == receipt["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _hidden_shape(task: Any, teacher: Teacher, item: Any, device: torch.device) -> dict[str, int]:
    """The teacher's hidden-state count (layer 0 = the pre-transformer features) and width, from one example."""
    signals = teacher.signals(move_to_device(task.collate([item]), device), SignalRequest(
        frozenset({Signal.HIDDEN_STATES})))
    hidden = signals.hidden_states
    if not hidden:
        raise KDUserError("kd teacher capture --signals hidden_states: the teacher returned no hidden states; only "
                          "teachers that expose their hidden layers (the speech teachers) can store them.")
    return {"count": len(hidden), "width": int(hidden[-1].shape[-1])}


def capture(task: Any, teacher: Teacher, items: Sequence[Any], directory: Path, settings: CaptureSettings, *,
            teacher_config: Mapping[str, Any], device: torch.device, batch_size: int = 32,
            shard: tuple[int, int] = (0, 1), teacher_metrics: Mapping[str, Any] | None = None,
            decode_sequences: SequenceDecoder | None = None) -> CaptureResult:
    """Run ``teacher`` over ``items`` (the split's examples) and write the shards ``shard[0]`` of every
    ``shard[1]`` into ``directory``; write the manifest when every shard is there.

    ``teacher_config`` (name and args) joins the store's identity; ``teacher_metrics`` (the teacher's test scores,
    with the test fingerprint) is recorded for runs that report the teacher; ``decode_sequences(teacher, batch)``
    makes the sequences signal (with the decoding settings in ``settings.sequences``).
    """
    settings.check()
    worker, workers = shard
    if not (0 <= worker < workers):
        raise KDUserError(f"kd teacher capture: --shard must be i/n with 0 <= i < n, got {worker}/{workers}.")
    if settings.has(Signal.SEQUENCES) and decode_sequences is None:
        raise ValueError("capturing sequences needs decode_sequences")
    keys, digests = split_examples(items)
    if not keys:
        raise KDUserError(f"kd teacher capture: the {settings.split} split of task '{task.name}' is empty.")
    shard_count = math.ceil(len(keys) / settings.shard_examples)
    fingerprints = dict(task.fingerprints()) if hasattr(task, "fingerprints") else {}
    identity = {"format": STORE_FORMAT, "task": task.name, "teacher": dict(teacher_config),
                "teacher_sha256": teacher_fingerprint(teacher), "data_sha256": data_fingerprint(keys, digests),
                "settings": asdict(settings)}
    store_id = _store_id(identity)
    capture_info = {**identity, "store_id": store_id, "shards": shard_count, "examples": len(keys),
                    "vocab_size": getattr(teacher, "vocab_size", None),
                    "tokenizer_sha256": fingerprints.get("tokenizer"),
                    "is_encoder_decoder": bool(getattr(teacher, "is_encoder_decoder", False)),
                    "teacher_parameters": teacher.num_parameters(),
                    "teacher_class": type(getattr(teacher, "hf_model", teacher)).__name__,
                    "test_sha256": fingerprints.get("test")}
    directory.mkdir(parents=True, exist_ok=True)
    existing = directory / CAPTURE_FILE
    if existing.is_file():
        stored = json.loads(existing.read_text(encoding="utf-8"))
        if stored.get("store_id") != store_id:
            differing = sorted(key for key in identity if stored.get(key) != json.loads(json.dumps(identity[key],
                                                                                                 default=str)))
            raise KDUserError(f"The store '{directory}' holds another capture (it differs in: "
                              f"{', '.join(differing) or 'its format'}). Choose another --out, or delete that store "
                              f"to capture this teacher and data into it.")
    elif any(directory.iterdir()):
        raise KDUserError(f"kd teacher capture: '{directory}' is not empty and holds no teacher store "
                          f"({CAPTURE_FILE} missing). Choose an empty or new --out directory.")
    teacher.eval()
    if settings.has(Signal.LOGITS):
        _labels_for(teacher, task.collate(items[:1]))  # refused before anything is written
    if settings.has(Signal.HIDDEN_STATES):
        shape = _hidden_shape(task, teacher, items[0], device)
        if settings.layers is not None and max(settings.layers) >= shape["count"]:
            raise KDUserError(f"kd teacher capture: --layers {','.join(map(str, settings.layers))} asks for layer "
                              f"{max(settings.layers)}, but the teacher has hidden states 0..{shape['count'] - 1} "
                              f"(0 = the pre-transformer features).")
        capture_info["hidden_states"] = {"teacher_layers": shape["count"] - 1, "width": shape["width"],
                                         "layers": list(settings.layers or range(shape["count"]))}
    atomic_write_json(directory / CAPTURE_FILE, capture_info)
    if teacher_metrics:
        # Apart from the shards: the scores include decoding speeds, which differ from one capture to the next.
        atomic_write_json(directory / METRICS_FILE, {"test_sha256": fingerprints.get("test"),
                                                     "metrics": dict(teacher_metrics)})

    mine = [index for index in range(shard_count) if index % workers == worker]
    todo = [index for index in mine if not _receipt_ok(directory, shard_name(index, shard_count))]
    started = time.monotonic()
    with Progress("teacher capture", len(todo) * settings.shard_examples, unit="example") as progress:
        for index in todo:
            first = index * settings.shard_examples
            chunk = list(range(first, min(len(items), first + settings.shard_examples)))
            rows: list[dict[str, torch.Tensor]] = []
            for start in range(0, len(chunk), batch_size):
                positions = chunk[start:start + batch_size]
                batch = move_to_device(task.collate([items[i] for i in positions]), device)
                if batch_keys(batch) != [keys[i] for i in positions]:
                    raise RuntimeError("the batch keys differ from the items' keys (kdcore.teacher_shards)")
                rows.extend(_example_signals(teacher, batch, len(positions), settings, decode_sequences))
                progress.update(len(positions))
            data = encode_shard([keys[i] for i in chunk], [digests[i] for i in chunk], rows)
            name = shard_name(index, shard_count)
            atomic_write_bytes(directory / f"{name}.safetensors", data)
            atomic_write_json(directory / f"{name}.json", {"size": len(data), "examples": len(chunk),
                                                           "sha256": hashlib.sha256(data).hexdigest()})
    manifest = finalize(directory)
    return CaptureResult(directory, store_id, len(todo), len(mine) - len(todo), manifest is not None,
                         time.monotonic() - started, manifest or {})


def _example_signals(teacher: Teacher, batch: Batch, count: int, settings: CaptureSettings,
                     decode_sequences: SequenceDecoder | None) -> list[dict[str, torch.Tensor]]:
    """The captured signals of each of the ``count`` examples of ``batch``: a dict of tensors per example."""
    dtype = VALUE_DTYPES[settings.values_dtype]
    rows: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    if settings.has(Signal.LOGITS):
        logits = teacher.signals(batch, SignalRequest(frozenset({Signal.LOGITS}))).logits
        if not isinstance(logits, torch.Tensor):
            raise KDUserError("kd teacher capture needs a teacher that computes dense logits; this teacher "
                              "returned none (a stored teacher cannot be captured again).")
        labels = _labels_for(teacher, batch)
        for row, entry in enumerate(rows):
            row_logits = logits[row, :scored_length(labels[row])].float()
            sparse = SparseLogits.from_dense(row_logits, min(settings.top_k, row_logits.shape[-1]),
                                             temperature=settings.temperature)
            entry.update(values=sparse.values.to(dtype).cpu(), indices=sparse.indices.to(torch.int32).cpu(),
                         tail_log_mass=sparse.tail_log_mass.cpu())  # type: ignore[union-attr]
            if settings.full_logits:
                entry["logits"] = row_logits.to(dtype).cpu()
    if settings.has(Signal.HIDDEN_STATES):
        request = SignalRequest(frozenset({Signal.HIDDEN_STATES}), settings.layers)
        states = per_example_states(teacher.signals(batch, request), settings.layers, "--layers", dtype)
        for entry, state in zip(rows, states):
            entry["hidden_states"] = state
    if settings.has(Signal.SEQUENCES):
        assert decode_sequences is not None
        for entry, tokens in zip(rows, decode_sequences(teacher, batch)):
            entry["sequences"] = torch.tensor(tokens, dtype=torch.int32)
    return rows


def _labels_for(teacher: Teacher, batch: Batch) -> torch.Tensor:
    target_labels = getattr(teacher, "target_labels", None)
    if target_labels is not None:
        return target_labels(batch)
    labels = batch.get("labels")
    if labels is None:
        raise KDUserError("kd teacher capture stores token-level teacher logits and needs batches with 'labels'; "
                          "this task's batches have none (capture --signals hidden_states for a speech task).")
    return labels


def finalize(directory: Path) -> dict[str, Any] | None:
    """Write the manifest when every shard has a verified receipt; return it (None while shards are missing)."""
    info = json.loads((directory / CAPTURE_FILE).read_text(encoding="utf-8"))
    shards = []
    for index in range(int(info["shards"])):
        name = shard_name(index, int(info["shards"]))
        if not _receipt_ok(directory, name):
            return None
        receipt = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        shards.append({"file": f"{name}.safetensors", **receipt})
    manifest = {**info, "shard_files": shards}
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------- reading


class TeacherStore:
    """A complete store, opened for reading: the captured signals of any example by its key.

    Every shard's size and sha256 are checked on open (before any training); a missing, truncated or changed shard
    is refused with :class:`KDUserError` naming it (capture again to repair it: finished shards are kept).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        path = self.directory / MANIFEST_FILE
        if not path.is_file():
            partial = (self.directory / CAPTURE_FILE).is_file()
            raise KDUserError(
                f"teacher.args.path '{self.directory}' is not a complete teacher store ("
                + ("its capture has not finished: run the same kd teacher capture command again to complete it"
                   if partial else f"no {MANIFEST_FILE}; make one with kd teacher capture --out DIR") + ").")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise KDUserError(f"The teacher store manifest '{path}' is unreadable ({error}). Capture the store "
                              f"again.") from None
        if self.manifest.get("format") not in READABLE_FORMATS:
            raise KDUserError(f"'{path}' is a {self.manifest.get('format')!r} store; this kd reads "
                              f"{' and '.join(repr(f) for f in READABLE_FORMATS)}. Capture the store again with "
                              f"this kd.")
        self.settings = CaptureSettings.from_json(self.manifest["settings"])
        self.shards: list[Shard] = []
        self._where: dict[str, tuple[int, int]] = {}
        self.digests: dict[str, str] = {}
        for shard_index, record in enumerate(self.manifest["shard_files"]):
            shard = self._open_shard(record)
            self.shards.append(shard)
            for row, (key, digest) in enumerate(zip(shard.keys, shard.digests)):
                self._where[key] = (shard_index, row)
                self.digests[key] = digest

    def _open_shard(self, record: Mapping[str, Any]) -> Shard:
        shard_path = self.directory / record["file"]
        if not shard_path.is_file():
            raise KDUserError(f"The teacher store shard '{shard_path}' is missing. Run the kd teacher capture "
                              f"command of this store again: it writes the missing shards.")
        if shard_path.stat().st_size != record["size"]:
            raise KDUserError(f"The teacher store shard '{shard_path}' has {shard_path.stat().st_size} bytes, "
                              f"the manifest says {record['size']} (truncated or changed). Delete it and its "
                              f".json receipt and run the capture again: it rewrites only that shard.")
        # Hashed before any training (a flipped byte would otherwise stop the run halfway).
        if sha256_file(shard_path) != record["sha256"]:
            raise KDUserError(f"The teacher store shard '{shard_path}' does not match its sha256 in the "
                              f"manifest (its bytes changed on disk). Delete it and its .json receipt and run the "
                              f"capture again: it rewrites only that shard.")
        legacy = (record["ids"], record["digests"]) if "ids" in record else None  # format /1: keys in the manifest
        try:
            return Shard.open(shard_path, legacy)
        except Exception as error:  # noqa: BLE001 - a header that matches its sha256 but is not a shard
            raise KDUserError(f"The teacher store shard '{shard_path}' is not readable as a teacher store shard "
                              f"({error}). Capture the store again.") from None

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals the store holds."""
        return self.settings.signals

    @property
    def vocab_size(self) -> int | None:
        value = self.manifest.get("vocab_size")
        return None if value is None else int(value)

    @property
    def hidden_layers(self) -> list[int]:
        """The teacher layers whose hidden states are stored, in order (layer 0 = pre-transformer features)."""
        return list(self.manifest.get("hidden_states", {}).get("layers", []))

    def check_data(self, items: Sequence[Any], split: str, where: str) -> None:
        """Refuse (exit 2) when an example of ``items`` is not in the store or differs from what was captured."""
        keys, digests = split_examples(items)
        missing = [key for key in keys if key not in self.digests]
        changed = [key for key, digest in zip(keys, digests) if key in self.digests and self.digests[key] != digest]
        if missing or changed:
            parts = []
            if missing:
                parts.append(f"{len(missing)} example(s) are not in it (e.g. key {missing[0]!r})")
            if changed:
                parts.append(f"{len(changed)} example(s) differ from what the teacher read (e.g. key {changed[0]!r})")
            raise KDUserError(
                f"The teacher store '{self.directory}' ({where}) was captured from other data than this run's "
                f"{split} split: {'; '.join(parts)}. The store covers {len(self.digests)} examples of task "
                f"'{self.manifest['task']}' (data fingerprint {self.manifest['data_sha256'][:16]}). Capture a store "
                f"for this data (kd teacher capture with the same task settings as the run).")

    def examples(self, keys: Sequence[str], names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """The stored tensors ``names`` of each example of ``keys``, in order."""
        located = [self._locate(key) for key in keys]
        answer: list[dict[str, torch.Tensor]] = [{} for _ in keys]
        by_shard: dict[int, list[int]] = {}
        for position, (shard_index, _) in enumerate(located):
            by_shard.setdefault(shard_index, []).append(position)
        for shard_index, positions in by_shard.items():
            examples = self.shards[shard_index].read([located[p][1] for p in positions], names)
            for position, example in zip(positions, examples):
                answer[position] = example
        return answer

    def sparse_logits(self, keys: Sequence[str], width: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> SparseLogits:
        """``(B, width, k)`` top-k logits with tail mass for the examples; positions past an example's stored length
        hold a valid filler distribution (their labels are -100)."""
        return sparse_logits_batch(self.examples(keys, ("values", "indices", "tail_log_mass")), width,
                                   int(self.vocab_size or 0), self.settings.temperature, device, dtype)

    def dense_logits(self, keys: Sequence[str], width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, width, V)`` stored full logits (stores captured with ``--full-logits``)."""
        logits = torch.zeros((len(keys), width, int(self.vocab_size or 0)), dtype=dtype)
        for row, example in enumerate(self.examples(keys, ("logits",))):
            count = min(width, int(example["logits"].shape[0]))
            logits[row, :count] = example["logits"][:count].to(dtype)
        return logits.to(device)

    def hidden_states(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """The stored ``(frames, layers, D)`` states of each example (layers: :attr:`hidden_layers`)."""
        return [example["hidden_states"] for example in self.examples(keys, ("hidden_states",))]

    def sequences(self, keys: Sequence[str]) -> list[list[int]]:
        """The teacher's stored output tokens of each example."""
        return [example["sequences"].tolist() for example in self.examples(keys, ("sequences",))]

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self._where[str(key)]
        except KeyError:
            raise KDUserError(f"The teacher store '{self.directory}' has no example with key {key!r}: it was "
                              f"captured from other data. Capture a store for this run's data.") from None

    def teacher_metrics(self) -> dict[str, Any]:
        """``{"test_sha256", "metrics"}``: the teacher's test scores measured at capture (empty when not scored)."""
        path = self.directory / METRICS_FILE
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise KDUserError(f"The teacher store's '{path}' is unreadable ({error}); delete it (the run then needs "
                              f"trainer.evaluate_teacher=false) or capture again.") from None

    def disk_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())


# ----------------------------------------------------------------------------------------------- the teacher


class StoredTeacher(Teacher):
    """A teacher whose signals are read from a store: no model in memory.

    It answers requests for logits (top-k with tail mass, or full logits where captured) on the task's own
    batches, and for hidden states (the stored layers, frame by frame); examples are looked up by their keys
    (:func:`kdcore.teacher_shards.batch_keys`). It cannot read other prefixes or generate, and says so at planning
    (:meth:`unavailable`); seq-kd reads the stored sequences itself (``store.sequences``).
    """

    def __init__(self, store: TeacherStore, tokenizer: Any = None) -> None:
        super().__init__()
        self.store = store
        self.tokenizer = tokenizer
        manifest = store.manifest
        self.is_encoder_decoder = bool(manifest.get("is_encoder_decoder"))
        self.store_teacher_fingerprint = str(manifest["teacher_sha256"])
        self.description = f"stored {manifest.get('teacher_class', 'teacher')} ({store.directory})"
        #: The fingerprint of the run's test set (set by the factory); the recorded scores count only for it.
        self.test_sha256: str | None = None

    @property
    def vocab_size(self) -> int | None:
        return self.store.vocab_size

    @property
    def hidden_size(self) -> int | None:
        """Width of the stored hidden states (speech students size their heads by it)."""
        shape = self.store.manifest.get("hidden_states")
        return int(shape["width"]) if shape else None

    @property
    def num_hidden_layers(self) -> int | None:
        """Transformer layers of the captured teacher (speech students choose their target layers by it)."""
        shape = self.store.manifest.get("hidden_states")
        return int(shape["teacher_layers"]) if shape else None

    def fingerprint(self) -> str:
        """The captured teacher's weight fingerprint."""
        return self.store_teacher_fingerprint

    def num_parameters(self, trainable_only: bool = False) -> int:
        """The captured teacher's parameter count (no parameters are loaded)."""
        return 0 if trainable_only else int(self.store.manifest.get("teacher_parameters") or 0)

    @staticmethod
    def _asked(request: SignalRequest) -> set[Signal]:
        # A stored teacher answers a request for its final hidden state (the fused path) with its logits.
        asked = set(request.signals)
        return (asked - OPTIONAL_SIGNALS) | ({Signal.LOGITS} if asked & OPTIONAL_SIGNALS else set())

    def unavailable(self, request: SignalRequest) -> frozenset[Signal]:
        """Signals of ``request`` the store does not hold: refused here, at planning, naming what to capture."""
        missing = sorted(signal.value for signal in self._asked(request)
                         if not (signal in (Signal.LOGITS, Signal.HIDDEN_STATES) and self.store.settings.has(signal)))
        if missing:
            raise KDUserError(
                f"The objectives ask the teacher for {', '.join(missing)}, but the teacher store "
                f"'{self.store.directory}' (teacher.args.path) holds {', '.join(self.store.signals)}"
                + (" (a store answers on the data only)" if Signal.SEQUENCES.value in missing else "")
                + f". Capture a store with --signals {','.join(sorted(set(self.store.signals) | set(missing)))}, "
                  f"or choose objectives that read what it holds.")
        if Signal.HIDDEN_STATES in request.signals:
            self._hidden_positions(request)  # refuses layers the store lacks
        return frozenset()

    def _hidden_positions(self, request: SignalRequest) -> list[int]:
        layers = self.store.hidden_layers
        stored = None if self.store.settings.layers is None else layers
        return served_layers(stored, len(layers), request, f"teacher store '{self.store.directory}'",
                             "the capture's --layers")

    def recorded_metrics(self) -> dict[str, Any] | None:
        """The teacher's test scores measured at capture; refused when the store has none for this run's test set
        (a stored teacher cannot be evaluated: it has no model)."""
        recorded = self.store.teacher_metrics()
        metrics = recorded.get("metrics") or {}
        if not metrics or self.test_sha256 != recorded.get("test_sha256"):
            why = ("has no teacher scores (captured with --no-evaluate)" if not metrics else
                   "scored the teacher on another test set")
            raise KDUserError(f"trainer.evaluate_teacher is true, but the teacher store '{self.store.directory}' "
                              f"{why}, and a stored teacher has no model to evaluate. Set "
                              f"trainer.evaluate_teacher=false, or capture the store with this run's test data.")
        return {key: float(value) for key, value in metrics.items()}

    def check_temperatures(self, objectives: Sequence[Any], where: str) -> None:
        """Refuse divergence objectives whose temperature differs from the one the tail mass was captured at."""
        captured = self.store.settings.temperature
        for item in objectives:
            if not item.objective.teacher_request().wants(Signal.LOGITS):
                continue
            temperature = getattr(getattr(item.objective, "config", None), "temperature", None)
            if temperature is not None and float(temperature) != captured and not self.store.settings.full_logits:
                raise KDUserError(
                    f"Objective '{item.label}' ({where}) divides the logits by temperature {temperature}, but the "
                    f"teacher store '{self.store.directory}' holds the teacher's tail mass at temperature {captured}; "
                    f"the top-k distribution is exact only there. Set objectives.{item.label}.args.temperature="
                    f"{captured}, or capture the store again with --temperature {temperature}.")

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        self.unavailable(request)
        keys = batch_keys(batch)
        signals = Signals()
        if Signal.HIDDEN_STATES in request.signals:
            device = batch["waveform"].device if isinstance(batch.get("waveform"), torch.Tensor) else "cpu"
            signals = hidden_state_signals(self.store.hidden_states(keys), self._hidden_positions(request), device)
        if Signal.LOGITS in self._asked(request):
            signals = Signals(logits=self._logits(batch, keys), hidden_states=signals.hidden_states,
                              extra=signals.extra)
        return signals

    def _logits(self, batch: Batch, keys: list[str]) -> torch.Tensor | SparseLogits:
        labels = batch.get("labels")
        if labels is None:
            raise KDUserError("A stored teacher gives logits at the data targets' positions and needs batches with "
                              "'labels'.")
        target_labels = next_token_aligned(labels, IGNORE_INDEX, self.is_encoder_decoder)  # as captured
        width, device = int(target_labels.shape[1]), target_labels.device
        if self.store.settings.full_logits:
            return self.store.dense_logits(keys, width, device)
        return self.store.sparse_logits(keys, width, device)


class StoreTeacherConfig(BaseModel):
    """``teacher: store``: where the store is."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="a directory written by kd teacher capture")


class StoreTeacherFactory(ModelFactory):
    """Builds a :class:`StoredTeacher` and checks, before any training, that the store fits the run's data."""

    name: ClassVar[str] = "store"
    description: ClassVar[str] = ("Teacher signals read from a store written by kd teacher capture (top-k logits "
                                  "with tail mass, hidden states, output sequences); no teacher model in memory")
    Config: ClassVar[type[BaseModel]] = StoreTeacherConfig

    def build(self, config: BaseModel, context: BuildContext) -> Teacher:
        assert isinstance(config, StoreTeacherConfig)
        store = TeacherStore(config.path)
        task = context.task
        if store.manifest.get("task") != task.name:
            raise KDUserError(f"The teacher store '{store.directory}' (teacher.args.path) was captured on task "
                              f"'{store.manifest.get('task')}', this run is task '{task.name}'.")
        splits = task.build_data(context.seed)
        store.check_data(getattr(splits, store.settings.split), store.settings.split, "teacher.args.path")
        tokenizer = getattr(task, "tokenizer", None)
        recorded = store.manifest.get("tokenizer_sha256")
        if tokenizer is not None and recorded and hasattr(task, "fingerprints"):
            current = task.fingerprints().get("tokenizer")
            if current != recorded:
                raise KDUserError(f"The teacher store '{store.directory}' was captured with a tokenizer of "
                                  f"fingerprint {recorded[:16]}, this run's task tokenizer has {str(current)[:16]}: "
                                  f"the stored token ids would mean other tokens. Capture the store with this "
                                  f"run's data settings.")
        teacher = StoredTeacher(store, tokenizer)
        if hasattr(task, "fingerprints"):
            teacher.test_sha256 = task.fingerprints().get("test")
        return teacher


def capture_worker_shard(explicit: str | None) -> tuple[int, int]:
    """``--shard i/n``, else the torchrun rank and world size, else (0, 1)."""
    if explicit:
        try:
            worker, workers = (int(part) for part in explicit.split("/"))
        except ValueError:
            raise KDUserError(f"kd teacher capture: --shard must look like i/n (e.g. 0/2), got {explicit!r}.") from None
        return worker, workers
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


__all__ = ["CaptureResult", "CaptureSettings", "STORE_FORMAT", "STORE_SIGNALS", "SequenceDecoder",
           "StoreTeacherConfig", "StoreTeacherFactory", "StoredTeacher", "TeacherStore", "capture",
           "capture_worker_shard", "data_fingerprint", "example_digest", "finalize", "split_examples",
           "teacher_fingerprint"]
