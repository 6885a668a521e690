"""The kd command as a user meets it: errors exit 2 without a traceback; list, --version, --dry-run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest



def _assert_user_error(result, *needles: str) -> None:  # noqa: ANN001
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_version(run_kd) -> None:
    result = run_kd("--version")
    assert result.returncode == 0 and result.stdout.startswith("kd ")


def test_unknown_task_lists_available(tmp_path: Path, run_kd) -> None:
    _assert_user_error(run_kd("run", "--task", "nonexistent", "--plugin", "vanilla", cwd=tmp_path),
                       "Unknown task 'nonexistent'", "Available tasks:", "toy")


def test_bad_type_via_set(tmp_path: Path, run_kd) -> None:
    _assert_user_error(run_kd("run", "--task", "toy", "--plugin", "vanilla", "--set", "trainer.lr=abc", cwd=tmp_path),
                       "trainer.lr", "'abc'", "float")


def test_malformed_yaml_config(tmp_path: Path, run_kd) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  lr: 0.1\n   max_steps: 3\n")
    _assert_user_error(run_kd("run", "--task", "toy", "--plugin", "vanilla", "--config", str(config), cwd=tmp_path),
                       f"{config}:3:")


@pytest.mark.parametrize("args, needle", [
    (["run", "--task", "toy"], "No plugin given"),
    (["run", "--task", "toy", "--plugin", "vanilla", "--config", "missing.yaml"], "does not exist"),
    (["run", "--task", "toy", "--plugin", "vanilla", "--set", "nonsense"], "KEY=VALUE"),
    (["run", "--task", "toy", "--plugin", "vanilla", "--device", "tpu"], "invalid choice"),
    (["run", "--task", "toy", "--plugin", "vanilla", "--set", "trainr.lr=1"], "Did you mean 'trainer'"),
    (["eval", "--run", "not-a-run"], "not a kd run directory"),
    (["bogus"], "invalid choice"),
])
def test_user_errors_exit_2(tmp_path: Path, args: list[str], needle: str, run_kd) -> None:
    _assert_user_error(run_kd(*args, cwd=tmp_path), needle)


def test_unwritable_out_dir(tmp_path: Path, run_kd) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_user_error(run_kd("run", "--task", "toy", "--plugin", "vanilla", "--out", str(blocker / "sub"),
                              cwd=tmp_path), "not writable")


def test_list_shows_every_kind_with_sources(run_kd) -> None:
    result = run_kd("list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"plugins", "tasks", "objectives", "teachers", "students"} <= set(data)
    names = {e["name"]: e for e in data["tasks"]}
    assert names["toy"]["source"] == "built-in" and names["toy"]["description"]
    assert "forward_kl" in {e["name"] for e in data["objectives"]}
    human = run_kd("list").stdout
    assert "plugins (" in human and "vanilla" in human and "[built-in]" in human


def test_dry_run_writes_plan_and_trains_nothing(tmp_path: Path, run_kd) -> None:
    out = tmp_path / "plan"
    result = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--dry-run", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["params"]["teacher"] > plan["params"]["student"] > 0
    assert isinstance(plan["params"]["teacher"], int) and plan["data"]["train"] == 4000
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()
    assert "teacher parameters" in result.stdout
