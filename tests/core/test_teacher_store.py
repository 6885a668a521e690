"""The teacher store: ``kd teacher capture`` on the tiny wmt data, runs that read it with no teacher model, resumption
after SIGKILL, shards captured separately, and every bad input refused with exit 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcore.cli import main
from kdcore.signals import SparseLogits

SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
DATA = ["--set", "data.corpus=files", "--set", f"data.train.path={SAMPLE}", "--set", "data.valid_size=16",
        "--set", "data.test_size=24"]
CAPTURE = ["teacher", "capture", "--task", "wmt", "--preset", "tiny", *DATA, "--top-k", "8", "--shard-examples", "100",
           "--batch-size", "16"]


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store-cache")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One capture (teacher trained on first use, scored on the test split) shared by the tests."""
    out = tmp_path_factory.mktemp("stores") / "wmt-k8"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KD_CACHE_DIR", str(cache_dir))
        patch.setenv("OMP_NUM_THREADS", "1")
        assert main([*CAPTURE, "--out", str(out)]) == 0
    return out


@pytest.fixture()
def in_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KD_CACHE_DIR", str(cache_dir))
    return cache_dir


def test_capture_writes_a_complete_store_with_top_k_and_tail(store: Path) -> None:
    manifest = json.loads((store / "kd-store.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["top_k"] == 8 and manifest["shards"] == 4  # 360 training examples, 100 per shard
    assert sum(len(shard["ids"]) for shard in manifest["shard_files"]) == manifest["examples"] == 360
    metrics = json.loads((store / "teacher-metrics.json").read_text(encoding="utf-8"))
    assert "bleu" in metrics["metrics"] and metrics["test_sha256"] == manifest["test_sha256"]


def test_stored_logits_are_the_teachers_top_k_with_its_tail_mass(store: Path, in_cache: Path) -> None:
    from kdcore.registry import Registry
    from kdcore.resolve import build_task_and_teacher, resolve_run
    from kdcore.signals import request, Signal
    from kdcore.teacher_store import TeacherStore

    resolved = resolve_run(Registry.discover(), task="wmt", plugin="word-kd", preset="tiny", sets=DATA[1::2])
    task, teacher, _ = build_task_and_teacher(resolved, torch.device("cpu"))
    items = task.build_data(0).train[:5]
    batch = task.collate(items)
    dense = teacher.signals(batch, request(Signal.LOGITS)).logits
    stored = TeacherStore(store).sparse_logits(batch["ids"], batch["labels"].shape[1])
    expected = SparseLogits.from_dense(dense.float(), 8)
    scored = batch["labels"] != -100
    assert torch.equal(stored.indices[scored], expected.indices[scored].long())
    torch.testing.assert_close(stored.values[scored], expected.values[scored].half().float())
    torch.testing.assert_close(stored.tail_log_mass[scored], expected.tail_log_mass[scored])
    # top-k plus tail is a distribution
    total = torch.logsumexp(torch.cat([torch.log_softmax(dense.float(), -1).gather(-1, expected.indices.long()),
                                       expected.tail_log_mass.unsqueeze(-1)], -1), -1)
    torch.testing.assert_close(total[scored], torch.zeros_like(total[scored]), atol=1e-5, rtol=0)


def test_word_kd_trains_from_the_store_without_a_teacher_model(store: Path, in_cache: Path, tmp_path: Path) -> None:
    from kdcore.registry import Registry
    from kdcore.resolve import build_components, resolve_run
    from kdcore.teacher_store import StoredTeacher

    sets = [*DATA[1::2], "teacher.name=store", f"teacher.args.path={store}"]
    resolved = resolve_run(Registry.discover(), task="wmt", plugin="word-kd", preset="tiny", sets=sets)
    built = build_components(resolved, torch.device("cpu"))
    assert isinstance(built.teacher, StoredTeacher) and not list(built.teacher.parameters())
    out = tmp_path / "run"
    assert main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *DATA, "--set", "teacher.name=store",
                 "--set", f"teacher.args.path={store}", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    recorded = json.loads((store / "teacher-metrics.json").read_text(encoding="utf-8"))["metrics"]
    assert metrics["teacher"]["bleu"] == pytest.approx(recorded["bleu"])
    assert metrics["params"]["teacher"] == json.loads((store / "kd-store.json").read_text())["teacher_parameters"]
    losses = [json.loads(line)["kd"] for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert losses and all(0 < loss < 50 for loss in losses)


_KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
import kdcore.teacher_store as store
real = store.atomic_write_json
def write(path, data):
    if str(path).endswith("-of-00004.json") and "00001" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # the second shard is on disk, its receipt is not
    real(path, data)
store.atomic_write_json = write
from kdcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_capture_killed_with_sigkill_resumes_to_the_same_store(store: Path, in_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    args = [*CAPTURE, "--out", str(out), "--no-evaluate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_SHARD, *args], env=env, capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "kd-store.json").exists() and (out / "shard-00000-of-00004.json").exists()
    assert main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *DATA, "--set",
                 "teacher.name=store", "--set", f"teacher.args.path={out}", "--dry-run", "--out",
                 str(tmp_path / "plan")]) == 2  # an unfinished capture is refused
    assert main(args) == 0
    expected = {name: data for name, data in _files(store).items() if name != "teacher-metrics.json"}
    resumed = {name: data for name, data in _files(out).items() if not name.startswith(".")}
    assert resumed == expected


def test_shards_captured_separately_merge_into_the_same_store(store: Path, in_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    assert main([*CAPTURE, "--out", str(out), "--no-evaluate", "--shard", "1/2"]) == 0
    assert not (out / "kd-store.json").exists()
    assert main([*CAPTURE, "--out", str(out), "--no-evaluate", "--shard", "0/2"]) == 0
    assert _files(out) == {name: data for name, data in _files(store).items() if name != "teacher-metrics.json"}


def _run_from(store: Path, tmp_path: Path, *extra: str, plugin: str = "word-kd") -> int:
    return main(["run", "--task", "wmt", "--plugin", plugin, "--preset", "tiny", *DATA, "--set", "teacher.name=store",
                 "--set", f"teacher.args.path={store}", *extra, "--dry-run", "--out", str(tmp_path / "plan")])


def _copy(store: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    return copy


def test_bad_stores_are_refused_with_exit_2(store: Path, in_cache: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # other data: fewer validation pairs leave more training pairs than were captured
    assert main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *DATA, "--set",
                 "data.valid_size=12", "--set", "teacher.name=store", "--set", f"teacher.args.path={store}",
                 "--dry-run", "--out", str(tmp_path / "plan")]) == 2
    assert "captured from other data" in capsys.readouterr().err
    # a method that runs the teacher on the student's prefixes
    assert _run_from(store, tmp_path, plugin="imitation") == 2
    assert "needs the teacher model" in capsys.readouterr().err
    # a divergence at another temperature than the stored tail mass
    assert _run_from(store, tmp_path, "--set", "objectives.kd.args.temperature=2.0") == 2
    assert "temperature 1.0" in capsys.readouterr().err
    # a truncated shard, and one with a flipped byte
    copy = _copy(store, tmp_path)
    shard = copy / "shard-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert _run_from(copy, tmp_path) == 2
    assert "truncated" in capsys.readouterr().err
    data = bytearray((store / "shard-00002-of-00004.safetensors").read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _run_from(copy, tmp_path) == 2
    assert "sha256" in capsys.readouterr().err
    # the damaged shard is rewritten by capturing again; the others are kept
    shard.unlink()
    assert main([*CAPTURE, "--out", str(copy), "--no-evaluate"]) == 0
    assert (copy / "shard-00002-of-00004.safetensors").read_bytes() == (store / "shard-00002-of-00004.safetensors"
                                                                        ).read_bytes()
    # capturing other settings into an existing store
    assert main([*CAPTURE[:-6], "--top-k", "4", "--out", str(store), "--no-evaluate"]) == 2
    assert "holds another capture" in capsys.readouterr().err
    # a store without teacher scores, while the run reports the teacher
    (copy / "teacher-metrics.json").unlink(missing_ok=True)
    assert _run_from(copy, tmp_path) == 2
    assert "trainer.evaluate_teacher" in capsys.readouterr().err
    assert _run_from(copy, tmp_path, "--set", "trainer.evaluate_teacher=false") == 0
