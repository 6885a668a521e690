"""DistilHuBERT (Chang, Yang and Lee, ICASSP 2022): the non-autoregressive baseline of GenDistiller.

The student is HuBERT's CNN feature extractor, a 512->768 projection, the
convolutional positional embedding and 2 transformer layers (768 wide, 12
heads, FFN 3072), initialised from the teacher's CNN and first 2 layers. One
linear head per target teacher layer (4, 8, 12) reads the *last* student
layer and predicts that teacher layer; the loss per layer is
L1 - log sigmoid(cos) (``kdcore.objectives.hidden_state_loss`` kind
``l1_logsigmoid_cos``), summed over the heads. After distillation the heads
are dropped: the deployed model has 23.49M parameters with a HuBERT Base or
WavLM Base+ teacher (see tests/speech_students/test_parameter_counts.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, PositiveInt
from torch import nn

from kdcore.interfaces import Batch, BuildContext, Method, ModelFactory, StepOutput
from kdcore.signals import SignalRequest, Signals
from kd_plugins.speech.students import (
    HIDDEN_STATES_REQUEST, PAPER_TRAINER, WAVLM_BASE_PLUS_CONFIG, HiddenLossConfig, SpeechStudent,
    SpeechStudentConfig, align_frames, frame_signals, init_from_teacher, make_layers,
    resolve_target_layers, resolve_teacher_dim, teacher_layers, weighted_layer_losses,
)


class DistilHubertStudentConfig(SpeechStudentConfig):
    """DistilHuBERT student: the shared front end, ``num_layers`` layers and one linear head per target layer."""

    num_layers: PositiveInt = Field(2, description="transformer layers (paper: 2)")


class DistilHubertStudent(SpeechStudent):
    """CNN front end + transformer layers + training-only prediction heads."""

    def __init__(self, config: DistilHubertStudentConfig, teacher_dim: int,
                 target_layers: Sequence[int] | None = None) -> None:
        super().__init__(config, teacher_dim, target_layers)
        self.layers = make_layers(config)
        # One linear head per target layer on the last layer's output (s3prl: one Linear(768, 768 * n_tasks)).
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, teacher_dim) for _ in self.target_layers)

    def encode(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The student's hidden states (front end, then each layer) and the frame mask."""
        hidden, frame_mask = self.features(batch)
        states = [hidden]
        padding = ~frame_mask
        for layer in self.layers:
            hidden = layer(hidden, key_padding_mask=padding)
            states.append(hidden)
        return states, frame_mask

    def predict(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The heads' predictions of the target teacher layers ``(B, T, teacher_dim)`` and the frame mask."""
        states, frame_mask = self.encode(batch)
        return [head(states[-1]) for head in self.heads], frame_mask

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        """Hidden states of the deployed student (front end + each layer, ``(B, T, hidden)``) and ``frame_mask``.

        This is what SUPERB's weighted sum reads; the prediction heads are training-only and not included.
        """
        states, frame_mask = self.encode(batch)
        return frame_signals(states, frame_mask)

    def parameter_count_excluding(self) -> int:
        """Deployed size: everything but the prediction heads (as the paper counts 23.49M)."""
        return self.num_parameters() - sum(p.numel() for p in self.heads.parameters())


class DistilHubertStudentFactory(ModelFactory):
    """Builds a DistilHuBERT student sized for the run's teacher, initialised from it when possible."""

    name: ClassVar[str] = "distilhubert-student"
    description: ClassVar[str] = "DistilHuBERT student: HuBERT CNN + 2 transformer layers + per-layer linear heads"
    Config: ClassVar[type[BaseModel]] = DistilHubertStudentConfig

    def build(self, config: BaseModel, context: BuildContext) -> DistilHubertStudent:
        assert isinstance(config, DistilHubertStudentConfig)
        target_layers = resolve_target_layers(config, context.teacher)
        teacher_dim = resolve_teacher_dim(config, context.teacher)
        with seeded(context.seed):
            student = DistilHubertStudent(config, teacher_dim, target_layers)
        if context.teacher is not None:
            init_from_teacher(student.front_end, student.layers, context.teacher, config.init_from_teacher)
        return student


@contextlib.contextmanager
def seeded(seed: int):  # noqa: ANN201 - a context manager
    """Initialise a model from ``seed`` without disturbing the global RNG (same student for the same seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: The paper's student (23.49M without the heads with a WavLM Base+/HuBERT Base teacher).
PAPER_STUDENT_ARGS: dict[str, Any] = {"hidden_size": 768, "num_layers": 2, "num_heads": 12, "ffn_dim": 3072,
                                      "target_layers": [4, 8, 12], "init_from_teacher": True}


class DistilHubertMethod(Method):
    """Predict the target teacher layers with one head each; sum of per-layer hidden-state losses."""

    name: ClassVar[str] = "distilhubert"
    description: ClassVar[str] = ("DistilHuBERT (Chang et al. 2022): 2-layer student, linear heads predict teacher "
                                  "layers 4/8/12, L1 - log sigmoid(cos)")
    Config: ClassVar[type[BaseModel]] = HiddenLossConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "teacher": {"name": "wavlm", "args": {"source": None, "config": dict(WAVLM_BASE_PLUS_CONFIG)}},
            "student": {"name": "distilhubert-student", "args": dict(PAPER_STUDENT_ARGS)},
            "method": {"loss": "l1_logsigmoid_cos", "cos_weight": 1.0},
            "trainer": dict(PAPER_TRAINER),
        },
        # Real Base teachers (the superb task's presets of the same names pick the checkpoint): paper sizes.
        "wavlm-base-plus": {"student": {"name": "distilhubert-student", "args": dict(PAPER_STUDENT_ARGS)}},
        "hubert-base": {"student": {"name": "distilhubert-student", "args": dict(PAPER_STUDENT_ARGS)}},
    }

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        # Sized for the superb task's default teacher (Whisper tiny.en encoder, 384 wide): FFN 4x the width as
        # in DistilHuBERT (3072 = 4 x 768); GenDistiller's default keeps the papers' 2304 : 3072 ratio.
        return {"student": {"name": "distilhubert-student", "args": {"num_layers": 2, "ffn_dim": 1536}}}

    def _speech_student(self) -> DistilHubertStudent:
        if not isinstance(self.student, DistilHubertStudent):
            from kdcore.errors import KDUserError

            raise KDUserError(f"--plugin distilhubert needs student 'distilhubert-student', got "
                              f"{type(self.student).__name__}; set student.name: distilhubert-student.")
        return self.student

    def teacher_request(self) -> SignalRequest:
        return self._speech_student().teacher_request()

    def student_request(self) -> SignalRequest:
        return HIDDEN_STATES_REQUEST

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        """Teacher target layers -> student head predictions -> weighted sum of per-layer losses."""
        student = self._speech_student()
        teacher_signals = self.teacher.signals(batch, self.teacher_request())
        targets = teacher_layers(teacher_signals, student.target_layers)
        predictions, student_mask = student.predict(batch)
        _, mask = align_frames(student_mask, teacher_signals.extra.get("frame_mask"), targets[0].shape[1],
                               self.config.max_frame_mismatch)
        loss, parts = weighted_layer_losses(predictions, targets, student.target_layers, mask, self.config)
        return StepOutput(loss, parts)


__all__ = ["DistilHubertMethod", "DistilHubertStudent", "DistilHubertStudentConfig", "DistilHubertStudentFactory"]
