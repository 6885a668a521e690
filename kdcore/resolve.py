"""From CLI flags and files to a validated run and its built components."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from kdcore import distributed
from kdcore.config import (
    Layer, LayeredConfig, RunConfig, load_yaml_file, parse_set_option, validate_model,
)
from kdcore.errors import KDUserError, did_you_mean
from kdcore.interfaces import (
    BuildContext, Method, Model, ModelFactory, Objective, Student, Task, Teacher, Tracker, WeightedObjective,
    objectives_misfit,
)
from kdcore.registry import Registry
from kdcore.tracking.registration import resolve_trackers


@dataclass
class ResolvedObjective:
    label: str
    cls: type[Objective]
    config: BaseModel
    weight: float
    start: float = 0.0
    stop: float = 1.0


@dataclass
class ResolvedRun:
    """A run config with every section validated by the class it configures."""

    config: RunConfig
    task_cls: type[Task]
    method_cls: type[Method]
    data_config: BaseModel
    method_config: BaseModel
    teacher_factory: type[ModelFactory]
    teacher_config: BaseModel
    student_factory: type[ModelFactory]
    student_config: BaseModel
    objectives: list[ResolvedObjective]
    trackers: list[type[Tracker]] = field(default_factory=list)  # trainer.report_to

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config (defaults filled in), as saved with the run."""
        data = self.config.model_dump(mode="json")
        data["data"] = self.data_config.model_dump(mode="json")
        data["method"] = self.method_config.model_dump(mode="json")
        data["objectives"] = {k: v for k, v in data["objectives"].items() if v is not None}
        data["teacher"]["args"] = self.teacher_config.model_dump(mode="json")
        data["student"]["args"] = self.student_config.model_dump(mode="json")
        for item in self.objectives:
            data["objectives"][item.label]["name"] = item.cls.name
            data["objectives"][item.label]["args"] = item.config.model_dump(mode="json")
        return data


def _pick_name(kind: str, flag: str | None, layers: LayeredConfig) -> str:
    if flag:
        return flag
    value = layers.values.get(kind)
    if isinstance(value, str) and value:
        return value
    raise KDUserError(f"No {kind} given. Pass --{kind} NAME (run 'kd list' to see the available {kind}s).")


