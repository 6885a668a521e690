"""Shared test setup: every test gets its own kd cache so runs never share state."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kd-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _run_kd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real ``kd`` command in a subprocess (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdcore", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run_kd():  # noqa: ANN201 - returns the helper above
    """Run the real ``kd`` command: ``run_kd("list", "--json", env={...}, cwd=path)``."""
    return _run_kd


def _install_plugin(package: Path, target: Path) -> dict[str, str]:
    """pip-install a plugin package (with its real entry point) into ``target``; return an env that sees it."""
    # Build from a copy so pip's build/ and egg-info never land in the repository.
    source = target.parent / f"{target.name}-src"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("build", "*.egg-info"), dirs_exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, capture_output=True)
    return {"PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}


@pytest.fixture(scope="session")
def install_plugin():  # noqa: ANN201
    """``install_plugin(package_dir, target_dir) -> env`` (session-scoped helper)."""
    return _install_plugin


@pytest.fixture(scope="session")
def fault_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Env in which the test-only fault-injection plugin (SIGKILL at $KD_KILL_AT_STEP) is installed."""
    return _install_plugin(REPO / "tests" / "fixtures" / "kd-fault-injection", tmp_path_factory.mktemp("fault-plugin"))
