"""The engine end to end through the real CLI: outputs, exact resume after SIGKILL, hooks."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from kdcore.io import read_jsonl

TINY = ["--task", "toy", "--plugin", "vanilla", "--preset", "tiny"]


def test_run_writes_every_artifact(tmp_path: Path, run_kd) -> None:
    out = tmp_path / "run"
    result = run_kd("run", *TINY, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "toy" and metrics["plugin"] == "vanilla"
    assert set(metrics["params"]) == {"teacher", "student"} and metrics["params"]["student"] < metrics["params"]["teacher"]
    assert {"accuracy", "nll"} <= set(metrics["student"]) and {"accuracy", "nll"} <= set(metrics["teacher"])
    assert {"kd", "torch", "transformers"} <= set(metrics["versions"]) and metrics["train_seconds"] > 0
    report = (out / "report.md").read_text()
    assert "| accuracy (selects best) |" in report and "loss.png" in report
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "metric.png").read_bytes()[:4] == b"\x89PNG"
    records = read_jsonl(out / "log.jsonl")
    # The first record says what is trained: each objective's label, name and weight, the precision used and the
    # number of processes.
    assert records[0] == {"type": "start", "step": 0, "precision": "fp32", "world_size": 1,
                          "objectives": {"kd": {"name": "forward_kl", "weight": 1.0}, "nll": {"name": "nll", "weight": 0.5}}}
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(5, 41, 5))
    assert [r["step"] for r in records if r["type"] == "eval"] == [20, 40]
    # stderr is not a terminal here: every validation and each test evaluation says so in a line of its own
    assert "Validation at step 20: accuracy" in result.stderr and "Validation at step 40: accuracy" in result.stderr
    assert "(best " in result.stderr and "at step 20)" in result.stderr
    assert "Test split: evaluating the student." in result.stderr
    assert "Test split: evaluating the teacher." in result.stderr
    assert (out / "config.yaml").exists() and (out / "best" / "student.safetensors").exists()
    # keep_checkpoints=2 by default: only the two newest survive
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000030", "step-00000040"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path, fault_env: dict[str, str], run_kd) -> None:
    common = [*TINY, "--seed", "3", "--set", "student.args.dropout=0.3"]  # dropout: the RNG state must be restored
    straight = run_kd("run", *common, "--out", str(tmp_path / "straight"), cwd=tmp_path, env=fault_env)
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    killed = run_kd("run", *common, "--out", str(killed_dir), cwd=tmp_path, env={**fault_env, "KD_KILL_AT_STEP": "27"})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert not (killed_dir / "metrics.json").exists()
    assert sorted(p.name for p in (killed_dir / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]

    resumed = run_kd("run", "--out", str(killed_dir), "--resume", cwd=tmp_path, env=fault_env)
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    actual = json.loads((killed_dir / "metrics.json").read_text())
    assert actual["student"] == expected["student"] and actual["teacher"] == expected["teacher"]
    assert actual["best_step"] == expected["best_step"]

    def losses(path: Path) -> list[tuple]:
        return [(r["type"], r["step"], r.get("loss"), r.get("accuracy")) for r in read_jsonl(path / "log.jsonl")]

    assert losses(killed_dir) == losses(tmp_path / "straight")


def test_resume_without_checkpoint_dir_is_a_clear_error(tmp_path: Path, run_kd) -> None:
    result = run_kd("run", "--out", str(tmp_path / "nothing"), "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "no config.yaml" in result.stderr and "Traceback" not in result.stderr


def test_eval_reproduces_the_final_student_metrics_and_run_refuses_to_overwrite(tmp_path: Path, run_kd) -> None:
    out = tmp_path / "run"
    assert run_kd("run", *TINY, "--out", str(out), cwd=tmp_path).returncode == 0
    again = run_kd("run", *TINY, "--out", str(out), cwd=tmp_path)  # the same --out holds a finished run
    assert again.returncode == 2 and "--resume" in again.stderr
    result = run_kd("eval", "--run", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    again = json.loads((out / "eval.json").read_text())["student"]
    assert again == json.loads((out / "metrics.json").read_text())["student"]
    assert json.loads((out / "metrics.json").read_text())["metric_metadata"] == {}  # the toy task has none
    # The toy task reads no user files: a clear message, exit 2, nothing written.
    source = tmp_path / "src.txt"
    source.write_text("a\n")
    refused = run_kd("eval", "--run", str(out), "--source", str(source), "--reference", str(source), cwd=tmp_path)
    assert refused.returncode == 2 and "cannot evaluate on user files" in refused.stderr
    assert "Traceback" not in refused.stderr and not (out / "eval-files.json").exists()
    missing = run_kd("eval", "--run", str(out), "--source", str(tmp_path / "nope.txt"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr


@pytest.mark.parametrize("select", ["best", "last"])
def test_trainer_select_keeps_the_best_or_the_last_evaluated_student(tmp_path: Path, run_kd, select: str) -> None:
    out = tmp_path / select
    # at lr 1.0 the toy student's validation accuracy peaks early and then falls: best and last differ
    result = run_kd("run", *TINY, "--out", str(out), "--set", f"trainer.select={select}",
                    "--set", "trainer.eval_every=5", "--set", "trainer.lr=1.0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    evals = [r for r in read_jsonl(out / "log.jsonl") if r["type"] == "eval"]
    info = json.loads((out / "best" / "info.json").read_text())
    if select == "last":
        expected_step = evals[-1]["step"]
    else:
        best_value = max(r["accuracy"] for r in evals)
        expected_step = next(r["step"] for r in evals if r["accuracy"] == best_value)  # the first of ties
        assert expected_step != evals[-1]["step"]  # otherwise this run cannot tell the two rules apart
    assert metrics["best_step"] == info["step"] == expected_step
    assert metrics["selection"] == select
    report = (out / "report.md").read_text()
    assert ("(the last; trainer.select: last)" in report) == (select == "last")
