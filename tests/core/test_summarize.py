"""`kd summarize`: mean ± sample std over real toy runs, teacher counted once per seed, clear errors."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from kdcore.errors import KDUserError
from kdcore.summary import markdown_table, parse_group, summarize


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three seeds of vanilla and two of a second (differently configured) row, from the real CLI."""
    from kdcore.cli import main

    root = tmp_path_factory.mktemp("summary-runs")
    for seed in (0, 1, 2):
        assert main(["run", "--task", "toy", "--plugin", "vanilla", "--seed", str(seed),
                     "--set", "trainer.max_steps=6", "--out", str(root / f"vanilla-s{seed}")]) == 0
    for seed in (0, 1):
        assert main(["run", "--task", "toy", "--plugin", "vanilla", "--seed", str(seed), "--set",
                     "trainer.max_steps=2", "--out", str(root / f"short-s{seed}")]) == 0
    return root


def _student(path: Path) -> dict[str, float]:
    return json.loads((path / "metrics.json").read_text())["student"]


def test_mean_and_sample_std_match_the_runs(toy_runs: Path) -> None:
    groups = [parse_group(f"long={toy_runs}/vanilla-s*"), parse_group(f"{toy_runs}/short-s*")]
    rows, metrics, task = summarize(groups)
    assert task == "toy" and metrics
    labels = [row.label for row in rows]
    assert labels == ["teacher", "long", f"{toy_runs}/short-s*"]
    metric = metrics[0]
    values = [_student(toy_runs / f"vanilla-s{seed}")[metric] for seed in (0, 1, 2)]
    mean, std, count = rows[1].mean_std(metric)
    assert count == 3 and mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(statistics.stdev(values))
    # The teacher was scored in 5 runs but with 3 distinct seeds: it counts 3 times, not 5.
    assert rows[0].mean_std(metric)[2] == 3
    table = markdown_table(rows, metrics)
    assert f"{mean:.3f} ± {std:.3f}" in table


def test_cli_writes_table_and_raw_values(toy_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdcore.cli import main

    metric = sorted(_student(toy_runs / "vanilla-s0"))[0]
    out = toy_runs / "tables" / "toy.md"
    assert main(["summarize", f"vanilla={toy_runs}/vanilla-s*", "--metric", metric, "--no-teacher",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| vanilla |" in printed and "teacher" not in printed
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["rows"][0]["metrics"][metric]["n"] == 3
    assert len(raw["rows"][0]["metrics"][metric]["values"]) == 3
    assert out.read_text().endswith(printed)


def test_errors_name_the_problem(toy_runs: Path, tmp_path: Path) -> None:
    with pytest.raises(KDUserError, match="matches no run directory"):
        parse_group(f"{tmp_path}/nothing-*")
    unfinished = tmp_path / "unfinished-s0"
    unfinished.mkdir()
    with pytest.raises(KDUserError, match="holds no metrics.json"):
        summarize([parse_group(str(unfinished))])
    assert parse_group(f"{tmp_path}/unfinished-*", skip_unfinished=False)[1] == [unfinished]
    with pytest.raises(KDUserError, match="matches no run directory"):
        parse_group(f"{tmp_path}/unfinished-*", skip_unfinished=True)
    with pytest.raises(KDUserError, match="no student metric"):
        summarize([parse_group(f"{toy_runs}/vanilla-s*")], ["no_such_metric"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(KDUserError, match="could not be read as JSON"):
        summarize([parse_group(str(broken))])
    other = tmp_path / "other-task"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"task": "wmt", "student": {"bleu": 1.0}}))
    with pytest.raises(KDUserError, match="mix tasks"):
        summarize([parse_group(f"{toy_runs}/vanilla-s0"), parse_group(str(other))])


def test_welch_test_against_a_baseline_matches_the_formula(toy_runs: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import math

    from scipy import stats

    from kdcore.cli import main
    from kdcore.summary import welch_tests

    metric = sorted(_student(toy_runs / "vanilla-s0"))[0]
    groups = [parse_group(f"long={toy_runs}/vanilla-s*"), parse_group(f"short={toy_runs}/short-s*")]
    rows, metrics, _ = summarize(groups, [metric])
    [test] = welch_tests(rows, metrics, "short")
    long_values = [_student(toy_runs / f"vanilla-s{seed}")[metric] for seed in (0, 1, 2)]
    short_values = [_student(toy_runs / f"short-s{seed}")[metric] for seed in (0, 1)]
    variance = statistics.variance(long_values) / 3 + statistics.variance(short_values) / 2
    expected_t = (statistics.fmean(long_values) - statistics.fmean(short_values)) / math.sqrt(variance)
    degrees = variance ** 2 / ((statistics.variance(long_values) / 3) ** 2 / 2
                               + (statistics.variance(short_values) / 2) ** 2 / 1)
    assert test.label == "long" and test.t == pytest.approx(expected_t)
    assert test.degrees_of_freedom == pytest.approx(degrees)
    assert test.p == pytest.approx(2 * stats.t.sf(abs(expected_t), degrees))
    assert main(["summarize", f"long={toy_runs}/vanilla-s*", f"short={toy_runs}/short-s*", "--metric", metric,
                 "--baseline", "short"]) == 0
    assert "Welch's t-test against `short`" in capsys.readouterr().out
    with pytest.raises(KDUserError, match="no group has that label"):
        welch_tests(rows, metrics, "missing")
