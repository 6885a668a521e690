"""The base of the text tasks (``wmt``, ``summarization``): :class:`TextTask`.

A :class:`TextTask` reads its corpus (the embedded one by default, or local files: :mod:`.splits`),
tokenises it once with the task's tokenizer (:mod:`.tokenizer`) within the length limits
(:mod:`.encoding`), and yields items

``{"id", "source", "target", "split", "source_ids", "target_ids"}``.

With ``data.teacher_vocab_size`` the teacher reads the text through a tokenizer of its own
(:attr:`TextTask.teacher_tokenizer`, trained like the task's): items and batches then carry the
teacher's token ids and both sides' character offsets as well (:mod:`.encoding`, :mod:`.collate`),
the task-trained teacher learns from the teacher's reading (:meth:`TextTask.teacher_items`), and a
model with the teacher's tokenizer is evaluated on it. The task's tokenizer stays the student's.

Training batches are length-bucketed (:func:`kd_tasks.sampling.length_bucketed_batches`) and
collated as seq2seq batches (:mod:`.collate`). Evaluation decodes every item (greedy, and beam
search with each of ``data.eval_beams``: :mod:`.decoding`) and hands hypotheses and references to
the subclass's :meth:`TextTask.score` (sacrebleu or rouge-score, :mod:`.metrics`), reporting the
decoding speed and the signs of a model that ignores its input (:mod:`.diagnostics`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, DataSplits, Model, Task
from kdcore.io import atomic_write_directory
from kd_tasks.sampling import length_bucketed_batches

from .collate import collate_seq2seq
from .corpus import Corpus
from .data_config import TextDataConfig
from .decoding import decode_items
from .diagnostics import distinct_fraction, first_batch_encoder_spread, warn_if_input_ignored
from .encoding import encode_records, teacher_view
from .files import Layout, TextRecord, configured_layouts, read_parallel_lines
from .presets import text_task_defaults
from .splits import capped_splits, file_splits
from .tokenizer import task_teacher_tokenizer, task_tokenizer, tokenizer_fingerprint

#: Training batches are sorted by length within pools of this many batches.
BUCKET_POOL_BATCHES = 50
#: Where a run directory holds the run's tokenizer (:meth:`TextTask.save_run_files`).
RUN_TOKENIZER = "tokenizer"


class TextTask(Task):
    """Base of the seq2seq text tasks; subclasses set the corpus, layouts and metrics."""

    DataConfig: ClassVar[type[TextDataConfig]] = TextDataConfig
    #: Column layouts tried, in order, on rows of TSV/CSV/JSONL/dataset files.
    layouts: ClassVar[tuple[Layout, ...]] = ()
    eval_file_roles: ClassVar[tuple[str, ...]] = ("source", "reference")
    #: The metrics whose per-item statistics the test evaluation records (kd_tasks.text.metrics.item_statistics).
    item_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data_config: TextDataConfig, cache_dir: Path) -> None:
        super().__init__(data_config, cache_dir)
        self.data_config: TextDataConfig = data_config
        self._records: dict[str, list[TextRecord]] | None = None
        self._tokenizer: Any = None
        self._teacher_tokenizer: Any = None
        self._splits: DataSplits | None = None
        self.tokenizer_dir: Path | None = None
        self.corpus_info: dict[str, Any] = {}
        #: Non-numeric facts of the last evaluation (e.g. sacrebleu signatures); see metric_metadata().
        self.last_metadata: dict[str, str] = {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return text_task_defaults(cls.name)

    # ------------------------------------------------------------------ data
    def embedded_records(self) -> dict[str, list[TextRecord]]:
        """The built-in corpus as ``{"train", "valid", "test"}`` record lists (subclasses)."""
        raise NotImplementedError

    def note_embedded_corpus(self, corpus: Corpus) -> None:
        """Record where the embedded corpus is cached and its content hash (reported with the run's data)."""
        self.corpus_info["manifest"] = {"directory": str(corpus.directory),
                                        "content_sha256": corpus.manifest.get("content_sha256")}

    def records(self) -> dict[str, list[TextRecord]]:
        """The raw text records of every split, after the size limits (read once)."""
        if self._records is None:
            config = self.data_config
            if config.corpus == "embedded":
                records = self.embedded_records()
            else:
                records = file_splits(config, configured_layouts(config.source_field, config.target_field,
                                                                 self.layouts))
            self._records = capped_splits(records, config, self.name)
        return self._records

    @property
    def tokenizer(self) -> Any:
        """The task's tokenizer (models built without their own tokenizer use it too)."""
        if self._tokenizer is None:
            self._tokenizer, self.tokenizer_dir = task_tokenizer(self.data_config, self.cache_dir,
                                                                 self.records()["train"])
        return self._tokenizer

    @property
    def teacher_tokenizer(self) -> Any:
        """The teacher's tokenizer: its own with ``data.teacher_vocab_size`` (trained on the same text, cached like
        the task's), else the task's."""
        if not self.data_config.separate_teacher_tokenizer:
            return self.tokenizer
        if self._teacher_tokenizer is None:
            self._teacher_tokenizer, _ = task_teacher_tokenizer(self.data_config, self.cache_dir,
                                                                self.records()["train"])
        return self._teacher_tokenizer

    def teacher_items(self, items: Sequence[Any]) -> list[Any]:
        """``items`` as the teacher reads them (its own token ids as ``source_ids``/``target_ids``): what the
        task-trained teacher learns from and is evaluated on. The items themselves when teacher and student share
        the task's tokenizer."""
        return [teacher_view(item) for item in items]

    def reads_teacher_view(self, model: Any) -> bool:
        """Whether ``model`` reads the text through the teacher's own tokenizer (not the task's)."""
        tokenizer = getattr(model, "tokenizer", None)
        return (self.data_config.separate_teacher_tokenizer and tokenizer is not None
                and tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(self.teacher_tokenizer))

    def _encode(self, records: Sequence[TextRecord], split: str, *, training: bool) -> list[dict[str, Any]]:
        teacher_tokenizer = self.teacher_tokenizer if self.data_config.separate_teacher_tokenizer else None
        items, self.corpus_info[split] = encode_records(records, split, self.tokenizer, self.data_config,
                                                        training=training, teacher_tokenizer=teacher_tokenizer)
        return items

    def build_data(self, seed: int) -> DataSplits:  # noqa: ARG002 - data depend on the data config only
        if self._splits is None:
            records = self.records()
            self._splits = DataSplits(train=self._encode(records["train"], "train", training=True),
                                      valid=self._encode(records["valid"], "valid", training=False),
                                      test=self._encode(records["test"], "test", training=False))
            if not self._splits.train:
                raise KDUserError("Every training example was skipped as over-long; raise data.max_source_tokens / "
                                  "max_target_tokens or use data.overlong=truncate.")
        return self._splits

    def data_fingerprint(self) -> str:
        """sha256 of the tokenised training split and the tokenizer: what the student learns from (and, with one
        tokenizer for both, a task-trained teacher)."""
        return _training_data_fingerprint(self.tokenizer, self.build_data(0).train)

    def teacher_data_fingerprint(self) -> str:
        """sha256 of the training split as the teacher reads it and of its tokenizer: what a task-trained teacher
        learns from. Equal to :meth:`data_fingerprint` of a task whose own tokenizer is this one."""
        return _training_data_fingerprint(self.teacher_tokenizer, self.teacher_items(self.build_data(0).train))

    def fingerprints(self) -> dict[str, str]:
        """``data`` (what the student learns from), ``test`` (the scored inputs and references) and ``tokenizer``
        (its token -> id map); with a teacher tokenizer of its own also ``teacher_data`` and ``teacher_tokenizer``."""
        digest = hashlib.sha256()
        for item in self.build_data(0).test:
            digest.update(json.dumps([item["source_ids"], item["target"]], ensure_ascii=False).encode())
        fingerprints = {"data": self.data_fingerprint(), "test": digest.hexdigest(),
                        "tokenizer": tokenizer_fingerprint(self.tokenizer)}
        if self.data_config.separate_teacher_tokenizer:
            fingerprints.update(teacher_data=self.teacher_data_fingerprint(),
                                teacher_tokenizer=tokenizer_fingerprint(self.teacher_tokenizer))
        return fingerprints

    def save_run_files(self, out_dir: Path) -> dict[str, Any]:
        """The tokenizer in ``<out>/tokenizer/`` (Hugging Face layout): the student's token ids mean nothing without
        it, and the cache that holds it (or the data it is trained from) may be elsewhere."""
        atomic_write_directory(Path(out_dir) / RUN_TOKENIZER, lambda staging: self.tokenizer.save_pretrained(staging))
        return {"tokenizer": {"directory": RUN_TOKENIZER, "fingerprint": tokenizer_fingerprint(self.tokenizer)}}

    def use_run_files(self, out_dir: Path, stored: Mapping[str, Any]) -> None:
        """Tokenise with the run's own tokenizer; where its copy is gone, with the one this config builds, if it has
        the recorded fingerprint."""
        from kd_plugins.text.models import load_tokenizer

        entry = stored.get("tokenizer")
        if not isinstance(entry, Mapping):
            return
        expected, directory = str(entry.get("fingerprint")), Path(out_dir) / str(entry.get("directory"))
        if directory.is_dir():
            tokenizer = load_tokenizer(str(directory), local_files_only=True)
            if tokenizer_fingerprint(tokenizer) != expected:
                raise KDUserError(f"The run's tokenizer '{directory}' does not have the fingerprint its "
                                  f"provenance.json records ({expected[:16]}): it was changed after the run. Copy "
                                  f"the tokenizer/ folder again from the original run directory.")
            self._tokenizer, self.tokenizer_dir = tokenizer, directory
            return
        rebuild = ("kd trains it again from data.train (the same training data give the same tokenizer)"
                   if self.data_config.tokenizer == "train" else f"kd loads it from '{self.data_config.tokenizer}'")
        try:
            rebuilt = tokenizer_fingerprint(self.tokenizer)
        except KDUserError as error:
            raise KDUserError(f"The run's tokenizer '{directory}' (fingerprint {expected[:16]}) is missing, and "
                              f"rebuilding it failed: {error} Copy the tokenizer/ folder from the original run "
                              f"directory, or make the data it is built from available ({rebuild}).") from None
        if rebuilt != expected:
            raise KDUserError(f"The run's tokenizer '{directory}' (fingerprint {expected[:16]}) is missing, and the "
                              f"tokenizer this config builds ({rebuild}) has fingerprint {rebuilt[:16]}: the student's "
                              f"token ids would not match it. Copy the tokenizer/ folder from the original run "
                              f"directory, or point data.train (--set) at the run's training data.")

    def load_eval_files(self, files: Mapping[str, Path]) -> Sequence[Any]:
        """Items from ``--source`` and ``--reference`` (one sentence per line, same number of lines, UTF-8)."""
        missing = [role for role in self.eval_file_roles if role not in files]
        if missing:
            raise KDUserError(f"Task '{self.name}' scores a user test set from --source FILE and --reference FILE; "
                              f"missing: {', '.join('--' + m for m in missing)}.")
        records = read_parallel_lines(Path(files["source"]), Path(files["reference"]), empty="error")
        return self._encode(records, "test", training=False)

    # ------------------------------------------------------------------ batches
    def collate(self, items: Sequence[Any]) -> Batch:
        teacher_pad = int(self.teacher_tokenizer.pad_token_id) if self.data_config.separate_teacher_tokenizer else None
        return collate_seq2seq(items, int(self.tokenizer.pad_token_id), teacher_pad)

    def epoch_batches(self, dataset: Sequence[Any], batch_size: int,
                      generator: torch.Generator) -> list[list[int]] | None:
        """Length-bucketed batches (by target, then source length)."""
        lengths = [(len(item["target_ids"]), len(item["source_ids"])) for item in dataset]
        return length_bucketed_batches(lengths, batch_size, BUCKET_POOL_BATCHES, generator)

    # ------------------------------------------------------------------ evaluation
    def score(self, hypotheses: list[str], references: list[str], suffix: str) -> dict[str, float]:
        """Metrics of detokenised hypotheses against references; keys end with ``suffix`` (subclasses)."""
        raise NotImplementedError

    def metric_metadata(self) -> dict[str, str]:
        """Non-numeric facts about the last evaluation's metrics (e.g. sacrebleu signatures)."""
        return dict(self.last_metadata)

    def record_test_items(self, decoding: str, dataset: Sequence[Any], hypotheses: Sequence[str],
                          references: Sequence[str]) -> None:
        """Each item's output and the sufficient statistics of :attr:`item_metrics`, for the paired bootstrap
        (:func:`kdcore.evaluation.record_items`; computed only while the engine records)."""
        from kdcore.evaluation import is_recording_items, record_items

        from .metrics import AGGREGATES, item_statistics

        if not is_recording_items() or not self.item_metrics:
            return
        statistics = item_statistics(hypotheses, references, self.item_metrics)
        record_items(decoding, [{"id": item["id"], "hypothesis": hypothesis, "reference": reference, "stats": stats}
                                for item, hypothesis, reference, stats in zip(dataset, hypotheses, references,
                                                                             statistics)],
                     {name: AGGREGATES[name] for name in self.item_metrics})

    def evaluate(self, model: Model, dataset: Sequence[Any], device: torch.device, batch_size: int) -> dict[str, float]:
        from kd_plugins.text.models import HFTextModel

        if not dataset:
            raise KDUserError(f"Task '{self.name}': nothing to evaluate (empty dataset).")
        if not isinstance(model, HFTextModel):
            raise KDUserError(f"Task '{self.name}' evaluates text models (teacher/student 'seq2seq'); got "
                              f"{type(model).__name__}.")
        in_training = dataset[0].get("split") == "valid"
        tokenizer = self.tokenizer
        if self.reads_teacher_view(model):
            # Padded with the task's padding id: a padded position is masked, whatever id it holds.
            dataset, tokenizer = self.teacher_items(dataset), self.teacher_tokenizer
        beams = self.data_config.valid_beams if in_training else self.data_config.eval_beams
        references = [item["target"] for item in dataset]
        metrics: dict[str, float] = {}
        self.last_metadata = {}
        spread = first_batch_encoder_spread(model, dataset, self.collate, device, batch_size)
        if spread is not None:
            metrics["encoder_spread"] = spread
        for num_beams in beams:
            suffix = "" if num_beams == 1 else f"_beam{num_beams}"
            hypotheses, speed = decode_items(model, dataset, self.collate, tokenizer, self.data_config, device,
                                             batch_size, num_beams)
            metrics.update(self.score(hypotheses, references, suffix))
            prefix = "greedy" if num_beams == 1 else f"beam{num_beams}"
            self.record_test_items(prefix, dataset, hypotheses, references)
            metrics.update({f"{prefix}_{key}": value for key, value in speed.items()})
            metrics[f"{prefix}_distinct_outputs"] = distinct_fraction(hypotheses)
            warn_if_input_ignored(hypotheses, f"{self.name} {dataset[0].get('split', '?')} ({prefix})", spread)
        metrics["examples"] = float(len(dataset))
        return metrics


def _training_data_fingerprint(tokenizer: Any, items: Sequence[Any]) -> str:
    """sha256 of a tokenizer's token -> id map and of the ``source_ids``/``target_ids`` of ``items``."""
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for item in items:
        digest.update(json.dumps([item["source_ids"], item["target_ids"]]).encode())
    return digest.hexdigest()


__all__ = ["BUCKET_POOL_BATCHES", "RUN_TOKENIZER", "TextTask"]
