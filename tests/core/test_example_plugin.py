"""The third-party example packages, pip-installed for real: listed by kd list, used by kd run, built on kdcore.api.

(Every command their READMEs and docs/writing-plugins.md show is run by tests/core/test_plugin_docs.py.)
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kdcore.api import KDUserError, Signals
from kdcore.interfaces import Student, Teacher, WeightedObjective
from kdcore.objectives.library import ForwardKLObjective

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PACKAGES = {"kd-example-objective": "kd_example_objective", "kd-example-method": "kd_example_method"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, install_plugin) -> dict[str, str]:  # noqa: ANN001
    paths = [install_plugin(EXAMPLES / package, tmp_path_factory.mktemp("example-site") / "site")["PYTHONPATH"]
             for package in PACKAGES]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def test_examples_are_listed_with_their_packages(env: dict[str, str], run_kd) -> None:  # noqa: ANN001
    listing = run_kd("list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    objectives = {e["name"]: e for e in data["objectives"]}
    methods = {e["name"]: e for e in data["plugins"]}
    assert objectives["logit_mse"]["source"] == "package kd-example-objective 0.1.0"
    assert methods["noised-kd"]["source"] == "package kd-example-method 0.1.0"
    assert "[example plugin]" in methods["noised-kd"]["description"] and not data["failures"]


def test_example_method_trains_with_the_example_objective(tmp_path: Path, env: dict[str, str], run_kd) -> None:  # noqa: ANN001
    """Two third-party components combine: the installed objective, under its own label, is what was optimised."""
    out = tmp_path / "run"
    result = run_kd("run", "--task", "toy", "--plugin", "noised-kd", "--out", str(out),
                    "--set", "method.std=0.2", "--set", "objectives.kd=null", "--set", "objectives.mse.name=logit_mse",
                    "--set", "objectives.mse.args.reduction=sum", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    logged = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert all("mse" in r and "kd" not in r for r in logged)
    assert logged[-1]["mse"] < logged[0]["mse"]
    config = (out / "config.yaml").read_text()
    assert "logit_mse" in config and "reduction: sum" in config and "std: 0.2" in config


def test_example_plugins_absent_without_install(run_kd) -> None:  # noqa: ANN001
    data = json.loads(run_kd("list", "--json").stdout)
    assert "logit_mse" not in {e["name"] for e in data["objectives"]}
    assert "noised-kd" not in {e["name"] for e in data["plugins"]}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_examples_import_only_the_public_api(package: str) -> None:
    """A plugin needs kdcore.api and nothing else from kd (no kd_plugins / kd_tasks internals)."""
    source = (EXAMPLES / package / PACKAGES[package] / "__init__.py").read_text(encoding="utf-8")
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    assert {m for m in modules if m and m.split(".")[0] in {"kdcore", "kd_plugins", "kd_tasks"}} == {"kdcore.api"}


def _load(package: str) -> ModuleType:
    path = EXAMPLES / package / PACKAGES[package] / "__init__.py"
    spec = importlib.util.spec_from_file_location(f"_example_{PACKAGES[package]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the Config annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class _Seeing:
    """A model whose logits are its inputs, remembering what it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward_signals(self, batch, request) -> Signals:  # noqa: ANN001
        self.seen.append(batch["inputs"])
        return Signals(logits=batch["inputs"])


class _SeeingTeacher(_Seeing, Teacher):
    pass


class _SeeingStudent(_Seeing, Student):
    pass


def _noised_kd(**config) -> tuple:  # noqa: ANN003
    method_class = _load("kd-example-method").NoisedKD
    teacher, student = _SeeingTeacher(), _SeeingStudent()
    method = method_class(method_class.Config(**config), None, teacher, student,
                          [WeightedObjective("kd", ForwardKLObjective(), 1.0)])
    return method, teacher, student


def test_noised_kd_shows_both_models_the_same_noised_batch() -> None:
    method, teacher, student = _noised_kd(std=0.5)
    batch = {"inputs": torch.zeros(512, 4), "labels": torch.zeros(512, dtype=torch.long)}
    torch.manual_seed(0)
    comparison = method.compare(batch, step=0)
    shown = teacher.seen[0]
    assert torch.equal(shown, student.seen[0]) and torch.equal(comparison.batch["inputs"], shown)
    assert abs(float(shown.std()) - 0.5) < 0.05  # the configured noise, around the data
    assert torch.equal(comparison.batch["labels"], batch["labels"]) and torch.equal(batch["inputs"], torch.zeros(512, 4))
    loss = method.training_step(batch, step=0).loss  # the configured objective over the comparison
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_noised_kd_refuses_inputs_the_batch_does_not_have() -> None:
    method, _, _ = _noised_kd(inputs=["features"])
    method.task = type("Task", (), {"name": "toy"})()
    with pytest.raises(KDUserError, match=r"method.inputs names 'features'.*\['inputs', 'labels'\]"):
        method.compare({"inputs": torch.zeros(2, 4), "labels": torch.zeros(2, dtype=torch.long)}, step=0)
    with pytest.raises(ValueError):
        _load("kd-example-method").NoisedKD.Config(std=0)


def test_logit_mse_averages_over_the_scored_positions() -> None:
    objective = _load("kd-example-objective").LogitMSE()
    student = Signals(logits=torch.zeros(2, 3, 5))
    teacher = Signals(logits=torch.ones(2, 3, 5))
    labels = torch.tensor([[1, 2, -100], [-100, -100, 3]])
    assert float(objective(student, teacher, {"labels": labels}).loss) == pytest.approx(1.0)
    teacher.logits[0, 2] = 100.0  # an ignored position does not count
    assert float(objective(student, teacher, {"labels": labels}).loss) == pytest.approx(1.0)
    summed = _load("kd-example-objective").LogitMSE(objective.Config(reduction="sum"))
    assert float(summed(student, Signals(logits=torch.ones(2, 3, 5)), {}).loss) == pytest.approx(5.0)


def test_public_api_reference_names_every_export() -> None:
    """kdcore.api's docstring is the short reference: every exported name is in it, and every export resolves."""
    import kdcore.api as api

    assert all(hasattr(api, name) for name in api.__all__)
    missing = [name for name in api.__all__ if not re.search(rf"\b{re.escape(name)}\b", api.__doc__ or "")]
    assert not missing, f"kdcore.api exports {missing} without describing them in its docstring"
