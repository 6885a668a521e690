"""Experiment tracking (``trainer.report_to``): what the trackers record equals log.jsonl, read back with the
trackers' own readers (TensorBoard's EventAccumulator, MLflow's client on the run's local store, trackio's
SQLiteStorage on its local directory); refusals at planning; only rank 0 reports; a resume continues the same tracker
runs.

W&B is replaced by a recorder module here (its offline files have no reader in the wandb package), which checks
what kd hands it: offline mode, the run directory, the resolved config, the same scalars and the figures.
"""
from __future__ import annotations

import importlib.machinery
import json
import shutil
import socket
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdcore import distributed, runner
from kdcore.cli import main
from kdcore.errors import KDUserError
from kdcore.io import read_jsonl
from kdcore.registry import Registry
from kdcore.resolve import resolve_run, resolve_saved_run
from kdcore.tracking.registration import reporting

TRACKED = ["trainer.report_to=[tensorboard,mlflow,wandb,trackio]", "trainer.progress=off"]
TOY = ["run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny"]


class _RecordingWandb(types.ModuleType):
    """Stands in for the ``wandb`` package: records init's arguments, every log call and finish."""

    class Image:
        def __init__(self, path: str) -> None:
            self.path = path

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.finished = 0

    def init(self, **settings: Any) -> Any:
        self.inits.append(settings)
        recorder = self
        return types.SimpleNamespace(id=settings.get("id") or "recorded-run",
                                     log=lambda data, step: recorder.logged.append((data, step)),
                                     finish=lambda: setattr(recorder, "finished", recorder.finished + 1))


def _expected_scalars(out: Path) -> dict[str, dict[int, float]]:
    """log.jsonl's numbers by tracker name (``<split or type>/<field>``) and step, plus metrics.json's test metrics."""
    expected: dict[str, dict[int, float]] = {}
    for record in read_jsonl(out / "log.jsonl"):
        group = record.get("split") or record["type"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{group}/{key}", {})[record["step"]] = float(value)
    metrics = json.loads((out / "metrics.json").read_text())
    last_step = max(step for series in expected.values() for step in series)
    for group, role in (("test", "student"), ("test_teacher", "teacher")):
        for key, value in metrics[role].items():
            expected[f"{group}/{key}"] = {last_step: float(value)}
    return expected


def _tensorboard(out: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _tensorboard_scalars(events: Any) -> dict[str, dict[int, float]]:
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        assert len({point.step for point in points}) == len(points), f"{tag}: a step recorded twice"
        scalars[tag] = {point.step: point.value for point in points}
    return scalars


def _mlflow_run(out: Path) -> tuple[Any, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _mlflow_scalars(client: Any, run: Any) -> dict[str, dict[int, float]]:
    scalars = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        assert len({point.step for point in history}) == len(history), f"{key}: a step recorded twice"
        scalars[key] = {point.step: point.value for point in history}
    return scalars


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trackio's local directory for this module. trackio reads TRACKIO_DIR once, at its first import, so the
    variable is set before that import and the import is checked to have taken it (else nothing is run: the test
    must not write into ~/.cache/huggingface)."""
    directory = tmp_path_factory.mktemp("trackio")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(directory))
        for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
            patch.delenv(name, raising=False)
        import trackio.utils

    if Path(trackio.utils.TRACKIO_DIR) != directory:
        pytest.fail(f"trackio was imported before this module set TRACKIO_DIR; it writes to {trackio.utils.TRACKIO_DIR}")
    return directory


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, trackio_dir: Path) -> tuple[Path, _RecordingWandb]:
    """A tiny toy run reporting to TensorBoard, MLflow, trackio (real, local) and W&B (the recorder)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    recorder = _RecordingWandb()
    connections: list[Any] = []

    def refuse(_socket: socket.socket, address: Any) -> None:
        connections.append(address)
        raise OSError(f"the tracking test allows no network connection ({address})")

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", recorder)
        patch.setattr(socket.socket, "connect", refuse)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT"):
            patch.delenv(name, raising=False)
        registry = Registry.discover(entry_points=False)
        runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=TRACKED), registry, out)
    assert connections == []  # no tracker tried to reach a server
    return out, recorder


def test_tensorboard_holds_log_jsonl_s_scalars_the_config_and_the_figures(tracked_run: tuple[Path, Any]) -> None:
    from tensorboard.plugins.hparams import metadata

    out, _ = tracked_run
    expected = _expected_scalars(out)
    assert {"train/loss", "train/lr", "train/examples_per_second", "valid/accuracy", "test/accuracy"} <= set(expected)
    events = _tensorboard(out)
    scalars = _tensorboard_scalars(events)
    assert set(scalars) == set(expected)
    for tag, series in expected.items():
        assert scalars[tag] == pytest.approx(series, rel=1e-6), tag  # event files store float32
    config = yaml.safe_load((out / "config.yaml").read_text())
    hparams = metadata.parse_session_start_info_plugin_data(
        events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]).hparams
    assert hparams["trainer.max_steps"].number_value == config["trainer"]["max_steps"]
    assert hparams["student.name"].string_value == config["student"]["name"]
    assert {"figures/loss", "figures/metric"} <= set(events.Tags()["images"])


def test_mlflow_holds_log_jsonl_s_scalars_the_config_and_the_figures(tracked_run: tuple[Path, Any]) -> None:
    out, _ = tracked_run
    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert _mlflow_scalars(client, run) == _expected_scalars(out)  # MLflow stores doubles: exactly equal
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params["trainer.lr"] == str(config["trainer"]["lr"])
    assert json.loads(run.data.params["trainer.report_to"]) == ["tensorboard", "mlflow", "wandb", "trackio"]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    figures = {item.path for item in client.list_artifacts(run.info.run_id, "figures")}
    assert "config.yaml" in artifacts and {"figures/loss.png", "figures/metric.png"} <= figures
    assert (out / "mlflow-artifacts").is_dir()  # artifacts stay in the run directory too


