"""Cache entries kd can trust: a content manifest per entry, checked on load, and one builder per entry.

Everything kd caches (task-trained teachers, tokenizers, corpora, downloads, converted models, teacher outputs)
is an *entry*: a directory under the cache whose ``kd-cache.json`` manifest names its kind, what it was built from,
and the size and sha256 of every file in it. This module is the one place that writes, checks, locks, moves aside
and lists entries; each kind only says how to build its files.

* Written last, atomically: an entry is built in a staging directory next to it, its manifest is written there
  last, and the directory is renamed into place. A reader sees a complete entry or none.
* Checked on load: every file's size on every load; every file's sha256 once per process and entry (a flipped
  byte in a weight file costs a rebuild, not a run on garbage).
* Damaged (a changed, truncated or missing file, an unreadable manifest, or an entry without a manifest written
  by an older kd): reported with a warning naming the path, renamed to ``<entry>.damaged-<UTC time>`` and rebuilt;
  where the caller cannot rebuild it, refused with :class:`~kdcore.errors.KDUserError` naming the path.
* One builder per entry: an inter-process lock (``filelock``, an OS lock the kernel releases when its process
  dies, so a killed builder never blocks the next) around checking and building; a second process logs that it
  waits, then reads the finished entry.
* Appendable entries (teacher outputs computed on demand) hold *shards*: files written once, atomically, and named
  by their size and sha256, so each shard verifies itself; the manifest names the shard pattern.

docs/cache.md describes the layout and the ``kd cache`` command built on :func:`scan_cache`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from kdcore.errors import KDUserError
from kdcore.io import atomic_write_bytes, atomic_write_json, follow_umask, sha256_file

log = logging.getLogger(__name__)

#: The manifest file of every cache entry.
MANIFEST = "kd-cache.json"
MANIFEST_FORMAT = "kd-cache/1"
LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"
DAMAGED_MARK = ".damaged-"
STAGING_MARK = ".building-"
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<time>\d{20})-(?P<size>\d+)-(?P<sha256>[0-9a-f]{64})(?P<suffix>\.[^-]+)$")

# Full hashes done in this process, by path, with the (inode, size, mtime) of what was hashed: a file written since
# (a new mtime) is hashed again.
_hashed_entries: dict[str, tuple[tuple[int, int, int], ...]] = {}
_hashed_shards: dict[str, tuple[int, int, int]] = {}


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
Loaded = TypeVar("Loaded")


class CacheEntryDamaged(Exception):
    """A cache entry that must not be used: ``reason`` says what is wrong with ``path``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# ------------------------------------------------------------------------------------------- files and shards


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps of one file: its size in bytes and its sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _content_files(directory: Path, shards: str | None) -> list[str]:
    names = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if not path.is_file() or relative == MANIFEST or (shards and fnmatch.fnmatch(relative, shards)):
            continue
        names.append(relative)
    return names


