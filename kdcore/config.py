"""Typed run configuration and its layering.

Precedence, lowest first: the task's defaults and the plugin's (method's)
defaults < ``--preset NAME`` < ``--config FILE`` < ``--set key=value`` (and
``--seed``/``--device``). YAML is read with ``yaml.safe_load`` only. Each layer
is a plain dict; they are deep-merged, then validated by pydantic v2 models:
the fixed :class:`RunConfig`, then the sections whose schema depends on the
chosen names (``data`` by the task, ``method`` by the plugin, ``args`` of
teacher, student and objectives by their registered classes). Every error
names the key, the value, where the value came from and what is allowed.
"""
from __future__ import annotations

import copy
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
    model_validator,
)

from kdcore.errors import KDUserError, did_you_mean


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelSpec(StrictModel):
    """A registered teacher or student factory and its arguments."""

    name: str = Field(description="registered teacher/student name (see `kd list`)")
    args: dict[str, Any] = Field(default_factory=dict, description="validated by the factory's Config")


class ActiveSpan(StrictModel):
    """The part of training in which an objective counts, as fractions t/T of the run's steps."""

    start: float = Field(0.0, ge=0.0, lt=1.0, description="first progress t/T at which the objective counts")
    stop: float = Field(1.0, gt=0.0, le=1.0, description="progress t/T from which it no longer counts")

    @model_validator(mode="after")
    def _ordered(self) -> "ActiveSpan":
        if self.start >= self.stop:
            raise ValueError(f"start ({self.start:g}) must be below stop ({self.stop:g}): the objective would never "
                             f"count")
        return self


class ObjectiveSpec(StrictModel):
    """One weighted objective; the key it is stored under is its label in logs."""

    name: str | None = Field(None, description="registered objective name; defaults to the label")
    weight: NonNegativeFloat = 1.0
    args: dict[str, Any] = Field(default_factory=dict, description="validated by the objective's Config")
    active: ActiveSpan = Field(
        default_factory=ActiveSpan,
        description="{start, stop}: the objective counts only while start <= t/T < stop (t the optimiser step, T the "
                    "run's steps, lowered with them by a time budget); outside it, it is not computed. Phases such as "
                    "a supervised warm-up before on-policy distillation are objectives with adjoining spans")


class EarlyStoppingConfig(StrictModel):
    """Stop a run whose validation metric stopped improving (kdcore.early_stopping)."""

    patience: PositiveInt = Field(description="in-loop evaluations in a row without an improvement before the run "
                                              "stops")
    min_delta: NonNegativeFloat = Field(0.0, description="how much the task's metric must improve on the best so "
                                                         "far to count as an improvement")


class TrainerConfig(StrictModel):
    """Optimisation and bookkeeping of the one engine every plugin uses."""

    max_steps: PositiveInt = 200
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = Field(1e-8, description="Adam's epsilon, added to the root of the second moment")
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    clip_norm: PositiveFloat | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16", "native-bf16"] = "auto"
    eval_every: PositiveInt = 100
    select: Literal["best", "last"] = Field(
        "best", description="which evaluated student best/ keeps (and the test split scores): the best on the "
                            "task's metric, or the last one (every evaluation is logged either way)")
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    max_nonfinite_steps: PositiveInt = 10
    progress: Literal["auto", "on", "off"] = "auto"
    evaluate_teacher: bool = True
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp replicates the student, fsdp shards it (FSDP2 fully_shard)")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="stop when the task's validation metric has not improved for `patience` evaluations")
    report_to: list[str] = Field(
        default_factory=list, description="experiment trackers that receive log.jsonl's scalars, the config and "
                                          "report.md's figures (docs/tracking.md): tensorboard, mlflow, wandb, "
                                          "trackio or a plugin's; kd list shows them")
    time_budget_minutes: PositiveFloat | None = Field(
        None, description="wall-clock minutes for the training loop, validations included: when the rate measured "
                          "on the first steps projects more, max_steps is lowered to what fits (logged and "
                          "reported; the schedule follows); null: no budget")

    @model_validator(mode="after")
    def _trackers_named_once(self) -> "TrainerConfig":
        twice = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if twice:
            raise KDUserError(f"trainer.report_to names {', '.join(twice)} more than once; name each tracker once.")
        return self

    @model_validator(mode="after")
    def _early_stopping_can_act(self) -> "TrainerConfig":
        stopping = self.early_stopping
        # The run can stop early only at an evaluation before the last step, after patience + 1 of them.
        if stopping is not None and (stopping.patience + 1) * self.eval_every >= self.max_steps:
            before_end = (self.max_steps - 1) // self.eval_every
            raise KDUserError(
                f"trainer.early_stopping.patience = {stopping.patience} can never stop this run: it needs "
                f"{stopping.patience + 1} validations before the last step, and trainer.eval_every = "
                f"{self.eval_every} with trainer.max_steps = {self.max_steps} gives {before_end}. Lower "
                f"trainer.eval_every or the patience, or remove trainer.early_stopping.")
        return self


