"""Files and directories kd writes follow the umask, as a plain ``open()``/``mkdir()`` would (issue 25, item 5):
the atomic writers create their temporary files with ``tempfile`` (owner-only) and must not keep those modes."""
from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kdcore.checkpoint import save_state_dict
from kdcore.cli import main
from kdcore.io import atomic_write_bytes, atomic_write_json, current_umask, follow_umask
from kdcore.teacher_shards import AppendableStore


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """``umask(value)`` sets the process umask for the test; the old one is restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                             (0o027, 0o640, 0o750)], ids=["022", "077", "027"])
def test_atomic_writers_give_the_modes_of_a_plain_open(tmp_path: Path, umask, mask: int, file_mode: int,
                                                       dir_mode: int) -> None:
    umask(mask)
    assert current_umask() == mask
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "nested" / "b.json", {"a": 1})
    save_state_dict({"w": torch.zeros(2)}, tmp_path / "c.safetensors")
    store = AppendableStore(tmp_path / "store", "test-store", {"teacher": "t"}, what="the test store",
                            label="test shard", examples_label="examples")
    shard = store.append(["a"], ["a"], [{"sequences": torch.tensor([1, 2], dtype=torch.int32)}])
    with open(tmp_path / "plain", "w", encoding="utf-8"):
        pass
    assert _mode(tmp_path / "plain") == file_mode
    for name in ("a.bin", "nested/b.json", "c.safetensors", shard.relative_to(tmp_path).as_posix()):
        assert _mode(tmp_path / name) == file_mode, name
    assert _mode(tmp_path / "nested") == dir_mode and _mode(tmp_path / "store") == dir_mode
    staged = tmp_path / "staged"
    staged.mkdir(mode=0o700)
    follow_umask(staged)  # what a mkdtemp staging directory gets before it is renamed into place
    assert _mode(staged) == dir_mode
    # No temporary file is left behind by any writer.
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def _toy_run(out: Path, cache: Path) -> None:
    code = main(["run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--set", f"cache_dir={cache}",
                 "--set", "data.n_train=256", "--set", "teacher.args.train_steps=20", "--set", "trainer.max_steps=10",
                 "--set", "trainer.eval_every=5", "--set", "trainer.checkpoint_every=5", "--out", str(out)])
    assert code == 0


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["022", "077"])
def test_a_real_toy_run_writes_files_that_follow_the_umask(tmp_path: Path, umask, mask: int, file_mode: int,
                                                           dir_mode: int) -> None:
    umask(mask)
    out, cache = tmp_path / "run", tmp_path / "cache"
    _toy_run(out, cache)
    expected = ["config.yaml", "metrics.json", "report.md", "log.jsonl", "loss.png", "best/student.safetensors",
                "best/info.json", "provenance.json"]
    for name in expected:
        assert _mode(out / name) == file_mode, name
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert _mode(checkpoint) == dir_mode
        names = {p.name for p in checkpoint.iterdir()}
        assert {"student.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json",
                "manifest.json"} <= names
        for path in checkpoint.iterdir():
            assert _mode(path) == file_mode, path
    assert _mode(out / "best") == dir_mode
    # Everything in the run directory and the cache (the toy teacher) is shared as the umask says.
    for path in [*out.rglob("*"), *cache.rglob("*")]:
        assert _mode(path) == (dir_mode if path.is_dir() else file_mode), path
