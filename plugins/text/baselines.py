"""Baselines for ImitKD: training from scratch, word-level KD and sequence-level KD.

Each decides only where teacher and student meet; the configured objectives (defaults below) compare them there.

* ``scratch``: the student on the data (default objective: NLL on the data targets; the teacher is never run).
* ``word-kd`` (Hinton et al. 2015; Kim & Rush 2016 "word-level"): teacher and student on the *data* prefixes
  (default objective: forward KL; add ``nll`` as a second objective for the weighted NLL on the data).
* ``seq-kd`` (Kim & Rush 2016): the teacher's beam-search outputs replace the data targets; they are generated
  once per training example and cached on disk, keyed by the example id, a hash of its source tokens and the
  teacher's weights (default objective: NLL on them), or read from a teacher store captured with
  ``kd teacher capture --plugin seq-kd`` (``teacher: store``, no teacher model in memory).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Comparison, EmptyConfig, Student, Task, Teacher, WeightedObjective
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX, Signal
from kdcore.teacher_shards import AppendableStore
from kdcore.teacher_store import StoredTeacher
from kd_plugins.text.generation import beam_search, generation_length_limit, longest_target
from kd_plugins.text.method import TextMethod, take_rows

log = logging.getLogger(__name__)

#: The kind of seq-kd's cache entries (kdcore.cache).
SEQ_KD_KIND = "seq-kd"
#: /2: the outputs are teacher-store signal shards (kdcore.teacher_shards); /1 wrote JSON chunks.
SEQ_KD_FORMAT = "seq-kd/2"
#: The options of SeqKDConfig that decide the teacher's outputs (recorded with them, compared with a store's).
DECODING_OPTIONS = ("num_beams", "length_penalty", "max_new_tokens", "max_length_ratio", "max_length_offset")


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
    """Teacher outputs on disk: an appendable teacher store in the kd cache
    (:class:`kdcore.teacher_shards.AppendableStore`), ``<root>/<key>/`` with one ``sequences`` signal shard per
    batch of new outputs.

    ``key`` combines the teacher's weight fingerprint and the decoding settings (recorded in the entry's manifest,
    ``built_from``), so a different teacher or beam never reuses stale targets. Each output is stored under its
    example id with a hash of the example's source tokens as its digest: an id whose source changed is generated
    again. A damaged shard is deleted, with a warning naming it, and its targets are generated again.
    """

    def __init__(self, root: Path, key: str, built_from: dict[str, Any]) -> None:
        self.outputs = AppendableStore(Path(root) / key, SEQ_KD_KIND, {"format": SEQ_KD_FORMAT, **built_from},
                                       what="the seq-kd teacher outputs", label="seq-kd cache file",
                                       examples_label="targets")
        self.directory = self.outputs.directory

    def lookup_many(self, example_ids: Sequence[str], source_hashes: Sequence[str]) -> list[list[int] | None]:
        """The stored outputs of the examples (None where missing or generated from another source)."""
        found = self.outputs.lookup(example_ids, source_hashes)
        return [found[i]["sequences"].tolist() if i in found else None for i in example_ids]

    def lookup(self, example_id: str, source_hash: str) -> list[int] | None:
        return self.lookup_many([example_id], [source_hash])[0]

    def store(self, new_entries: dict[str, dict[str, Any]]) -> None:
        """Store ``{example id: {"source": source hash, "tokens": [...]}}`` as one new shard."""
        if not new_entries:
            return
        self.outputs.append(list(new_entries), [entry["source"] for entry in new_entries.values()],
                            [{"sequences": torch.tensor(entry["tokens"], dtype=torch.int32)}
                             for entry in new_entries.values()])


class TeacherSequences:
    """The teacher's beam-search outputs for training examples, generated once per example and kept in the seq-kd
    cache (or read from a teacher store captured with them): seq-kd's targets, and ImitKD*'s data.

    ``config`` carries the decoding options (:class:`SeqKDConfig`); ``where`` names the config owner in messages.
    """

    def __init__(self, teacher: Any, task: Task, config: SeqKDConfig, where: str) -> None:
        self.teacher, self.task, self.config, self.where = teacher, task, config, where
        self._cache: SeqKDCache | None = None
        self.teacher_calls = 0

    @property
    def cache(self) -> SeqKDCache:
        if self._cache is None:
            config = self.config
            settings = SeqKDMethod.decoding_settings(config)
            teacher_fingerprint = self.teacher.fingerprint()
            settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
            key = f"{teacher_fingerprint[:16]}-{settings_hash[:8]}"
            root = Path(config.cache_dir).expanduser() if config.cache_dir else Path(self.task.cache_dir) / "seq-kd"
            self._cache = SeqKDCache(root, key, {"teacher_sha256": teacher_fingerprint, "settings": settings,
                                                 "teacher_class": type(self.teacher.hf_model).__name__})
        return self._cache

    def targets(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Teacher beam outputs for the batch as -100 padded labels, and how many rows were cache hits."""
        if self.config.ids_key not in batch:
            raise KDUserError(f"{self.where} caches teacher outputs per training example and needs the batch key "
                              f"'{self.config.ids_key}' (ids_key); this task's batches have keys {sorted(batch)}.")
        ids = [str(item) for item in batch[self.config.ids_key]]
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if isinstance(self.teacher, StoredTeacher):
            return pad_rows(self.teacher.store.sequences(ids), IGNORE_INDEX, device=input_ids.device), len(ids)
        hashes = [source_hash(input_ids[i], None if attention_mask is None else attention_mask[i])
                  for i in range(len(ids))]
        cache = self.cache
        targets: list[list[int] | None] = cache.lookup_many(ids, hashes)
        missing = [index for index, target in enumerate(targets) if target is None]
        if missing:
            rows = take_rows(batch, torch.tensor(missing, device=input_ids.device), ("input_ids", "attention_mask"))
            # The length cap follows the longest data target of the whole batch, as when every row is decoded.
            rows["labels"] = batch.get("labels")
            generated = SeqKDMethod.decode_teacher_sequences(self.teacher, self.config, rows)
            self.teacher_calls += 1
            new_entries: dict[str, dict[str, Any]] = {}
            for index, tokens in zip(missing, generated):
                targets[index] = tokens
                new_entries[ids[index]] = {"source": hashes[index], "tokens": tokens}
            cache.store(new_entries)
        return pad_rows([t or [] for t in targets], IGNORE_INDEX, device=input_ids.device), len(ids) - len(missing)


