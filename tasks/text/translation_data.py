"""Embedded English->German translation corpus from Home Assistant's translation catalogs.

Home Assistant (Apache-2.0) ships, for every integration, the user-interface
strings in many languages: ``homeassistant/components/<name>/translations/<lang>.json``.
Joining the English and German files by flattened key gives real pairs written
by human translators. The pinned wheel is fetched with ``pip download`` (the
release needs Python >= 3.14.2 to install, but the JSON is read straight from
the zip, so any Python works), checked against a recorded sha256, and never
installed or imported.

Build steps (counts of each are stored in the manifest; docs/data.md explains
the choices): join by key -> unique pairs -> filters (empty, multi-line, HTML,
URL and Markdown links, unbalanced braces, > 2 placeholders, source > 300
characters, identical source and target, source < 60% letters, placeholders
differing between source and target) -> placeholders masked as ``{0}``, ``{1}``
-> one target per source (dedup on a case- and space-insensitive key) ->
deterministic split by the sha256 of that key (so a test source never appears
in train or valid).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.cache import ensure_entry
from kdcore.config import default_cache_dir
from kdcore.errors import KDUserError
from kdcore.io import sha256_file

from .corpus import CleanRecords, Corpus, dedup_key, letter_fraction, normalize_space, split_rank
from .manifest import cached_corpus

log = logging.getLogger(__name__)

HA_PACKAGE = "homeassistant"
HA_VERSION = "2026.11.0"
HA_WHEEL_NAME = f"{HA_PACKAGE}-{HA_VERSION}-py3-none-any.whl"
# sha256 of the wheel on PyPI, recorded when the version was pinned.
HA_WHEEL_SHA256 = "7ca5fbde9dea879ac7723949fc84347aac5182e6309c357b2e4973fd391b00f7"
# The release declares Requires-Python >= 3.14.2; "--python-version 3.14" means 3.14.0 and is refused.
HA_PYTHON_VERSION = "3.14.2"
HA_LICENSE = "Apache-2.0"
WHEEL_ENV = "KD_HOMEASSISTANT_WHEEL"
#: The kind of the cache entry holding the downloaded wheel (kdcore.cache).
DOWNLOAD_KIND = "download"

# Bump when the cleaning, masking, dedup or split rules change: cached corpora are then rebuilt.
BUILDER_VERSION = "ha-translations/1"

MAX_SOURCE_CHARS = 300
MAX_PLACEHOLDERS = 2
MIN_LETTER_FRACTION = 0.6

_CATALOG = re.compile(r"^homeassistant/components/(?P<component>[^/]+)/translations/(?P<lang>[A-Za-z-]+)\.json$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_HTML = re.compile(r"<[A-Za-z/!][^>]*>|&[A-Za-z]+;|&#\d+;")
_URL = re.compile(r"https?://|www\.|\]\(", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ wheel


def _check_wheel(path: Path, expected_sha256: str) -> Path:
    if not path.is_file():
        raise KDUserError(f"The Home Assistant wheel '{path}' does not exist. Give the path of "
                          f"{HA_WHEEL_NAME} (downloaded with pip download), or leave it unset to download it.")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise KDUserError(
            f"The Home Assistant wheel '{path}' has sha256 {actual}, but {HA_WHEEL_NAME} has {expected_sha256}. "
            f"It is a different or damaged file; download {HA_PACKAGE}=={HA_VERSION} again (pip download --no-deps "
            f"--only-binary=:all: --python-version {HA_PYTHON_VERSION} {HA_PACKAGE}=={HA_VERSION}).")
    return path


def fetch_wheel(cache_dir: Path | None = None, wheel: str | Path | None = None, *,
                expected_sha256: str = HA_WHEEL_SHA256) -> Path:
    """The verified Home Assistant wheel: ``wheel`` (or $KD_HOMEASSISTANT_WHEEL), the cached copy, or a download.

    The cached copy is a verified cache entry (:mod:`kdcore.cache`) ``<cache>/downloads/<package>-<version>/``:
    the download runs ``python -m pip download`` (PyPI or the user's configured index) into the entry's staging
    directory, and the entry is published only after the wheel's sha256 matched the pinned one.
    """
    wheel = wheel or os.environ.get(WHEEL_ENV) or None
    if wheel:
        return _check_wheel(Path(wheel).expanduser(), expected_sha256)
    downloads = (cache_dir or default_cache_dir()) / "downloads"
    entry = downloads / f"{HA_PACKAGE}-{HA_VERSION}"

    def download(staging: Path) -> None:
        legacy = downloads / HA_WHEEL_NAME  # where kd before verified cache entries kept it
        if legacy.is_file() and sha256_file(legacy) == expected_sha256:
            os.replace(legacy, staging / HA_WHEEL_NAME)
            return
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", HA_PYTHON_VERSION, f"{HA_PACKAGE}=={HA_VERSION}", "-d", str(staging),
                   "--disable-pip-version-check", "--quiet"]
        log.info("Downloading %s==%s (67.6 MB) for the translation corpus.", HA_PACKAGE, HA_VERSION)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = staging / HA_WHEEL_NAME
        if result.returncode != 0 or not downloaded.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise KDUserError(
                f"Could not download {HA_PACKAGE}=={HA_VERSION} from the package index (pip said: "
                f"{' '.join(tail) or 'nothing'}). The translation corpus is built from that wheel. On a machine with "
                f"PyPI access run 'pip download --no-deps --only-binary=:all: --python-version {HA_PYTHON_VERSION} "
                f"{HA_PACKAGE}=={HA_VERSION} -d DIR' and give the wheel's path in ${WHEEL_ENV} (or the task's "
                f"data.wheel).")
        _check_wheel(downloaded, expected_sha256)

    built_from = {"package": HA_PACKAGE, "version": HA_VERSION, "wheel": HA_WHEEL_NAME, "sha256": expected_sha256}
    return ensure_entry(entry, DOWNLOAD_KIND, built_from, download, what=f"the {HA_WHEEL_NAME} download",
                        load=lambda _: entry / HA_WHEEL_NAME)


# ---------------------------------------------------------------------------------------- extract


@dataclass(frozen=True)
class RawPair:
    """One joined catalog entry: ``component`` and flattened ``key`` identify it."""

    component: str
    key: str
    source: str
    target: str


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("a.b.c", value)`` for every leaf of nested dicts (lists are indexed)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from flatten(value, f"{prefix}.{index}")
    else:
        yield prefix, tree


def extract_pairs(wheel: Path, source_lang: str = "en", target_lang: str = "de") -> list[RawPair]:
    """All (source, target) catalog entries sharing a component and key, read from the zip (never installed)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise KDUserError(f"'{wheel}' is not a readable wheel (zip) file: {error}.") from error
    with archive:
        catalogs: dict[str, dict[str, str]] = defaultdict(dict)
        for name in archive.namelist():
            match = _CATALOG.match(name)
            if match and match["lang"] in (source_lang, target_lang):
                catalogs[match["component"]][match["lang"]] = name
        pairs: list[RawPair] = []
        for component in sorted(catalogs):
            files = catalogs[component]
            if source_lang not in files or target_lang not in files:
                continue
            source_leaves = dict(flatten(json.loads(archive.read(files[source_lang]))))
            target_leaves = dict(flatten(json.loads(archive.read(files[target_lang]))))
            for key, source in source_leaves.items():
                target = target_leaves.get(key)
                if isinstance(source, str) and isinstance(target, str):
                    pairs.append(RawPair(component, key, source, target))
    if not pairs:
        raise KDUserError(f"'{wheel}' holds no {source_lang}/{target_lang} catalogs under "
                          "homeassistant/components/*/translations/; is it the Home Assistant wheel?")
    return pairs


# ------------------------------------------------------------------------------------------ clean


def placeholders(text: str) -> list[str]:
    """``{name}`` placeholders in order of appearance."""
    return _PLACEHOLDER.findall(text)


def rejection_reason(source: str, target: str) -> str | None:
    """Why a pair is dropped (a filter name as counted in the manifest), or None to keep it.

    Filters run in this order and a pair is counted under the first that fires.
    """
    if not source.strip() or not target.strip():
        return "empty"
    if "\n" in source or "\n" in target:
        # Multi-line entries are formatted help blocks (lists, paragraphs), not sentences.
        return "multi_line"
    if _HTML.search(source) or _HTML.search(target):
        return "html"
    if _URL.search(source) or _URL.search(target):
        return "url"
    if any(char in _PLACEHOLDER.sub("", text) for text in (source, target) for char in "{}"):
        # Nested or unbalanced braces (e.g. ICU plural syntax) cannot be masked reliably.
        return "unbalanced_braces"
    if len(placeholders(source)) > MAX_PLACEHOLDERS:
        return "too_many_placeholders"
    if len(source) > MAX_SOURCE_CHARS:
        return "source_too_long"
    if source.strip() == target.strip():
        return "identical"
    if letter_fraction(source) < MIN_LETTER_FRACTION:
        return "few_letters"
    if sorted(placeholders(source)) != sorted(placeholders(target)):
        return "placeholder_mismatch"
    return None


def mask_placeholders(source: str, target: str) -> tuple[str, str]:
    """Replace each distinct placeholder by ``{0}``, ``{1}`` (numbered by first appearance in the source).

    Why: names such as ``{entity_name}`` are code identifiers copied verbatim; masking keeps
    them consistent between the sides while BLEU/chrF no longer reward spelling identifiers.
    """
    numbers: dict[str, str] = {}
    for name in placeholders(source):
        numbers.setdefault(name, "{%d}" % len(numbers))
    replace = lambda match: numbers[match.group(0)]  # noqa: E731 - tiny local callback
    return _PLACEHOLDER.sub(replace, source), _PLACEHOLDER.sub(replace, target)


def clean_pairs(raw: Sequence[RawPair]) -> CleanRecords:
    """Filter, mask, and keep one target per source; every dropped pair is counted under its reason."""
    occurrences = Counter((pair.source, pair.target) for pair in raw)
    first_id: dict[tuple[str, str], str] = {}
    for pair in raw:
        first_id.setdefault((pair.source, pair.target), f"{pair.component}:{pair.key}")
    dropped: dict[str, int] = {}
    kept: list[tuple[str, str, str, int]] = []  # source, target, id, raw occurrences
    for (source, target), count in occurrences.items():
        reason = rejection_reason(source, target)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        masked_source, masked_target = mask_placeholders(normalize_space(source), normalize_space(target))
        kept.append((masked_source, masked_target, first_id[(source, target)], count))
    # One target per source: the one seen most often in the catalogs (ties: smallest
    # string) so the choice does not depend on file order.
    by_key: dict[str, tuple[str, str, str, int]] = {}
    target_counts: dict[str, Counter[str]] = defaultdict(Counter)
    for source, target, pair_id, count in kept:
        target_counts[dedup_key(source)][target] += count
    for source, target, pair_id, count in sorted(kept, key=lambda item: (item[0], item[1], item[2])):
        key = dedup_key(source)
        best_target = min(target_counts[key].items(), key=lambda item: (-item[1], item[0]))[0]
        if target == best_target and key not in by_key:
            by_key[key] = (source, target, pair_id, count)
    records = [{"id": pair_id, "source": source, "target": target}
               for source, target, pair_id, _ in by_key.values()]
    counts = {"raw_pairs": len(raw), "unique_pairs": len(occurrences),
              "dropped": dict(sorted(dropped.items(), key=lambda item: -item[1])),
              "clean_pairs": len(kept), "duplicate_sources": len(kept) - len(records), "final_pairs": len(records)}
    return CleanRecords(records, counts)


def split_records(records: Sequence[dict[str, str]], valid_size: int, test_size: int,
                  text_field: str = "source") -> dict[str, list[dict[str, str]]]:
    """Test = the ``test_size`` records of lowest hash rank, valid = the next ``valid_size``, train = the rest."""
    if valid_size + test_size >= len(records):
        raise KDUserError(f"valid_size ({valid_size}) + test_size ({test_size}) leave no training data: the corpus "
                          f"has {len(records)} records. Use smaller splits.")
    ranked = sorted(records, key=lambda record: split_rank(dedup_key(record[text_field])))
    return {"train": ranked[valid_size + test_size:], "valid": ranked[test_size:test_size + valid_size],
            "test": ranked[:test_size]}


# ------------------------------------------------------------------------------------------ build


def translation_corpus_dir(cache_dir: Path, source_lang: str = "en", target_lang: str = "de") -> Path:
    return cache_dir / "data" / "translation" / f"{HA_PACKAGE}-{HA_VERSION}-{source_lang}-{target_lang}"


def load_translation_corpus(cache_dir: str | Path | None = None, *, wheel: str | Path | None = None,
                            source_lang: str = "en", target_lang: str = "de", valid_size: int = 500,
                            test_size: int = 1000, force: bool = False) -> Corpus:
    """The Home Assistant en->de corpus, built at first use and then read from the cache.

    Records are ``{"id": "<component>:<key>", "source": str, "target": str}``.
    ``wheel`` (or $KD_HOMEASSISTANT_WHEEL) is an already-downloaded wheel for
    machines without index access. The cache is reused only while its manifest
    matches the pinned wheel, this builder version, the split sizes and the
    files' hashes; otherwise it is rebuilt. ``target_lang`` may be any catalog
    language (``fr``, ``pt-BR`` …).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    directory = translation_corpus_dir(cache_dir, source_lang, target_lang)
    expected = {
        "builder": BUILDER_VERSION,
        "source": {"package": HA_PACKAGE, "version": HA_VERSION, "wheel": HA_WHEEL_NAME, "sha256": HA_WHEEL_SHA256,
                   "license": HA_LICENSE},
        "params": {"source_lang": source_lang, "target_lang": target_lang, "valid_size": valid_size,
                   "test_size": test_size, "max_source_chars": MAX_SOURCE_CHARS,
                   "max_placeholders": MAX_PLACEHOLDERS, "min_letter_fraction": MIN_LETTER_FRACTION},
    }
    splits, manifest = cached_corpus(directory, expected,
                                     lambda: build_translation_corpus(expected, cache_dir, wheel),
                                     what="the translation corpus", force=force)
    log.debug("Translation corpus in %s: %s", directory, manifest["splits"])
    return Corpus(splits["train"], splits["valid"], splits["test"], manifest, directory)


def build_translation_corpus(expected: Mapping[str, Any], cache_dir: Path, wheel: str | Path | None = None
                             ) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any]]:
    """Fetch, extract, clean and split: the splits and the counts of every step (cached by the caller)."""
    started = time.perf_counter()
    params = expected["params"]
    wheel_path = fetch_wheel(cache_dir, wheel, expected_sha256=expected["source"]["sha256"])
    raw = extract_pairs(wheel_path, params["source_lang"], params["target_lang"])
    cleaned = clean_pairs(raw)
    splits = split_records(cleaned.records, params["valid_size"], params["test_size"])
    return splits, {"counts": cleaned.counts, "build_seconds": round(time.perf_counter() - started, 2)}

