"""What the speech students (DistilHuBERT, GenDistiller) share: their sizes, base class and factory.

A speech student is a HuBERT-style front end (:mod:`kd_plugins.speech.front_end`) followed by transformer layers
(:mod:`kd_plugins.speech.transformer_layer`) that predict chosen teacher layers. The factory sizes it for the run's
teacher (:mod:`kd_plugins.speech.teacher_shape`), builds it from the run's seed and initialises it from the teacher
where it can (:mod:`kd_plugins.speech.teacher_init`).
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, model_validator
from transformers import HubertConfig

from kdcore.interfaces import Batch, BuildContext, ModelFactory, Student, Teacher
from kdcore.signals import Signal, SignalRequest
from kd_plugins.speech.front_end import DEFAULT_CONV_LAYERS, FrontEndLayout, SpeechFrontEnd
from kd_plugins.speech.teacher_shape import resolve_target_layers, resolve_teacher_dim


class SpeechStudentConfig(BaseModel):
    """Sizes of a speech student; defaults are DistilHuBERT's (= HuBERT/WavLM base widths)."""

    model_config = ConfigDict(extra="forbid")

    conv_layers: list[tuple[PositiveInt, PositiveInt, PositiveInt]] = Field(
        default_factory=lambda: [list(layer) for layer in DEFAULT_CONV_LAYERS],
        description="CNN feature extractor as [channels, kernel, stride] per layer")
    conv_bias: bool = False
    extractor_norm: Literal["group", "layer"] = Field(
        "group", description="'group': GroupNorm after the first conv (base models); 'layer': LayerNorm after each")
    hidden_size: PositiveInt = 768
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 12
    ffn_dim: PositiveInt = 3072
    pos_conv_kernel: PositiveInt = 128
    pos_conv_groups: PositiveInt = 16
    dropout: NonNegativeFloat = Field(0.1, le=1.0)
    attention_dropout: NonNegativeFloat = Field(0.1, le=1.0)
    activation_dropout: NonNegativeFloat = Field(0.1, le=1.0)
    layer_norm_first: bool = Field(False, description="pre-LN layers (large models); base models are post-LN")
    layer_norm_eps: float = 1e-5
    normalize_waveform: bool = Field(
        False, description="zero-mean unit-variance per utterance before the CNN (match the teacher's input)")
    target_layers: list[int] | None = Field(
        None, description="teacher hidden layers to predict (0 = pre-transformer features); None: num_targets "
                          "evenly spaced layers ending at the teacher's last (4, 8, 12 for a 12-layer teacher)")
    num_targets: PositiveInt = Field(3, description="how many layers target_layers=None picks")
    teacher_hidden_size: PositiveInt | None = Field(
        None, description="width of the teacher's hidden states; None: read from the teacher")
    front_end_layout: FrontEndLayout = Field(
        "transformers", description="'transformers': HuBERT as transformers builds it (LayerNorm over the CNN "
                                    "channels before the projection, dropout after it; the teacher's encoder "
                                    "LayerNorm is copied); 's3prl': DistilHuBERT as s3prl builds it (the projection "
                                    "reads the CNN directly, no dropout there; the encoder LayerNorm starts at 1, 0)")
    feature_grad_mult: float = Field(
        1.0, ge=0.0, description="multiplies the gradient reaching the CNN (s3prl's DistilHuBERT: 0.1; 0 freezes it)")
    init_from_teacher: bool | Literal["auto"] = Field(
        "auto", description="copy CNN, projection, positional conv and the first layers from a WavLM/HuBERT "
                            "teacher, or (true only) the first layers from a Whisper encoder teacher (pre-LN students "
                            "with its head count); 'auto': from a WavLM/HuBERT teacher when the shapes match")

    @model_validator(mode="after")
    def _check_sizes(self) -> "SpeechStudentConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.hidden_size % self.pos_conv_groups:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by pos_conv_groups "
                             f"{self.pos_conv_groups}")
        if self.target_layers is not None:
            if not self.target_layers:
                raise ValueError("target_layers must name at least one teacher layer (or be null: automatic)")
            if any(layer < 0 for layer in self.target_layers) or self.target_layers != sorted(set(self.target_layers)):
                raise ValueError(f"target_layers {self.target_layers} must be distinct, non-negative and increasing")
        return self

    def hubert_config(self) -> HubertConfig:
        """The transformers config whose front-end modules this student reuses."""
        return HubertConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.num_heads, intermediate_size=self.ffn_dim,
            num_hidden_layers=self.num_layers,
            conv_dim=[c for c, _, _ in self.conv_layers], conv_kernel=[k for _, k, _ in self.conv_layers],
            conv_stride=[s for _, _, s in self.conv_layers], conv_bias=self.conv_bias,
            feat_extract_norm=self.extractor_norm, feat_extract_activation="gelu",
            feat_proj_layer_norm=self.front_end_layout == "transformers",
            feat_proj_dropout=self.dropout if self.front_end_layout == "transformers" else 0.0,
            num_conv_pos_embeddings=self.pos_conv_kernel, num_conv_pos_embedding_groups=self.pos_conv_groups,
            layer_norm_eps=self.layer_norm_eps,
            do_stable_layer_norm=self.layer_norm_first,
        )


class SpeechStudent(Student):
    """Base of the speech students: the front end, the frame mask and the teacher layers they predict."""

    def __init__(self, config: SpeechStudentConfig, teacher_dim: int,
                 target_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.teacher_dim = teacher_dim
        layers = target_layers if target_layers is not None else config.target_layers
        if layers is None:
            raise ValueError("target_layers=None in the config: pass the layers resolved from the teacher "
                             "(resolve_target_layers)")
        self.target_layers: tuple[int, ...] = tuple(layers)
        self.front_end = SpeechFrontEnd(config)

    def features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Front-end features ``(B, T, hidden)`` and frame mask ``(B, T)`` of a batch."""
        waveform = batch["waveform"]
        lengths = batch.get("waveform_lengths")
        return self.front_end(waveform.to(self.front_end.layer_norm.weight.dtype), lengths)

    def teacher_request(self) -> SignalRequest:
        """What the teacher is asked for: the target layers."""
        return SignalRequest(frozenset({Signal.HIDDEN_STATES}), tuple(self.target_layers))

    @abc.abstractmethod
    def initialise_from(self, teacher: Teacher) -> None:
        """Copy what fits from the teacher's weights, as ``config.init_from_teacher`` says."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise a model from ``seed`` without disturbing the global RNG (same student for the same seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class SpeechStudentFactory(ModelFactory):
    """Builds a speech student sized for the run's teacher (target layers, width), initialised from it when possible."""

    Config: ClassVar[type[BaseModel]] = SpeechStudentConfig
    student_class: ClassVar[type[SpeechStudent]]

    def build(self, config: BaseModel, context: BuildContext) -> SpeechStudent:
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} builds from a {self.Config.__name__}, got {type(config).__name__}")
        target_layers = resolve_target_layers(config, context.teacher)
        teacher_dim = resolve_teacher_dim(config, context.teacher)
        with seeded(context.seed):
            student = self.student_class(config, teacher_dim, target_layers)
        if context.teacher is not None:
            student.initialise_from(context.teacher)
        return student


__all__ = ["SpeechStudent", "SpeechStudentConfig", "SpeechStudentFactory", "seeded"]
