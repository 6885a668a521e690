"""Building blocks shared by the speech students (DistilHuBERT, GenDistiller).

A speech student is a HuBERT-style front end (CNN feature extractor, feature
projection, convolutional positional embedding, layer norm) followed by
transformer layers. The front end reuses transformers' HuBERT modules, so its
parameter names and shapes equal those of a WavLM/HuBERT teacher and its
weights can be copied from one (as DistilHuBERT initialises its student).

The transformer layer is a HuBERT/WavLM-base layer (post-LN by default) built
from ``torch.nn.MultiheadAttention``; unlike ``nn.TransformerEncoderLayer`` it
can attend to *earlier* positions passed as ``memory``, which GenDistiller's
autoregressive generation needs (see :mod:`kd_plugins.speech.gendistiller`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, model_validator
from torch import nn
from torch.nn import functional as F
from transformers import HubertConfig
from transformers.models.hubert.modeling_hubert import (
    HubertFeatureEncoder, HubertFeatureProjection, HubertPositionalConvEmbedding,
)

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Student, Teacher
from kdcore.signals import Signal, SignalRequest, Signals

log = logging.getLogger(__name__)

#: HuBERT/WavLM-base CNN: (channels, kernel, stride) per layer; 400-sample receptive field, 320-sample hop.
DEFAULT_CONV_LAYERS: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2

HIDDEN_STATES_REQUEST = SignalRequest(frozenset({Signal.HIDDEN_STATES}))


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
    init_from_teacher: bool | Literal["auto"] = Field(
        "auto", description="copy CNN, projection, positional conv and the first layers from a WavLM/HuBERT "
                            "teacher; 'auto': when the teacher is one and the shapes match")

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
            feat_extract_norm=self.extractor_norm, feat_extract_activation="gelu", feat_proj_layer_norm=True,
            feat_proj_dropout=self.dropout, num_conv_pos_embeddings=self.pos_conv_kernel,
            num_conv_pos_embedding_groups=self.pos_conv_groups, layer_norm_eps=self.layer_norm_eps,
            do_stable_layer_norm=self.layer_norm_first,
        )


def conv_output_lengths(lengths: torch.Tensor, conv_layers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Frames a valid (unpadded) conv stack produces from ``lengths`` samples."""
    frames = lengths.long()
    for _, kernel, stride in conv_layers:
        frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
    return frames.clamp(min=0)


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``(B, max_length)`` bool mask, True on valid frames."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class SpeechFrontEnd(nn.Module):
    """Waveform -> ``(B, T, hidden)`` features with the frame mask (HuBERT's pre-transformer part).

    Module names equal transformers' HuBERT/WavLM ones (``feature_extractor``,
    ``feature_projection``, ``pos_conv_embed``, ``layer_norm``) so teacher
    weights load by name.
    """

    def __init__(self, config: SpeechStudentConfig) -> None:
        super().__init__()
        hubert_config = config.hubert_config()
        self.conv_layers = [tuple(layer) for layer in config.conv_layers]
        self.normalize_waveform = config.normalize_waveform
        self.layer_norm_first = config.layer_norm_first
        self.feature_extractor = HubertFeatureEncoder(hubert_config)
        self.feature_projection = HubertFeatureProjection(hubert_config)
        self.pos_conv_embed = HubertPositionalConvEmbedding(hubert_config)
        # Post-LN models normalise right after the positional embedding; pre-LN ones at the very end (HuBERT large).
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def receptive_field(self) -> int:
        """Samples needed for one frame."""
        field, hop = 1, 1
        for _, kernel, stride in self.conv_layers:
            field += (kernel - 1) * hop
            hop *= stride
        return field

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, T, hidden)`` and the valid-frame mask ``(B, T)``."""
        if waveform.dim() != 2:
            raise KDUserError(f"A speech student expects batch['waveform'] of shape (batch, samples); got "
                              f"shape {tuple(waveform.shape)}. Down-mix and batch the audio in the task's collate.")
        if lengths is None:
            lengths = torch.full((waveform.shape[0],), waveform.shape[1], device=waveform.device, dtype=torch.long)
        lengths = lengths.to(waveform.device)
        if int(lengths.min()) < self.receptive_field:
            raise KDUserError(
                f"An utterance of {int(lengths.min())} samples is shorter than the student's CNN receptive field "
                f"({self.receptive_field} samples = {self.receptive_field / 16000 * 1000:.0f} ms at 16 kHz): "
                f"it yields no frame. Drop or pad clips shorter than that in the data.")
        if self.normalize_waveform:
            waveform = _normalize_per_utterance(waveform, lengths)
        features = self.feature_extractor(waveform).transpose(1, 2)
        frame_mask = lengths_to_mask(conv_output_lengths(lengths, self.conv_layers), features.shape[1])
        hidden = self.feature_projection(features)
        hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)  # padding must not leak through the pos conv
        hidden = hidden + self.pos_conv_embed(hidden)
        if not self.layer_norm_first:
            hidden = self.layer_norm(hidden)
        return self.dropout(hidden), frame_mask


def _normalize_per_utterance(waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # Same as transformers' Wav2Vec2FeatureExtractor(do_normalize=True), but over valid samples only.
    mask = lengths_to_mask(lengths, waveform.shape[1]).to(waveform.dtype)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (waveform * mask).sum(1, keepdim=True) / count
    var = (((waveform - mean) * mask) ** 2).sum(1, keepdim=True) / count
    return (waveform - mean) / torch.sqrt(var + 1e-7) * mask


class SpeechTransformerLayer(nn.Module):
    """A HuBERT/WavLM-base transformer layer that may also attend to earlier positions (``memory``).

    Names mirror transformers' layers (``attention``, ``layer_norm``,
    ``feed_forward.intermediate_dense``/``output_dense``, ``final_layer_norm``)
    so :func:`copy_transformer_layer` can fill it from a teacher layer.
    Attention is ``nn.MultiheadAttention`` (scaled-dot-product kernels), not hand-written.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, *, dropout: float = 0.1,
                 attention_dropout: float = 0.1, activation_dropout: float = 0.1, layer_norm_first: bool = False,
                 layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=attention_dropout, batch_first=True)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.feed_forward = nn.ModuleDict({
            "intermediate_dense": nn.Linear(hidden_size, ffn_dim),
            "output_dense": nn.Linear(ffn_dim, hidden_size),
        })
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.activation_dropout(F.gelu(self.feed_forward["intermediate_dense"](hidden)))
        return self.dropout(self.feed_forward["output_dense"](inner))

    def forward(self, hidden: torch.Tensor, *, memory: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Update ``hidden`` ``(B, Tq, D)``.

        ``memory`` ``(B, Tm, D)``: this layer's inputs at earlier positions, put
        before ``hidden`` as extra keys/values. ``key_padding_mask``
        ``(B, Tm + Tq)`` and ``attn_mask`` ``(Tq, Tm + Tq)`` are True where
        attention is *blocked* (PyTorch's convention).
        """
        keys = hidden if memory is None else torch.cat([memory, hidden], dim=1)
        if self.layer_norm_first:
            query, keys = self.layer_norm(hidden), self.layer_norm(keys)
        else:
            query = hidden
        attended, _ = self.attention(query, keys, keys, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                     need_weights=False)
        hidden = hidden + self.dropout(attended)
        if self.layer_norm_first:
            return hidden + self._feed_forward(self.final_layer_norm(hidden))
        hidden = self.layer_norm(hidden)
        return self.final_layer_norm(hidden + self._feed_forward(hidden))


def make_layers(config: SpeechStudentConfig, count: int | None = None) -> nn.ModuleList:
    """``count`` (default ``config.num_layers``) transformer layers of the configured size."""
    return nn.ModuleList(
        SpeechTransformerLayer(config.hidden_size, config.num_heads, config.ffn_dim, dropout=config.dropout,
                               attention_dropout=config.attention_dropout,
                               activation_dropout=config.activation_dropout,
                               layer_norm_first=config.layer_norm_first, layer_norm_eps=config.layer_norm_eps)
        for _ in range(config.num_layers if count is None else count))


# --------------------------------------------------------------------------- teachers


def find_hf_speech_model(module: nn.Module) -> nn.Module | None:
    """The transformers WavLM/HuBERT/wav2vec 2.0 model inside a teacher wrapper, or None."""
    from transformers import HubertModel, Wav2Vec2Model, WavLMModel

    for candidate in module.modules():
        if isinstance(candidate, (WavLMModel, HubertModel, Wav2Vec2Model)):
            return candidate
    return None


def _teacher_config_value(teacher: Teacher, keys: Sequence[str]) -> int | None:
    """The first integer among ``keys`` in any transformers config inside the teacher."""
    for candidate in teacher.modules():
        config = getattr(candidate, "config", None)
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
    return None


def _probe_hidden_states(teacher: Teacher) -> tuple[torch.Tensor, ...]:
    """The teacher's hidden states on one second of silence (for teachers without a transformers config)."""
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    batch = {"waveform": torch.zeros(1, 16000, device=device), "waveform_lengths": torch.tensor([16000], device=device)}
    return tuple(teacher.signals(batch, HIDDEN_STATES_REQUEST).hidden_states or ())


def teacher_hidden_size(teacher: Teacher) -> int:
    """Width of the teacher's hidden states: from its transformers config, else by running it once on silence."""
    width = _teacher_config_value(teacher, ("hidden_size", "d_model"))
    if width is not None:
        return width
    hidden = _probe_hidden_states(teacher)
    if not hidden:
        raise KDUserError(f"The teacher {type(teacher).__name__} returned no hidden states; a speech student "
                          f"distils hidden layers, so pick a teacher that exposes them (e.g. 'wavlm').")
    return int(hidden[-1].shape[-1])


def copy_transformer_layer(target: SpeechTransformerLayer, source: nn.Module) -> None:
    """Fill ``target`` from a transformers HuBERT/WavLM/wav2vec2 encoder layer (WavLM's relative-position
    bias has no counterpart in the student and is left out, as DistilHuBERT does)."""
    attention = source.attention
    with torch.no_grad():
        target.attention.in_proj_weight.copy_(torch.cat(
            [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight], dim=0))
        target.attention.in_proj_bias.copy_(torch.cat(
            [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias], dim=0))
        target.attention.out_proj.load_state_dict(attention.out_proj.state_dict())
        target.layer_norm.load_state_dict(source.layer_norm.state_dict())
        target.feed_forward["intermediate_dense"].load_state_dict(
            source.feed_forward.intermediate_dense.state_dict())
        target.feed_forward["output_dense"].load_state_dict(source.feed_forward.output_dense.state_dict())
        target.final_layer_norm.load_state_dict(source.final_layer_norm.state_dict())


def init_from_teacher(front_end: SpeechFrontEnd, layers: Sequence[SpeechTransformerLayer], teacher: nn.Module,
                      mode: bool | Literal["auto"]) -> bool:
    """Copy the teacher's CNN, projection, positional conv, encoder layer norm and first ``len(layers)`` layers.

    Returns whether weights were copied. ``mode=True`` raises :class:`KDUserError`
    when the teacher is not a transformers WavLM/HuBERT model or the shapes differ;
    ``"auto"`` then keeps the random initialisation and says so in the log.
    """
    if mode is False:
        return False
    source = find_hf_speech_model(teacher)
    problem = None
    if source is None:
        problem = f"the teacher {type(teacher).__name__} holds no transformers WavLM/HuBERT/wav2vec2 model"
    elif getattr(source.config, "do_stable_layer_norm", False) != front_end.layer_norm_first:
        problem = ("the teacher's layer-norm placement (do_stable_layer_norm="
                   f"{source.config.do_stable_layer_norm}) differs from the student's layer_norm_first="
                   f"{front_end.layer_norm_first}")
    elif len(source.encoder.layers) < len(layers):
        problem = f"the teacher has {len(source.encoder.layers)} layers, fewer than the student's {len(layers)}"
    else:
        try:
            _copy_front_end_and_layers(front_end, layers, source)
        except (RuntimeError, AttributeError, KeyError) as error:
            problem = f"the shapes differ ({str(error).splitlines()[0]})"
    if problem is None:
        log.info("student initialised from the teacher: CNN, projection, positional conv and %d layer(s)", len(layers))
        return True
    if mode == "auto":
        log.info("student not initialised from the teacher (%s); random initialisation", problem)
        return False
    raise KDUserError(f"student.args.init_from_teacher is true, but {problem}. Set init_from_teacher to 'auto' "
                      f"or false, or use a WavLM/HuBERT teacher with the student's sizes.")


def _copy_front_end_and_layers(front_end: SpeechFrontEnd, layers: Sequence[SpeechTransformerLayer],
                               source: nn.Module) -> None:
    # Load into copies first so a shape error leaves the student untouched.
    import copy

    staged_front = copy.deepcopy(front_end)
    staged_front.feature_extractor.load_state_dict(source.feature_extractor.state_dict())
    staged_front.feature_projection.load_state_dict(source.feature_projection.state_dict())
    staged_front.pos_conv_embed.load_state_dict(source.encoder.pos_conv_embed.state_dict())
    staged_front.layer_norm.load_state_dict(source.encoder.layer_norm.state_dict())
    staged_layers = [copy.deepcopy(layer) for layer in layers]
    for staged, teacher_layer in zip(staged_layers, source.encoder.layers):
        copy_transformer_layer(staged, teacher_layer)
    front_end.load_state_dict(staged_front.state_dict())
    for layer, staged in zip(layers, staged_layers):
        layer.load_state_dict(staged.state_dict())


# --------------------------------------------------------------------------- teacher targets


def teacher_layers(signals: Signals, layers: Sequence[int]) -> list[torch.Tensor]:
    """The teacher hidden states for ``layers`` from a teacher answer.

    Teachers return either every layer (HF ``output_hidden_states`` layout,
    index = layer number) or only the requested ones, in order.
    """
    hidden = signals.hidden_states
    if hidden is None:
        raise KDUserError("The teacher returned no hidden states; GenDistiller/DistilHuBERT need a teacher "
                          "that exposes its hidden layers (e.g. 'wavlm', 'hubert', 'whisper-encoder').")
    if len(hidden) > max(layers):
        return [hidden[layer] for layer in layers]
    if len(hidden) == len(layers):
        return list(hidden)
    raise KDUserError(f"The student's target_layers {list(layers)} ask for teacher layers the teacher does not "
                      f"have (it returned {len(hidden)} hidden states, layer 0 = pre-transformer features). "
                      f"Choose student.args.target_layers between 0 and {len(hidden) - 1}.")


def align_frames(student_mask: torch.Tensor, teacher_mask: torch.Tensor | None, teacher_frames: int,
                 max_mismatch: int) -> tuple[int, torch.Tensor]:
    """Common frame count and mask of student and teacher outputs.

    CNN students and WavLM/HuBERT teachers with the same CNN produce equal
    frames; other teachers (Whisper: 20 ms frames from a mel front end) may
    differ by a frame or two at the end. Both are cropped to the shorter
    length; a larger per-utterance difference means the frame rates differ
    and is a configuration error.
    """
    student_valid = student_mask.sum(1)
    if teacher_mask is None:
        teacher_mask = torch.ones(student_mask.shape[0], teacher_frames, dtype=torch.bool, device=student_mask.device)
    teacher_mask = teacher_mask.to(student_mask.device).bool()
    difference = (student_valid - teacher_mask.sum(1)).abs().max()
    if int(difference) > max_mismatch:
        raise KDUserError(
            f"Student and teacher frame counts differ by {int(difference)} frames for one utterance (more than "
            f"method.max_frame_mismatch={max_mismatch}): their frame rates differ. Give the student a CNN "
            f"(student.args.conv_layers) with the teacher's hop (320 samples = 20 ms for WavLM/HuBERT/Whisper).")
    frames = min(student_mask.shape[1], teacher_mask.shape[1])
    return frames, student_mask[:, :frames] & teacher_mask[:, :frames]


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str, mask: torch.Tensor,
                cos_weight: float) -> torch.Tensor:
    """kdcore's hidden-state loss (the one source of that math), in fp32, on the first ``mask.shape[1]`` frames."""
    from kdcore.objectives import hidden_state_loss  # lazy: the objectives library is a separate component

    frames = mask.shape[1]
    return hidden_state_loss(student_hidden[:, :frames].float(), teacher_hidden[:, :frames].float(), kind,
                             mask=mask, cos_weight=cos_weight)


LossKind = Literal["l1", "mse", "cosine", "l1_logsigmoid_cos"]


class HiddenLossConfig(BaseModel):
    """The per-layer loss shared by the speech methods (DistilHuBERT's by default)."""

    model_config = ConfigDict(extra="forbid")

    loss: LossKind = Field("l1_logsigmoid_cos", description="kdcore.objectives.hidden_state_loss kind, per layer")
    cos_weight: NonNegativeFloat = Field(1.0, description="weight of the -log sigmoid(cos) term (DistilHuBERT: 1)")
    layer_weights: list[NonNegativeFloat] | None = Field(
        None, description="one weight per target layer (losses are summed); None: 1 each")
    max_frame_mismatch: int = Field(2, ge=0, description="allowed student/teacher frame-count difference")


def weighted_layer_losses(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                          layer_ids: Sequence[int], mask: torch.Tensor, config: HiddenLossConfig
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over layers of ``weight * hidden_state_loss``; parts are the unweighted per-layer losses."""
    weights = config.layer_weights if config.layer_weights is not None else [1.0] * len(layer_ids)
    if len(weights) != len(layer_ids):
        raise KDUserError(f"method.layer_weights has {len(weights)} entries but the student predicts "
                          f"{len(layer_ids)} teacher layers {list(layer_ids)}; give one weight per layer.")
    from kdcore.objectives import multi_layer_hidden_loss  # lazy: the objectives library is a separate component

    frames = mask.shape[1]
    # One autograd node for all layers (gradients produced in the forward pass): less memory than a graph per layer.
    total, per_layer = multi_layer_hidden_loss(
        [prediction[:, :frames] for prediction in predictions], [target[:, :frames] for target in targets],
        config.loss, mask=mask, cos_weight=config.cos_weight, layer_weights=weights)
    parts = {f"layer{layer}": float(value) for layer, value in zip(layer_ids, per_layer.detach())}
    return total, parts


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
        """What a method asks the teacher for: the target layers (plus whatever subclasses need)."""
        return SignalRequest(frozenset({Signal.HIDDEN_STATES}), tuple(self.target_layers))


def resolve_teacher_dim(config: SpeechStudentConfig, teacher: Teacher | None) -> int:
    """The teacher width a student must predict, from the config or the teacher."""
    if config.teacher_hidden_size is not None:
        if teacher is not None and (actual := teacher_hidden_size(teacher)) != config.teacher_hidden_size:
            raise KDUserError(
                f"student.args.teacher_hidden_size is {config.teacher_hidden_size}, but the teacher's hidden states "
                f"are {actual} wide: the student's prediction heads would not match the teacher. Set "
                f"student.args.teacher_hidden_size={actual} or leave it unset to take it from the teacher.")
        return config.teacher_hidden_size
    if teacher is None:
        raise KDUserError("Building a speech student needs the teacher's hidden size: no teacher was given, so "
                          "set student.args.teacher_hidden_size (e.g. 768 for WavLM/HuBERT Base).")
    return teacher_hidden_size(teacher)


def teacher_num_layers(teacher: Teacher) -> int:
    """Transformer layers of the teacher: from its transformers config, else by running it once on silence."""
    layers = _teacher_config_value(teacher, ("num_hidden_layers", "encoder_layers"))
    return layers if layers is not None else len(_probe_hidden_states(teacher)) - 1


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """``count`` distinct layers in 1..num_layers ending at the last: round(num_layers * k / count), k = 1..count."""
    count = min(count, num_layers)
    return sorted({max(1, round(num_layers * k / count)) for k in range(1, count + 1)})


def resolve_target_layers(config: SpeechStudentConfig, teacher: Teacher | None) -> list[int]:
    """The teacher layers a student predicts: the configured ones (checked against the teacher's depth when
    it is known) or, for ``target_layers: null``, evenly spaced ones (layers 4, 8, 12 of 12)."""
    depth = teacher_num_layers(teacher) if teacher is not None else None
    if config.target_layers is None:
        if depth is None:
            raise KDUserError("student.args.target_layers is null (automatic) but no teacher is known to read its "
                              "depth from; list the teacher layers to predict, e.g. [4, 8, 12].")
        return evenly_spaced_layers(depth, config.num_targets)
    if depth is not None and max(config.target_layers) > depth:
        raise KDUserError(
            f"student.args.target_layers {config.target_layers} asks for layer {max(config.target_layers)}, "
            f"but the teacher has {depth} transformer layers (valid: 0..{depth}, 0 = pre-transformer); "
            f"or set target_layers: null to pick {config.num_targets} evenly spaced ones.")
    return list(config.target_layers)


def frame_signals(hidden_states: Sequence[torch.Tensor], frame_mask: torch.Tensor, **extra: Any) -> Signals:
    """``Signals`` with hidden states and the frame mask, as speech teachers return them."""
    return Signals(hidden_states=tuple(hidden_states), extra={"frame_mask": frame_mask, **extra})


#: transformers ``WavLMConfig`` arguments of WavLM Base+ (microsoft/wavlm-base-plus): the paper presets build
#: the teacher from this with random weights, so parameter counts come out right without downloading anything.
WAVLM_BASE_PLUS_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "feat_extract_norm": "group",
    "do_stable_layer_norm": False, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "num_buckets": 320, "max_bucket_distance": 800, "layer_norm_eps": 1e-5,
}

#: DistilHuBERT's training recipe (s3prl distiller config): 200k updates, batch 24, lr 2e-4, 7% warm-up, linear decay.
PAPER_TRAINER: dict[str, Any] = {"max_steps": 200000, "batch_size": 24, "lr": 2e-4, "warmup_steps": 14000,
                                 "schedule": "linear", "weight_decay": 0.0}


__all__ = [
    "PAPER_TRAINER", "WAVLM_BASE_PLUS_CONFIG",
    "DEFAULT_CONV_LAYERS", "HiddenLossConfig", "SpeechFrontEnd", "SpeechStudent", "SpeechStudentConfig",
    "SpeechTransformerLayer", "align_frames", "conv_output_lengths", "copy_transformer_layer",
    "find_hf_speech_model", "frame_signals", "hidden_loss", "init_from_teacher", "lengths_to_mask", "make_layers",
    "resolve_target_layers", "resolve_teacher_dim", "teacher_hidden_size", "teacher_layers", "teacher_num_layers",
    "evenly_spaced_layers", "weighted_layer_losses", "HIDDEN_STATES_REQUEST",
]
