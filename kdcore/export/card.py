"""The model card (``README.md``) of an export: a Hugging Face YAML header, then the evidence.

The header carries ``library_name``, ``tags`` (knowledge-distillation, kd, the
method), ``base_model`` (a hub teacher) or ``teacher`` (any other), ``datasets``,
``metrics`` and a ``model-index`` whose results are the student's test metrics from
``metrics.json``, and ``license``. The body records the run (the command that
reproduces it and the resolved config), the method and its paper, sizes, teacher and
student test metrics side by side with the metric signatures, the speed, the seeds,
what the export's self-test measured, and the known limitations.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from kdcore.export.base import ExportResult
from kdcore.export.weights import ExportWeights
from kdcore.resolve import ResolvedRun


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _format(value: Any) -> str:
    if not _number(value):
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _hub_id(source: Any) -> str | None:
    """``source`` when it names a model on a hub (owner/name) rather than a local path or a built-in model."""
    if not isinstance(source, str) or source.count("/") != 1 or Path(source).expanduser().exists():
        return None
    return source


def teacher_description(resolved: ResolvedRun) -> str:
    """The teacher as the run configured it: its factory name and, when it has one, its weights' source."""
    args = resolved.teacher_config.model_dump(mode="json")
    source = args.get("source")
    return f"{resolved.config.teacher.name} ({source})" if source else resolved.config.teacher.name


def dataset_description(resolved: ResolvedRun) -> str:
    """The task and where its data came from (the data config's corpus or source)."""
    data = resolved.data_config.model_dump(mode="json")
    origin = data.get("corpus") or data.get("source") or "configured data"
    return f"kd task '{resolved.config.task}' ({origin} data)"


def card_header(resolved: ResolvedRun, metrics: dict[str, Any], result: ExportResult, license_id: str,
                weights: ExportWeights) -> dict[str, Any]:
    """The YAML metadata of the card, as a dict."""
    method = resolved.config.plugin
    header: dict[str, Any] = {"library_name": result.library_name, "license": license_id,
                              "tags": ["knowledge-distillation", "kd", method, *result.tags]}
    teacher_source = resolved.teacher_config.model_dump(mode="json").get("source")
    hub = _hub_id(teacher_source)
    if hub is not None:
        header["base_model"] = hub
    header["teacher"] = teacher_description(resolved)
    header["datasets"] = [dataset_description(resolved)]
    if result.pipeline_tag:
        header["pipeline_tag"] = result.pipeline_tag
    student = {k: v for k, v in metrics["student"].items() if _number(v)}
    if weights.measured and student:
        header["metrics"] = sorted(student)
        header["model-index"] = [{
            "name": f"{resolved.config.task}-{method}-student",
            "results": [{
                "task": {"type": result.pipeline_tag or resolved.config.task, "name": resolved.config.task},
                "dataset": {"name": dataset_description(resolved), "type": resolved.config.task, "split": "test"},
                "metrics": [{"type": name, "name": f"test {name}", "value": value}
                            for name, value in sorted(student.items())],
            }],
        }]
    return header


def _metrics_table(metrics: dict[str, Any]) -> str:
    teacher, student = metrics.get("teacher") or {}, metrics["student"]
    names = [name for name in student if _number(student[name])]
    names += [name for name in teacher if name not in student and _number(teacher[name])]
    main = metrics.get("metric")
    lines = ["| metric | teacher | student |", "| --- | ---: | ---: |"]
    for name in names:
        label = f"**{name}** (selects the best student)" if name == main else name
        lines.append(f"| {label} | {_format(teacher.get(name))} | {_format(student.get(name))} |")
    return "\n".join(lines)


def _speed_lines(metrics: dict[str, Any], result: ExportResult) -> list[str]:
    teacher, student = metrics.get("teacher") or {}, metrics["student"]
    lines = []
    for name in student:
        if name.endswith("_per_second") and _number(student[name]) and _number(teacher.get(name)) and teacher[name]:
            lines.append(f"- {name} (test set, in the run, PyTorch): student {student[name]:.4g}, teacher "
                         f"{teacher[name]:.4g}: {student[name] / teacher[name]:.2f}x the teacher's")
    for name, value in result.speed.items():
        lines.append(f"- {name} (measured at export): {_format(value) if _number(value) else value}")
    return lines or ["- (the task reports no speed)"]


