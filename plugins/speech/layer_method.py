"""What the two speech methods (DistilHuBERT, GenDistiller) share: a student that predicts chosen teacher layers.

Such a method decides *where* student and teacher meet: the student's predictions (or generations) of the target
teacher layers against those layers, on the frames both have (:func:`~kd_plugins.speech.speech_signals.align_frames`).
It hands them to the objectives as a :class:`~kdcore.interfaces.Comparison` of hidden states, so any hidden-state
objective decides *how* they are compared; the papers' L1 - log sigmoid(cos) per layer is the default.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Comparison, Method, Student, Task, Teacher, WeightedObjective
from kdcore.objectives.layers import HIDDEN_LAYER_IDS
from kdcore.signals import Signal, SignalRequest, Signals
from kd_plugins.speech.speech_signals import teacher_layers
from kd_plugins.speech.student_base import SpeechStudent, SpeechStudentFactory
from kd_plugins.speech.teachers import WAVLM_BASE_PLUS_CONFIG

#: The papers' loss (DistilHuBERT, kept by GenDistiller): L1 - log sigmoid(cos) on each target layer, summed.
PAPER_OBJECTIVES: dict[str, Any] = {"kd": {"name": "l1_logsigmoid_cos", "weight": 1.0, "args": {"cos_weight": 1.0}}}

#: GenDistiller's paper recipe: DistilHuBERT's steps, batch, lr and schedule (s3prl's distiller config: 200k updates,
#: batch 24, lr 2e-4, 7% warm-up, linear decay), with the engine's AdamW otherwise and no weight decay. DistilHuBERT's
#: own ``paper`` preset takes s3prl's whole recipe (kd_plugins.speech.distilhubert.S3PRL_TRAINER).
PAPER_TRAINER: dict[str, Any] = {"max_steps": 200000, "batch_size": 24, "lr": 2e-4, "warmup_steps": 14000,
                                 "schedule": "linear", "weight_decay": 0.0}


def paper_presets(student: str, student_args: dict[str, Any], method: dict[str, Any] | None = None, *,
                  trainer: dict[str, Any] | None = None, objectives: dict[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """A method's presets: ``paper`` (the WavLM Base+ architecture with random weights, the paper's student, loss and
    recipe: ``objectives`` and ``trainer``, by default :data:`PAPER_OBJECTIVES` and :data:`PAPER_TRAINER`) and
    ``wavlm-base-plus`` / ``hubert-base`` (the paper's student for the real Base teachers, which the superb task's
    presets of the same names load)."""
    at_paper_size: dict[str, Any] = {"student": {"name": student, "args": dict(student_args)}}
    if method:
        at_paper_size["method"] = dict(method)
    paper = {"teacher": {"name": "wavlm", "args": {"source": None, "config": dict(WAVLM_BASE_PLUS_CONFIG)}},
             **copy.deepcopy(at_paper_size), "objectives": copy.deepcopy(objectives or PAPER_OBJECTIVES),
             "trainer": copy.deepcopy(trainer or PAPER_TRAINER)}
    return {"paper": paper, "wavlm-base-plus": copy.deepcopy(at_paper_size),
            "hubert-base": copy.deepcopy(at_paper_size)}


class LayerMethodConfig(BaseModel):
    """Where student and teacher layers meet; how they are compared is the objectives' part."""

    model_config = ConfigDict(extra="forbid")

    max_frame_mismatch: int = Field(2, ge=0, description="allowed student/teacher frame-count difference")


class TeacherLayerMethod(Method):
    """Base of the methods whose student predicts the teacher's target layers.

    Subclasses name their student factory and implement :meth:`compare` with :meth:`teacher_targets` and
    :meth:`comparison`.
    """

    Config: ClassVar[type[BaseModel]] = LayerMethodConfig
    student_offers: ClassVar[frozenset[Signal]] = frozenset({Signal.HIDDEN_STATES})
    teacher_offers: ClassVar[frozenset[Signal]] = frozenset({Signal.HIDDEN_STATES})
    student_factory: ClassVar[type[SpeechStudentFactory]]
    #: The method's student args on top of the task's (sized for the task's default teacher).
    default_student_args: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        factory = self.student_factory
        if not isinstance(student, factory.student_class):
            raise KDUserError(f"--plugin {self.name} needs student '{factory.name}', got {type(student).__name__}; "
                              f"set student.name: {factory.name}.")
        # Set before the base class asks the teacher what it can give (teacher_request reads the target layers).
        self.speech_student: SpeechStudent = student
        super().__init__(config, task, teacher, student, objectives)
        for item in self.objectives:
            if getattr(item.objective.config, "teacher_layers", None) is not None:
                raise KDUserError(
                    f"objectives.{item.label}.args.teacher_layers is set, but --plugin {self.name} pairs each "
                    f"predicted layer with its target teacher layer itself (student.args.target_layers); remove "
                    f"teacher_layers, or choose the layers with student.args.target_layers.")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"student": {"name": cls.student_factory.name, "args": dict(cls.default_student_args)},
                "objectives": copy.deepcopy(PAPER_OBJECTIVES)}

    def teacher_request(self) -> SignalRequest:
        """The target layers (the objectives see them as the comparison's teacher side, in order)."""
        return self.speech_student.teacher_request()

    def teacher_targets(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The teacher's target layers ``(B, T_teacher, D)`` and its frame mask (None: all frames valid)."""
        signals = self.teacher.signals(batch, self.teacher_request())
        return teacher_layers(signals, self.speech_student.target_layers), signals.extra.get("frame_mask")

    def comparison(self, predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], mask: torch.Tensor,
                   parts: dict[str, float] | None = None) -> Comparison:
        """Predicted against target layers on the common frames (``mask``: ``(B, frames)``, True where both count)."""
        frames = mask.shape[1]
        student = Signals(hidden_states=tuple(prediction[:, :frames] for prediction in predictions))
        teacher = Signals(hidden_states=tuple(target[:, :frames] for target in targets),
                          extra={HIDDEN_LAYER_IDS: self.speech_student.target_layers})
        return Comparison(student, teacher, {"attention_mask": mask}, parts or {})


__all__ = ["LayerMethodConfig", "PAPER_OBJECTIVES", "PAPER_TRAINER", "TeacherLayerMethod", "paper_presets"]