def source_hash(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """Hash of one example's source tokens (padding excluded)."""
    tokens = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    return hashlib.sha1(json.dumps(tokens.tolist()).encode()).hexdigest()


class SeqKDMethod(TextMethod):
    """Sequence-level KD: teacher and student meet on the teacher's (cached or stored) beam-search outputs."""

    name: ClassVar[str] = "seq-kd"
    description: ClassVar[str] = "Sequence-level KD (Kim & Rush 2016): teacher beam outputs as targets, cached on disk"
    Config: ClassVar[type[BaseModel]] = SeqKDConfig
    # Its targets can come from a teacher store captured with them (checked in __init__, where a store without
    # them, or objectives asking a store for more, are refused).
    needs_teacher_model: ClassVar[bool] = False

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        assert isinstance(config, SeqKDConfig)
        self.config: SeqKDConfig = config
        if not self.text_teacher.is_encoder_decoder:
            raise KDUserError("plugin 'seq-kd' decodes with encoder-decoder teachers only (teacher 'seq2seq').")
        if isinstance(teacher, StoredTeacher):
            self._check_store(teacher)
        self.sequences = TeacherSequences(self.text_teacher, task, config, "plugin 'seq-kd'")

    @property
    def cache(self) -> SeqKDCache:
        """The run-time cache of the teacher's outputs (not used with a teacher store)."""
        return self.sequences.cache

    @property
    def teacher_calls(self) -> int:
        """Beam-search batches run (0 when every target came from the cache or a store)."""
        return self.sequences.teacher_calls

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"kd": {"name": "nll"}}}

    @staticmethod
    def decoding_settings(config: SeqKDConfig) -> dict[str, Any]:
        """The options that decide the teacher's outputs."""
        return {option: getattr(config, option) for option in DECODING_OPTIONS}

    @classmethod
    def decode_teacher_sequences(cls, teacher: Teacher, config: SeqKDConfig, batch: Batch) -> list[list[int]]:
        """The teacher's beam-search outputs for every row of ``batch`` (also ``kd teacher capture``'s sequences)."""
        data_labels = batch.get("labels")
        # Without data targets to measure, only the hard cap applies.
        limit = generation_length_limit(0 if data_labels is None else longest_target(data_labels),
                                        config.max_new_tokens, None if data_labels is None else config.max_length_ratio,
                                        config.max_length_offset)
        generated = beam_search(teacher, batch["input_ids"], batch.get("attention_mask"),  # type: ignore[arg-type]
                                num_beams=config.num_beams, max_new_tokens=limit,
                                length_penalty=config.length_penalty)
        return generated.to_lists()

    def _check_store(self, teacher: StoredTeacher) -> None:
        """Planning: the store holds the teacher's outputs under these decoding settings, and nothing else is asked
        of it (a store answers on the data, not on the teacher's outputs)."""
        store, where = teacher.store, f"teacher store '{teacher.store.directory}'"
        if Signal.SEQUENCES.value not in store.signals:
            raise KDUserError(f"plugin 'seq-kd' learns from the teacher's output sequences, but the {where} "
                              f"(teacher.args.path) holds {', '.join(store.signals)}. Capture one with "
                              f"'kd teacher capture --plugin seq-kd' (--signals sequences).")
        captured, wanted = dict(store.settings.sequences or {}), self.decoding_settings(self.config)
        differing = [f"method.{option}={wanted[option]} (captured: {captured.get(option)})"
                     for option in DECODING_OPTIONS if captured.get(option) != wanted[option]]
        if differing:
            raise KDUserError(f"The {where} holds the teacher's outputs decoded with other settings: "
                              f"{', '.join(differing)}. Use the captured settings, or capture again with these "
                              f"method.* options (kd teacher capture --plugin seq-kd --set method....).")
        if self.config.cache_dir is not None:
            raise KDUserError(f"method.cache_dir is set, but with a teacher store ({where}) seq-kd reads the "
                              f"teacher's outputs from the store and caches nothing; remove method.cache_dir.")
        if self.teacher_request().signals:
            asked = ", ".join(sorted(signal.value for signal in self.teacher_request().signals))
            raise KDUserError(f"The objectives ask the teacher for {asked} on its own outputs, where plugin 'seq-kd' "
                              f"compares the models; a teacher store ({where}) holds the teacher's signals on the "
                              f"data only. Use the teacher model (teacher.name), or objectives that ask nothing of "
                              f"the teacher (nll).")

    def teacher_targets(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Teacher beam outputs for the batch as -100 padded labels, and how many rows were cache hits."""
        return self.sequences.targets(batch)

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Both models read the teacher's outputs as prefixes; those outputs are also the targets."""
        targets, hits = self.teacher_targets(batch)
        model_batch = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "labels": targets}
        return self.meet(model_batch, {"cache_hit_fraction": hits / max(1, targets.shape[0])})


__all__ = ["ScratchMethod", "SeqKDCache", "SeqKDConfig", "SeqKDMethod", "TeacherSequences", "WordKDMethod",
           "source_hash"]
