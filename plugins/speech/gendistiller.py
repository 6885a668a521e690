"""GenDistiller (Gao, Zhang, Deng and Feng; arXiv 2310.13418, 2406.09444): generate the teacher's layers.

A small student *generates* the chosen teacher layers (e.g. 4, 8, 12) one
after another. It has DistilHuBERT's front end (shared code, see
:mod:`kd_plugins.speech.student_base`) and a generator: transformer layers over a
sequence of (layer, time) positions, block by block::

    block 0 input: the front-end features x0        -> predicts teacher layer 4
    block 1 input: teacher layer 4 (or its prediction) -> predicts layer 8
    block 2 input: teacher layer 8 (or its prediction) -> predicts layer 12

Each block's input gets a learned layer embedding (which layer to produce).
Attention is causal across layers and full across time: position (l, t) may
attend to (l', t') iff l' <= l (the current block sees itself fully, because
its input - the previous layer - is known in full; ``current_block_attention:
same_time`` restricts it to (l, t) itself). The prediction of a block is
``skip + output_projection(generator output)`` where ``skip`` is the block's
input in teacher space: the generator learns what a layer adds to the previous
one (the paper's skip connection plus output projection).

Inference generates autoregressively: block l reads the student's own
prediction of the previous layer and attends to the cached inputs of blocks
< l at every generator layer. Training (``method.train_inputs``) runs that
same generation by default (``generated``: the loss back-propagates through
the generated inputs into the blocks before, and the logged ``sampling_prob``
is 1.0, every input being the student's own); ``teacher``, the paper's
teacher forcing and the paper presets' choice, feeds the teacher's layers in
one parallel pass with the block-causal mask, optionally with scheduled
sampling. Fed the same inputs, generation and teacher forcing give the same
result (tests/speech_students/test_gendistiller.py). Assumptions where the
paper is silent, and every deviation from it: docs/speech-methods.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, PositiveInt, model_validator
from torch import nn

from kdcore.interfaces import Batch, Comparison, Teacher
from kdcore.signals import SignalRequest, Signals
from kd_plugins.speech.layer_method import LayerMethodConfig, TeacherLayerMethod, paper_presets
from kd_plugins.speech.speech_signals import align_frames, frame_signals
from kd_plugins.speech.student_base import SpeechStudent, SpeechStudentConfig, SpeechStudentFactory
from kd_plugins.speech.teacher_init import init_from_teacher
from kd_plugins.speech.teacher_shape import find_hf_speech_model
from kd_plugins.speech.transformer_layer import make_layers

CurrentBlockAttention = Literal["full", "same_time"]


def block_causal_mask(num_blocks: int, frames: int, current_block: CurrentBlockAttention = "full",
                      device: torch.device | None = None) -> torch.Tensor:
    """``(num_blocks * frames)``-square bool matrix, True where query (l, t) may attend to key (l', t').

    Positions are ordered block-major: index ``l * frames + t``. Allowed iff
    ``l' < l``, or ``l' == l`` and (``current_block == "full"`` or ``t' == t``).
    """
    block = torch.arange(num_blocks * frames, device=device) // frames
    time = torch.arange(num_blocks * frames, device=device) % frames
    earlier = block[None, :] < block[:, None]
    same_block = block[None, :] == block[:, None]
    if current_block == "full":
        return earlier | same_block
    return earlier | (same_block & (time[None, :] == time[:, None]))


def attention_masks(allowed: torch.Tensor, key_valid: torch.Tensor, num_heads: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(attn_mask, key_padding_mask)`` for ``nn.MultiheadAttention`` (True = blocked) from the allowed
    ``(Tq, Tk)`` pattern and the valid keys ``(B, Tk)``.

    A query left with no valid key (a padding frame that may only see itself,
    with ``same_time``) would give an all ``-inf`` softmax row, i.e. NaN that
    then leaks through the values; such rows may see every key instead. Their
    outputs are padding and never scored.
    """
    merged = allowed[None] & key_valid[:, None, :]
    empty = ~merged.any(-1, keepdim=True)
    if not bool(empty.any()):
        return ~allowed, ~key_valid
    return (~(merged | empty)).repeat_interleave(num_heads, 0), None


class GenDistillerStudentConfig(SpeechStudentConfig):
    """GenDistiller student: the shared front end and a block-causal generator over the target layers."""

    num_layers: PositiveInt = Field(1, description="generator transformer layers")
    ffn_dim: PositiveInt = Field(2304, description="generator feed-forward width (see docs/speech-methods.md)")
    skip_connection: bool = Field(True, description="prediction = block input + output projection (paper)")
    layer_embeddings: bool = Field(True, description="add a learned embedding of the layer being generated")
    current_block_attention: CurrentBlockAttention = Field(
        "full", description="'full': (l,t) sees all of block l; 'same_time': only (l,t) in its own block")
    expose_front_end: bool = Field(
        True, description="forward_signals also returns the front-end features as layer 0 (when widths match)")

    @model_validator(mode="after")
    def _check_generated(self) -> "GenDistillerStudentConfig":
        if self.target_layers is not None and self.target_layers[0] == 0:
            raise ValueError("GenDistiller generates transformer layers: target_layers must start above 0")
        return self


class GenDistillerStudent(SpeechStudent):
    """Front end + generator of the teacher's target layers, block by block."""

    def __init__(self, config: GenDistillerStudentConfig, teacher_dim: int,
                 target_layers: Sequence[int] | None = None) -> None:
        super().__init__(config, teacher_dim, target_layers)
        if self.target_layers[0] == 0:
            raise ValueError("GenDistiller generates transformer layers: target_layers must start above 0")
        self.config: GenDistillerStudentConfig = config
        hidden = config.hidden_size
        self.generator = make_layers(config)
        self.layer_embedding = nn.Embedding(len(self.target_layers), hidden) if config.layer_embeddings else None
        widths_match = teacher_dim == hidden
        # Teacher layers enter the generator through input_projection; x0 enters teacher space through
        # skip_projection. Both are identities at the paper's sizes (768 = 768) and cost no parameters.
        self.input_projection: nn.Module = nn.Identity() if widths_match else nn.Linear(teacher_dim, hidden)
        self.skip_projection: nn.Module = (nn.Identity() if widths_match or not config.skip_connection
                                           else nn.Linear(hidden, teacher_dim))
        self.output_projection = nn.Linear(hidden, teacher_dim)

    @property
    def num_blocks(self) -> int:
        return len(self.target_layers)

    def initialise_from(self, teacher: Teacher) -> None:
        """The generator's layers start as the teacher's first layers (DistilHuBERT's initialisation) when their
        shapes match; otherwise the front end alone is copied, so both methods start from the teacher's CNN."""
        # At the paper sizes the generator's FFN (2304) is narrower than a Base teacher's (3072).
        mode = self.config.init_from_teacher
        if find_hf_speech_model(teacher) is None:  # a Whisper teacher gives its layers or nothing
            init_from_teacher(self.front_end, self.generator, teacher, mode)
            return
        copied = init_from_teacher(self.front_end, self.generator, teacher, "auto" if mode is not False else False)
        if not copied and mode is not False:
            init_from_teacher(self.front_end, [], teacher, mode)

    # ----------------------------------------------------------------------- one block's input and output

    def _block_input(self, index: int, front_end: torch.Tensor, previous: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator input of block ``index`` and its skip source (teacher space)."""
        if index == 0:
            block, skip = front_end, self.skip_projection(front_end)
        else:
            assert previous is not None
            block, skip = self.input_projection(previous), previous
        if self.layer_embedding is not None:
            block = block + self.layer_embedding.weight[index]
        return block, skip

    def _block_output(self, generated: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        prediction = self.output_projection(generated)
        return prediction + skip if self.config.skip_connection else prediction

    # ----------------------------------------------------------------------- the two ways to run it

    def teacher_forced(self, front_end: torch.Tensor, frame_mask: torch.Tensor,
                       previous_layers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Predictions of all target layers in one pass, given the inputs of blocks 1.. (``previous_layers``:
        the teacher's layers when training with ``train_inputs: teacher``, or any other choice of inputs,
        ``(B, T, teacher_dim)`` each)."""
        if len(previous_layers) != self.num_blocks - 1:
            raise ValueError(f"{self.num_blocks - 1} previous layers expected, got {len(previous_layers)}")
        frames = front_end.shape[1]
        blocks, skips = zip(*(self._block_input(index, front_end, previous_layers[index - 1] if index else None)
                              for index in range(self.num_blocks)))
        hidden = torch.cat(blocks, dim=1)
        allowed = block_causal_mask(self.num_blocks, frames, self.config.current_block_attention, hidden.device)
        attn_mask, padding = attention_masks(allowed, frame_mask.repeat(1, self.num_blocks), self.config.num_heads)
        for layer in self.generator:
            hidden = layer(hidden, key_padding_mask=padding, attn_mask=attn_mask)
        return [self._block_output(generated, skip)
                for generated, skip in zip(hidden.split(frames, dim=1), skips)]

    def generate(self, front_end: torch.Tensor, frame_mask: torch.Tensor,
                 teacher_inputs: list[torch.Tensor] | None = None, use_teacher: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
        """Autoregressive generation of all target layers.

        Block ``l`` attends, at each generator layer, to that layer's cached
        inputs of blocks ``< l`` (a cache of layer inputs: keys/values are
        re-projected from it, which costs little for a handful of blocks).
        With ``teacher_inputs`` and ``use_teacher`` ``(B, num_blocks - 1)``
        bool, utterance ``b`` takes the teacher's layer as input of block
        ``l + 1`` where ``use_teacher[b, l]`` (scheduled sampling).
        """
        frames = front_end.shape[1]
        # Rows of the full mask that belong to one block: what block l's queries may see of blocks 0..l.
        allowed_all = block_causal_mask(self.num_blocks, frames, self.config.current_block_attention,
                                        front_end.device)
        memory: list[torch.Tensor | None] = [None] * len(self.generator)
        predictions: list[torch.Tensor] = []
        for index in range(self.num_blocks):
            previous = None
            if index:
                previous = predictions[-1]
                if teacher_inputs is not None and use_teacher is not None:
                    choose = use_teacher[:, index - 1].to(previous.device)[:, None, None]
                    previous = torch.where(choose, teacher_inputs[index - 1].to(previous.dtype), previous)
            hidden, skip = self._block_input(index, front_end, previous)
            allowed = allowed_all[index * frames:(index + 1) * frames, :(index + 1) * frames]
            attn_mask, key_padding = attention_masks(allowed, frame_mask.repeat(1, index + 1), self.config.num_heads)
            for layer_index, layer in enumerate(self.generator):
                layer_input = hidden
                hidden = layer(hidden, memory=memory[layer_index], key_padding_mask=key_padding, attn_mask=attn_mask)
                cached = memory[layer_index]
                memory[layer_index] = layer_input if cached is None else torch.cat([cached, layer_input], dim=1)
            predictions.append(self._block_output(hidden, skip))
        return predictions

    # ----------------------------------------------------------------------- Model API

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        """The generated layers (autoregressive, as deployed), preceded by the front-end features when their
        width equals the teacher's, and ``frame_mask``; ``extra["teacher_layers"]`` names each entry."""
        front_end, frame_mask = self.features(batch)
        generated = self.generate(front_end, frame_mask)
        if self.config.expose_front_end and front_end.shape[-1] == generated[0].shape[-1]:
            return frame_signals([front_end, *generated], frame_mask, teacher_layers=(0, *self.target_layers))
        return frame_signals(generated, frame_mask, teacher_layers=tuple(self.target_layers))


class GenDistillerStudentFactory(SpeechStudentFactory):
    """Builds a GenDistiller student sized for the run's teacher, initialised from it when possible."""

    name: ClassVar[str] = "gendistiller-student"
    description: ClassVar[str] = ("GenDistiller student: HuBERT CNN front end + block-causal generator of the "
                                  "teacher's layers")
    Config: ClassVar[type[BaseModel]] = GenDistillerStudentConfig
    student_class: ClassVar[type[SpeechStudent]] = GenDistillerStudent


TrainInputs = Literal["teacher", "generated"]


class GenDistillerConfig(LayerMethodConfig):
    """What blocks 1.. read in training, and the scheduled-sampling schedule."""

    # 'generated' by default: on the embedded superb default, teacher forcing left a gap between the layers the
    # student learns from (the teacher's) and the ones it generates from when deployed (its own); training on
    # its own generation closed most of the keyword gap to distilhubert (docs/speech.md, assumption 9). The
    # paper presets keep teacher forcing.
    train_inputs: TrainInputs = Field(
        "generated", description="inputs of blocks 1.. in training: 'generated' = the student's own generated "
                                 "layers with gradients through them (the computation that is deployed), "
                                 "'teacher' = the teacher's layers (teacher forcing, the paper; see sampling_*)")

    sampling_start: float = Field(0.0, ge=0.0, le=1.0,
                                  description="probability of feeding the student's own previous layer at step 0")
    sampling_end: float = Field(0.0, ge=0.0, le=1.0, description="... at the last step")
    sampling_schedule: Literal["constant", "linear"] = Field(
        "linear", description="'linear': from sampling_start to sampling_end; 'constant': sampling_start")

    @model_validator(mode="after")
    def _sampling_needs_teacher_inputs(self) -> "GenDistillerConfig":
        if self.train_inputs == "generated" and (self.sampling_start or self.sampling_end):
            raise ValueError("scheduled sampling mixes teacher and generated inputs, so it needs train_inputs "
                             "'teacher' (with train_inputs 'generated' every input is already generated); set "
                             "method.train_inputs=teacher or leave sampling_start/sampling_end at 0")
        return self


#: The paper-sized student for a WavLM Base+/HuBERT Base teacher (<= 16.4M, docs/speech-methods.md).
PAPER_STUDENT_ARGS: dict[str, Any] = {"hidden_size": 768, "num_layers": 1, "num_heads": 12, "ffn_dim": 2304,
                                      "target_layers": [4, 8, 12], "init_from_teacher": True}


class GenDistillerMethod(TeacherLayerMethod):
    """Each generated layer against its target teacher layer. By default (``train_inputs: generated``) the layers
    are generated as deployed, with gradients through the generated inputs; ``train_inputs: teacher`` (the paper,
    the paper presets) teacher-forces them, optionally with scheduled sampling."""

    name: ClassVar[str] = "gendistiller"
    description: ClassVar[str] = ("GenDistiller (Gao et al. 2023): a small student generates the teacher's layers "
                                  "autoregressively (causal across layers, full across time)")
    Config: ClassVar[type[BaseModel]] = GenDistillerConfig
    student_factory = GenDistillerStudentFactory
    speech_student: GenDistillerStudent
    # Sized for the superb task's default teacher (Whisper tiny.en encoder, 384 wide): two generator layers with a
    # narrow FFN (the width), 2.83M parameters, 36% below the default DistilHuBERT (4.45M) as the papers' 33%.
    # Depth over FFN width: measured against one layer with FFN 1152 (2.53M) and 2 x 576 (docs/speech.md,
    # assumption 10).
    default_student_args: ClassVar[dict[str, Any]] = {"num_layers": 2, "ffn_dim": 384}
    presets: ClassVar[dict[str, dict[str, Any]]] = paper_presets(GenDistillerStudentFactory.name, PAPER_STUDENT_ARGS,
                                                                 method={"train_inputs": "teacher"})

    def sampling_probability(self, step: int) -> float:
        """Probability that a block's input is the student's own previous layer at ``step``."""
        config = self.config
        if config.sampling_schedule == "constant" or self.total_steps <= 1:
            return config.sampling_start
        progress = min(1.0, step / (self.total_steps - 1))
        return config.sampling_start + (config.sampling_end - config.sampling_start) * progress

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Teacher forcing (or, with ``train_inputs: generated``, generation as deployed, differentiated end
        to end); each block's prediction meets its teacher layer."""
        student = self.speech_student
        targets, teacher_mask = self.teacher_targets(batch)
        front_end, student_mask = student.features(batch)
        frames, mask = align_frames(student_mask, teacher_mask, targets[0].shape[1], self.config.max_frame_mismatch)
        # The generator runs on the common frames; the teacher's inputs must have the student's time axis.
        front_end = front_end[:, :frames]
        if self.config.train_inputs == "generated":
            return self.comparison(student.generate(front_end, mask), targets, mask, {"sampling_prob": 1.0})
        inputs = [target[:, :frames].to(front_end.dtype) for target in targets[:-1]]
        probability = self.sampling_probability(step)
        if probability > 0 and inputs:
            own = torch.rand(front_end.shape[0], len(inputs), device=front_end.device) < probability
            with torch.no_grad():
                generated = student.generate(front_end.detach(), mask, inputs, use_teacher=~own)
            inputs = [torch.where(own[:, index, None, None], generated[index], teacher)
                      for index, teacher in enumerate(inputs)]
        predictions = student.teacher_forced(front_end, mask, inputs)
        return self.comparison(predictions, targets, mask, {"sampling_prob": probability})


__all__ = [
    "GenDistillerConfig", "GenDistillerMethod", "GenDistillerStudent", "GenDistillerStudentConfig",
    "GenDistillerStudentFactory", "attention_masks", "block_causal_mask",
]
