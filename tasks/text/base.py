"""What the text tasks (``wmt``, ``summarization``) share: data config, loading, tokenising, batching, decoding.

A :class:`TextTask` reads its corpus (the embedded one by default, or local files),
tokenises it once with the task's tokenizer (trained offline with ``tokenizers`` on
the training text, or a model's own), and yields items

``{"id", "source", "target", "split", "source_ids", "target_ids"}``

where the token ids end with the end-of-sequence token and are truncated to
``data.max_source_tokens`` / ``data.max_target_tokens`` (each truncation is counted
and logged). :meth:`TextTask.collate` builds the batch keys that
``kd_plugins.text.models`` documents for seq2seq models: ``input_ids``,
``attention_mask``, ``labels`` (-100 padded) and ``ids`` (the seq-kd cache key).
Training batches are length-bucketed (:meth:`TextTask.epoch_batches`).

Evaluation decodes every item (greedy, and beam search with each of
``data.eval_beams``), detokenises with the tokenizer and hands hypotheses and
references to the subclass's :meth:`TextTask.score` (sacrebleu or rouge-score);
decoding speed (sentences/s, generated tokens/s) is measured on the same pass.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from kdcore.config import StrictModel
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, DataSplits, Model, Task

from .files import (
    Layout, ReadStats, TextRecord, read_csv_rows, read_dataset_rows, read_jsonl_rows, read_parallel_lines,
    read_tsv_rows, records_from_rows,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "valid", "test")


class SplitFiles(StrictModel):
    """Where one split comes from: a TSV/CSV/JSONL file or dataset folder (``path``), or a plain-text pair."""

    path: str | None = Field(None, description="TSV/CSV/JSONL file, or a folder written by datasets' save_to_disk")
    source: str | None = Field(None, description="plain-text source file, one sentence per line")
    reference: str | None = Field(None, description="plain-text reference file, line i translates/summarises line i")
    split: str | None = Field(None, description="split name inside a saved DatasetDict (train, validation, test)")

    @model_validator(mode="after")
    def _one_origin(self) -> "SplitFiles":
        if (self.path is None) == (self.source is None and self.reference is None):
            raise ValueError("give either 'path' (a TSV/CSV/JSONL file or dataset folder) or both 'source' and "
                             "'reference' (plain-text files)")
        if self.path is None and (self.source is None or self.reference is None):
            raise ValueError("plain-text data needs both 'source' and 'reference'")
        return self


class TextDataConfig(StrictModel):
    """``data.*`` keys shared by the text tasks."""

    corpus: Literal["embedded", "files"] = Field(
        "embedded", description="embedded: the task's built-in corpus; files: data.train/valid/test")
    train: SplitFiles | None = None
    valid: SplitFiles | None = Field(None, description="default: data.valid_size examples held out of train")
    test: SplitFiles | None = Field(None, description="default: data.test_size examples held out of train")
    format: Literal["auto", "tsv", "csv", "jsonl", "dataset"] = Field(
        "auto", description="format of data.*.path; auto: by extension (.tsv .csv .jsonl/.json), folders = dataset")
    source_field: str | None = Field(None, description="column with the source text (default: detected)")
    target_field: str | None = Field(None, description="column with the target text (default: detected)")
    valid_size: PositiveInt = Field(500, description="held-out valid examples when no valid files are given")
    test_size: PositiveInt = Field(1000, description="held-out test examples when no test files are given")
    max_train: PositiveInt | None = Field(None, description="use at most this many training examples (quick runs)")
    max_valid: PositiveInt | None = Field(None, description="use at most this many valid examples")
    max_test: PositiveInt | None = Field(None, description="use at most this many test examples")
    max_source_tokens: PositiveInt = Field(128, description="longer sources are truncated (counted, logged)")
    max_target_tokens: PositiveInt = Field(128, description="longer targets are truncated (counted, logged)")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="training examples over the token limits: truncate or skip (counted, logged)")
    tokenizer: str = Field("train", description="'train': a BPE tokenizer trained on the training text (cached); "
                                                "else a tokenizer directory, tokenizer.json or hub id")
    vocab_size: PositiveInt = Field(8000, description="size of the trained tokenizer's vocabulary")
    local_files_only: bool = Field(True, description="tokenizer hub id: never download")
    eval_beams: list[PositiveInt] = Field(default_factory=lambda: [1, 5],
                                          description="beam sizes of the final evaluation (1 = greedy)")
    valid_beams: list[PositiveInt] = Field(default_factory=lambda: [1],
                                           description="beam sizes of the in-training validation")
    max_length_ratio: float = Field(2.0, gt=0, description="decode at most ratio x longest source + offset tokens")
    max_length_offset: int = Field(10, ge=0)
    max_new_tokens: PositiveInt = Field(256, description="hard cap on decoded tokens")

    @field_validator("eval_beams", "valid_beams")
    @classmethod
    def _greedy_first(cls, value: list[int]) -> list[int]:
        if 1 not in value:
            raise ValueError("must include 1: greedy decoding gives the metric that selects the best checkpoint")
        return sorted(set(value))

    @model_validator(mode="after")
    def _files_given(self) -> "TextDataConfig":
        if self.corpus == "files" and self.train is None:
            raise ValueError("corpus 'files' needs data.train (e.g. data.train.path=train.tsv, or "
                             "data.train.source=train.en and data.train.reference=train.de)")
        return self


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "dataset"
    suffix = path.suffix.lower()
    formats = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
    if suffix not in formats:
        raise KDUserError(f"Cannot tell the format of '{path}' from its extension '{suffix}'. Use .tsv, .csv, .jsonl "
                          f"or a dataset folder, or set data.format.")
    return formats[suffix]


def _truncate(ids: list[int], limit: int, eos_id: int | None) -> list[int]:
    """The first ``limit`` ids, still ending with eos (a truncated target must still teach the model to stop)."""
    if len(ids) <= limit:
        return ids
    if eos_id is not None and ids and ids[-1] == eos_id:
        return ids[:limit - 1] + [eos_id]
    return ids[:limit]


class TextTask(Task):
    """Base of the seq2seq text tasks; subclasses set the corpus, layouts and metrics."""

    DataConfig: ClassVar[type[TextDataConfig]] = TextDataConfig
    #: Column layouts tried, in order, on rows of TSV/CSV/JSONL/dataset files.
    layouts: ClassVar[tuple[Layout, ...]] = ()
    eval_file_roles: ClassVar[tuple[str, ...]] = ("source", "reference")

    def __init__(self, data_config: TextDataConfig, cache_dir: Path) -> None:
        super().__init__(data_config, cache_dir)
        self.data_config: TextDataConfig = data_config
        self._records: dict[str, list[TextRecord]] | None = None
        self._tokenizer: Any = None
        self._splits: DataSplits | None = None
        self.tokenizer_dir: Path | None = None
        self.corpus_info: dict[str, Any] = {}
        #: Non-numeric facts of the last evaluation (e.g. sacrebleu signatures); see metric_metadata().
        self.last_metadata: dict[str, str] = {}

    # ------------------------------------------------------------------ corpus
    def embedded_records(self) -> dict[str, list[TextRecord]]:
        """The built-in corpus as ``{"train", "valid", "test"}`` record lists (subclasses)."""
        raise NotImplementedError

    def _layouts(self) -> tuple[Layout, ...]:
        config = self.data_config
        if config.source_field or config.target_field:
            if not (config.source_field and config.target_field):
                raise KDUserError("Set both data.source_field and data.target_field (or neither, to detect them).")
            return (Layout("data.source_field/target_field", config.source_field, config.target_field, "id"),)
        return self.layouts

    def _read_split(self, name: str, files: SplitFiles) -> list[TextRecord]:
        stats = ReadStats()
        if files.path is None:
            records = read_parallel_lines(Path(files.source).expanduser(), Path(files.reference).expanduser(),
                                          empty="skip", stats=stats)
        else:
            path = Path(files.path).expanduser()
            if not path.exists():
                raise KDUserError(f"data.{name}.path '{path}' does not exist.")
            kind = _format_of(path, self.data_config.format)
            readers = {"tsv": read_tsv_rows, "csv": read_csv_rows, "jsonl": read_jsonl_rows}
            rows = read_dataset_rows(path, files.split or name) if kind == "dataset" else readers[kind](path)
            layouts = (Layout("tsv", "0", "1"),) if kind == "tsv" else self._layouts()
            records = records_from_rows(rows, layouts, prefix=f"{name}:{path.name}", stats=stats)
        stats.log(f"data.{name}")
        if not records:
            raise KDUserError(f"data.{name} holds no usable examples ({stats.rows} rows read, skipped: "
                              f"{stats.skipped or 'none'}).")
        return records

    def _file_records(self) -> dict[str, list[TextRecord]]:
        config = self.data_config
        assert config.train is not None
        train = self._read_split("train", config.train)
        records: dict[str, list[TextRecord]] = {}
        # Held-out splits taken from train are chosen by a hash of the source text, so the choice is
        # deterministic and the same source never lands in two splits.
        ranked = sorted(train, key=lambda r: hashlib.sha256(r["source"].encode("utf-8")).hexdigest())
        start = 0
        for name, size in (("test", config.test_size), ("valid", config.valid_size)):
            files = getattr(config, name)
            if files is not None:
                records[name] = self._read_split(name, files)
            else:
                records[name] = ranked[start:start + size]
                start += size
        if start:
            held = {r["source"] for r in ranked[:start]}
            train = [r for r in train if r["source"] not in held]
            if not train:
                raise KDUserError(f"data.train has {len(ranked)} examples; holding out data.valid_size/test_size "
                                  f"({config.valid_size}/{config.test_size}) leaves none for training. Give "
                                  f"data.valid/data.test files or smaller sizes.")
        records["train"] = train
        return records

    def records(self) -> dict[str, list[TextRecord]]:
        """The raw text records of every split, after the size limits (read once)."""
        if self._records is None:
            config = self.data_config
            records = self.embedded_records() if config.corpus == "embedded" else self._file_records()
            limits = {"train": config.max_train, "valid": config.max_valid, "test": config.max_test}
            self._records = {name: records[name][:limits[name]] if limits[name] else records[name]
                             for name in SPLITS}
            for name in SPLITS:
                if not self._records[name]:
                    raise KDUserError(f"The {name} split of task '{self.name}' is empty; check the data config.")
        return self._records

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """The task's tokenizer (models built without their own tokenizer use it too)."""
        if self._tokenizer is None:
            config = self.data_config
            if config.tokenizer == "train":
                from .tokenizer import cached_trained_tokenizer

                train = self.records()["train"]
                texts = [r["source"] for r in train] + [r["target"] for r in train]
                self._tokenizer, self.tokenizer_dir = cached_trained_tokenizer(self.cache_dir, texts,
                                                                               config.vocab_size)
            else:
                from kd_plugins.text.models import load_tokenizer

                self._tokenizer = load_tokenizer(config.tokenizer, local_files_only=config.local_files_only)
                path = Path(config.tokenizer).expanduser()
                self.tokenizer_dir = path if path.exists() else None
            if self._tokenizer.pad_token_id is None:
                raise KDUserError(f"The tokenizer '{config.tokenizer}' has no padding token; seq2seq batches need one.")
        return self._tokenizer

    def _encode(self, records: Sequence[TextRecord], split: str, *, training: bool) -> list[dict[str, Any]]:
        """Items with token ids; over-long examples are truncated or (training, overlong=skip) skipped."""
        config, tokenizer = self.data_config, self.tokenizer
        if not records:
            return []
        sources = tokenizer([r["source"] for r in records], add_special_tokens=True)["input_ids"]
        targets = tokenizer(text_target=[r["target"] for r in records], add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        items: list[dict[str, Any]] = []
        truncated = skipped = 0
        for record, source_ids, target_ids in zip(records, sources, targets):
            too_long = len(source_ids) > config.max_source_tokens or len(target_ids) > config.max_target_tokens
            if too_long:
                if training and config.overlong == "skip":
                    skipped += 1
                    continue
                truncated += 1
            items.append({"id": record["id"], "source": record["source"], "target": record["target"],
                          "split": split, "source_ids": _truncate(list(source_ids), config.max_source_tokens, eos),
                          "target_ids": _truncate(list(target_ids), config.max_target_tokens, eos)})
        if truncated:
            log.warning("%s: truncated %d of %d examples to data.max_source_tokens=%d / max_target_tokens=%d "
                        "(the untruncated reference is still used for scoring).", split, truncated, len(records),
                        config.max_source_tokens, config.max_target_tokens)
        if skipped:
            log.warning("%s: skipped %d of %d examples over data.max_source_tokens=%d / max_target_tokens=%d "
                        "(data.overlong=skip).", split, skipped, len(records), config.max_source_tokens,
                        config.max_target_tokens)
        self.corpus_info[split] = {"examples": len(items), "truncated": truncated, "skipped_overlong": skipped}
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
        """sha256 of the tokenised training split and the tokenizer: what a task-trained teacher learnt from."""
        from .tokenizer import tokenizer_fingerprint

        digest = hashlib.sha256(tokenizer_fingerprint(self.tokenizer).encode())
        for item in self.build_data(0).train:
            digest.update(json.dumps([item["source_ids"], item["target_ids"]]).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ batches
    def collate(self, items: Sequence[Any]) -> Batch:
        pad = int(self.tokenizer.pad_token_id)
        source_width = max(len(item["source_ids"]) for item in items)
        target_width = max(max(len(item["target_ids"]) for item in items), 1)
        input_ids = torch.full((len(items), source_width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), source_width), dtype=torch.long)
        labels = torch.full((len(items), target_width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            source, target = item["source_ids"], item["target_ids"]
            input_ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
            attention_mask[row, :len(source)] = 1
            if target:
                labels[row, :len(target)] = torch.tensor(target, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "ids": [str(item["id"]) for item in items]}

    def epoch_batches(self, dataset: Sequence[Any], batch_size: int,
                      generator: torch.Generator) -> list[list[int]] | None:
        """Length-bucketed batches: shuffle, sort pools of 50 batches by length, cut, shuffle the batches.

        Why: padding a 5-token sentence to the 60-token one next to it would waste most of
        a step; sorting within pools keeps the order random across pools.
        """
        size = len(dataset)
        batch_size = min(batch_size, size)
        order = torch.randperm(size, generator=generator).tolist()
        pool = 50 * batch_size
        batches: list[list[int]] = []
        for start in range(0, size, pool):
            chunk = sorted(order[start:start + pool],
                           key=lambda i: (len(dataset[i]["target_ids"]), len(dataset[i]["source_ids"])))
            batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
        batches = [batch for batch in batches if len(batch) == batch_size] or batches[:1]
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]

    # ------------------------------------------------------------------ evaluation
    def score(self, hypotheses: list[str], references: list[str], suffix: str) -> dict[str, float]:
        """Metrics of detokenised hypotheses against references; keys end with ``suffix`` (subclasses)."""
        raise NotImplementedError

    def metric_metadata(self) -> dict[str, str]:
        """Non-numeric facts about the last evaluation's metrics (e.g. sacrebleu signatures)."""
        return dict(self.last_metadata)

    def decode_dataset(self, model: Model, dataset: Sequence[Any], device: torch.device, batch_size: int,
                       num_beams: int) -> tuple[list[str], dict[str, float]]:
        """Hypotheses for every item (in dataset order) and the decoding speed of this pass."""
        from kd_plugins.text.generation import decode
        from kd_plugins.text.models import HFTextModel

        if not isinstance(model, HFTextModel):
            raise KDUserError(f"Task '{self.name}' evaluates text models (teacher/student 'seq2seq'); got "
                              f"{type(model).__name__}.")
        config, tokenizer = self.data_config, self.tokenizer
        # Sorted by length so each batch pads little; the hypotheses are put back in dataset order.
        order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["source_ids"]))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

        def run(indices: list[int]) -> Any:
            batch = self.collate([dataset[i] for i in indices])
            input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            longest = int(mask.sum(dim=1).max())
            limit = min(config.max_new_tokens, math.ceil(config.max_length_ratio * longest) + config.max_length_offset)
            return decode(model, input_ids, mask, num_beams=num_beams, max_new_tokens=limit)

        if chunks:
            run(chunks[0][:8])  # untimed warm-up: one-off allocator/kernel costs would skew small sets
        hypotheses: list[str] = [""] * len(dataset)
        tokens = 0
        started = time.perf_counter()
        for indices in chunks:
            generated = run(indices)
            tokens += int(generated.lengths.sum())
            texts = tokenizer.batch_decode(generated.to_lists(), skip_special_tokens=True)
            for index, text in zip(indices, texts):
                hypotheses[index] = text.strip()
        seconds = max(time.perf_counter() - started, 1e-9)
        speed = {"sentences_per_second": len(dataset) / seconds, "tokens_per_second": tokens / seconds,
                 "decode_seconds": seconds}
        return hypotheses, speed

    def evaluate(self, model: Model, dataset: Sequence[Any], device: torch.device, batch_size: int) -> dict[str, float]:
        if not dataset:
            raise KDUserError(f"Task '{self.name}': nothing to evaluate (empty dataset).")
        in_training = dataset[0].get("split") == "valid"
        beams = self.data_config.valid_beams if in_training else self.data_config.eval_beams
        references = [item["target"] for item in dataset]
        metrics: dict[str, float] = {}
        self.last_metadata = {}
        spread = self.encoder_spread(model, dataset, device, batch_size)
        if spread is not None:
            metrics["encoder_spread"] = spread
        for num_beams in beams:
            suffix = "" if num_beams == 1 else f"_beam{num_beams}"
            hypotheses, speed = self.decode_dataset(model, dataset, device, batch_size, num_beams)
            metrics.update(self.score(hypotheses, references, suffix))
            prefix = "greedy" if num_beams == 1 else f"beam{num_beams}"
            metrics.update({f"{prefix}_{key}": value for key, value in speed.items()})
            metrics[f"{prefix}_distinct_outputs"] = distinct_fraction(hypotheses)
            warn_if_input_ignored(hypotheses, f"{self.name} {dataset[0].get('split', '?')} ({prefix})", spread)
        metrics["examples"] = float(len(dataset))
        return metrics

    def encoder_spread(self, model: Model, dataset: Sequence[Any], device: torch.device,
                       batch_size: int) -> float | None:
        """:func:`~kd_plugins.text.models.encoder_spread` on the first batch of ``dataset`` (encoder-decoders only).

        Reported with every evaluation because it separates the two ways a model can ignore its source: an
        encoder that maps every input to one vector (spread near 0) and a decoder that has not yet learned to
        attend to a working encoder (spread of order 1); docs/text.md, "Encoder collapse".
        """
        from kd_plugins.text.models import encoder_spread

        if not getattr(model, "is_encoder_decoder", False):
            return None
        batch = self.collate([dataset[i] for i in range(min(len(dataset), batch_size))])
        with torch.no_grad():
            return encoder_spread(model.hf_model, batch["input_ids"].to(device), batch["attention_mask"].to(device))

    def load_eval_files(self, files: Mapping[str, Path]) -> Sequence[Any]:
        """Items from ``--source`` and ``--reference`` (one sentence per line, same number of lines, UTF-8)."""
        missing = [role for role in self.eval_file_roles if role not in files]
        if missing:
            raise KDUserError(f"Task '{self.name}' scores a user test set from --source FILE and --reference FILE; "
                              f"missing: {', '.join('--' + m for m in missing)}.")
        records = read_parallel_lines(Path(files["source"]), Path(files["reference"]), empty="error")
        return self._encode(records, "test", training=False)


