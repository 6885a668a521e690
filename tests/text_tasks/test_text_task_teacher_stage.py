"""The teacher stage runs on the one engine: a `kd run` SIGKILLed during it continues the stage from its last
checkpoint and ends with the same teacher as an uninterrupted stage; its log.jsonl and checkpoints live in a
partial directory next to the cache entry, which is never taken for a cached teacher and is removed once the
teacher is cached.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcore.checkpoint import list_checkpoints
from kdcore.interfaces import BuildContext
from kdcore.io import read_jsonl
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

SAMPLE = Path(__file__).parent / "data" / "ha-en-de-sample.tsv"
#: The tiny preset on the committed sample, with a teacher stage long enough to be killed in its middle, and
#: dropout on, so the resumed stage must also continue the dropout random stream.
SETS = ["data.corpus=files", f"data.train.path={SAMPLE}", "data.valid_size=8", "data.test_size=8",
        "teacher.args.train_steps=60", "teacher.args.checkpoint_every=5", "teacher.args.log_every=5",
        "teacher.args.dropout=0.1", "trainer.max_steps=1", "trainer.eval_every=1", "trainer.evaluate_teacher=false"]


def _kd_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcore", "run", *args]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "KD_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "KD_PROGRESS": "off"}


def _teachers(cache: Path) -> Path:
    return cache / "text" / "teachers"


def _reference_teacher(cache: Path, sets: list[str]) -> dict[str, torch.Tensor]:
    """The teacher of an uninterrupted stage with these settings, built in this process."""
    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="wmt", plugin="imitation", preset="tiny", sets=sets)
    task = resolved.task_cls(resolved.data_config, cache)
    context = BuildContext(task=task, cache_dir=cache, device=torch.device("cpu"), seed=0)
    resolved.teacher_factory().build(resolved.teacher_config, context)
    (entry,) = [p for p in _teachers(cache).iterdir() if p.is_dir()]
    return load_file(str(entry / "model.safetensors"))


def test_a_run_killed_during_its_teacher_stage_resumes_it_and_ends_with_the_same_teacher(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["--task", "wmt", "--plugin", "imitation", "--preset", "tiny",
            *[a for s in SETS for a in ("--set", s)], "--out", str(out)]
    process = subprocess.Popen(_kd_run(*args), env=_env(cache), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    partial: Path | None = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(_teachers(cache).glob("wmt-*.partial")) if _teachers(cache).exists() else []
        if found and list_checkpoints(found[0] / "checkpoints"):
            partial = found[0]
            break
        time.sleep(0.01)
    assert partial is not None, f"no teacher checkpoint appeared: {process.communicate()[1][-3000:]}"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL

    # (c) The killed stage left its partial directory, which is not a cache entry: no teacher is cached.
    entry = partial.with_name(partial.name[:-len(".partial")])
    killed_at = [int(p.name.split("-")[1]) for p in list_checkpoints(partial / "checkpoints")]
    assert killed_at and max(killed_at) < 60
    assert (partial / "log.jsonl").is_file() and not (entry / "kd-cache.json").exists()
    logged = [r["step"] for r in read_jsonl(partial / "log.jsonl") if r["type"] == "train"]
    assert logged and logged[0] == 5

    resumed = subprocess.run(_kd_run("--out", str(out), "--resume"), env=_env(cache), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Teacher stage: continuing from its checkpoint at step {max(killed_at)} of 60" in resumed.stderr
    # (b) Once the teacher is cached the partial directory is gone.
    assert (entry / "kd-cache.json").is_file() and not partial.exists()
    assert (out / "metrics.json").is_file()

    resumed_weights = load_file(str(entry / "model.safetensors"))
    reference = _reference_teacher(tmp_path / "reference-cache", SETS)
    assert resumed_weights.keys() == reference.keys()
    assert all(torch.equal(resumed_weights[k], reference[k]) for k in reference)


def test_an_interrupted_stage_is_not_a_cached_teacher_and_the_finished_one_leaves_no_partial_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(b) and (c) in one process, with lifecycle hooks in the stage: a stage stopped by SIGINT after step 10 keeps
    its checkpoints and caches nothing; the next build continues it, caches the same teacher as an uninterrupted
    stage and removes the partial directory."""
    from kdcore.hookspecs import hookimpl
    from kdcore.interrupts import TrainingInterrupted

    class InterruptAtStep10:
        @hookimpl
        def kd_on_step_end(self, context, step, logs) -> None:  # noqa: ANN001, ARG002 - hook signature
            if step == 10:
                os.kill(os.getpid(), signal.SIGINT)

    cache = tmp_path / "cache"
    sets = [s.replace("train_steps=60", "train_steps=20") for s in SETS]
    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="wmt", plugin="imitation", preset="tiny", sets=sets)
    task = resolved.task_cls(resolved.data_config, cache)
    interrupting = Registry.discover(entry_points=False)
    interrupting.register_plugin(InterruptAtStep10(), name="interrupt", source="test")
    context = BuildContext(task=task, cache_dir=cache, device=torch.device("cpu"), seed=0)
    monkeypatch.setattr(context, "registry", interrupting, raising=False)
    with pytest.raises(TrainingInterrupted) as stopped:
        resolved.teacher_factory().build(resolved.teacher_config, context)
    assert stopped.value.exit_code == 128 + signal.SIGINT
    assert "Teacher stage: Stopped by SIGINT after step 10" in str(stopped.value)
    assert "the same kd run command" in str(stopped.value) and "--out" not in str(stopped.value)
    (partial,) = _teachers(cache).glob("wmt-*.partial")
    entry = partial.with_name(partial.name[:-len(".partial")])
    assert [p.name for p in list_checkpoints(partial / "checkpoints")] == ["step-00000005", "step-00000010"]
    assert not (entry / "kd-cache.json").exists()

    context = BuildContext(task=task, cache_dir=cache, device=torch.device("cpu"), seed=0)
    resolved.teacher_factory().build(resolved.teacher_config, context)
    assert (entry / "kd-cache.json").is_file() and not partial.exists()

    reference = _reference_teacher(tmp_path / "reference-cache", sets)
    continued = load_file(str(entry / "model.safetensors"))
    assert all(torch.equal(continued[k], reference[k]) for k in reference)