def resolve_run(
    registry: Registry,
    *,
    task: str | None,
    plugin: str | None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> ResolvedRun:
    """Layer defaults < preset < config file < --set/--seed/--device, then validate."""
    user_layers = LayeredConfig()
    if config_file is not None:
        user_layers.apply(Layer(f"--config {config_file}", load_yaml_file(config_file)))
    set_layers = [Layer(f"--set {option}", parse_set_option(option)) for option in sets or []]
    for layer in set_layers:
        user_layers.apply(layer)

    task_name = _pick_name("task", task, user_layers)
    plugin_name = _pick_name("plugin", plugin, user_layers)
    task_cls = registry.load("task", task_name)
    method_cls = registry.load("plugin", plugin_name)

    layers = LayeredConfig()
    layers.apply(Layer(f"defaults of task '{task_name}'", task_cls.defaults()))
    layers.apply(Layer(f"defaults of plugin '{plugin_name}'", method_cls.defaults()))
    if preset is not None:
        found = False
        for owner, presets in ((f"task '{task_name}'", task_cls.presets), (f"plugin '{plugin_name}'", method_cls.presets)):
            if preset in presets:
                layers.apply(Layer(f"--preset {preset} of {owner}", presets[preset]))
                found = True
        if not found:
            available = sorted(set(task_cls.presets) | set(method_cls.presets))
            raise KDUserError(
                f"Unknown --preset '{preset}' for task '{task_name}' with plugin '{plugin_name}'."
                f"{did_you_mean(preset, available)} Available presets: {', '.join(available) or '(none)'}."
            )
    if config_file is not None:
        layers.apply(Layer(f"--config {config_file}", load_yaml_file(config_file)))
    for layer in set_layers:
        layers.apply(layer)
    flags: dict[str, Any] = {"task": task_name, "plugin": plugin_name}
    if seed is not None:
        flags["seed"] = seed
    if device is not None:
        flags["device"] = device
    layers.apply(Layer("command-line flags", flags))
    return validate_layers(registry, layers)


def validate_layers(registry: Registry, layers: LayeredConfig) -> ResolvedRun:
    """Validate the merged dict: the fixed schema first, then each class-specific section."""
    config = validate_model(RunConfig, layers.values, "", layers)
    task_cls = registry.load("task", config.task)
    method_cls = registry.load("plugin", config.plugin)
    data_config = validate_model(task_cls.DataConfig, config.data, "data", layers)
    method_config = validate_model(method_cls.Config, config.method, "method", layers)
    teacher_factory = registry.load("teacher", config.teacher.name)
    student_factory = registry.load("student", config.student.name)
    teacher_config = validate_model(teacher_factory.Config, config.teacher.args, "teacher.args", layers)
    student_config = validate_model(student_factory.Config, config.student.args, "student.args", layers)
    objectives = []
    for label, spec in config.objectives.items():
        if spec is None:  # removed by a higher layer (e.g. --set objectives.nll=null)
            continue
        cls = registry.load("objective", spec.name or label)
        objective_config = validate_model(cls.Config, spec.args, f"objectives.{label}.args", layers)
        objectives.append(ResolvedObjective(label, cls, objective_config, spec.weight, spec.active.start,
                                            spec.active.stop))
    check_objectives_fit(method_cls, objectives)
    trackers = resolve_trackers(registry, config.trainer.report_to)
    return ResolvedRun(config, task_cls, method_cls, data_config, method_config, teacher_factory, teacher_config,
                       student_factory, student_config, objectives, trackers)


def check_objectives_fit(method_cls: type[Method], objectives: list[ResolvedObjective]) -> None:
    """Planning (also under --dry-run) refuses objectives that ask for signals the method cannot hand over, and a set
    of objectives whose weights are all 0 (the loss would be identically zero)."""
    problem = objectives_misfit(method_cls, [(item.label, item.cls(item.config)) for item in objectives])
    if problem is not None:
        raise KDUserError(f"The objectives do not fit plugin '{method_cls.name}': {problem}")
    if all(item.weight == 0 for item in objectives):
        raise KDUserError(
            f"Every objective of plugin '{method_cls.name}' has weight 0 "
            f"({', '.join(f'objectives.{item.label}.weight' for item in objectives)}), so the loss is always zero and "
            f"the student would not learn. Give at least one objective a weight above 0.")
    gap = uncovered_progress([(item.start, item.stop) for item in objectives if item.weight > 0])
    if gap is not None:
        raise KDUserError(
            f"No objective of plugin '{method_cls.name}' with a weight above 0 counts while the training progress t/T "
            f"is in [{gap[0]:g}, {gap[1]:g}) (objectives.<label>.active: "
            f"{', '.join(f'{item.label} [{item.start:g}, {item.stop:g})' for item in objectives)}), so the student "
            f"would not learn then. Make the active spans adjoin: each start equal to another objective's stop, from 0 "
            f"to 1.")


def uncovered_progress(spans: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """The first part of [0, 1) that no ``(start, stop)`` span covers, or None when they cover it all."""
    reached = 0.0
    for start, stop in sorted(spans):
        if start > reached:
            return reached, start
        reached = max(reached, stop)
    return None if reached >= 1.0 else (reached, 1.0)


def resolve_saved_run(registry: Registry, run_dir: Path, sets: list[str] | None = None) -> ResolvedRun:
    """Re-validate the config a run saved (``<run>/config.yaml``), optionally with --set on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise KDUserError(f"'{run_dir}' is not a kd run directory: {path} does not exist. Pass the --out of a run.")
    layers = LayeredConfig()
    layers.apply(Layer(str(path), load_yaml_file(path)))
    for option in sets or []:
        layers.apply(Layer(f"--set {option}", parse_set_option(option)))
    return validate_layers(registry, layers)


def select_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise KDUserError("--device cuda was requested, but no CUDA device is available. Use --device cpu or auto.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class BuiltRun:
    """The components of a run, ready for the engine."""

    resolved: ResolvedRun
    task: Task
    teacher: Teacher
    student: Student
    method: Method
    device: torch.device


def _build_model(factory_cls: type[ModelFactory], config: BaseModel, context: BuildContext, role: str,
                 expected: type[Model]) -> Any:
    # Under torchrun a factory either builds on rank 0 first (the others then read what it cached) or, when it
    # trains data-parallel on first use, on every rank together (ModelFactory.builds_on_all_ranks).
    with contextlib.nullcontext() if factory_cls.builds_on_all_ranks else distributed.main_first():
        model = factory_cls().build(config, context)
    if not isinstance(model, expected):
        raise TypeError(f"{role} factory '{factory_cls.name}' returned {type(model).__name__}, "
                        f"not a kdcore.interfaces.{expected.__name__}")
    return model


def build_components(resolved: ResolvedRun, device: torch.device, cache_dir: Path | None = None,
                     dry_run: bool = False, registry: Registry | None = None,
                     saved_run: tuple[Path, Mapping[str, Any]] | None = None) -> BuiltRun:
    """Task, teacher (frozen), student and method for a resolved run (``dry_run``: see :class:`BuildContext`).

    ``saved_run``: a run directory and what its task stored there (``kd eval``); the task reads those files
    (:meth:`~kdcore.interfaces.Task.use_run_files`) before any model is built.

    Under torchrun the task is made on rank 0 first, then on the others; each model as its factory's
    ``builds_on_all_ranks`` says (:func:`_build_model`).
    """
    task, teacher, context = build_task_and_teacher(resolved, device, cache_dir, dry_run=dry_run, registry=registry,
                                                    saved_run=saved_run)
    if resolved.config.trainer.evaluate_teacher:
        teacher.recorded_metrics()  # a teacher that can neither be evaluated nor has scores is refused here
    student = _build_model(resolved.student_factory, resolved.student_config, context, "student", Student)
    student.to(device)
    objectives = [WeightedObjective(o.label, o.cls(o.config), o.weight, o.start, o.stop) for o in resolved.objectives]
    with distributed.main_first():
        method = resolved.method_cls(resolved.method_config, task, teacher, student, objectives)
    return BuiltRun(resolved, task, teacher, student, method, device)


def build_task_and_teacher(resolved: ResolvedRun, device: torch.device, cache_dir: Path | None = None, *,
                           dry_run: bool = False, registry: Registry | None = None,
                           saved_run: tuple[Path, Mapping[str, Any]] | None = None,
                           ) -> tuple[Task, Teacher, BuildContext]:
    """The task and the frozen teacher of a resolved run, and the build context a student is built in next
    (:func:`build_components`; ``kd teacher capture`` needs only these two)."""
    config = resolved.config
    cache = Path(cache_dir) if cache_dir is not None else config.resolved_cache_dir()
    on_all_ranks = resolved.teacher_factory.builds_on_all_ranks or resolved.student_factory.builds_on_all_ranks
    with distributed.main_first():
        task = resolved.task_cls(resolved.data_config, cache)
        if saved_run is not None:
            task.use_run_files(*saved_run)
        if on_all_ranks:
            # A model trained on every rank together reads the task's data: rank 0 fills the data caches
            # (corpus, tokenizer) before the other ranks read them.
            task.build_data(config.seed)
    context = BuildContext(task=task, cache_dir=cache, device=device, seed=config.seed, dry_run=dry_run,
                           registry=registry)
    teacher = _build_model(resolved.teacher_factory, resolved.teacher_config, context, "teacher", Teacher)
    teacher.freeze()
    teacher.to(device)
    context.teacher = teacher
    return task, teacher, context