def write_shard(directory: Path, prefix: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` atomically as a new shard of an appendable entry, named by its time, size and sha256."""
    name = f"{prefix}-{time.time_ns():020d}-{len(data)}-{hashlib.sha256(data).hexdigest()}{suffix}"
    path = Path(directory) / name
    atomic_write_bytes(path, data)
    _hashed_shards[str(path)] = _signature(path.stat())
    return path


def touch_shard(path: Path) -> None:
    """Mark a shard as just used (its mtime: least-recently-used eviction) without costing it another hash."""
    path = Path(path)
    hashed = _hashed_shards.get(str(path)) == _signature(path.stat())
    os.utime(path)
    if hashed:
        _hashed_shards[str(path)] = _signature(path.stat())


def verify_shard(path: Path, *, full: bool = False) -> None:
    """Check a shard against the size and sha256 in its name (the hash once per process); raise if it differs."""
    match = _SHARD_NAME.match(path.name)
    if match is None:
        raise CacheEntryDamaged(path, "its name does not carry its size and sha256 (written by an older kd)")
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CacheEntryDamaged(path, "the shard is missing") from None
    if stat.st_size != int(match["size"]):
        raise CacheEntryDamaged(path, f"{stat.st_size} bytes, its name says {match['size']} (truncated or changed)")
    if not full and _hashed_shards.get(str(path)) == _signature(stat):
        return
    if sha256_file(path) != match["sha256"]:
        raise CacheEntryDamaged(path, "its content does not match the sha256 in its name (changed on disk)")
    _hashed_shards[str(path)] = _signature(stat)


def shard_paths(directory: Path, manifest: Mapping[str, Any]) -> list[Path]:
    """The shards of an appendable entry, oldest first (by the time in their names)."""
    pattern = manifest.get("shards")
    if not pattern:
        return []
    return sorted((p for p in Path(directory).glob(pattern) if p.is_file()), key=lambda p: p.name)


# ----------------------------------------------------------------------------------------------- manifests


def write_manifest(directory: Path, kind: str, built_from: Mapping[str, Any], *, info: Mapping[str, Any] | None = None,
                   shards: str | None = None) -> dict[str, Any]:
    """Hash every file of ``directory`` (shards excepted) and write its manifest, atomically; return it."""
    directory = Path(directory)
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "built_from": dict(built_from), "info": dict(info or {}),
                "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "files": {name: file_record(directory / name) for name in _content_files(directory, shards)},
                "shards": shards}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the entry at ``directory``; :class:`CacheEntryDamaged` when it is missing or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheEntryDamaged(directory, f"it has no {MANIFEST} (an unfinished build, or written by an older kd "
                                           f"that did not record content hashes)") from None
    except (OSError, ValueError) as error:
        raise CacheEntryDamaged(directory, f"its {MANIFEST} is unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("built_from"), dict):
        raise CacheEntryDamaged(directory, f"its {MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_entry(directory: Path, *, kind: str | None = None, full: bool = False) -> dict[str, Any]:
    """The manifest of a complete, undamaged entry; :class:`CacheEntryDamaged` otherwise.

    Sizes are checked on every call, sha256 hashes on the first call of this process for this entry (every call
    with ``full``). ``kind``: the kind the caller expects (another kind at this path is damage too).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if kind is not None and manifest.get("kind") != kind:
        raise CacheEntryDamaged(directory, f"its manifest says kind {manifest.get('kind')!r}, expected {kind!r}")
    files: dict[str, Any] = manifest["files"]
    signatures = []
    for name, record in files.items():
        path = directory / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CacheEntryDamaged(directory, f"{name} is missing") from None
        if not isinstance(record, dict) or stat.st_size != record.get("size"):
            raise CacheEntryDamaged(directory, f"{name} has {stat.st_size} bytes, the manifest says "
                                               f"{record.get('size') if isinstance(record, dict) else '?'} "
                                               f"(truncated or changed)")
        signatures.append(_signature(stat))
    if full or _hashed_entries.get(str(directory)) != tuple(signatures):
        for name, record in files.items():
            if sha256_file(directory / name) != record.get("sha256"):
                raise CacheEntryDamaged(directory, f"{name} does not match its sha256 in the manifest (its bytes "
                                                   f"changed on disk)")
        _hashed_entries[str(directory)] = tuple(signatures)
    for shard in shard_paths(directory, manifest) if full else []:
        verify_shard(shard, full=True)
    with contextlib.suppress(OSError):  # the manifest's time is the entry's last use (kd cache clear --older-than)
        os.utime(directory / MANIFEST)
    return manifest


def move_aside(directory: Path, reason: str) -> Path:
    """Rename a damaged entry to ``<entry>.damaged-<UTC time>`` (kept for inspection; kd cache clear removes it)."""
    directory = Path(directory)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = directory.with_name(f"{directory.name}{DAMAGED_MARK}{stamp}")
    try:
        os.replace(directory, target)
    except OSError as error:
        raise KDUserError(f"The cache entry '{directory}' is damaged ({reason}) and kd cannot move it aside "
                          f"({error.strerror or error}). Delete it by hand (or run 'kd cache clear'); kd then "
                          f"rebuilds it.") from None
    _hashed_entries.pop(str(directory), None)
    log.warning("The cache entry %s is damaged (%s): moved aside to %s and rebuilt ('kd cache clear damaged' "
                "frees its space).", directory, reason, target.name)
    return target


def usable_entry(directory: Path, kind: str, built_from: Mapping[str, Any] | None = None, *,
                 rebuild: bool = True) -> dict[str, Any] | None:
    """The verified manifest of the entry at ``directory``, or None when there is none to use (then build it).

    A damaged entry is moved aside (``rebuild``) or refused with a KDUserError naming it. An undamaged entry
    built from other inputs than ``built_from`` (a fixed path whose sources changed) is removed.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    try:
        manifest = verify_entry(directory, kind=kind)
    except CacheEntryDamaged as damage:
        if not rebuild:
            raise KDUserError(f"The cache entry '{directory}' is damaged ({damage.reason}), and kd cannot rebuild it "
                              f"here. Remove it ('kd cache clear {kind}') and run the command that built it "
                              f"again.") from None
        move_aside(directory, damage.reason)
        return None
    if built_from is not None and manifest["built_from"] != json.loads(json.dumps(dict(built_from), default=str)):
        changed = sorted(key for key in set(manifest["built_from"]) | set(built_from)
                         if manifest["built_from"].get(key) != json.loads(json.dumps(built_from.get(key), default=str)))
        log.info("The cache entry %s was built from other inputs (%s changed); rebuilding it.", directory,
                 ", ".join(changed))
        remove_entry(directory)
        return None
    return manifest


def publish_entry(directory: Path, kind: str, built_from: Mapping[str, Any], build: Callable[[Path], Any], *,
                  shards: str | None = None) -> dict[str, Any]:
    """Build an entry: ``build(staging)`` writes its files, the manifest goes last, then the directory is renamed
    into place. ``build`` may return a dict of ``info`` for the manifest. Call it holding :func:`entry_lock`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{STAGING_MARK}", dir=directory.parent))
    try:
        follow_umask(staging)  # mkdtemp's 0700 would hide a shared cache's entries from the team
        info = build(staging)
        manifest = write_manifest(staging, kind, built_from, info=info if isinstance(info, Mapping) else None,
                                  shards=shards)
        if directory.exists():  # a stale entry the caller decided to replace
            remove_entry(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _hashed_entries[str(directory)] = tuple(_signature((directory / name).stat()) for name in manifest["files"])
    return manifest


def ensure_entry(directory: Path, kind: str, built_from: Mapping[str, Any], build: Callable[[Path], Any], *,
                 what: str, load: Callable[[dict[str, Any]], Loaded], rebuild: bool = True,
                 shards: str | None = None) -> Loaded:
    """``load(manifest)`` of the verified entry at ``directory``, built first when it is missing, damaged or built
    from other inputs than ``built_from``. ``what`` names the entry in log lines (e.g. "the trained tokenizer").

    Checking, building and loading happen under the entry's lock: one process builds, the others wait and then
    read, and ``kd cache clear`` never removes an entry while a process is reading it.
    """
    with entry_lock(directory, what):
        manifest = usable_entry(directory, kind, built_from, rebuild=rebuild)
        if manifest is None:
            manifest = publish_entry(directory, kind, built_from, build, shards=shards)
        return load(manifest)


def remove_entry(path: Path) -> None:
    """Delete an entry (or any cached path) so that no reader sees it half-deleted: rename first, then delete."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}-{time.time_ns()}")
    os.replace(path, doomed)
    _hashed_entries.pop(str(path), None)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- locking


def lock_path(entry: Path) -> Path:
    """The lock file of an entry: ``<entry>.lock`` next to it."""
    entry = Path(entry)
    return entry.with_name(entry.name + LOCK_SUFFIX)


@contextlib.contextmanager
def entry_lock(entry: Path, what: str) -> Iterator[None]:
    """Hold the inter-process lock of one entry; another process holding it is waited for, with a log line."""
    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Another process is building or reading %s (%s); waiting for it.", what, entry)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def lock_if_free(entry: Path) -> Iterator[bool]:
    """Hold the lock of ``entry`` if no running process holds it (yields True), else yield False at once."""
    path = lock_path(entry)
    if not path.exists():  # no process has ever locked it here, so none holds it
        yield True
        return
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


# -------------------------------------------------------------------------------------------------- listing


@dataclass
class CachedPath:
    """One row of ``kd cache list``: an entry (with its manifest) or another path under the cache."""

    path: Path
    kind: str
    bytes: int
    manifest: dict[str, Any] | None = None
    problem: str | None = None  # why it is not a usable entry (None for an entry with a readable manifest)
    last_used: float = 0.0

    @property
    def owner(self) -> Path:
        """The entry whose lock guards this path (a partial or staging directory belongs to its entry)."""
        name = self.path.name
        if name.endswith(PARTIAL_SUFFIX):
            return self.path.with_name(name[:-len(PARTIAL_SUFFIX)])
        if STAGING_MARK in name and name.startswith("."):
            return self.path.with_name(name[1:name.index(STAGING_MARK)])
        return self.path


@dataclass
class CacheScan:
    """Everything under a cache directory: entries, other paths, and the total disk use (as ``du`` counts it)."""

    root: Path
    rows: list[CachedPath] = field(default_factory=list)
    total_bytes: int = 0


def disk_bytes(path: Path) -> int:
    """Disk use of ``path`` and everything under it, counted as ``du`` does (allocated blocks, each inode once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(member: str) -> None:
        nonlocal total
        with contextlib.suppress(OSError):  # a file removed while it is counted
            stat = os.lstat(member)
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512

    add(str(path))
    if Path(path).is_dir() and not Path(path).is_symlink():
        for current, directories, files in os.walk(path):
            for name in directories + files:
                add(os.path.join(current, name))
    return total


def _loose_kind(name: str) -> str:
    if name.endswith(LOCK_SUFFIX):
        return "lock"
    if name.endswith(PARTIAL_SUFFIX):
        return "partial"
    if DAMAGED_MARK in name:
        return "damaged"
    if STAGING_MARK in name or ".removing-" in name:
        return "staging"
    return "unverified"


def scan_cache(root: Path) -> CacheScan:
    """Every entry under ``root`` (a directory with a manifest) and every other path next to them.

    A path outside every entry is listed by its name: an interrupted teacher stage (``partial``), a moved-aside
    entry (``damaged``), a build in progress (``staging``), a lock file (``lock``); anything else (files of an
    older kd without manifests: ``unverified``) at the highest level that holds none of these. The rows' sizes
    add up to the total but for the directories that hold them.
    """
    root = Path(root)
    scan = CacheScan(root)
    if not root.is_dir():
        return scan
    scan.total_bytes = disk_bytes(root)
    containers: dict[Path, bool] = {}

    def is_entry(path: Path) -> bool:  # a moved-aside or half-built copy keeps its manifest but is no entry
        return _loose_kind(path.name) == "unverified" and path.is_dir() and not path.is_symlink() \
            and (path / MANIFEST).is_file()

    def is_container(directory: Path) -> bool:
        """Whether ``directory`` holds entries or kd's own files next to them (so it is listed by its parts)."""
        if directory not in containers:
            containers[directory] = _loose_kind(directory.name) == "unverified" and any(
                is_entry(child) or _loose_kind(child.name) != "unverified"
                or (child.is_dir() and not child.is_symlink() and is_container(child))
                for child in directory.iterdir())
        return containers[directory]

    def visit(directory: Path) -> None:
        for child in sorted(directory.iterdir()):
            if is_entry(child):
                scan.rows.append(_entry_row(child))
            elif child.is_dir() and not child.is_symlink() and is_container(child):
                visit(child)
            else:
                kind = _loose_kind(child.name)
                with contextlib.suppress(OSError):
                    scan.rows.append(CachedPath(child, kind, disk_bytes(child), problem=kind,
                                                last_used=child.lstat().st_mtime))

    visit(root)
    return scan


def _entry_row(directory: Path) -> CachedPath:
    size = disk_bytes(directory)
    last_used = (directory / MANIFEST).stat().st_mtime
    try:
        manifest = read_manifest(directory)
    except CacheEntryDamaged as damage:
        return CachedPath(directory, "damaged", size, problem=damage.reason, last_used=last_used)
    return CachedPath(directory, str(manifest.get("kind")), size, manifest=manifest, last_used=last_used)


__all__ = ["CacheEntryDamaged", "CacheScan", "CachedPath", "DAMAGED_MARK", "LOCK_SUFFIX", "MANIFEST",
           "MANIFEST_FORMAT", "PARTIAL_SUFFIX", "disk_bytes", "ensure_entry", "entry_lock", "file_record",
           "lock_if_free", "lock_path", "move_aside", "publish_entry", "read_manifest", "remove_entry", "scan_cache",
           "shard_paths", "touch_shard", "usable_entry", "verify_entry", "verify_shard", "write_manifest",
           "write_shard"]
