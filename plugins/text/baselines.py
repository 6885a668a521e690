"""Baselines for ImitKD: training from scratch, word-level KD and sequence-level KD.

Each decides only where teacher and student meet; the configured objectives (defaults below) compare them there.

* ``scratch``: the student on the data (default objective: NLL on the data targets; the teacher is never run).
* ``word-kd`` (Hinton et al. 2015; Kim & Rush 2016 "word-level"): teacher and student on the *data* prefixes
  (default objective: forward KL; add ``nll`` as a second objective for the weighted NLL on the data).
* ``seq-kd`` (Kim & Rush 2016): the teacher's beam-search outputs replace the data targets; they are generated
  once per training example and cached on disk, keyed by the example id, a hash of its source tokens and the
  teacher's weights (default objective: NLL on them).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.cache import CacheEntryDamaged, ensure_entry, verify_shard, write_shard
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Comparison, EmptyConfig, Student, Task, Teacher, WeightedObjective
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX
from kd_plugins.text.generation import beam_search, generation_length_limit, longest_target
from kd_plugins.text.method import TextMethod, take_rows

log = logging.getLogger(__name__)

#: The kind of seq-kd's cache entries (kdcore.cache), and the pattern of their chunks.
SEQ_KD_KIND = "seq-kd"
CHUNK_PATTERN = "chunk-*.json"


class ScratchMethod(TextMethod):
    """The student alone on the data (the paper's "from scratch" baseline): the objectives on the data prefixes."""

    name: ClassVar[str] = "scratch"
    description: ClassVar[str] = "No distillation: the student trained with NLL on the data targets"
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    exchanges_tokens: ClassVar[bool] = False
    needs_teacher_model: ClassVar[bool] = False

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"nll": {"name": "nll"}}}


class WordKDMethod(TextMethod):
    """Word-level KD: teacher and student meet on the data prefixes (the text methods' default comparison)."""

    name: ClassVar[str] = "word-kd"
    description: ClassVar[str] = "Word-level KD: teacher next-token distribution on data prefixes (+ optional NLL)"
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    exchanges_tokens: ClassVar[bool] = False  # both read the data; the teacher only when an objective asks
    needs_teacher_model: ClassVar[bool] = False

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"kd": {"name": "forward_kl"}}}


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
    """Teacher outputs on disk: a verified, appendable cache entry (:mod:`kdcore.cache`) ``<root>/<key>/`` whose
    ``chunk-<time>-<size>-<sha256>.json`` files are each written once, atomically, and verify themselves.

    ``key`` combines the teacher's weight fingerprint and the decoding settings (recorded in the entry's manifest),
    so a different teacher or beam never reuses stale targets. Each entry stores a hash of the example's source
    tokens: an id whose source changed is regenerated. A damaged chunk is deleted, with a warning naming it, and
    its targets are generated again.
    """

    def __init__(self, root: Path, key: str, built_from: dict[str, Any]) -> None:
        self.directory = Path(root) / key
        ensure_entry(self.directory, SEQ_KD_KIND, built_from, lambda staging: None,
                     what="the seq-kd teacher outputs", shards=CHUNK_PATTERN, load=lambda _: None)
        self.entries: dict[str, dict[str, Any]] = {}
        for chunk in sorted(self.directory.glob(CHUNK_PATTERN)):
            try:
                verify_shard(chunk)
                self.entries.update(json.loads(chunk.read_text(encoding="utf-8")))
            except (CacheEntryDamaged, ValueError) as error:
                reason = error.reason if isinstance(error, CacheEntryDamaged) else f"unreadable JSON ({error})"
                log.warning("The seq-kd cache file %s is damaged (%s): deleted; its targets will be generated "
                            "again.", chunk, reason)
                chunk.unlink(missing_ok=True)

    def lookup(self, example_id: str, source_hash: str) -> list[int] | None:
        entry = self.entries.get(example_id)
        if entry is None or entry["source"] != source_hash:
            return None
        return list(entry["tokens"])

    def store(self, new_entries: dict[str, dict[str, Any]]) -> None:
        if not new_entries:
            return
        write_shard(self.directory, "chunk", ".json", json.dumps(new_entries).encode("utf-8"))
        self.entries.update(new_entries)


def source_hash(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """Hash of one example's source tokens (padding excluded)."""
    tokens = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    return hashlib.sha1(json.dumps(tokens.tolist()).encode()).hexdigest()


class SeqKDMethod(TextMethod):
    """Sequence-level KD: teacher and student meet on the teacher's (cached) beam-search outputs."""

    name: ClassVar[str] = "seq-kd"
    description: ClassVar[str] = "Sequence-level KD (Kim & Rush 2016): teacher beam outputs as targets, cached on disk"
    Config: ClassVar[type[BaseModel]] = SeqKDConfig

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        assert isinstance(config, SeqKDConfig)
        self.config: SeqKDConfig = config
        if not self.text_teacher.is_encoder_decoder:
            raise KDUserError("plugin 'seq-kd' decodes with encoder-decoder teachers only (teacher 'seq2seq').")
        self._cache: SeqKDCache | None = None
        self.teacher_calls = 0  # beam-search batches run (0 when every target came from the cache)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"kd": {"name": "nll"}}}

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
            config = self.config
            sources = take_rows(batch, torch.tensor(missing, device=input_ids.device), ("input_ids", "attention_mask"))
            data_labels = batch.get("labels")
            # Without data targets to measure, only the hard cap applies.
            limit = generation_length_limit(0 if data_labels is None else longest_target(data_labels),
                                            config.max_new_tokens,
                                            None if data_labels is None else config.max_length_ratio,
                                            config.max_length_offset)
            generated = beam_search(self.text_teacher, sources["input_ids"], sources["attention_mask"],
                                    num_beams=config.num_beams, max_new_tokens=limit,
                                    length_penalty=config.length_penalty)
            self.teacher_calls += 1
            new_entries: dict[str, dict[str, Any]] = {}
            for index, tokens in zip(missing, generated.to_lists()):
                targets[index] = tokens
                new_entries[ids[index]] = {"source": hashes[index], "tokens": tokens}
            cache.store(new_entries)
        return pad_rows([t or [] for t in targets], IGNORE_INDEX, device=input_ids.device), len(ids) - len(missing)

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Both models read the teacher's outputs as prefixes; those outputs are also the targets."""
        targets, hits = self.teacher_targets(batch)
        model_batch = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "labels": targets}
        return self.meet(model_batch, {"cache_hit_fraction": hits / max(1, targets.shape[0])})


__all__ = ["ScratchMethod", "SeqKDCache", "SeqKDConfig", "SeqKDMethod", "WordKDMethod", "source_hash"]
