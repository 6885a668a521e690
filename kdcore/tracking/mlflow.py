"""MLflow (``trainer.report_to: [mlflow]``): a local store under the run directory unless MLflow is pointed elsewhere.

By default each run has its own SQLite store, ``<out>/mlflow.db``, with artifacts in ``<out>/mlflow-artifacts``
(MLflow 3 keeps its file store in maintenance mode and recommends a database); view it with
``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db``. MLflow's own ``MLFLOW_TRACKING_URI`` (a server or a
shared database) and ``MLFLOW_EXPERIMENT_NAME`` (default ``kd``) are honoured. The resolved config goes in as
parameters and as ``config.yaml``; report.md's figures as artifacts under ``figures/``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from kdcore.hooks import RunContext
from kdcore.tracking.base import Tracker, flat_hyperparameters, resolved_config

#: The store and artifact folder under the run's output directory when MLFLOW_TRACKING_URI is not set.
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlflow-artifacts"
DEFAULT_EXPERIMENT = "kd"
#: MLflow takes at most this many parameters per call.
_PARAMS_PER_BATCH = 100


def tracking_uri(out_dir: Path) -> str:
    """Where the run is recorded: ``$MLFLOW_TRACKING_URI``, else the run's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out_dir) / STORE_FILE).resolve()}"


class MLflowTracker(Tracker):
    """Records the run's scalars as metrics, its config as parameters and its figures as artifacts in MLflow."""

    name = "mlflow"
    description = "MLflow run in <out>/mlflow.db (or $MLFLOW_TRACKING_URI): log.jsonl's scalars, config params, figures"
    # mlflow-skinny is enough; the SQLite store needs sqlalchemy and alembic, which only the full mlflow brings.
    modules = ("mlflow", "sqlalchemy", "alembic")
    extra = "mlflow"

    def __init__(self) -> None:
        super().__init__()
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, context: RunContext, resumed_at: int | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=tracking_uri(context.out_dir))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif "MLFLOW_TRACKING_URI" in os.environ:  # the server or database decides where artifacts go
            experiment_id = client.create_experiment(name)
        else:
            experiment_id = client.create_experiment(
                name, artifact_location=(context.out_dir / ARTIFACT_DIR).resolve().as_uri())
        saved = self.saved(context)
        config = resolved_config(context)
        if resumed_at is not None and saved.get("run_id"):
            # MLflow refuses to change a parameter, so a resume keeps the first ones; config.yaml is rewritten.
            self.run_id = saved["run_id"]
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=context.out_dir.name,
                                    tags={"kd.task": context.state.task, "kd.plugin": context.state.plugin})
            self.run_id = saved["run_id"] = run.info.run_id
            params = [Param(key, str(value)) for key, value in flat_hyperparameters(config).items()]
            for first in range(0, len(params), _PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=params[first:first + _PARAMS_PER_BATCH])
        client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        self.client = client

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in scalars.items()])

    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        for path in figures.values():
            self.client.log_artifact(self.run_id, str(path), "figures")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.client = None
