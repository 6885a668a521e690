"""The ``data.*`` keys shared by the text tasks (``wmt``, ``summarization``): where the data come from, split
sizes, token limits, the tokenizer and the decoding settings of evaluation."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from kdcore.config import StrictModel


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
    teacher_vocab_size: PositiveInt | None = Field(
        None, description="the teacher's own tokenizer, trained like the task's on the same text with this "
                          "vocabulary size (distillation across tokenizers: objective cross_tokenizer); the task's "
                          "tokenizer stays the student's. null: teacher and student share the task's tokenizer")
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
        if self.teacher_vocab_size is not None and self.tokenizer != "train":
            raise ValueError(f"teacher_vocab_size trains the teacher's own tokenizer on the task's text, but "
                             f"data.tokenizer is '{self.tokenizer}' (not 'train'): a given tokenizer has its own "
                             f"vocabulary; remove data.teacher_vocab_size or use data.tokenizer=train")
        return self

    @property
    def separate_teacher_tokenizer(self) -> bool:
        """Whether the teacher reads the text through a tokenizer of its own (a different vocabulary size)."""
        return self.teacher_vocab_size is not None and self.teacher_vocab_size != self.vocab_size


__all__ = ["SplitFiles", "TextDataConfig"]
