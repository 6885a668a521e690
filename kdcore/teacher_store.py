"""The teacher store: a teacher's signals on a task's data, captured once and streamed by every run that learns from
it (``kd teacher capture``, then ``teacher: store``).

Layout of a store directory (docs/teacher-store.md)::

    capture.json                    what is captured: teacher and data fingerprints, settings, shard plan
    shard-00000-of-00004.safetensors
        values          (P, k) float16/bfloat16  the k largest teacher logits of each position, sorted descending
        indices         (P, k) int32             their vocabulary ids
        tail_log_mass   (P,)   float32           log of the teacher probability outside the top k (temperature t)
        logits          (P, V)                   every logit (only with --full-logits)
        offsets         (n+1,) int64             example i's positions are rows offsets[i]:offsets[i+1]
    shard-00000-of-00004.json       receipt: the shard's size, sha256, example ids and example digests
    kd-store.json                   the manifest, written last: every shard with its size and sha256
    teacher-metrics.json            the teacher's test scores (unless --no-evaluate), reported by runs from it

Why this shape: a shard is the unit of work and of resumption. Shard ``j`` holds examples ``j*S .. (j+1)*S-1`` of
the split in the task's order, so any process can compute any shard, a capture killed with SIGKILL restarts at the
first shard without a receipt, several processes (``--shard i/n`` or torchrun ranks) fill disjoint shards of one
store, and whichever finds every receipt present writes the manifest. Every file is written to a temporary name
and renamed into place, and no file carries a time stamp, so an interrupted and an uninterrupted capture leave the
same bytes. The store's identity (``store_id``) is the sha256 of the teacher's weight fingerprint, its config, the
data fingerprint of the split and the capture settings: a store is refused by a run whose data differ and by a
capture that would write other signals into it.

Top-k values with the log tail mass (:meth:`kdcore.signals.SparseLogits.from_dense`) keep the teacher a proper
distribution: the divergences treat the tail as one more outcome (docs/objectives.md, "Sparse (top-k) teachers").
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, BuildContext, ModelFactory, Teacher
from kdcore.io import atomic_write_bytes, atomic_write_json, sha256_file
from kdcore.progress import Progress
from kdcore.provenance import weights_sha256
from kdcore.signals import IGNORE_INDEX, Signal, SignalRequest, Signals, SparseLogits

log = logging.getLogger(__name__)

STORE_FORMAT = "kd-teacher-store/1"
CAPTURE_FILE = "capture.json"
MANIFEST_FILE = "kd-store.json"
METRICS_FILE = "teacher-metrics.json"
VALUE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}


# ----------------------------------------------------------------------------------------------- fingerprints


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
    """sha256 of one example as the task prepared it (token ids, waveforms, texts): what the teacher read."""
    digest = hashlib.sha256()
    _digest_value(digest, item)
    return digest.hexdigest()


def example_id(item: Any, index: int) -> str:
    """The example's id (the ``id`` field tasks give their examples), else its position in the split."""
    if isinstance(item, Mapping) and "id" in item:
        return str(item["id"])
    return str(index)


def split_examples(items: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Ids and digests of a split's examples, in order; duplicate ids are refused (the store is keyed by id)."""
    ids = [example_id(item, index) for index, item in enumerate(items)]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise KDUserError(f"The teacher store keys examples by their id, but the split has the id {duplicate!r} more "
                          f"than once. Give every example a unique 'id' in the data files.")
    return ids, [example_digest(item) for item in items]


def data_fingerprint(ids: Sequence[str], digests: Sequence[str]) -> str:
    """sha256 over the split's (id, digest) pairs in order."""
    digest = hashlib.sha256()
    for identifier, item_digest in zip(ids, digests):
        digest.update(f"{identifier}\0{item_digest}\n".encode())
    return digest.hexdigest()


def teacher_fingerprint(teacher: Teacher) -> str:
    """The weights' sha256 (the teacher's own fingerprint when it has one, e.g. a stored teacher's)."""
    own = getattr(teacher, "store_teacher_fingerprint", None)
    return str(own) if own else weights_sha256(teacher)


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CaptureSettings:
    """What a capture writes (part of the store's identity)."""

    split: str = "train"
    top_k: int = 64
    values_dtype: str = "float16"
    full_logits: bool = False
    temperature: float = 1.0  # of the tail log-mass
    shard_examples: int = 512

    def check(self) -> None:
        if self.top_k < 1:
            raise KDUserError(f"kd teacher capture: --top-k must be at least 1, got {self.top_k}.")
        if self.values_dtype not in VALUE_DTYPES:
            raise KDUserError(f"kd teacher capture: --dtype must be one of {', '.join(VALUE_DTYPES)}, got "
                              f"{self.values_dtype!r}.")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise KDUserError(f"kd teacher capture: --temperature must be a positive number, got {self.temperature}.")
        if self.shard_examples < 1:
            raise KDUserError(f"kd teacher capture: --shard-examples must be at least 1, got {self.shard_examples}.")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def _store_id(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- capture


def scored_length(labels: torch.Tensor) -> int:
    """Positions kept for one example: up to its last scored (label != -100) position."""
    scored = (labels != IGNORE_INDEX).nonzero()
    return int(scored[-1, 0]) + 1 if scored.numel() else 0


def _shard_bytes(rows: list[dict[str, torch.Tensor]], settings: CaptureSettings) -> bytes:
    lengths = [int(row["values"].shape[0]) for row in rows]
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    tensors = {"values": torch.cat([row["values"] for row in rows]).to(VALUE_DTYPES[settings.values_dtype]),
               "indices": torch.cat([row["indices"] for row in rows]).to(torch.int32),
               "tail_log_mass": torch.cat([row["tail_log_mass"] for row in rows]).to(torch.float32),
               "offsets": offsets}
    if settings.full_logits:
        tensors["logits"] = torch.cat([row["logits"] for row in rows]).to(VALUE_DTYPES[settings.values_dtype])
    return save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()})


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