class RunConfig(StrictModel):
    """A whole run. ``data``/``method``/``args`` are checked against the chosen classes."""

    task: str
    plugin: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str | None = Field(None, description="shared cache (teachers, data); default $KD_CACHE_DIR or ~/.cache/kd")
    teacher: ModelSpec
    student: ModelSpec
    objectives: dict[str, ObjectiveSpec | None] = Field(
        default_factory=dict, description="label -> objective; null removes an objective set by a lower layer")
    method: dict[str, Any] = Field(default_factory=dict, description="validated by the plugin's Config")
    data: dict[str, Any] = Field(default_factory=dict, description="validated by the task's DataConfig")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return default_cache_dir()


def default_cache_dir() -> Path:
    """kd's cache when a run names none: ``$KD_CACHE_DIR``, else ``~/.cache/kd``."""
    return Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd")).expanduser()


# --------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """One source of config values, e.g. ``--config run.yaml``."""

    label: str
    values: dict[str, Any]


@dataclass
class LayeredConfig:
    """The merged dict plus, for each dotted key, the label of the layer that set it."""

    values: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)

    def apply(self, layer: Layer) -> None:
        _merge_into(self.values, layer.values, (), layer.label, self.provenance)

    def source_of(self, key: str) -> str | None:
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            label = self.provenance.get(".".join(parts[:end]))
            if label is not None:
                return label
        return None


