"""DistilHuBERT (Chang, Yang and Lee, ICASSP 2022): the non-autoregressive baseline of GenDistiller.

The student is HuBERT's CNN feature extractor, a 512->768 projection, the
convolutional positional embedding and 2 transformer layers (768 wide, 12
heads, FFN 3072), initialised from the teacher's CNN and first 2 layers. One
head per target teacher layer (4, 8, 12) reads the *last* student layer and
predicts that teacher layer: ``head: mlp`` is s3prl's head (``Linear(768,
768 * 3)``, GELU, then one ``768 -> 768`` map per target layer, i.e. one
two-layer MLP per target layer), ``head: linear`` one linear map per target
layer. The method compares each head's prediction with its teacher layer; the
default objective is the paper's L1 - log sigmoid(cos) per layer, summed over
the heads (objective ``l1_logsigmoid_cos``). After distillation the heads are
dropped.

The ``paper`` preset is the student as s3prl builds it (``mlp`` heads, the
``s3prl`` front-end layout, CNN gradient scale 0.1) with s3prl's distiller
recipe; tests/speech_students/test_s3prl_parity.py checks it against
``s3prl.upstream.distiller.model.DistillerModel``. Every deviation from the
paper and s3prl: docs/speech-methods.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, PositiveInt
from torch import nn

from kdcore.interfaces import Batch, Comparison, Teacher
from kdcore.signals import SignalRequest, Signals
from kd_plugins.speech.layer_method import PAPER_OBJECTIVES, TeacherLayerMethod, paper_presets
from kd_plugins.speech.speech_signals import align_frames, frame_signals
from kd_plugins.speech.student_base import SpeechStudent, SpeechStudentConfig, SpeechStudentFactory
from kd_plugins.speech.teacher_init import init_from_teacher
from kd_plugins.speech.transformer_layer import make_layers


class DistilHubertStudentConfig(SpeechStudentConfig):
    """DistilHuBERT student: the shared front end, ``num_layers`` layers and one head per target layer."""

    num_layers: PositiveInt = Field(2, description="transformer layers (paper: 2)")
    head: Literal["linear", "mlp"] = Field(
        "linear", description="prediction head per target layer on the last layer: 'linear' (one linear map) or "
                              "'mlp' (s3prl's: Linear(hidden, hidden), GELU, Linear(hidden, teacher width))")


def prediction_head(kind: str, hidden_size: int, teacher_dim: int) -> nn.Module:
    """One target layer's head. ``mlp`` equals s3prl's ``Linear(hidden, hidden * n) -> GELU -> SplitLinear`` cut
    into its ``n`` independent parts (the stacked first map and the split second one act per target layer), with
    PyTorch's default ``Linear`` initialisation, which is s3prl's distribution for both maps."""
    if kind == "linear":
        return nn.Linear(hidden_size, teacher_dim)
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, teacher_dim))


class DistilHubertStudent(SpeechStudent):
    """CNN front end + transformer layers + training-only prediction heads."""

    def __init__(self, config: DistilHubertStudentConfig, teacher_dim: int,
                 target_layers: Sequence[int] | None = None) -> None:
        super().__init__(config, teacher_dim, target_layers)
        self.layers = make_layers(config)
        self.heads = nn.ModuleList(prediction_head(config.head, config.hidden_size, teacher_dim)
                                   for _ in self.target_layers)

    def initialise_from(self, teacher: Teacher) -> None:
        """The teacher's CNN, projection, positional conv and first layers (DistilHuBERT's initialisation)."""
        init_from_teacher(self.front_end, self.layers, teacher, self.config.init_from_teacher)

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


class DistilHubertStudentFactory(SpeechStudentFactory):
    """Builds a DistilHuBERT student sized for the run's teacher, initialised from it when possible."""

    name: ClassVar[str] = "distilhubert-student"
    description: ClassVar[str] = "DistilHuBERT student: HuBERT CNN + 2 transformer layers + per-layer heads"
    Config: ClassVar[type[BaseModel]] = DistilHubertStudentConfig
    student_class: ClassVar[type[SpeechStudent]] = DistilHubertStudent


#: What makes the student s3prl's DistillerModel (pretrain/distiller/config_model.yaml, upstream/distiller/model.py).
S3PRL_STUDENT_ARGS: dict[str, Any] = {"head": "mlp", "front_end_layout": "s3prl", "feature_grad_mult": 0.1}

#: The paper's student as s3prl builds it (23,491,200 parameters without the heads with a WavLM Base+/HuBERT Base
#: teacher).
PAPER_STUDENT_ARGS: dict[str, Any] = {"hidden_size": 768, "num_layers": 2, "num_heads": 12, "ffn_dim": 3072,
                                      "target_layers": [4, 8, 12], "init_from_teacher": True, **S3PRL_STUDENT_ARGS}

#: s3prl's distiller recipe (pretrain/distiller/config_runner.yaml and optimizers.py, s3prl 0.4.18). Its optimiser
#: ``AdamW_with_schedule`` groups the parameters itself: weight decay 0.01 on every parameter whose name holds no
#: "bias" (the 1e-6 of the yaml is only the default those groups override), 0 on biases.
S3PRL_TRAINER: dict[str, Any] = {"max_steps": 200000, "batch_size": 24, "lr": 2e-4, "warmup_steps": 14000,
                                 "schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 0.01,
                                 "betas": [0.9, 0.98], "eps": 1e-6, "clip_norm": 5.0}

#: s3prl's loss is the mean over the heads of L1 + (-log sigmoid(cos)), where the paper writes their sum.
S3PRL_OBJECTIVES: dict[str, Any] = {
    "kd": {**PAPER_OBJECTIVES["kd"], "args": {**PAPER_OBJECTIVES["kd"]["args"], "layer_weights": [1 / 3] * 3}}}


class DistilHubertMethod(TeacherLayerMethod):
    """Each head's prediction against its target teacher layer."""

    name: ClassVar[str] = "distilhubert"
    description: ClassVar[str] = ("DistilHuBERT (Chang et al. 2022): 2-layer student, one head per teacher layer "
                                  "4/8/12, L1 - log sigmoid(cos)")
    student_factory = DistilHubertStudentFactory
    speech_student: DistilHubertStudent
    # Sized for the superb task's default teacher (Whisper tiny.en encoder, 384 wide): FFN 4x the width as in
    # DistilHuBERT (3072 = 4 x 768); GenDistiller's default keeps the papers' 2304 : 3072 ratio.
    default_student_args: ClassVar[dict[str, Any]] = {"num_layers": 2, "ffn_dim": 1536}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        **paper_presets(DistilHubertStudentFactory.name, PAPER_STUDENT_ARGS, trainer=S3PRL_TRAINER,
                        objectives=S3PRL_OBJECTIVES),
        # s3prl's student at the task's own sizes and recipe (e.g. the embedded superb default's budget).
        "s3prl-student": {"student": {"name": DistilHubertStudentFactory.name, "args": dict(S3PRL_STUDENT_ARGS)}},
    }

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Teacher target layers against the heads' predictions of them, on the common frames."""
        targets, teacher_mask = self.teacher_targets(batch)
        predictions, student_mask = self.speech_student.predict(batch)
        _, mask = align_frames(student_mask, teacher_mask, targets[0].shape[1], self.config.max_frame_mismatch)
        return self.comparison(predictions, targets, mask)


__all__ = ["DistilHubertMethod", "DistilHubertStudent", "DistilHubertStudentConfig", "DistilHubertStudentFactory"]