def capture(task: Any, teacher: Teacher, items: Sequence[Any], directory: Path, settings: CaptureSettings, *,
            teacher_config: Mapping[str, Any], device: torch.device, batch_size: int = 32,
            shard: tuple[int, int] = (0, 1), teacher_metrics: Mapping[str, Any] | None = None) -> CaptureResult:
    """Run ``teacher`` over ``items`` (the split's examples) and write the shards ``shard[0]`` of every
    ``shard[1]`` into ``directory``; write the manifest when every shard is there.

    ``teacher_config`` (name and args) joins the store's identity; ``teacher_metrics`` (the teacher's test scores,
    with the test fingerprint) is recorded for runs that report the teacher.
    """
    import time

    settings.check()
    worker, workers = shard
    if not (0 <= worker < workers):
        raise KDUserError(f"kd teacher capture: --shard must be i/n with 0 <= i < n, got {worker}/{workers}.")
    ids, digests = split_examples(items)
    if not ids:
        raise KDUserError(f"kd teacher capture: the {settings.split} split of task '{task.name}' is empty.")
    shard_count = math.ceil(len(ids) / settings.shard_examples)
    fingerprints = dict(task.fingerprints()) if hasattr(task, "fingerprints") else {}
    identity = {"format": STORE_FORMAT, "task": task.name, "teacher": dict(teacher_config),
                "teacher_sha256": teacher_fingerprint(teacher), "data_sha256": data_fingerprint(ids, digests),
                "settings": asdict(settings)}
    store_id = _store_id(identity)
    vocab_size = getattr(teacher, "vocab_size", None)
    capture_info = {**identity, "store_id": store_id, "shards": shard_count, "examples": len(ids),
                    "vocab_size": vocab_size, "tokenizer_sha256": fingerprints.get("tokenizer"),
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
    atomic_write_json(directory / CAPTURE_FILE, capture_info)
    if teacher_metrics:
        # Apart from the shards: the scores include decoding speeds, which differ from one capture to the next.
        atomic_write_json(directory / METRICS_FILE, {"test_sha256": fingerprints.get("test"),
                                                     "metrics": dict(teacher_metrics)})

    mine = [index for index in range(shard_count) if index % workers == worker]
    todo = [index for index in mine if not _receipt_ok(directory, shard_name(index, shard_count))]
    request = SignalRequest(frozenset({Signal.LOGITS}))
    dtype = VALUE_DTYPES[settings.values_dtype]
    started = time.monotonic()
    teacher.eval()
    with Progress("teacher capture", len(todo) * settings.shard_examples, unit="example") as progress:
        for index in todo:
            first = index * settings.shard_examples
            chunk = list(range(first, min(len(items), first + settings.shard_examples)))
            rows: list[dict[str, torch.Tensor]] = []
            for start in range(0, len(chunk), batch_size):
                positions = chunk[start:start + batch_size]
                batch = _to_device(task.collate([items[i] for i in positions]), device)
                signals = teacher.signals(batch, request)
                logits = signals.logits
                if not isinstance(logits, torch.Tensor):
                    raise KDUserError("kd teacher capture needs a teacher that computes dense logits; this teacher "
                                      "returned none (a stored teacher cannot be captured again).")
                labels = _labels_for(teacher, batch)
                for row in range(len(positions)):
                    length = scored_length(labels[row])
                    row_logits = logits[row, :length].float()
                    sparse = SparseLogits.from_dense(row_logits, min(settings.top_k, row_logits.shape[-1]),
                                                     temperature=settings.temperature)
                    entry = {"values": sparse.values.to(dtype).cpu(), "indices": sparse.indices.cpu(),
                             "tail_log_mass": sparse.tail_log_mass.cpu()}  # type: ignore[union-attr]
                    if settings.full_logits:
                        entry["logits"] = row_logits.to(dtype).cpu()
                    rows.append(entry)
                progress.update(len(positions))
            data = _shard_bytes(rows, settings)
            name = shard_name(index, shard_count)
            atomic_write_bytes(directory / f"{name}.safetensors", data)
            receipt = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "ids": [ids[i] for i in chunk], "digests": [digests[i] for i in chunk]}
            atomic_write_json(directory / f"{name}.json", receipt)
    manifest = finalize(directory)
    return CaptureResult(directory, store_id, len(todo), len(mine) - len(todo), manifest is not None,
                         time.monotonic() - started, manifest or {})


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _labels_for(teacher: Teacher, batch: Batch) -> torch.Tensor:
    target_labels = getattr(teacher, "target_labels", None)
    if target_labels is not None:
        return target_labels(batch)
    labels = batch.get("labels")
    if labels is None:
        raise KDUserError("kd teacher capture stores token-level teacher logits and needs batches with 'labels'; "
                          "this task's batches have none.")
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
    """A complete store, opened for reading: top-k logits (and tail mass) of any captured example by id.

    Every shard's size is checked on open and its sha256 on first use; a missing, truncated or changed shard is
    refused with :class:`KDUserError` naming it (capture again to repair it: finished shards are kept).
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
        if self.manifest.get("format") != STORE_FORMAT:
            raise KDUserError(f"'{path}' is a {self.manifest.get('format')!r} store; this kd reads {STORE_FORMAT!r}. "
                              f"Capture the store again with this kd.")
        self.settings = CaptureSettings(**self.manifest["settings"])
        self._where: dict[str, tuple[int, int]] = {}
        self.digests: dict[str, str] = {}
        for shard_index, shard in enumerate(self.manifest["shard_files"]):
            shard_path = self.directory / shard["file"]
            if not shard_path.is_file():
                raise KDUserError(f"The teacher store shard '{shard_path}' is missing. Run the kd teacher capture "
                                  f"command of this store again: it writes the missing shards.")
            if shard_path.stat().st_size != shard["size"]:
                raise KDUserError(f"The teacher store shard '{shard_path}' has {shard_path.stat().st_size} bytes, "
                                  f"the manifest says {shard['size']} (truncated or changed). Delete it and its "
                                  f".json receipt and run the capture again: it rewrites only that shard.")
            # Hashed before any training (a flipped byte would otherwise stop the run halfway).
            if sha256_file(shard_path) != shard["sha256"]:
                raise KDUserError(f"The teacher store shard '{shard_path}' does not match its sha256 in the "
                                  f"manifest (its bytes changed on disk). Delete it and its .json receipt and run the "
                                  f"capture again: it rewrites only that shard.")
            for row, (identifier, digest) in enumerate(zip(shard["ids"], shard["digests"])):
                self._where[identifier] = (shard_index, row)
                self.digests[identifier] = digest
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._loaded:
            shard = self.manifest["shard_files"][index]
            path = self.directory / shard["file"]
            with safe_open(str(path), framework="pt") as handle:
                self._loaded[index] = {name: handle.get_tensor(name) for name in handle.keys()}
        return self._loaded[index]

    def check_data(self, items: Sequence[Any], split: str, where: str) -> None:
        """Refuse (exit 2) when an example of ``items`` is not in the store or differs from what was captured."""
        ids, digests = split_examples(items)
        missing = [i for i in ids if i not in self.digests]
        changed = [i for i, d in zip(ids, digests) if i in self.digests and self.digests[i] != d]
        if missing or changed:
            parts = []
            if missing:
                parts.append(f"{len(missing)} example(s) are not in it (e.g. id {missing[0]!r})")
            if changed:
                parts.append(f"{len(changed)} example(s) differ from what the teacher read (e.g. id {changed[0]!r})")
            raise KDUserError(
                f"The teacher store '{self.directory}' ({where}) was captured from other data than this run's "
                f"{split} split: {'; '.join(parts)}. The store covers {len(self.digests)} examples of task "
                f"'{self.manifest['task']}' (data fingerprint {self.manifest['data_sha256'][:16]}). Capture a store "
                f"for this data (kd teacher capture with the same task settings as the run).")

    def sparse_logits(self, example_ids: Sequence[str], width: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> SparseLogits:
        """``(B, width, k)`` top-k logits with tail mass for the examples; positions past an example's stored length
        hold a valid filler distribution (their labels are -100)."""
        k = self.settings.top_k
        values = torch.full((len(example_ids), width, k), float("-inf"), dtype=dtype)
        values[..., 0] = 0.0
        indices = torch.arange(k, dtype=torch.int64).expand(len(example_ids), width, k).clone()
        tail = torch.full((len(example_ids), width), float("-inf"), dtype=torch.float32)
        for row, identifier in enumerate(example_ids):
            shard_index, position = self._locate(identifier)
            tensors = self._shard(shard_index)
            start, end = int(tensors["offsets"][position]), int(tensors["offsets"][position + 1])
            count = min(width, end - start)
            values[row, :count] = tensors["values"][start:start + count].to(dtype)
            indices[row, :count] = tensors["indices"][start:start + count].long()
            tail[row, :count] = tensors["tail_log_mass"][start:start + count]
        return SparseLogits(values.to(device), indices.to(device), self.vocab_size,
                            tail_log_mass=tail.to(device), tail_temperature=self.settings.temperature)

    def dense_logits(self, example_ids: Sequence[str], width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, width, V)`` stored full logits (stores captured with ``--full-logits``)."""
        logits = torch.zeros((len(example_ids), width, self.vocab_size), dtype=dtype)
        for row, identifier in enumerate(example_ids):
            shard_index, position = self._locate(identifier)
            tensors = self._shard(shard_index)
            start, end = int(tensors["offsets"][position]), int(tensors["offsets"][position + 1])
            count = min(width, end - start)
            logits[row, :count] = tensors["logits"][start:start + count].to(dtype)
        return logits.to(device)

    def _locate(self, identifier: str) -> tuple[int, int]:
        try:
            return self._where[str(identifier)]
        except KeyError:
            raise KDUserError(f"The teacher store '{self.directory}' has no example with id {identifier!r}: it was "
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
    batches (looked up by their ``ids``); it cannot read other prefixes or generate, and says so at planning
    (:meth:`unavailable`).
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
    def vocab_size(self) -> int:
        return self.store.vocab_size

    def fingerprint(self) -> str:
        """The captured teacher's weight fingerprint."""
        return self.store_teacher_fingerprint

    def num_parameters(self, trainable_only: bool = False) -> int:
        """The captured teacher's parameter count (no parameters are loaded)."""
        return 0 if trainable_only else int(self.store.manifest.get("teacher_parameters") or 0)

    def unavailable(self, request: SignalRequest) -> frozenset[Signal]:
        """Signals of ``request`` a store cannot give: all but logits."""
        return frozenset(request.required - {Signal.LOGITS})

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
            temperature = getattr(getattr(item.objective, "config", None), "temperature", None)
            if temperature is not None and float(temperature) != captured and not self.store.settings.full_logits:
                raise KDUserError(
                    f"Objective '{item.label}' ({where}) divides the logits by temperature {temperature}, but the "
                    f"teacher store '{self.store.directory}' holds the teacher's tail mass at temperature {captured}; "
                    f"the top-k distribution is exact only there. Set objectives.{item.label}.args.temperature="
                    f"{captured}, or capture the store again with --temperature {temperature}.")

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        missing = self.unavailable(request)
        if missing:
            raise KDUserError(f"A stored teacher gives logits only; asked for {sorted(s.value for s in missing)}.")
        if "ids" not in batch:
            raise KDUserError(f"A stored teacher looks examples up by the batch key 'ids'; this task's batches have "
                              f"{sorted(batch)}.")
        labels = batch.get("labels")
        if labels is None:
            raise KDUserError("A stored teacher gives logits at the data targets' positions and needs batches with "
                              "'labels'.")
        target_labels = labels
        if not self.is_encoder_decoder:  # logits at t predict token t+1 (as captured)
            target_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        width, device = int(target_labels.shape[1]), target_labels.device
        ids = [str(item) for item in batch["ids"]]
        if self.store.settings.full_logits:
            return Signals(logits=self.store.dense_logits(ids, width, device))
        return Signals(logits=self.store.sparse_logits(ids, width, device))


class StoreTeacherConfig(BaseModel):
    """``teacher: store``: where the store is."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="a directory written by kd teacher capture")


class StoreTeacherFactory(ModelFactory):
    """Builds a :class:`StoredTeacher` and checks, before any training, that the store fits the run's data."""

    name: ClassVar[str] = "store"
    description: ClassVar[str] = ("Teacher signals read from a store written by kd teacher capture (top-k logits "
                                  "with tail mass); no teacher model in memory")
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


__all__ = ["CaptureResult", "CaptureSettings", "StoreTeacherConfig", "StoreTeacherFactory", "StoredTeacher",
           "TeacherStore", "capture", "capture_worker_shard", "data_fingerprint",
           "example_digest", "finalize", "split_examples", "teacher_fingerprint"]