def _merge_into(target: dict, incoming: Mapping, prefix: tuple[str, ...], label: str, provenance: dict[str, str]) -> None:
    named_part = (len(prefix) == 2 and prefix[0] == "objectives") or prefix in (("teacher",), ("student",))
    if named_part and _renames(target, incoming):
        # Args belong to their name: a layer that swaps forward_kl for logit_mse (or the task-trained teacher for a
        # teacher store) must not inherit the layer below's args (they would be refused as unknown keys).
        target.pop("args", None)
        stale = ".".join((*prefix, "args"))
        for key in [k for k in provenance if k == stale or k.startswith(stale + ".")]:
            del provenance[key]
    for key, value in incoming.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, path, label, provenance)
        else:
            target[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
            _record(provenance, path, value, label)


def _renames(target: Mapping, incoming: Mapping) -> bool:
    old, new = target.get("name"), incoming.get("name")
    return new is not None and old is not None and new != old


def _record(provenance: dict[str, str], path: tuple[str, ...], value: Any, label: str) -> None:
    provenance[".".join(path)] = label
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _record(provenance, (*path, str(key)), inner, label)


class StrictBoolSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose booleans are only ``true``/``false`` (YAML 1.2).

    PyYAML follows YAML 1.1, where ``on``/``off``/``yes``/``no`` are booleans, so
    ``--set trainer.progress=off`` or a language code ``no`` would silently turn into
    ``False``. Everything else is exactly ``safe_load``: no tags that build objects.
    """


StrictBoolSafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictBoolSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.1 needs a dot in a float ("3.0e-4"); YAML 1.2 and every user also write "3e-4".
StrictBoolSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def safe_load_yaml(text: str) -> Any:
    """Safe-load YAML text with YAML 1.2 booleans (see :class:`StrictBoolSafeLoader`)."""
    return yaml.load(text, Loader=StrictBoolSafeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load; malformed files are reported with file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KDUserError(f"Config file '{path}' does not exist. Pass an existing YAML file to --config.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KDUserError(f"Config file '{path}' cannot be read: {error}. Expected a UTF-8 YAML file.") from None
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise KDUserError(
            f"{where}: malformed YAML ({problem}). The config file must be a YAML mapping such as "
            f"'trainer: {{lr: 0.001}}'; check indentation and quoting around line {mark.line + 1 if mark else '?'}."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KDUserError(
            f"Config file '{path}' holds a {type(data).__name__}, but a mapping of keys to values was expected "
            f"(e.g. 'trainer: {{lr: 0.001}}')."
        )
    return data


def parse_set_option(option: str) -> dict[str, Any]:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}``; the value is parsed as a YAML scalar/flow value."""
    key, sep, raw = option.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise KDUserError(
            f"--set '{option}' is not of the form KEY=VALUE with a dotted key (e.g. --set trainer.lr=3e-4 or "
            f"--set objectives.kl.weight=0.5)."
        )
    try:
        value = safe_load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text; validation decides
    nested: dict[str, Any] = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


# --------------------------------------------------------------------------- errors


def _type_description(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_description(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_description(typing.get_args(annotation)[0])
    names = {float: "a number (float)", int: "an integer (int)", bool: "a boolean (true/false)", str: "a string",
             type(None): "null"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    if origin in (dict, Mapping):
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    return getattr(annotation, "__name__", str(annotation))


def _field_at(model: type[BaseModel], loc: Iterable[Any]) -> tuple[type[BaseModel] | None, Any]:
    """The model that owns the last element of ``loc`` and that field's annotation."""
    owner: type[BaseModel] | None = model
    annotation: Any = None
    parts = list(loc)
    index = 0
    while index < len(parts) and owner is not None:
        name = str(parts[index])
        info = owner.model_fields.get(name)
        if info is None:
            return owner, None
        annotation = info.annotation
        index += 1
        if index == len(parts):
            return owner, annotation
        inner = _unwrap_model(annotation)
        if inner is None and typing.get_origin(annotation) is dict:
            value_type = typing.get_args(annotation)[1] if typing.get_args(annotation) else None
            inner = _unwrap_model(value_type)
            index += 1  # skip the dict key
            if index == len(parts):
                return owner, value_type
        owner = inner
    return owner, annotation


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The nested model whose fields live at ``loc`` (``[]`` is ``model`` itself)."""
    if not loc:
        return model
    _, annotation = _field_at(model, loc)
    return _unwrap_model(annotation)


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def explain_validation_error(
    error: ValidationError, model: type[BaseModel], prefix: str = "", layers: LayeredConfig | None = None,
    what: str = "configuration",
) -> KDUserError:
    """One paragraph naming each bad key, its value, its source and what is allowed."""
    sentences = []
    for item in error.errors()[:6]:
        loc = [str(p) for p in item["loc"] if not str(p).startswith("function-")]
        key = ".".join(([prefix] if prefix else []) + loc)
        source = layers.source_of(key) if layers is not None else None
        origin = f" (from {source})" if source else ""
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            allowed = list(owner.model_fields) if owner is not None else []
            parent = ".".join(([prefix] if prefix else []) + loc[:-1]) or "the top level"
            sentences.append(
                f"Unknown key '{key}'{origin} with value {item['input']!r}.{did_you_mean(loc[-1], allowed)} "
                f"Allowed keys under {parent}: {', '.join(allowed) or '(none)'}."
            )
        elif item["type"] == "missing":
            sentences.append(f"Missing required key '{key}'.")
        else:
            _, annotation = _field_at(model, loc)
            expected = f" Expected {_type_description(annotation)}." if annotation is not None else ""
            sentences.append(f"Key '{key}'{origin} has the invalid value {item['input']!r}: {item['msg']}.{expected}")
    more = len(error.errors()) - 6
    tail = f" ({more} more errors not shown.)" if more > 0 else ""
    return KDUserError(f"Invalid {what}: " + " ".join(sentences) + tail)


def _non_finite(values: Any, prefix: str, seen: set[int] | None = None) -> Iterator[tuple[str, float]]:
    if isinstance(values, float) and not math.isfinite(values):
        yield prefix, values
        return
    if not isinstance(values, (Mapping, list, tuple)):
        return
    seen = set() if seen is None else seen
    if id(values) in seen:  # a YAML alias may make a structure contain itself; validation reports it
        return
    seen.add(id(values))
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    for key, inner in items:
        where = (f"{prefix}.{key}" if prefix else str(key)) if isinstance(values, Mapping) else f"{prefix}[{key}]"
        yield from _non_finite(inner, where, seen)


def validate_model(model: type[BaseModel], values: Any, prefix: str, layers: LayeredConfig | None,
                   what: str = "configuration") -> BaseModel:
    """``model.model_validate(values)`` with errors explained for the user.

    Non-finite numbers (YAML ``.inf``/``.nan``) are refused everywhere: no config
    value of a run (a learning rate, a weight, a temperature) is meaningful as one.
    """
    for key, value in _non_finite(values, prefix):
        source = layers.source_of(key) if layers is not None else None
        origin = f" (from {source})" if source else ""
        raise KDUserError(f"Invalid {what}: key '{key}'{origin} has the non-finite value {value!r}; "
                          f"expected a finite number.")
    try:
        return model.model_validate(values if values is not None else {})
    except ValidationError as error:
        raise explain_validation_error(error, model, prefix, layers, what) from None


def dump_yaml_atomic(data: Mapping[str, Any], path: Path) -> None:
    """Write YAML to ``path`` through a temp file and ``os.replace``."""
    from kdcore.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True))