def distinct_fraction(hypotheses: Sequence[str]) -> float:
    """Share of distinct outputs among ``hypotheses`` (1.0: all different; 1/n: one output for everything)."""
    return len(set(hypotheses)) / max(1, len(hypotheses))


#: Below this share of distinct outputs (on >= 20 items) a model is taken to ignore its input.
MIN_DISTINCT_FRACTION = 0.05


def warn_if_input_ignored(hypotheses: Sequence[str], where: str, encoder_spread: float | None = None) -> bool:
    """Log a warning when a model gives (nearly) the same output for every input, and say so.

    A seq2seq model that has not learned to read its source decodes its target language model's
    favourite sentence for every input; its BLEU/ROUGE then measures that one sentence, which is easy
    to mistake for a weak but working model (docs/text.md, summarization results). With the model's
    ``encoder_spread`` the message also says which failure it is, because the remedies differ.
    """
    from kd_plugins.text.models import COLLAPSED_ENCODER_SPREAD

    if len(hypotheses) < 20 or distinct_fraction(hypotheses) >= MIN_DISTINCT_FRACTION:
        return False
    counts = Counter(hypotheses)  # only on the (rare) warning path
    most_common, count = counts.most_common(1)[0]
    if encoder_spread is None or math.isnan(encoder_spread):
        cause = ""
    elif encoder_spread < COLLAPSED_ENCODER_SPREAD:
        cause = (f" Its encoder has collapsed (encoder spread {encoder_spread:.2g}: one vector for every input); "
                 f"train it at a lower learning rate or with more warm-up steps (trainer.lr / trainer.warmup_steps "
                 f"for the student, teacher.args.lr / teacher.args.warmup_steps for a task-trained teacher).")
    else:
        cause = (f" Its encoder still tells inputs apart (encoder spread {encoder_spread:.2g}), so the decoder has "
                 f"not learned to attend to it yet; more training steps usually fix this.")
    log.warning("%s: only %d distinct outputs for %d inputs (the most common, %d times: %r); the model ignores "
                "its input, so its scores measure a fixed sentence.%s", where, len(counts), len(hypotheses), count,
                most_common[:80], cause)
    return True


__all__ = ["IGNORE_INDEX", "MIN_DISTINCT_FRACTION", "SplitFiles", "TextDataConfig", "TextTask", "distinct_fraction",
           "warn_if_input_ignored"]
