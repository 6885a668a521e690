"""Cached corpora on disk: JSONL splits plus a manifest, written so nothing is half-written.

A corpus directory holds one ``<split>.jsonl`` per split and ``manifest.json``.
The split files are written first (each through a temp file and ``os.replace``)
and the manifest last, so a reader that finds a manifest whose file hashes match
the files on disk has a complete corpus. A build that is killed half-way leaves
either the old, complete corpus or a manifest that no longer matches (rebuilt on
the next use).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcore.io import atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def jsonl_text(records: Sequence[Mapping[str, Any]]) -> str:
    """JSON-lines text with stable key order (so the same records give the same bytes and hash)."""
    return "".join(json.dumps(dict(record), ensure_ascii=False, sort_keys=True) + "\n" for record in records)


def read_split(path: Path) -> list[dict[str, Any]]:
    """All records of one cached split file (written by :func:`write_corpus`)."""
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def content_hash(file_hashes: Mapping[str, str]) -> str:
    """One hash over all split files (name and sha256 of each, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}\0{file_hashes[name]}\n".encode())
    return digest.hexdigest()


def write_corpus(directory: Path, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                 manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``splits`` as ``<name>.jsonl`` and then the manifest (plus file hashes); return the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    # Remove the old manifest first: while split files are being replaced the
    # directory must not look complete.
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    file_hashes: dict[str, str] = {}
    for name, records in splits.items():
        path = directory / f"{name}.jsonl"
        atomic_write_text(path, jsonl_text(records))
        file_hashes[path.name] = sha256_file(path)
    full = {"format": MANIFEST_FORMAT, **manifest, "splits": {name: len(records) for name, records in splits.items()},
            "files": file_hashes, "content_sha256": content_hash(file_hashes)}
    atomic_write_json(directory / MANIFEST_NAME, full)
    return full


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a corpus directory, or None when there is none or it is unreadable."""
    path = directory / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def valid_manifest(directory: Path, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest if it matches ``expected`` (same keys and values) and every file's hash; else None.

    Why each check: ``expected`` holds what defines the corpus (source package,
    version and hash, builder version, split parameters), so a change to any of
    them rebuilds; the file hashes catch a corpus edited or truncated on disk.
    """
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return None
    for key, value in expected.items():
        if manifest.get(key) != value:
            log.info("Corpus in %s is stale (%s changed); rebuilding.", directory, key)
            return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, digest in files.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            log.info("Corpus file %s is missing or changed; rebuilding.", path)
            return None
    if content_hash(files) != manifest.get("content_sha256"):
        return None
    return manifest


def read_corpus(directory: Path, manifest: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The splits named in ``manifest`` as lists of records."""
    return {name: read_split(directory / f"{name}.jsonl") for name in manifest["splits"]}
