"""Verified cache entries (kdcore.cache): damage of every sort is detected, reported, moved aside and rebuilt (or
refused); two processes build one entry once; ``kd cache list | verify | clear`` see, check and free the cache."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.cache import (
    DAMAGED_MARK, MANIFEST, CacheEntryDamaged, ensure_entry, entry_lock, lock_if_free, verify_entry, verify_shard,
    write_shard,
)
from kdcore.cli import main
from kdcore.errors import KDUserError

DAMAGES = ["flipped bytes", "truncated", "deleted file", "garbled manifest", "no manifest (older kd)"]


def damage(entry: Path, how: str, name: str) -> None:
    """Damage one file ``name`` of a cache entry (or its manifest) the way ``how`` says."""
    path = entry / name
    if how == "flipped bytes":
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "deleted file":
        path.unlink()
    elif how == "garbled manifest":
        (entry / MANIFEST).write_text((entry / MANIFEST).read_text()[:40])
    elif how == "no manifest (older kd)":
        (entry / MANIFEST).unlink()
    else:
        raise AssertionError(how)


def _build_counter(calls: list[int]):  # noqa: ANN202
    def build(staging: Path) -> dict:
        calls.append(1)
        (staging / "weights.bin").write_bytes(bytes(range(256)) * 8)
        (staging / "sub").mkdir()
        (staging / "sub" / "vocab.txt").write_text("a\nb\n")
        return {"note": "built by the test"}
    return build


def _ensure(entry: Path, calls: list[int], **options) -> str:  # noqa: ANN003
    return ensure_entry(entry, "test-kind", {"recipe": "r/1"}, _build_counter(calls), what="the test entry",
                        load=lambda manifest: (entry / "sub" / "vocab.txt").read_text(), **options)


def test_an_entry_is_built_once_with_its_manifest_last_and_then_read(tmp_path: Path) -> None:
    entry, calls = tmp_path / "kind" / "entry", []
    assert _ensure(entry, calls) == "a\nb\n" and _ensure(entry, calls) == "a\nb\n"
    assert calls == [1]
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["kind"] == "test-kind" and manifest["built_from"] == {"recipe": "r/1"}
    assert manifest["info"] == {"note": "built by the test"}
    assert manifest["files"]["weights.bin"]["size"] == 2048 and len(manifest["files"]["sub/vocab.txt"]["sha256"]) == 64
    assert not [p for p in entry.parent.iterdir() if ".building-" in p.name]  # the staging directory became the entry


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_entry_is_reported_moved_aside_and_rebuilt(tmp_path: Path, how: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    entry, calls = tmp_path / "kind" / "entry", []
    _ensure(entry, calls)
    damage(entry, how, "sub/vocab.txt" if how == "deleted file" else "weights.bin")
    with pytest.raises(CacheEntryDamaged):
        verify_entry(entry)
    with caplog.at_level(logging.WARNING, logger="kdcore.cache"):
        assert _ensure(entry, calls) == "a\nb\n"
    assert calls == [1, 1]
    (aside,) = [p for p in entry.parent.iterdir() if DAMAGED_MARK in p.name]
    assert aside.name.startswith("entry.damaged-")
    assert f"The cache entry {entry} is damaged" in caplog.text and "moved aside" in caplog.text
    verify_entry(entry, full=True)


def test_a_damaged_entry_kd_cannot_rebuild_is_refused_naming_it(tmp_path: Path) -> None:
    entry, calls = tmp_path / "kind" / "entry", []
    _ensure(entry, calls)
    damage(entry, "flipped bytes", "weights.bin")
    with pytest.raises(KDUserError, match=f"cache entry '{entry}' is damaged.*weights.bin does not match"):
        _ensure(entry, calls, rebuild=False)
    assert calls == [1] and entry.is_dir()


def test_a_changed_entry_is_found_in_the_same_process_and_hashed_once_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, calls = tmp_path / "entry", []
    _ensure(entry, calls)
    hashed: list[Path] = []
    import kdcore.cache as cache

    original = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path: hashed.append(Path(path)) or original(path))
    verify_entry(entry)
    verify_entry(entry)
    assert hashed == []  # hashed while it was written: sizes only afterwards
    damage(entry, "flipped bytes", "weights.bin")  # a new mtime: hashed again
    with pytest.raises(CacheEntryDamaged, match="weights.bin does not match its sha256"):
        verify_entry(entry)


def test_shards_carry_their_size_and_hash_in_their_names(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, "chunk", ".json", b'{"a": 1}')
    verify_shard(shard, full=True)
    shard.write_bytes(b'{"a": 2}')
    with pytest.raises(CacheEntryDamaged, match="does not match the sha256 in its name"):
        verify_shard(shard)
    shard.write_bytes(b'{"a"')
    with pytest.raises(CacheEntryDamaged, match="truncated or changed"):
        verify_shard(shard)
    old = tmp_path / "chunk-123-abc.json"
    old.write_text("{}")
    with pytest.raises(CacheEntryDamaged, match="older kd"):
        verify_shard(old)


_HOLD = """
import sys, time
from pathlib import Path
from kdcore.cache import entry_lock
with entry_lock(Path(sys.argv[1]), "the test entry"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_lock_is_held_across_processes_and_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(entry), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with lock_if_free(entry) as free:
            assert not free
        holder.kill()  # a killed builder never blocks the next one: the OS drops its lock
        holder.wait()
        with lock_if_free(entry) as free:
            assert free
        with entry_lock(entry, "the test entry"):
            pass
    finally:
        holder.kill()


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def _kd_cache(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str]:
    code = main(["cache", "--cache-dir", str(root), *args])
    return code, capsys.readouterr().out


def test_kd_cache_list_verify_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, calls = tmp_path / "cache", []
    _ensure(root / "kind" / "one", calls)
    ensure_entry(root / "other" / "two", "other-kind", {"source": "x"}, _build_counter(calls), what="two",
                 load=lambda manifest: None)
    (root / "text" / "teachers" / "wmt-0123.partial").mkdir(parents=True)
    (root / "text" / "teachers" / "wmt-0123.partial" / "log.jsonl").write_text("{}\n" * 1000)

    code, out = _kd_cache(capsys, root, "list")
    assert code == 0
    listed = int(out.splitlines()[0].split("(")[1].split(" bytes")[0].replace(",", ""))
    assert listed == _du(root)
    assert "test-kind" in out and "other-kind" in out and "partial" in out and "from recipe=r/1" in out
    code, out = _kd_cache(capsys, root, "list", "--json")
    rows = json.loads(out)["entries"]
    assert {row["kind"] for row in rows} == {"test-kind", "other-kind", "partial"}
    assert sum(row["bytes"] for row in rows) <= _du(root)

    code, out = _kd_cache(capsys, root, "verify")
    assert code == 0 and "all 2 entries match" in out
    damage(root / "kind" / "one", "truncated", "weights.bin")
    code, out = _kd_cache(capsys, root, "verify")
    assert code == 1 and "DAMAGED  kind/one" in out and "truncated or changed" in out

    with pytest.raises(KDUserError, match="nothing of kind 'nope'"):
        main_args = ["cache", "--cache-dir", str(root), "clear", "nope"]
        from kdcore.cache_cli import run_cache_command
        from kdcore.cli import _parser

        run_cache_command(_parser().parse_args(main_args))
    assert main(["cache", "--cache-dir", str(root), "clear", "--older-than", "soon"]) == 2
    capsys.readouterr()
    code, out = _kd_cache(capsys, root, "clear", "--older-than", "1d")  # everything was used just now
    assert "removed 0 paths" in out and (root / "kind" / "one").is_dir()

    with entry_lock(root / "other" / "two", "two"):  # a running process holds it: kept
        code, out = _kd_cache(capsys, root, "clear")
    assert "kept other/two: a running process holds it" in out and "removed 2 paths" in out
    assert (root / "other" / "two").is_dir() and not (root / "kind" / "one").exists()
    code, out = _kd_cache(capsys, root, "clear", "other-kind")
    assert "removed 1 path," in out and not (root / "other" / "two").exists()
    assert _du(root) <= 5 * 4096  # five directories and empty lock files are all that is left
    _ensure(root / "kind" / "one", calls)  # the next use rebuilds it
    assert len(calls) == 3


_TOY_RUN = ["run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--set", "teacher.args.train_steps=30",
            "--set", "trainer.max_steps=6", "--set", "trainer.eval_every=6", "--set", "trainer.checkpoint_every=6"]


def test_two_runs_started_together_on_an_empty_cache_train_the_teacher_once(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "KD_PROGRESS": "off"}
    runs = [subprocess.Popen([sys.executable, "-m", "kdcore", *_TOY_RUN, "--out", str(tmp_path / f"run-{i}")],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    logs = [err for _, err in outputs]
    # One trained the teacher; the other waited for it (or, started later, found it cached) and read it.
    assert sum("Teacher stage: the toy teacher is not cached" in log for log in logs) == 1, logs
    (entry,) = [p for p in (tmp_path / "cache" / "toy").iterdir() if p.is_dir()]
    assert json.loads((entry / MANIFEST).read_text())["kind"] == "toy-teacher"
    metrics = [json.loads((tmp_path / f"run-{i}" / "metrics.json").read_text()) for i in range(2)]
    assert metrics[0]["student"] == metrics[1]["student"] and metrics[0]["teacher"] == metrics[1]["teacher"]
