"""Cached corpora on disk: JSONL splits in a verified cache entry (:mod:`kdcore.cache`).

A corpus directory holds one ``<split>.jsonl`` per split and the entry's manifest ``kd-cache.json`` (what the
corpus was built from, its counts, and the size and sha256 of every file), written last: a corpus whose files
changed on disk is moved aside and rebuilt, one whose sources or parameters changed is rebuilt, and two processes
wanting the same corpus build it once (the second waits, then reads it).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcore.cache import ensure_entry, remove_entry
from kdcore.io import atomic_write_text

log = logging.getLogger(__name__)

#: The kind of the text corpora's cache entries.
CORPUS_KIND = "corpus"
Splits = Mapping[str, Sequence[Mapping[str, Any]]]


def jsonl_text(records: Sequence[Mapping[str, Any]]) -> str:
    """JSON-lines text with stable key order (so the same records give the same bytes and hash)."""
    return "".join(json.dumps(dict(record), ensure_ascii=False, sort_keys=True) + "\n" for record in records)


def read_split(path: Path) -> list[dict[str, Any]]:
    """All records of one cached split file (written by :func:`cached_corpus`)."""
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def content_hash(file_hashes: Mapping[str, str]) -> str:
    """One hash over all files of a corpus (name and sha256 of each, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}\0{file_hashes[name]}\n".encode())
    return digest.hexdigest()


def corpus_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A corpus's own view of its entry manifest: what it was built from, its counts, its files' hashes and one
    ``content_sha256`` over them (the corpus's fingerprint)."""
    hashes = {name: record["sha256"] for name, record in manifest["files"].items()}
    return {**manifest["built_from"], **manifest["info"], "files": hashes, "content_sha256": content_hash(hashes)}


def cached_corpus(directory: Path, built_from: Mapping[str, Any], build: Callable[[], tuple[Splits, dict[str, Any]]],
                  *, what: str, force: bool = False) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The splits and :func:`corpus_manifest` of the corpus cached at ``directory``, built by ``build()`` (the
    splits and their counts) when missing, damaged, or built from other inputs than ``built_from``."""
    if force:
        remove_entry(directory)

    def write(staging: Path) -> dict[str, Any]:
        splits, info = build()
        for name, records in splits.items():
            atomic_write_text(staging / f"{name}.jsonl", jsonl_text(records))
        return {**info, "splits": {name: len(records) for name, records in splits.items()}}

    def load(manifest: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        flat = corpus_manifest(manifest)
        return {name: read_split(Path(directory) / f"{name}.jsonl") for name in flat["splits"]}, flat

    return ensure_entry(directory, CORPUS_KIND, built_from, write, what=what, load=load)
