"""The four roles of a distillation run, and the method that combines them.

Data flows one way: a :class:`Task` yields batches, the :class:`Teacher` turns a
batch into :class:`~kdcore.signals.Signals`, each :class:`Objective` turns
teacher and student signals into a loss, and the engine steps the optimiser.
A :class:`Method` (what ``kd run --plugin NAME`` names) decides *where* teacher and
student meet (data prefixes, the student's own generations, the teacher's outputs,
generated layers) and returns a :class:`Comparison`; the configured objectives decide
*how* the two sides are compared, and their weighted sum is the loss.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from kdcore.errors import KDUserError
from kdcore.signals import Signal, SignalRequest, Signals
from kdcore.tracking.base import Tracker  # registered trackers subclass it (trainer.report_to, kdcore.tracking)

#: Every signal kind: what a method offers when it hands over whatever the models return (vanilla KD).
ALL_SIGNALS: frozenset[Signal] = frozenset(Signal)

Batch = Mapping[str, Any]


class EmptyConfig(BaseModel):
    """Config of a component that takes no options."""

    model_config = ConfigDict(extra="forbid")


class Model(nn.Module, abc.ABC):
    """A network that answers :class:`SignalRequest`s (shared by teachers and students)."""

    @abc.abstractmethod
    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        """Run the model on ``batch`` and return the requested signals."""

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all of them, or only the trainable ones)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class Teacher(Model):
    """A frozen model: eval mode, no gradients, signals returned detached."""

    def freeze(self) -> "Teacher":
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Teacher":  # noqa: ARG002 - a teacher never trains
        return super().train(False)

    @torch.no_grad()
    def signals(self, batch: Batch, request: SignalRequest) -> Signals:
        """The requested signals for ``batch``, without autograd history."""
        return self.forward_signals(batch, request).detached()

    def unavailable(self, request: SignalRequest) -> frozenset[Signal]:
        """The signals of ``request`` this teacher can never give (a stored teacher: those it was not captured
        with); a method whose objectives ask for one is refused at planning."""
        return frozenset()

    def recorded_metrics(self) -> dict[str, Any] | None:
        """Test scores measured elsewhere (a stored teacher's, at capture), reported instead of evaluating it;
        None: evaluate the teacher itself."""
        return None


class Student(Model):
    """A trainable model. Its ``state_dict`` is what checkpoints store (safetensors)."""

    def parameter_count_excluding(self) -> int:
        """Parameters that count towards the deployed size (override to exclude e.g. training-only heads)."""
        return self.num_parameters()


@dataclass
class BuildContext:
    """What a teacher or student factory may use while building a model."""

    task: "Task"
    cache_dir: Path
    device: torch.device
    seed: int
    teacher: Teacher | None = None  # set when building a student
    #: ``kd run --dry-run``: build every model with its real shapes but skip expensive one-off work (e.g. a
    #: teacher stage that trains for minutes); the plan's parameter counts stay exact.
    dry_run: bool = False
    #: The run's registry (a :class:`kdcore.registry.Registry`), so that a build step that trains (a teacher stage)
    #: calls the same lifecycle hooks as the run; None outside a run (then only built-in hooks apply).
    registry: Any = None


class ModelFactory(abc.ABC):
    """Builds a teacher or a student from a typed config (registered by name)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    #: Under torchrun: False (the default), rank 0 builds first (filling caches: downloads, conversions) while the
    #: other ranks wait, then they build from those caches. True, every rank calls :meth:`build` at the same time,
    #: because it trains the model data-parallel on first use (a teacher stage, :mod:`kdcore.teacher_stage`); the
    #: task's data is prepared by rank 0 first, and the factory writes its cache from rank 0 alone.
    builds_on_all_ranks: ClassVar[bool] = False

    @abc.abstractmethod
    def build(self, config: BaseModel, context: BuildContext) -> Model:
        """Return the model; teachers are frozen by the caller."""


@dataclass
class ObjectiveOutput:
    """A loss and the named parts to log (plain floats)."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Objective(abc.ABC):
    """Turns student and teacher signals (and the batch) into a loss.

    Subclasses set ``name``, a pydantic ``Config`` and the signals they need.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = EmptyConfig

    def __init__(self, config: BaseModel | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @abc.abstractmethod
    def student_request(self) -> SignalRequest:
        """Signals the objective needs from the student."""

    @abc.abstractmethod
    def teacher_request(self) -> SignalRequest:
        """Signals the objective needs from the teacher."""

    @abc.abstractmethod
    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        """The loss for one batch."""


@dataclass
class WeightedObjective:
    """An objective with its label in the config and its weight."""

    label: str
    objective: Objective
    weight: float
    start: float = 0.0  # the objective counts while start <= progress t/T < stop (objectives.<label>.active)
    stop: float = 1.0

    def active_at(self, progress: float) -> bool:
        """Whether the objective counts at training progress ``progress`` (t/T); the last step counts as inside."""
        return self.start <= progress < self.stop or (self.stop >= 1.0 and progress >= 1.0)


def objective_summary(name: str, weight: float, start: float, stop: float) -> dict[str, Any]:
    """How a plan and a run's log describe one objective: its registered name, weight and (when not the whole run)
    its active span."""
    summary: dict[str, Any] = {"name": name, "weight": weight}
    if (start, stop) != (0.0, 1.0):
        summary["active"] = {"start": start, "stop": stop}
    return summary


def training_progress(step: int, total_steps: int) -> float:
    """t/T of 0-based optimiser step ``step`` in a run of ``total_steps`` (0 before the engine sets T)."""
    return min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 0.0


def combine_objectives(
    objectives: Sequence[WeightedObjective], student: Signals, teacher: Signals, batch: Batch,
    progress: float | None = None,
) -> ObjectiveOutput:
    """Weighted sum of the objectives; each unweighted loss is logged as ``<label>``.

    With ``progress`` (t/T), objectives whose active span does not hold it are skipped (not computed, not logged);
    planning (:func:`kdcore.resolve.check_objectives_fit`) makes sure some objective counts at every step.
    """
    total: torch.Tensor | None = None
    parts: dict[str, float] = {}
    for item in objectives:
        if progress is not None and not item.active_at(progress):
            continue
        output = item.objective(student, teacher, batch)
        parts[item.label] = float(output.loss.detach())
        for key, value in output.parts.items():
            parts[f"{item.label}/{key}"] = value
        weighted = item.weight * output.loss
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("a method needs at least one objective")
    return ObjectiveOutput(total, parts)


@dataclass
class DataSplits:
    """Train, validation and test datasets (anything indexable with ``len``)."""

    train: Sequence[Any]
    valid: Sequence[Any]
    test: Sequence[Any]


class Task(abc.ABC):
    """Data, evaluation with named metrics, and default teacher/student presets.

    ``defaults()`` and ``presets`` return run-config fragments (plain dicts) that
    the config layering merges below the user's ``--preset``/``--config``/``--set``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    DataConfig: ClassVar[type[BaseModel]] = EmptyConfig
    metric: ClassVar[str]  # the metric that selects the best checkpoint
    greater_is_better: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, data_config: BaseModel, cache_dir: Path) -> None:
        self.data_config = data_config
        self.cache_dir = Path(cache_dir)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Run-config fragment with this task's default teacher, student and trainer."""
        return {}

    @abc.abstractmethod
    def build_data(self, seed: int) -> DataSplits:
        """Load or make the datasets (deterministic for a seed)."""

    @abc.abstractmethod
    def collate(self, items: Sequence[Any]) -> Batch:
        """Turn dataset items into a batch of tensors."""

    @abc.abstractmethod
    def evaluate(self, model: Model, dataset: Sequence[Any], device: torch.device, batch_size: int) -> dict[str, float]:
        """Named metrics of ``model`` on ``dataset`` (must include ``self.metric``)."""

    def epoch_batches(self, dataset: Sequence[Any], batch_size: int,
                      generator: torch.Generator) -> list[list[int]] | None:
        """One epoch's training batches as lists of dataset indices, or None for a plain shuffle.

        Override for e.g. length-bucketed batches (speech). Use only ``generator``
        for randomness so the order is reproducible and resumable.
        """
        return None

    def metric_metadata(self) -> dict[str, str]:
        """Non-numeric facts about the last evaluation (e.g. sacrebleu signatures), saved with the metrics."""
        return {}

    def compare_models(self, student: "Model", teacher: "Model", dataset: Sequence[Any], device: torch.device,
                       batch_size: int) -> dict[str, float]:
        """Metrics of the student *relative to* the teacher on ``dataset`` (e.g. how often the two choose the same
        next token), reported with the student's test metrics when the teacher is scored; none by default. Called in
        eval mode, under ``no_grad``, outside the training random streams."""
        return {}

    def fingerprints(self) -> dict[str, str]:
        """Content hashes of what the task's data were made from (e.g. ``data``, ``test``, ``tokenizer``), recorded
        in ``<out>/provenance.json`` and compared again by ``kd eval --run`` (docs/runs.md). Call after
        :meth:`build_data`."""
        return {}

    def save_run_files(self, out_dir: Path) -> dict[str, Any]:
        """Copy the small files a later ``kd eval --run`` needs besides the student's weights (e.g. a tokenizer)
        into ``out_dir`` and return what was stored (relative paths, fingerprints). Call after :meth:`build_data`."""
        return {}

    def use_run_files(self, out_dir: Path, stored: Mapping[str, Any]) -> None:
        """Read the files :meth:`save_run_files` stored in ``out_dir`` (``stored`` is what it returned) instead of
        building them again; called before any model is built. Raises :class:`~kdcore.errors.KDUserError` naming a
        missing file, its fingerprint and how to rebuild it when it cannot be replaced."""

    #: Roles of the user files :meth:`load_eval_files` accepts (e.g. ``("source", "reference")``).
    eval_file_roles: ClassVar[tuple[str, ...]] = ()

    def load_eval_files(self, files: Mapping[str, Path]) -> Sequence[Any]:
        """Dataset items from a user's own files, for ``kd eval --run DIR --source F --reference F``.

        ``files`` maps a role from :attr:`eval_file_roles` to a path. Tasks that
        cannot read user files keep this default, which reports that clearly.
        """
        raise KDUserError(f"Task '{self.name}' cannot evaluate on user files (got {sorted(files)}); "
                          f"run 'kd eval --run DIR' without file options to score its own test split.")


@dataclass
class StepOutput:
    """Loss to back-propagate and parts to log for one micro-batch."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    """Where teacher and student meet for one micro-batch: what the objectives compare.

    ``student`` and ``teacher`` hold the signals on the same positions; ``batch`` is what objectives read besides
    them: ``labels`` aligned with the logit positions (``IGNORE_INDEX`` where nothing is scored) and
    ``attention_mask`` aligned with the hidden states' positions. ``parts`` are the method's own numbers to log
    (e.g. ImitKD's β).
    """

    student: Signals
    teacher: Signals
    batch: Batch
    parts: dict[str, float] = field(default_factory=dict)


class Method(abc.ABC):
    """A distillation algorithm: where teacher and student meet.

    A method arranges the inputs on which the two are compared (:meth:`compare`) and says which signals it can hand
    over (``student_offers`` / ``teacher_offers``); the loss is always the weighted sum of the configured objectives
    over that comparison (:meth:`training_step`). The papers' losses are each method's default objectives
    (:meth:`defaults`), so any objective, built-in or installed, that asks for signals the method offers plugs in.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Signals :meth:`compare` can hand the objectives from each side; planning refuses objectives asking for others.
    student_offers: ClassVar[frozenset[Signal]] = ALL_SIGNALS
    teacher_offers: ClassVar[frozenset[Signal]] = ALL_SIGNALS

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        self.config = config
        self.task = task
        self.teacher = teacher
        self.student = student
        self.objectives = list(objectives)
        self.total_steps = 0
        missing = teacher.unavailable(self.teacher_request()) if teacher is not None else frozenset()
        if missing:
            raise KDUserError(
                f"Plugin '{self.name}': the objectives ask the teacher for {', '.join(sorted(s.value for s in missing))}"
                f", which this teacher ({type(teacher).__name__}) cannot give. Choose objectives on the signals it "
                f"has, or a teacher model (teacher.name).")

    def on_train_start(self, total_steps: int) -> None:
        """Called by the engine before the first step (schedules such as ImitKD's beta need T), and again with the
        new total when a time budget lowers the run's steps (:mod:`kdcore.time_budget`)."""
        self.total_steps = total_steps

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called by the engine on every process after each validation during training, with the student's validation
        ``metrics`` (those of log.jsonl's eval record) after optimiser step ``step``. Adaptive schedules (DistiLLM's
        student fraction) react here; the default does nothing."""

    def state_dict(self) -> dict[str, Any]:
        """The method's own run state (adaptive schedules, replay buffers), JSON-ready: each checkpoint stores it per
        process and :meth:`load_state_dict` gets it back on ``--resume``. Stateless methods return ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called after construction, before :meth:`on_train_start`)."""
        if state:
            raise KDUserError(f"The checkpoint holds run state of plugin '{self.name}' ({', '.join(sorted(state))}), "
                              f"but this plugin keeps none: the checkpoint was written by another version or plugin. "
                              f"Resume with the plugin that wrote it, or start a new --out.")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Run-config fragment with this method's default objectives and options."""
        return {}

    def merge_requests(self, requests: Sequence[SignalRequest]) -> SignalRequest:
        """One request to a model from what each objective asked of it: by default their union.

        A method whose models can serve some requests more cheaply overrides this (the text methods ask for the
        final hidden state instead of the logits when every objective can use it).
        """
        merged = SignalRequest()
        for item in requests:
            merged = merged | item
        return merged

    def _model_requests(self) -> tuple[SignalRequest, SignalRequest]:
        # The objectives are fixed for a run, so the two requests are worked out once, on first use.
        cached = self.__dict__.get("_cached_model_requests")
        if cached is None or cached[0] is not self.objectives:
            requests = (self.merge_requests([item.objective.student_request() for item in self.objectives]),
                        self.merge_requests([item.objective.teacher_request() for item in self.objectives]))
            cached = (self.objectives, requests)
            self.__dict__["_cached_model_requests"] = cached
        return cached[1]

    def student_request(self) -> SignalRequest:
        """What to ask the student for: :meth:`merge_requests` of the objectives' student requests."""
        return self._model_requests()[0]

    def teacher_request(self) -> SignalRequest:
        """What to ask the teacher for: :meth:`merge_requests` of the objectives' teacher requests."""
        return self._model_requests()[1]

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Where teacher and student meet at optimiser step ``step`` (0-based); classic KD: on the same batch.

        The teacher is not run when no objective asks it for anything (e.g. NLL alone).
        """
        teacher_request = self.teacher_request()
        teacher_signals = self.teacher.signals(batch, teacher_request) if teacher_request.signals else Signals()
        student_signals = self.student.forward_signals(batch, self.student_request())
        return Comparison(student_signals, teacher_signals, batch)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        """The weighted sum of the objectives over :meth:`compare`'s comparison (methods override ``compare``)."""
        comparison = self.compare(batch, step)
        combined = combine_objectives(self.objectives, comparison.student, comparison.teacher, comparison.batch,
                                      training_progress(step, self.total_steps))
        return StepOutput(combined.loss, {**comparison.parts, **combined.parts})

    def trainable_modules(self) -> nn.Module:
        """The module whose parameters the optimiser updates (the student by default)."""
        return self.student


def objectives_misfit(method: type[Method], objectives: Sequence[tuple[str, Objective]]) -> str | None:
    """Why ``method`` cannot feed these ``(label, objective)`` pairs, or None when it can (planning's check)."""
    problems = []
    for label, objective in objectives:
        for role, asked, offered in (("student", objective.student_request().required, method.student_offers),
                                     ("teacher", objective.teacher_request().required, method.teacher_offers)):
            missing = asked - offered
            if missing:
                problems.append(
                    f"objective '{label}' ({objective.name}) asks the {role} for "
                    f"{', '.join(sorted(s.value for s in asked))}, but method '{method.name}' offers the {role}'s "
                    f"{', '.join(sorted(s.value for s in offered)) or 'nothing'}")
    if not objectives:
        return f"method '{method.name}' has no objectives: its loss would be empty. Configure at least one under 'objectives'."
    if problems:
        return ("; ".join(problems) + ". Choose objectives that read what the method offers (kd list shows them), "
                "or a method that offers these signals.")
    return None


__all__ = [
    "ALL_SIGNALS", "Batch", "BuildContext", "Comparison", "DataSplits", "EmptyConfig", "Method", "Model", "ModelFactory", "Objective",
    "ObjectiveOutput", "Signal", "SignalRequest", "Signals", "StepOutput", "Student", "Task", "Teacher",
    "Tracker", "WeightedObjective", "combine_objectives", "objective_summary", "objectives_misfit",
    "training_progress",
]
