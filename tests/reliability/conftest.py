"""Figures for docs/reliability.md, counted by the tests themselves (not typed in by hand).

Run ``KD_RELIABILITY_FIGURES=figures.json pytest tests/reliability tests/core`` and
the counters below are written there at the end of the session.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

FIGURES: collections.Counter[str] = collections.Counter()


@pytest.fixture
def figures() -> collections.Counter[str]:
    """Counters: faults_injected, runs_resumed, identical_after_resume, hypothesis_inputs, ..."""
    return FIGURES


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:  # noqa: ARG001 - hook signature
    target = os.environ.get("KD_RELIABILITY_FIGURES")
    if target and FIGURES:
        Path(target).write_text(json.dumps(dict(sorted(FIGURES.items())), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- distributed runs (torchrun, gloo)

REPO = Path(__file__).resolve().parents[2]
#: Dropout 0: the only randomness left is the data order, the same global order on 1 or 2 processes.
DIST_SETS = ["student.args.dropout=0", "trainer.progress=off", "data.n_train=256", "trainer.max_steps=12",
             "trainer.eval_every=6", "trainer.checkpoint_every=6", "trainer.log_every=1", "trainer.batch_size=32"]


def _torchrun(out: Path, *extra: str, cwd: Path, nproc: int = 2, env: dict[str, str] | None = None,
              resume: bool = False):  # noqa: ANN202
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m kd run ...`` (toy task)."""
    import subprocess
    import sys

    if resume:
        args = ["--out", str(out), "--resume"]
    else:
        args = ["--task", "toy", "--plugin", "vanilla", "--preset", "tiny",
                *[arg for option in DIST_SETS for arg in ("--set", option)], *extra, "--out", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "kd", "run", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in [full_env.get("PYTHONPATH", ""), str(REPO)] if p)
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def dist_sets() -> list[str]:
    return list(DIST_SETS)


@pytest.fixture
def torchrun():  # noqa: ANN201 - returns the helper above
    return _torchrun


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference for distributed runs: the same run with DIST_SETS in this process (WORLD_SIZE unset)."""
    from kdcore import runner
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    out = tmp_path_factory.mktemp("one-process") / "run"
    registry = Registry.discover(entry_points=False)
    runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=DIST_SETS), registry, out)
    return out


def _assert_same_training(reference: Path, candidate: Path) -> None:
    """Same log records (losses and metrics within 1e-5) and the same final test metrics."""
    from kdcore.io import read_jsonl

    expected, actual = read_jsonl(reference / "log.jsonl"), read_jsonl(candidate / "log.jsonl")
    assert [(r["type"], r["step"]) for r in actual] == [(r["type"], r["step"]) for r in expected]
    for want, got in zip(expected, actual):
        for key in ("loss", "kd", "nll", "accuracy"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), (want, got)
    assert (json.loads((candidate / "metrics.json").read_text())["student"]
            == pytest.approx(json.loads((reference / "metrics.json").read_text())["student"], abs=1e-5))


@pytest.fixture
def assert_same_training():  # noqa: ANN201
    return _assert_same_training


# --------------------------------------------------------------------------- single-process fault runs

#: The run every fault test repeats: toy task, 40 steps, checkpoints every 10, dropout on (the RNG must resume too).
FAULT_RUN = ["--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--seed", "3",
             "--set", "student.args.dropout=0.3"]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory: pytest.TempPathFactory, fault_env: dict[str, str]) -> Path:
    """The uninterrupted reference run (fault plugin installed, no fault armed)."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("straight")
    result = subprocess.run([sys.executable, "-m", "kdcore", "run", *FAULT_RUN, "--out", str(base / "run")],
                            cwd=base, env={**os.environ, **fault_env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return base / "run"


@pytest.fixture
def fault_run() -> list[str]:
    return list(FAULT_RUN)


def _assert_identical(reference: Path, candidate: Path) -> None:
    """Bit-identical outcome: final metrics, best step and every logged loss and metric."""
    from kdcore.io import read_jsonl

    expected = json.loads((reference / "metrics.json").read_text())
    actual = json.loads((candidate / "metrics.json").read_text())
    assert actual["student"] == expected["student"] and actual["teacher"] == expected["teacher"]
    assert actual["best_step"] == expected["best_step"]

    def records(path: Path) -> list[tuple]:
        return [(r["type"], r["step"], r.get("loss"), r.get("accuracy")) for r in read_jsonl(path / "log.jsonl")]

    assert records(candidate) == records(reference)
    from safetensors.torch import load_file

    assert all(load_file(str(candidate / "best" / "student.safetensors"))[k].equal(v)
               for k, v in load_file(str(reference / "best" / "student.safetensors")).items())


@pytest.fixture
def assert_identical():  # noqa: ANN201
    return _assert_identical