def test_wandb_gets_the_same_scalars_offline_in_the_run_directory(tracked_run: tuple[Path, _RecordingWandb]) -> None:
    out, recorder = tracked_run
    (settings,) = recorder.inits
    assert settings["mode"] == "offline" and settings["dir"] == str(out)
    assert settings["config"] == yaml.safe_load((out / "config.yaml").read_text())
    scalars: dict[str, dict[int, float]] = {}
    for data, step in recorder.logged:
        for key, value in data.items():
            if not isinstance(value, recorder.Image):
                scalars.setdefault(key, {})[step] = value
    assert scalars == _expected_scalars(out)
    images = {key: value.path for data, _ in recorder.logged for key, value in data.items()
              if isinstance(value, recorder.Image)}
    assert images == {"figures/loss": str(out / "loss.png"), "figures/metric": str(out / "metric.png")}
    assert recorder.finished == 1


def _trackio_logs(run_name: str) -> list[dict[str, Any]]:
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("kd") == [run_name]  # one run: a resume continues it
    return SQLiteStorage.get_logs("kd", run_name)


def test_trackio_holds_log_jsonl_s_scalars_the_config_and_the_figures(tracked_run: tuple[Path, Any]) -> None:
    from trackio.sqlite_storage import SQLiteStorage

    out, _ = tracked_run
    scalars: dict[str, dict[int, float]] = {}
    images: dict[str, Any] = {}
    for entry in _trackio_logs(out.name):
        for key, value in entry.items():
            if key.startswith("figures/"):
                images[key] = value
            elif key not in ("step", "timestamp"):
                assert key not in scalars or entry["step"] not in scalars[key], f"{key}: a step recorded twice"
                scalars.setdefault(key, {})[entry["step"]] = value
    assert scalars == _expected_scalars(out)  # trackio stores doubles: exactly equal
    config = SQLiteStorage.get_run_config("kd", out.name)
    assert {key: value for key, value in config.items() if not key.startswith("_")} == yaml.safe_load(
        (out / "config.yaml").read_text())
    assert set(images) == {"figures/loss", "figures/metric"}


def test_a_resumed_run_continues_the_same_tracker_runs(tracked_run: tuple[Path, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    shutil.copytree(tracked_run[0], out)
    monkeypatch.setitem(sys.modules, "wandb", _RecordingWandb())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry = Registry.discover(entry_points=False)
    runner.run(resolve_saved_run(registry, out, ["trainer.max_steps=50"]), registry, out, resume=True)
    _, run = _mlflow_run(out)  # the same MLflow run, finished again
    assert run.info.status == "FINISHED"
    assert max(point.step for point in _mlflow_run(out)[0].get_metric_history(run.info.run_id, "train/loss")) == 50
    steps = {point.step for point in _tensorboard(out).Scalars("train/loss")}
    assert steps == {record["step"] for record in read_jsonl(out / "log.jsonl") if record["type"] == "train"}
    assert sys.modules["wandb"].inits[0]["id"] == "recorded-run"  # the id the first run saved in its checkpoints
    # trackio continues its run of the same name (the module's trackio test ran before this one, in file order).
    assert max(entry["step"] for entry in _trackio_logs(out.name) if "train/loss" in entry) == 50


def test_a_missing_extra_is_refused_at_planning_naming_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    for extra in ([], ["--dry-run"]):
        out = tmp_path / f"run{len(extra)}"
        assert main([*TOY, "--out", str(out), "--set", "trainer.report_to=[tensorboard,mlflow]", *extra]) == 2
        error = capsys.readouterr().err
        assert 'pip install "kd[mlflow]"' in error and "Traceback" not in error
        assert not (out / "config.yaml").exists() and not (out / "plan.json").exists()


def test_an_unknown_or_repeated_tracker_is_refused_with_the_known_names(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TOY, "--out", str(tmp_path / "a"), "--dry-run", "--set", "trainer.report_to=[tensorbord]"]) == 2
    error = capsys.readouterr().err
    assert "trainer.report_to: Unknown tracker 'tensorbord'" in error and "mlflow, tensorboard, trackio, wandb" in error
    assert main([*TOY, "--out", str(tmp_path / "b"), "--dry-run", "--set",
                 "trainer.report_to=[mlflow,mlflow]"]) == 2
    assert "names mlflow more than once" in capsys.readouterr().err


def test_only_rank_0_opens_trackers(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry.discover(entry_points=False)
    tensorboard = registry.load("tracker", "tensorboard")
    with reporting(registry, [tensorboard]) as trackers:
        assert [type(tracker) for tracker in trackers] == [tensorboard]
        assert registry.plugin_manager.is_registered(trackers[0])
    assert not registry.plugin_manager.is_registered(trackers[0])
    monkeypatch.setattr(distributed, "_STATE", distributed.DistributedState(rank=1, world_size=2))
    with reporting(registry, [tensorboard]) as trackers:
        assert trackers == []


def test_check_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = Registry.discover(entry_points=False).load("tracker", "wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(KDUserError, match=r'wandb.*pip install "kd\[wandb\]"'):
        tracker.check_installed()


@pytest.mark.slow
def test_a_real_wandb_run_is_recorded_offline_in_the_run_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")  # kd[wandb] is not part of dev: a large wheel with its own service binary
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    registry = Registry.discover(entry_points=False)
    runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny",
                           sets=["trainer.report_to=[wandb]", "trainer.progress=off"]), registry, out)
    (recorded,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert recorded.stat().st_size > 0