def _yaml_block(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()


def model_card(run_dir: Path, resolved: ResolvedRun, metrics: dict[str, Any], result: ExportResult, fmt: str,
               license_id: str, weights: ExportWeights, student_description: str) -> str:
    """The ``README.md`` of an export."""
    config = resolved.config
    header = card_header(resolved, metrics, result, license_id, weights)
    params = metrics.get("params") or {}
    teacher_params, student_params = params.get("teacher"), params.get("student")
    size = (f"{student_params:,} parameters, {student_params / teacher_params:.1%} of the teacher's "
            f"{teacher_params:,} ({teacher_params / student_params:.1f}x smaller)"
            if _number(student_params) and _number(teacher_params) and student_params else "not recorded")
    signatures = metrics.get("metric_metadata") or {}
    shown = weights.path.relative_to(run_dir) if weights.path.is_relative_to(run_dir) else weights.path
    step = f"step {weights.step}" if weights.step is not None else "the run's final student"
    which = ("the run's best student" if weights.measured else "a checkpoint other than the measured student")
    sections = [
        "---", _yaml_block(header), "---", "",
        f"# {config.task} student distilled with kd ({config.plugin})", "",
        f"A {student_description} distilled from the teacher `{teacher_description(resolved)}` on "
        f"{dataset_description(resolved)} with [kd](https://example.invalid/kd/docs), exported with "
        f"`kd export --format {fmt}`.", "",
        "## Method", "", f"`{config.plugin}`: {resolved.method_cls.description}", "",
        "Objectives: " + (", ".join(f"`{o.label}` = {o.cls.name} (weight {o.weight:g})" for o in resolved.objectives)
                          or "none") + ".", "",
        "## Size", "", f"- student: {size}",
        "- (deployed parameters: training-only parts such as prediction heads are not counted)", "",
        "## Test metrics", "",
        (f"Measured by kd on the task's test split at the end of the run, for the teacher and for the exported "
         f"weights ({which}, {step})." if weights.measured else
         f"These are the test metrics of the run's best student; the exported weights ({step}) are {which} and "
         f"were not measured on the test split (run `kd eval` on them)."), "",
        _metrics_table(metrics), "",
    ]
    if signatures:
        sections += ["Metric signatures:", ""] + [f"- {name}: `{value}`" for name, value in signatures.items()] + [""]
    sections += ["## Speed", "", *_speed_lines(metrics, result), "",
                 "## How it was made", "",
                 f"- seed: {metrics.get('seed', config.seed)}; selection: {metrics.get('selection', '–')} "
                 f"(best step {metrics.get('best_step', '–')}); training time {metrics.get('train_seconds', '–')} s "
                 f"on {metrics.get('device', '–')} (world size {metrics.get('world_size', 1)})",
                 f"- versions: {json.dumps(metrics.get('versions', {}))}",
                 f"- exported weights: `{shown}` (sha256 `{weights.sha256}`, verified by {weights.verified_by})", "",
                 "Reproduce the run with kd (the resolved config below is the run's `config.yaml`):", "",
                 "```bash", "kd run --config config.yaml --out my-run",
                 f"kd export --run my-run --out my-export --format {fmt}", "```", "",
                 "<details><summary>Resolved config (config.yaml)</summary>", "", "```yaml",
                 _yaml_block(resolved.to_dict()), "```", "", "</details>", "",
                 "## Usage", "", result.usage.strip(), "",
                 "## Export self-test", "",
                 "The export was loaded back and compared with the kd student on inputs from the task's test split:",
                 "", "```json", json.dumps(result.checks, indent=2), "```", "",
                 "## Known limitations", ""]
    limitations = [*result.limitations,
                   "The test metrics come from kd's own test split of the task data; they say little about other "
                   "domains.",
                   "The license in the header is what `kd export --license` was given; the weights also follow the "
                   "terms of the teacher and of the training data."]
    sections += [f"- {line}" for line in limitations] + [""]
    return "\n".join(sections)


def parse_card_header(text: str) -> dict[str, Any]:
    """The YAML header of a model card (between the first two ``---`` lines)."""
    lines = text.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        raise ValueError("a model card starts with a YAML header between '---' lines")
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end])) or {}


__all__ = ["card_header", "dataset_description", "model_card", "parse_card_header", "teacher_description"]
