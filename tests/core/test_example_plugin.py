"""The third-party example package, pip-installed for real, shows up in kd list and is used by kd run."""
from __future__ import annotations

import json
from pathlib import Path



def test_example_plugin_is_listed_and_used(tmp_path: Path, run_kd, install_plugin) -> None:
    env = install_plugin(Path(__file__).resolve().parents[2] / "examples" / "kd-example-objective", tmp_path / "site")
    listing = run_kd("list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    objectives = {e["name"]: e for e in json.loads(listing.stdout)["objectives"]}
    assert objectives["logit_mse"]["source"] == "package kd-example-objective 0.1.0"

    out = tmp_path / "run"
    result = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--out", str(out),
                    "--set", "objectives.kd=null", "--set", "objectives.mse.name=logit_mse",
                    "--set", "objectives.mse.args.reduction=sum", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    logged = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert all("mse" in r and "kd" not in r for r in logged)
    assert logged[-1]["mse"] < logged[0]["mse"]  # the third-party objective is what was optimised
    config = (out / "config.yaml").read_text()
    assert "logit_mse" in config and "reduction: sum" in config


def test_example_plugin_absent_without_install(run_kd) -> None:
    objectives = {e["name"] for e in json.loads(run_kd("list", "--json").stdout)["objectives"]}
    assert "logit_mse" not in objectives
