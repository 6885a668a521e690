"""metrics.json, report.md and the PNG curves of a finished run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcore.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl


def _plot(path: Path, series: dict[str, tuple[list[float], list[float]]], ylabel: str, title: str) -> bool:
    import io

    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    if not any(xs for xs, _ in series.values()):
        return False
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, (xs, ys) in series.items():
        if xs:
            axis.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(out_dir: Path, metrics: dict[str, Any], primary_metric: str) -> Path:
    """Write report.md (results table, parameters, time) and loss/metric PNGs next to it."""
    records = read_jsonl(out_dir / "log.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    loss_png = _plot(out_dir / "loss.png", {"train loss": ([r["step"] for r in train], [r["loss"] for r in train])},
                     "loss", "Training loss")
    metric_png = _plot(out_dir / "metric.png",
                       {primary_metric: ([r["step"] for r in evals if primary_metric in r],
                                         [r[primary_metric] for r in evals if primary_metric in r])},
                       primary_metric, f"Validation {primary_metric} (student)")
    teacher, student = metrics.get("teacher", {}), metrics.get("student", {})
    names = list(dict.fromkeys([*teacher, *student]))
    last = metrics.get("selection") == "last"
    kept = (f"Scored checkpoint: step {metrics.get('best_step')} (the last; trainer.select: last)" if last
            else f"Best checkpoint: step {metrics.get('best_step')}")
    lines = [
        f"# kd run: task `{metrics['task']}`, plugin `{metrics['plugin']}`",
        "",
        "## Results (test split)",
        "",
        "| metric | teacher | student |",
        "|---|---|---|",
        *[f"| {n}{' (selects best)' if n == primary_metric and not last else ''} | {_format(teacher.get(n, '—'))} | "
          f"{_format(student.get(n, '—'))} |" for n in names],
        f"| parameters | {metrics['params']['teacher']:,} | {metrics['params']['student']:,} |",
        "",
        f"Student parameters are {metrics['params']['student'] / max(1, metrics['params']['teacher']):.1%} of the "
        f"teacher's. {kept}. Training time: "
        f"{metrics['train_seconds']:.1f} s on {metrics.get('device', '?')}.",
        "",
    ]
    budget = metrics.get("time_budget")
    if budget:
        lines += [f"Time budget of {budget['budget_minutes']:g} min: trained {budget['max_steps']} of the "
                  f"{budget['planned_steps']} planned steps ({budget['reason']}).", ""]
    stopped = metrics.get("stopped_early")
    if stopped:
        lines += [f"Stopped early at step {stopped['step']} of {stopped['max_steps']}: {stopped['reason']}.", ""]
    lines += [
        "## Curves",
        "",
    ]
    if loss_png:
        lines += ["![training loss](loss.png)", ""]
    if metric_png:
        lines += [f"![validation {primary_metric}](metric.png)", ""]
    versions = metrics.get("versions", {})
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "metrics.json", metrics)
