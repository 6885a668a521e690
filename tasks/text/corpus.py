"""What the embedded text corpora (translation, summarization) share: the :class:`Corpus` they load as, the clean
records their builders return, and the text keys their cleaning, de-duplication and splitting use."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


_SPACE = re.compile(r"\s+")


def letter_fraction(text: str) -> float:
    """Share of characters (spaces included) that are letters."""
    return sum(char.isalpha() for char in text) / max(1, len(text))


def normalize_space(text: str) -> str:
    """``text`` with every run of white space as one space, stripped."""
    return _SPACE.sub(" ", text).strip()


def dedup_key(source: str) -> str:
    """Sources equal under this key are one source (case and spacing differences are not new data)."""
    return normalize_space(source).casefold()


def split_rank(key: str) -> str:
    """Deterministic pseudo-random rank of a source: the sha256 of its dedup key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class CleanRecords:
    """Clean, deduplicated records and the count of every step (what a corpus builder keeps and drops)."""

    records: list[dict[str, str]]
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Corpus:
    """A cached corpus: its splits (lists of dict records), its manifest and its directory."""

    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    test: list[dict[str, Any]]
    manifest: dict[str, Any]
    directory: Path


__all__ = ["CleanRecords", "Corpus", "dedup_key", "letter_fraction", "normalize_space",
           "split_rank"]
