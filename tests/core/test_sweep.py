"""`kd sweep`: a grid of real toy runs in parallel processes, skipped when finished, clear errors before any run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdcore.cli import main
from kdcore.errors import KDUserError
from kdcore.sweep import load_sweep, plan_jobs, slugify

SWEEP = {
    "task": "toy",
    "seeds": [0, 1],
    "jobs": 2,
    "threads": 1,
    "set": {"trainer.max_steps": 4, "trainer.eval_every": 4},
    "runs": {"vanilla": {"plugin": "vanilla"},
             "vanilla (lr 1e-2)": {"plugin": "vanilla", "set": {"trainer.lr": 0.01}}},
    "decimals": 4,
}
#: The summary's tests against a baseline row (kd summarize --baseline --bootstrap --resamples).
STATISTICS = {"baseline": "vanilla", "bootstrap": True, "resamples": 200}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", str(_write(root / "toy.yaml", {**SWEEP, **STATISTICS})), "--out", str(root / "out")]) == 0
    return root / "out"


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_every_run_finishes_with_its_own_settings_and_the_summary_has_a_row_per_label(finished_sweep: Path) -> None:
    runs = sorted(path.name for path in finished_sweep.iterdir() if (path / "metrics.json").is_file())
    assert runs == ["vanilla-lr-1e-2-s0", "vanilla-lr-1e-2-s1", "vanilla-s0", "vanilla-s1"]
    for name in runs:
        config = _config(finished_sweep / name)
        assert config["trainer"]["max_steps"] == 4 and config["seed"] == int(name[-1])
    assert _config(finished_sweep / "vanilla-lr-1e-2-s0")["trainer"]["lr"] == 0.01
    assert _config(finished_sweep / "vanilla-s0")["trainer"]["lr"] != 0.01
    summary = json.loads((finished_sweep / "summary.json").read_text())
    labels = [row["label"] for row in summary["rows"]]
    assert labels == ["teacher", "vanilla", "vanilla (lr 1e-2)"]
    # score_teacher: once — only the grid's first run (seed 0, first label) scored the teacher.
    scored = {name for name in runs if json.loads((finished_sweep / name / "metrics.json").read_text())["teacher"]}
    assert scored == {"vanilla-s0"}
    text = (finished_sweep / "summary.md").read_text()
    assert "| vanilla (lr 1e-2) |" in text
    # baseline/bootstrap: the sweep's summary carries the same tests kd summarize --baseline --bootstrap prints.
    welch = text.split("Welch's t-test against `vanilla`", 1)[1]
    assert "| vanilla (lr 1e-2) | " in welch
    bootstrap = text.split("Paired bootstrap over test items against `vanilla`", 1)[1]
    # (the toy task records no per-item statistics, so the bootstrap says what it could not test; the resampling
    # itself is tested in test_summarize.py)
    assert "Not tested: accuracy (no per-item statistics in runs of vanilla, vanilla (lr 1e-2))" in bootstrap
    assert sorted(path.name for path in (finished_sweep / "logs").iterdir()) == [f"{name}.log" for name in runs]


def test_a_second_call_skips_finished_runs(finished_sweep: Path, tmp_path: Path) -> None:
    stamps = {path: path.stat().st_mtime_ns for path in finished_sweep.glob("*/metrics.json")}
    assert main(["sweep", str(_write(tmp_path / "toy.yaml", SWEEP)), "--out", str(finished_sweep)]) == 0
    assert {path: path.stat().st_mtime_ns for path in finished_sweep.glob("*/metrics.json")} == stamps


def test_an_interrupted_run_is_resumed_and_a_failing_run_is_reported(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sweep = {**SWEEP, "seeds": [0], "runs": {"vanilla": {"plugin": "vanilla"}}}
    broken = tmp_path / "out" / "vanilla-s0"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.yaml").write_text("trainer: [unclosed\n")
    jobs = plan_jobs(load_sweep(_write(tmp_path / "toy.yaml", sweep)), tmp_path / "out")
    assert jobs[0].arguments == ["run", "--resume", "--out", str(broken)]
    assert main(["sweep", str(tmp_path / "toy.yaml"), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "1 of 1 runs failed: vanilla seed 0" in error and "vanilla-s0.log" in error
    assert "config.yaml" in (tmp_path / "out" / "logs" / "vanilla-s0.log").read_text()


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(_write(tmp_path / "toy.yaml", SWEEP)), "--out", str(tmp_path / "out"),
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\nkd run --task toy --plugin vanilla") == 4
    assert "--set trainer.lr=0.01" in printed and "--set trainer.evaluate_teacher=false" in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "expected"), [
    ({"runs": {"a": {"plugin": "vanilla", "lr": 1}}}, "Unknown key 'runs.a.lr'"),
    ({"jobs": 0}, "Key 'jobs'"),
    ({"runs": {"x y": {"plugin": "vanilla"}, "x-y": {"plugin": "vanilla"}}}, "would share the directories 'x-y-s*'"),
    ({"runs": {"a": {"plugin": "vanila"}}}, "run 'a'"),
    ({"runs": {"a": {"plugin": "vanilla", "set": {"trainer.lrr": 1}}}}, "trainer.lrr"),
    ({"baseline": "vanila", "bootstrap": True}, "baseline 'vanila' is not one of the runs' labels"),
    ({"bootstrap": True}, "name it with baseline: LABEL"),
    ({"baseline": "vanilla", "resamples": 10}, "add bootstrap: true"),
])
def test_bad_sweep_files_fail_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             change: dict, expected: str) -> None:
    path = _write(tmp_path / "bad.yaml", {**SWEEP, **change})
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert expected in error and str(path) in error
    assert not (tmp_path / "out").exists()


def test_slugify_names_directories(tmp_path: Path) -> None:
    assert slugify("imitation (hard)") == "imitation-hard" and slugify("seq-kd") == "seq-kd"
    with pytest.raises(KDUserError, match="no letters or digits"):
        load_sweep(_write(tmp_path / "bad.yaml", {**SWEEP, "runs": {"()": {"plugin": "vanilla"}}}))


@pytest.mark.parametrize(("name", "rows"), [("wmt", 5), ("summarization", 5), ("superb", 3)])
def test_the_shipped_sweeps_of_the_docs_validate(name: str, rows: int) -> None:
    from kdcore.sweep import validate_entries

    path = Path(__file__).resolve().parents[2] / "examples" / "sweeps" / f"{name}.yaml"
    config = load_sweep(path)
    validate_entries(config, path)
    assert config.task == name and len(config.runs) == rows and config.seeds == [0, 1, 2, 3, 4]
    assert config.baseline in config.runs and config.bootstrap


def test_ctrl_c_lets_no_further_run_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import time

    import kdcore.sweep as sweep_module

    started: list[str] = []

    def fake_execute(job: sweep_module.SweepJob, logs: Path, threads: int | None) -> tuple:
        started.append(job.directory.name)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C delivers to kd itself: KeyboardInterrupt in main
            time.sleep(0.5)  # the interrupted kd run takes a moment to stop
        return job, 130, 0.5

    monkeypatch.setattr(sweep_module, "_execute", fake_execute)
    config = load_sweep(_write(tmp_path / "toy.yaml", {**SWEEP, "jobs": 1}))
    # Python's own Ctrl-C behaviour, whatever handler an earlier test or library left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep_module.run_sweep(config, tmp_path / "out")
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(0.6)  # the worker has finished its job and would have taken the next one by now
    assert started == ["vanilla-s0"]