def test_a_budget_cut_teacher_serves_budgeted_runs_and_is_trained_again_in_full_when_the_budget_is_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``teacher.args.time_budget_minutes: false`` means every step: a cached teacher that a budget cut short is not
    silently reused by such a run (it is trained again and replaces the entry), while budgeted runs reuse it."""
    import json
    import logging

    from kdcore.errors import KDUserError

    cache = tmp_path / "cache"
    base = [s.replace("train_steps=60", "train_steps=40") for s in SETS if "dropout" not in s]
    registry = Registry.discover(entry_points=False)

    def build(*extra: str) -> dict:
        resolved = resolve_run(registry, task="wmt", plugin="imitation", preset="tiny", sets=[*base, *extra])
        task = resolved.task_cls(resolved.data_config, cache)
        context = BuildContext(task=task, cache_dir=cache, device=torch.device("cpu"), seed=0)
        resolved.teacher_factory().build(resolved.teacher_config, context)
        (entry,) = [p for p in _teachers(cache).iterdir() if p.is_dir() and not p.name.endswith(".partial")]
        return json.loads((entry / "kd-cache.json").read_text())["info"]

    cut = build("teacher.args.time_budget_minutes=0.0001")  # 6 ms: the first check keeps one more step
    assert cut["time_budget"]["planned_steps"] == 40 and cut["time_budget"]["max_steps"] < 40
    caplog.set_level(logging.INFO)
    assert build()["time_budget"] == cut["time_budget"]  # the task's budget: the cut teacher serves
    assert "training it again" not in caplog.text
    full = build("teacher.args.time_budget_minutes=false")
    assert "time_budget" not in full and full["steps"] == 40
    assert "a time budget cut its training to" in caplog.text and "training it again" in caplog.text
    caplog.clear()
    assert build("teacher.args.time_budget_minutes=false") == full  # a full teacher serves: reused
    assert "training it again" not in caplog.text
    with pytest.raises(KDUserError, match="time_budget_minutes.*Expected a number .float. or one of False or null"):
        resolve_run(registry, task="wmt", plugin="imitation", preset="tiny",
                    sets=[*base, "teacher.args.time_budget_minutes=true"])
