"""Baselines for ImitKD: training from scratch, word-level KD and sequence-level KD.

* ``scratch``: NLL of the student on the data targets (no teacher).
* ``word-kd`` (Hinton et al. 2015; Kim & Rush 2016 "word-level"): the teacher's
  next-token distribution on the *data* prefixes, through a kdcore divergence,
  optionally plus a weighted NLL on the data.
* ``seq-kd`` (Kim & Rush 2016): the teacher's beam-search outputs replace the data
  targets; they are generated once per training example and cached on disk,
  keyed by the example id, a hash of its source tokens and the teacher's weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Method, StepOutput, Student, Task, Teacher, WeightedObjective
from kdcore.io import atomic_write_json
from kd_plugins.text.generation import beam_search
from kd_plugins.text.imitation import as_text_models, warn_unused_objectives
from kd_plugins.text.losses import LOGITS, DivergenceOptions, nll_loss, teacher_distribution_loss
from kd_plugins.text.models import IGNORE_INDEX, check_vocab_compatible

log = logging.getLogger(__name__)


class ScratchConfig(BaseModel):
    """``scratch`` takes no options."""

    model_config = ConfigDict(extra="forbid")


class ScratchMethod(Method):
    """The student alone, trained with NLL on the data (the paper's "from scratch" baseline)."""

    name: ClassVar[str] = "scratch"
    description: ClassVar[str] = "No distillation: the student trained with NLL on the data targets"
    Config: ClassVar[type[BaseModel]] = ScratchConfig

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        _, self.text_student = as_text_models(teacher, student, self.name)
        warn_unused_objectives(objectives, self.name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {}

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        logits = self.text_student.forward_signals(batch, LOGITS).logits
        loss = nll_loss(logits, self.text_student.target_labels(batch))
        return StepOutput(loss, {"nll": float(loss.detach())})


class WordKDConfig(DivergenceOptions):
    """Options of ``word-kd``: the divergence, and the weights of the KD and NLL terms."""

    kd_weight: float = Field(1.0, ge=0.0, description="weight of the divergence to the teacher")
    nll_weight: float = Field(0.0, ge=0.0, description="weight of the NLL on the data targets (0: pure word-KD)")


class WordKDMethod(Method):
    """Word-level KD: match the teacher's next-token distribution on the data prefixes."""

    name: ClassVar[str] = "word-kd"
    description: ClassVar[str] = "Word-level KD: teacher next-token distribution on data prefixes (+ optional NLL)"
    Config: ClassVar[type[BaseModel]] = WordKDConfig

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        assert isinstance(config, WordKDConfig)
        self.config: WordKDConfig = config
        if config.kd_weight == 0 and config.nll_weight == 0:
            raise KDUserError("plugin 'word-kd': method.kd_weight and method.nll_weight are both 0, so the loss is "
                              "always zero. Set at least one of them above 0.")
        self.text_teacher, self.text_student = as_text_models(teacher, student, self.name)
        check_vocab_compatible(teacher, student, where="plugin 'word-kd'")
        warn_unused_objectives(objectives, self.name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {}

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        config = self.config
        labels = self.text_student.target_labels(batch)
        kd_loss, student_signals = teacher_distribution_loss(config, self.text_teacher, self.text_student, batch,
                                                             labels, need_student_logits=config.nll_weight > 0)
        parts = {config.divergence: float(kd_loss.detach())}
        loss = config.kd_weight * kd_loss
        if config.nll_weight > 0:
            nll = nll_loss(student_signals.logits, labels)
            parts["nll"] = float(nll.detach())
            loss = loss + config.nll_weight * nll
        parts["loss"] = float(loss.detach())
        return StepOutput(loss, parts)


class SeqKDConfig(BaseModel):
    """Options of ``seq-kd``: how the teacher decodes the targets, and where they are cached."""

    model_config = ConfigDict(extra="forbid")

    num_beams: int = Field(5, ge=1, description="teacher beam size (Kim & Rush use 5)")
    length_penalty: float = 1.0
    max_new_tokens: int = Field(128, ge=1, description="hard cap on teacher output length")
    max_length_ratio: float | None = Field(
        2.0, gt=0.0, description="also cap at ratio x the longest data target of the batch + max_length_offset")
    max_length_offset: int = Field(5, ge=0)
    ids_key: str = Field("ids", description="batch key with a stable id per training example")
    cache_dir: str | None = Field(None, description="default: <kd cache>/seq-kd (shared between runs)")


class SeqKDCache:
    """Teacher outputs on disk: ``<root>/<key>/chunk-*.json`` files, each written atomically, never rewritten.

    ``key`` combines the teacher's weight fingerprint and the decoding settings,
    so a different teacher or beam never reuses stale targets. Each entry stores
    a hash of the example's source tokens: an id whose source changed is regenerated.
    """

    def __init__(self, root: Path, key: str, manifest: dict[str, Any]) -> None:
        self.directory = Path(root) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            atomic_write_json(manifest_path, manifest)
        self.entries: dict[str, dict[str, Any]] = {}
        for chunk in sorted(self.directory.glob("chunk-*.json")):
            try:
                self.entries.update(json.loads(chunk.read_text(encoding="utf-8")))
            except json.JSONDecodeError:  # cannot happen with atomic writes unless edited by hand: regenerate
                log.warning("Ignoring unreadable seq-kd cache file %s.", chunk)

    def lookup(self, example_id: str, source_hash: str) -> list[int] | None:
        entry = self.entries.get(example_id)
        if entry is None or entry["source"] != source_hash:
            return None
        return list(entry["tokens"])

    def store(self, new_entries: dict[str, dict[str, Any]]) -> None:
        if not new_entries:
            return
        name = f"chunk-{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
        atomic_write_json(self.directory / name, new_entries)
        self.entries.update(new_entries)


def source_hash(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """Hash of one example's source tokens (padding excluded)."""
    tokens = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    return hashlib.sha1(json.dumps(tokens.tolist()).encode()).hexdigest()


def pad_labels(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token lists as a (B, L) label tensor padded with -100."""
    width = max((len(row) for row in rows), default=0)
    labels = torch.full((len(rows), max(width, 1)), IGNORE_INDEX, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if row:
            labels[index, :len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    return labels


class SeqKDMethod(Method):
    """Sequence-level KD: NLL of the student on the teacher's (cached) beam-search outputs."""

    name: ClassVar[str] = "seq-kd"
    description: ClassVar[str] = "Sequence-level KD (Kim & Rush 2016): teacher beam outputs as targets, cached on disk"
    Config: ClassVar[type[BaseModel]] = SeqKDConfig

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        assert isinstance(config, SeqKDConfig)
        self.config: SeqKDConfig = config
        self.text_teacher, self.text_student = as_text_models(teacher, student, self.name)
        if not self.text_teacher.is_encoder_decoder:
            raise KDUserError("plugin 'seq-kd' decodes with encoder-decoder teachers only (teacher 'seq2seq').")
        check_vocab_compatible(teacher, student, where="plugin 'seq-kd'")
        warn_unused_objectives(objectives, self.name)
        self._cache: SeqKDCache | None = None
        self.teacher_calls = 0  # beam-search batches run (0 when every target came from the cache)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {}

    @property
    def cache(self) -> SeqKDCache:
        if self._cache is None:
            config = self.config
            settings = {"num_beams": config.num_beams, "length_penalty": config.length_penalty,
                        "max_new_tokens": config.max_new_tokens, "max_length_ratio": config.max_length_ratio,
                        "max_length_offset": config.max_length_offset}
            teacher_fingerprint = self.text_teacher.fingerprint()
            settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
            key = f"{teacher_fingerprint[:16]}-{settings_hash[:8]}"
            root = Path(config.cache_dir).expanduser() if config.cache_dir else Path(self.task.cache_dir) / "seq-kd"
            self._cache = SeqKDCache(root, key, {"teacher_sha256": teacher_fingerprint, "settings": settings,
                                                 "teacher_class": type(self.text_teacher.hf_model).__name__})
        return self._cache

    def _length_limit(self, data_labels: torch.Tensor | None) -> int:
        config = self.config
        if config.max_length_ratio is None or data_labels is None:
            return config.max_new_tokens
        longest = int((data_labels != IGNORE_INDEX).sum(dim=1).max())
        return max(1, min(config.max_new_tokens, math.ceil(config.max_length_ratio * longest) + config.max_length_offset))

    def teacher_targets(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Teacher beam outputs for the batch as -100 padded labels, and how many rows were cache hits."""
        if self.config.ids_key not in batch:
            raise KDUserError(f"plugin 'seq-kd' caches teacher outputs per training example and needs the batch key "
                              f"'{self.config.ids_key}' (method.ids_key); this task's batches have keys "
                              f"{sorted(batch)}.")
        ids = [str(item) for item in batch[self.config.ids_key]]
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        hashes = [source_hash(input_ids[i], None if attention_mask is None else attention_mask[i])
                  for i in range(len(ids))]
        cache = self.cache
        targets: list[list[int] | None] = [cache.lookup(i, h) for i, h in zip(ids, hashes)]
        missing = [index for index, target in enumerate(targets) if target is None]
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            sub_mask = attention_mask[rows] if attention_mask is not None else None
            generated = beam_search(self.text_teacher, input_ids[rows], sub_mask, num_beams=self.config.num_beams,
                                    max_new_tokens=self._length_limit(batch.get("labels")),
                                    length_penalty=self.config.length_penalty)
            self.teacher_calls += 1
            new_entries: dict[str, dict[str, Any]] = {}
            for index, tokens in zip(missing, generated.to_lists()):
                targets[index] = tokens
                new_entries[ids[index]] = {"source": hashes[index], "tokens": tokens}
            cache.store(new_entries)
        return pad_labels([t or [] for t in targets], input_ids.device), len(ids) - len(missing)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        labels, hits = self.teacher_targets(batch)
        student_batch = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                         "labels": labels}
        logits = self.text_student.forward_signals(student_batch, LOGITS).logits
        loss = nll_loss(logits, labels)
        return StepOutput(loss, {"nll": float(loss.detach()), "cache_hit_fraction": hits / max(1, labels.shape[0])})


__all__ = ["ScratchConfig", "ScratchMethod", "SeqKDCache", "SeqKDConfig", "SeqKDMethod", "WordKDConfig",
           "WordKDMethod", "pad_labels", "source_hash"]
