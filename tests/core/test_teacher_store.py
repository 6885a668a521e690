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
    assert sum(shard["examples"] for shard in manifest["shard_files"]) == manifest["examples"] == 360
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


# ----------------------------------------------------------------------------------------------- sequences (seq-kd)

#: seq-kd's decoding settings for the tests (a narrow, short beam: the tiny teacher decodes 360 examples quickly).
SEQ_KD = ["--plugin", "seq-kd", "--set", "method.num_beams=2", "--set", "method.max_new_tokens=12"]


@pytest.fixture(scope="module")
def sequence_store(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, store: Path) -> Path:
    """The teacher's beam outputs, captured as --plugin seq-kd decodes them (the default signal of seq-kd)."""
    out = tmp_path_factory.mktemp("stores") / "wmt-seq"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KD_CACHE_DIR", str(cache_dir))
        patch.setenv("OMP_NUM_THREADS", "1")
        assert main([*CAPTURE[:-6], "--shard-examples", "100", "--batch-size", "16", *SEQ_KD, "--no-evaluate",
                     "--out", str(out)]) == 0
    return out


def _seq_kd(*extra: str, teacher: list[str] | None = None):  # noqa: ANN202
    from kdcore.registry import Registry
    from kdcore.resolve import build_components, resolve_run

    sets = [*DATA[1::2], *SEQ_KD[3::2], *(teacher or []), *extra]
    resolved = resolve_run(Registry.discover(), task="wmt", plugin="seq-kd", preset="tiny", sets=sets)
    return build_components(resolved, torch.device("cpu"))


def test_stored_sequences_are_the_teachers_beam_outputs(sequence_store: Path, in_cache: Path) -> None:
    from kdcore.teacher_store import TeacherStore

    manifest = json.loads((sequence_store / "kd-store.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["signals"] == ["sequences"]
    assert manifest["settings"]["sequences"] == {"num_beams": 2, "length_penalty": 1.0, "max_new_tokens": 12,
                                                 "max_length_ratio": 2.0, "max_length_offset": 5}
    live = _seq_kd()
    batch = live.task.collate(live.task.build_data(0).train[:16])  # the capture's first batch
    expected = live.method.decode_teacher_sequences(live.teacher, live.method.config, batch)
    assert TeacherStore(sequence_store).sequences(batch["ids"]) == expected
    assert all(0 < len(tokens) <= 12 for tokens in expected)


def test_seq_kd_learns_from_stored_sequences_without_a_teacher_model(sequence_store: Path, in_cache: Path) -> None:
    from kd_plugins.text.baselines import SeqKDMethod

    built = _seq_kd("trainer.evaluate_teacher=false",
                    teacher=["teacher.name=store", f"teacher.args.path={sequence_store}"])
    assert isinstance(built.method, SeqKDMethod) and not list(built.teacher.parameters())
    batch = built.task.collate(built.task.build_data(0).train[40:44])
    targets, hits = built.method.teacher_targets(batch)
    stored = built.teacher.store.sequences(batch["ids"])
    assert hits == 4 and [row[row != -100].tolist() for row in targets] == stored
    output = built.method.training_step(batch, 0)
    assert torch.isfinite(output.loss) and output.parts["cache_hit_fraction"] == 1.0
    assert built.method.teacher_calls == 0 and built.method.sequences._cache is None  # no run-time cache either


def test_stores_lacking_what_the_method_reads_are_refused(store: Path, sequence_store: Path, in_cache: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seq_kd = ["--set", "method.num_beams=2", "--set", "method.max_new_tokens=12"]
    # seq-kd from a store of logits, word-kd from a store of sequences
    assert _run_from(store, tmp_path, *seq_kd, plugin="seq-kd") == 2
    assert "holds logits" in capsys.readouterr().err
    assert _run_from(sequence_store, tmp_path, "--set", "trainer.evaluate_teacher=false") == 2
    assert "holds sequences. Capture a store with --signals logits,sequences" in capsys.readouterr().err
    # other decoding settings, and objectives that ask the stored teacher for logits on its own outputs
    assert _run_from(sequence_store, tmp_path, "--set", "method.num_beams=3", "--set", "method.max_new_tokens=12",
                     "--set", "trainer.evaluate_teacher=false", plugin="seq-kd") == 2
    assert "method.num_beams=3 (captured: 2)" in capsys.readouterr().err
    assert _run_from(sequence_store, tmp_path, *seq_kd, "--set", "objectives.kd.name=reverse_kl", "--set",
                     "trainer.evaluate_teacher=false", plugin="seq-kd") == 2
    assert "ask the teacher for logits" in capsys.readouterr().err
    assert _run_from(sequence_store, tmp_path, *seq_kd, "--set", "trainer.evaluate_teacher=false",
                     plugin="seq-kd") == 0
    # capture options of signals that are not captured, and sequences from a method that makes none
    assert main([*CAPTURE[:-6], *SEQ_KD, "--top-k", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--top-k set(s) the logits signal" in capsys.readouterr().err
    assert main([*CAPTURE, "--signals", "sequences", "--out", str(tmp_path / "y")]) == 2
    assert "--top-k set(s) the logits signal" in capsys.readouterr().err
    assert main([*CAPTURE[:-6], "--signals", "sequences", "--out", str(tmp_path / "z")]) == 2
    assert "pass --plugin seq-kd" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_kd_run_seq_kd_from_a_store(sequence_store: Path, in_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--task", "wmt", "--plugin", "seq-kd", "--preset", "tiny", *DATA, *SEQ_KD[2:], "--set",
                 "teacher.name=store", "--set", f"teacher.args.path={sequence_store}", "--set",
                 "trainer.evaluate_teacher=false", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(record["cache_hit_fraction"] == 1.0 for record in records if record["type"] == "train")


# ----------------------------------------------------------------------------------------------- format


def test_stores_of_the_first_format_are_still_read(tmp_path: Path) -> None:
    """A kd-teacher-store/1 store (one shared ``offsets``, example ids in the manifest) reads as it did."""
    import hashlib

    from safetensors.torch import save

    from kdcore.teacher_store import TeacherStore

    dense = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    sparse = SparseLogits.from_dense(dense, 4)
    data = save({"values": sparse.values.half(), "indices": sparse.indices.int(),
                 "tail_log_mass": sparse.tail_log_mass, "offsets": torch.tensor([0, 3, 5])})
    (tmp_path / "shard-00000-of-00001.safetensors").write_bytes(data)
    settings = {"split": "train", "top_k": 4, "values_dtype": "float16", "full_logits": False, "temperature": 1.0,
                "shard_examples": 512}
    manifest = {"format": "kd-teacher-store/1", "task": "wmt", "settings": settings, "vocab_size": 20,
                "data_sha256": "0" * 64, "teacher_sha256": "1" * 64, "shard_files": [
                    {"file": "shard-00000-of-00001.safetensors", "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "ids": ["a", "b"], "digests": ["x", "y"]}]}
    (tmp_path / "kd-store.json").write_text(json.dumps(manifest), encoding="utf-8")
    store = TeacherStore(tmp_path)
    assert store.signals == ("logits",) and store.digests == {"a": "x", "b": "y"}
    read = store.sparse_logits(["b", "a"], width=3)
    torch.testing.assert_close(read.values[0, :2], sparse.values[3:].half().float())
    torch.testing.assert_close(read.tail_log_mass[1], sparse.tail_log_mass[:3])
    assert torch.equal(read.indices[1], sparse.indices[:3])
