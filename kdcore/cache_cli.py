"""``kd cache list | verify | clear``: see, check and free kd's cache (docs/cache.md).

Built on :func:`kdcore.cache.scan_cache`: every entry (a directory with a ``kd-cache.json`` manifest) and every
other path next to them (moved-aside damaged entries, interrupted teacher stages, builds in progress, files of an
older kd), with their disk use counted as ``du`` counts it.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from kdcore.cache import (
    CacheEntryDamaged, CachedPath, lock_if_free, remove_entry, scan_cache, shard_paths, verify_entry,
)
from kdcore.errors import KDUserError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_cache_parser(commands: Any) -> None:
    """The ``kd cache`` subcommand and its three actions, on the ``kd`` command's subparsers."""
    cache = commands.add_parser("cache", help="see, verify or clear kd's cache (teachers, tokenizers, corpora, ...)")
    cache.add_argument("--cache-dir", help="the cache (default $KD_CACHE_DIR or ~/.cache/kd)")
    actions = cache.add_subparsers(dest="action", metavar="ACTION", parser_class=type(cache))
    listing = actions.add_parser("list", help="sizes per kind and per entry, and what each entry was built from")
    listing.add_argument("kind", nargs="?", metavar="KIND", help="only this kind (e.g. text-teacher, tokenizer)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    verify = actions.add_parser("verify", help="check every entry's files against its manifest (sizes and sha256)")
    verify.add_argument("kind", nargs="?", metavar="KIND", help="only this kind")
    clear = actions.add_parser("clear", help="remove entries (never one a running process holds) and free the space")
    clear.add_argument("kind", nargs="?", metavar="KIND", help="only this kind (e.g. damaged, partial, text-teacher)")
    clear.add_argument("--older-than", metavar="DURATION",
                       help="only what was last used longer ago than this (e.g. 30d, 12h, 90m, 2w)")


def run_cache_command(args: argparse.Namespace) -> int:
    """Run ``kd cache <action>``; returns the exit code (1 when ``verify`` found damage)."""
    from kdcore.config import default_cache_dir

    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.action is None:
        raise KDUserError("kd cache needs an action: list, verify or clear (e.g. 'kd cache list').")
    return {"list": _list, "verify": _verify, "clear": _clear}[args.action](root, args)


def format_bytes(count: int) -> str:
    """A size in decimal units, as the docs quote them (``61.2 MB``)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``30d``, ``12h``, ``90m``, ``2w`` or ``45s``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if match is None:
        raise KDUserError(f"--older-than '{text}' is not a duration; give a number and a unit: s, m, h, d or w "
                          f"(e.g. 30d for thirty days, 12h for twelve hours).")
    return float(match[1]) * _UNITS[match[2]]


def _rows(root: Path, kind: str | None) -> tuple[list[CachedPath], int]:
    scan = scan_cache(root)
    rows = [row for row in scan.rows if row.kind != "lock"]
    if kind is not None:
        kinds = sorted({row.kind for row in rows})
        rows = [row for row in rows if row.kind == kind]
        if not rows:
            raise KDUserError(f"The cache '{root}' holds nothing of kind '{kind}'. Kinds there now: "
                              f"{', '.join(kinds) or 'none (the cache is empty)'}.")
    return rows, scan.total_bytes


def _built_from(row: CachedPath) -> str:
    if row.manifest is None:
        return row.problem or ""
    parts = []
    for key, value in row.manifest["built_from"].items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(f"{key}={text if len(text) <= 40 else text[:37] + '...'}")
    return ", ".join(parts)


def _list(root: Path, args: argparse.Namespace) -> int:
    rows, total = _rows(root, args.kind)
    if args.json:
        print(json.dumps({"cache": str(root), "total_bytes": total, "entries": [
            {"path": str(row.path.relative_to(root)), "kind": row.kind, "bytes": row.bytes,
             "created": row.manifest.get("created") if row.manifest else None,
             "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.last_used)),
             "built_from": row.manifest["built_from"] if row.manifest else None,
             "info": row.manifest.get("info") if row.manifest else None, "problem": row.problem}
            for row in rows]}, indent=2))
        return 0
    print(f"kd cache {root}: {format_bytes(total)} in all ({total:,} bytes on disk, as du counts them)")
    if not rows:
        return 0
    kinds: dict[str, list[CachedPath]] = {}
    for row in rows:
        kinds.setdefault(row.kind, []).append(row)
    width = max(len(kind) for kind in (*kinds, "KIND"))
    print(f"\n  {'KIND'.ljust(width)}  ENTRIES       SIZE")
    for kind, members in sorted(kinds.items(), key=lambda item: -sum(row.bytes for row in item[1])):
        print(f"  {kind.ljust(width)}  {len(members):7d}  {format_bytes(sum(row.bytes for row in members)):>9}")
    print()
    for kind, members in sorted(kinds.items()):
        print(f"{kind}:")
        for row in sorted(members, key=lambda row: str(row.path)):
            created = f"  built {row.manifest.get('created')}" if row.manifest else ""
            print(f"  {format_bytes(row.bytes):>9}  {row.path.relative_to(root)}{created}")
            print(f"             {'from ' if row.manifest else ''}{_built_from(row)}")
    return 0


def _verify(root: Path, args: argparse.Namespace) -> int:
    rows, _ = _rows(root, args.kind)
    damaged = 0
    for row in rows:
        relative = row.path.relative_to(root)
        if row.manifest is None:
            print(f"{row.kind:>10}  {relative}  ({row.problem}; not an entry kd uses)")
            continue
        try:
            manifest = verify_entry(row.path, full=True)
        except CacheEntryDamaged as damage:
            damaged += 1
            print(f"   DAMAGED  {relative}  ({damage.reason})")
            continue
        shards = len(shard_paths(row.path, manifest))
        files = len(manifest["files"]) + shards
        print(f"        ok  {relative}  ({files} file{'s' if files != 1 else ''} checked)")
    entries = sum(row.manifest is not None for row in rows)
    if damaged:
        print(f"kd cache verify: {damaged} of {entries} entries are damaged. The next run that needs one moves it "
              f"aside and rebuilds it; 'kd cache clear KIND' removes them now.")
        return 1
    print(f"kd cache verify: all {entries} entries match their manifests.")
    return 0


def _clear(root: Path, args: argparse.Namespace) -> int:
    rows, before = _rows(root, args.kind)
    cutoff = time.time() - parse_duration(args.older_than) if args.older_than else None
    removed, busy = 0, []
    for row in rows:
        if cutoff is not None and row.last_used > cutoff:
            continue
        with lock_if_free(row.owner) as free:
            if not free:  # being built or read right now: never pulled from under a running process
                busy.append(row)
                continue
            remove_entry(row.path)
            removed += 1
    after = scan_cache(root).total_bytes
    for row in busy:
        print(f"kept {row.path.relative_to(root)}: a running process holds it")
    print(f"kd cache clear: removed {removed} path{'s' if removed != 1 else ''}, freed {format_bytes(before - after)} "
          f"(now {format_bytes(after)} in {root}).")
    return 0


__all__ = ["add_cache_parser", "format_bytes", "parse_duration", "run_cache_command"]
