"""``kd summarize``: mean ± standard deviation of finished runs, one row per group of seeds.

A comparison in a paper is a table of methods over several seeds. Each run
writes ``metrics.json`` (teacher and student metrics, parameter counts, seed);
this module reads a set of run directories per row, checks they belong to the
same task, and reports the mean and the sample standard deviation (n − 1) of
each metric. The teacher is added as its own row(s): a teacher scored in
several runs with the same seed gives the same numbers, so it counts once per
seed.
"""
from __future__ import annotations

import glob
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcore.errors import KDUserError


@dataclass
class RunResult:
    """The parts of one run's metrics.json a summary uses."""

    directory: Path
    task: str
    seed: int | None
    student_params: int | None
    teacher_params: int | None
    student: dict[str, float]
    teacher: dict[str, float]


@dataclass
class SummaryRow:
    """One table row: a label, its runs' parameter count and per-metric values (one per seed/run)."""

    label: str
    params: int | None
    values: dict[str, list[float]] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)

    def mean_std(self, metric: str) -> tuple[float, float | None, int]:
        """Mean, sample standard deviation (None for a single value) and count of ``metric``."""
        values = self.values.get(metric, [])
        if not values:
            return math.nan, None, 0
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def _numbers(block: Any) -> dict[str, float]:
    if not isinstance(block, dict):
        return {}
    return {key: float(value) for key, value in block.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def read_run(directory: Path) -> RunResult:
    """Read ``directory/metrics.json``; a missing or malformed file is a user error naming it."""
    path = directory / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KDUserError(f"'{directory}' holds no metrics.json: it is not a finished kd run (an interrupted run "
                          f"can be continued with kd run --resume --out {directory}).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KDUserError(f"'{path}' could not be read as JSON ({error}); expected the metrics.json a kd run "
                          f"writes.") from None
    if not isinstance(data, dict) or "student" not in data or "task" not in data:
        raise KDUserError(f"'{path}' is not a kd metrics.json (expected the keys 'task' and 'student').")
    params = data.get("params") or {}
    return RunResult(directory=directory, task=str(data["task"]), seed=data.get("seed"),
                     student_params=params.get("student"), teacher_params=params.get("teacher"),
                     student=_numbers(data["student"]), teacher=_numbers(data.get("teacher")))


def parse_group(spec: str, skip_unfinished: bool = False) -> tuple[str, list[Path]]:
    """``[LABEL=]GLOB`` → (label, run directories); a glob that matches no run is a user error.

    With ``skip_unfinished``, directories without metrics.json (runs still going or
    interrupted) are left out instead of being an error.
    """
    label, sep, pattern = spec.partition("=")
    if not sep:
        label, pattern = spec, spec
    if not label or not pattern:
        raise KDUserError(f"'{spec}' is not of the form [LABEL=]GLOB (e.g. gendistiller='runs/gen-s*').")
    directories = sorted(Path(match) for match in glob.glob(pattern) if Path(match).is_dir())
    if skip_unfinished:
        directories = [directory for directory in directories if (directory / "metrics.json").is_file()]
    if not directories:
        raise KDUserError(f"'{pattern}' matches no run directory; pass a directory (or glob) written by kd run --out.")
    return label, directories


def summarize(groups: list[tuple[str, list[Path]]], metrics: list[str] | None = None,
              include_teacher: bool = True) -> tuple[list[SummaryRow], list[str], str]:
    """Rows (teachers first, then one per group), the metric columns and the task name.

    ``metrics`` defaults to every numeric student metric the runs share.
    """
    results = [(label, [read_run(directory) for directory in directories]) for label, directories in groups]
    tasks = {run.task for _, runs in results for run in runs}
    if len(tasks) != 1:
        by_task = {task: [str(run.directory) for _, runs in results for run in runs if run.task == task]
                   for task in sorted(tasks)}
        raise KDUserError(f"kd summarize compares runs of one task; these runs mix tasks: {by_task}.")
    if metrics is None:
        shared = set.intersection(*(set(run.student) for _, runs in results for run in runs))
        metrics = sorted(shared)
    for _, runs in results:
        for run in runs:
            missing = [metric for metric in metrics if metric not in run.student]
            if missing:
                raise KDUserError(f"'{run.directory}/metrics.json' has no student metric {missing}; it has "
                                  f"{sorted(run.student)}.")
    rows: list[SummaryRow] = []
    if include_teacher:
        # One teacher row per distinct teacher (parameter count); one value per seed, since runs with the same
        # seed score the same teacher identically and repeating it would shrink the standard deviation.
        teachers: dict[int | None, dict[Any, RunResult]] = {}
        for _, runs in results:
            for run in runs:
                if run.teacher and all(metric in run.teacher for metric in metrics):
                    teachers.setdefault(run.teacher_params, {}).setdefault(run.seed, run)
        for params, by_seed in teachers.items():
            row = SummaryRow("teacher", params)
            for run in by_seed.values():
                row.runs.append(str(run.directory))
                for metric in metrics:
                    row.values.setdefault(metric, []).append(run.teacher[metric])
            rows.append(row)
    for label, runs in results:
        params = {run.student_params for run in runs}
        row = SummaryRow(label, params.pop() if len(params) == 1 else None)
        for run in runs:
            row.runs.append(str(run.directory))
            for metric in metrics:
                row.values.setdefault(metric, []).append(run.student[metric])
        rows.append(row)
    return rows, metrics, tasks.pop()


def _cell(mean: float, std: float | None, decimals: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{decimals}f}" + ("" if std is None else f" ± {std:.{decimals}f}")


def markdown_table(rows: list[SummaryRow], metrics: list[str], decimals: int = 3) -> str:
    """A Markdown table: label, parameters, n, then mean ± std per metric."""
    header = ["", "parameters", "n", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        counts = {row.mean_std(metric)[2] for metric in metrics}
        params = "–" if row.params is None else f"{row.params / 1e6:.2f}M"
        cells = [_cell(*row.mean_std(metric)[:2], decimals) for metric in metrics]
        lines.append("| " + " | ".join([row.label, params, "/".join(map(str, sorted(counts))), *cells]) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class WelchTest:
    """Welch's t-test of one row against the baseline row on one metric (two-sided; unequal variances)."""

    label: str
    metric: str
    difference: float  # mean of the row minus mean of the baseline
    t: float
    degrees_of_freedom: float
    p: float


def welch_tests(rows: list[SummaryRow], metrics: list[str], baseline: str) -> list[WelchTest]:
    """Every non-teacher row against the row labelled ``baseline``, per metric.

    Welch's test (scipy.stats.ttest_ind with equal_var=False) compares seeds of two methods without assuming equal
    variances; it needs at least two runs per row. A metric constant within both rows has no test (NaN).
    """
    from scipy import stats

    by_label = {row.label: row for row in rows if row.label != "teacher"}
    if baseline not in by_label:
        raise KDUserError(f"kd summarize --baseline {baseline!r}: no group has that label; the groups are "
                          f"{sorted(by_label)} (label a group with LABEL=GLOB).")
    reference = by_label[baseline]
    tests = []
    for row in by_label.values():
        if row is reference:
            continue
        for metric in metrics:
            ours, theirs = row.values.get(metric, []), reference.values.get(metric, [])
            if len(ours) < 2 or len(theirs) < 2:
                raise KDUserError(f"kd summarize --baseline: Welch's test needs at least two runs per group; "
                                  f"'{row.label}' has {len(ours)} and '{baseline}' {len(theirs)} for {metric}.")
            result = stats.ttest_ind(ours, theirs, equal_var=False)
            degrees = getattr(result, "df", math.nan)
            tests.append(WelchTest(row.label, metric, statistics.fmean(ours) - statistics.fmean(theirs),
                                   float(result.statistic), float(degrees), float(result.pvalue)))
    return tests


def markdown_welch(tests: list[WelchTest], baseline: str, decimals: int = 3) -> str:
    """The tests as a Markdown table: difference of means, t, degrees of freedom, p."""
    lines = [f"Welch's t-test against `{baseline}` (two-sided; p < 0.05 is a difference beyond seed noise):", "",
             "| | metric | difference | t | df | p |", "|---|---|---|---|---|---|"]
    for test in tests:
        lines.append(f"| {test.label} | {test.metric} | {test.difference:+.{decimals}f} | {test.t:.2f} | "
                     f"{test.degrees_of_freedom:.1f} | {test.p:.3f} |")
    return "\n".join(lines) + "\n"


def summary_json(rows: list[SummaryRow], metrics: list[str], task: str) -> dict[str, Any]:
    """The raw values behind the table (every seed), with means and standard deviations."""
    out: dict[str, Any] = {"task": task, "metrics": metrics, "rows": []}
    for row in rows:
        entry: dict[str, Any] = {"label": row.label, "params": row.params, "runs": row.runs, "metrics": {}}
        for metric in metrics:
            mean, std, count = row.mean_std(metric)
            entry["metrics"][metric] = {"mean": mean, "std": std, "n": count, "values": row.values.get(metric, [])}
        out["rows"].append(entry)
    return out


__all__ = ["RunResult", "SummaryRow", "WelchTest", "markdown_table", "markdown_welch", "parse_group", "read_run",
           "summarize", "summary_json", "welch_tests"]
