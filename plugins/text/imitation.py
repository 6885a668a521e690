"""ImitKD (Lin et al., EMNLP 2020): distillation of an autoregressive model as imitation learning.

The student is trained on prefixes it generated itself and the teacher says what
the next token should be on those prefixes, so the student learns to recover
from its own mistakes (exposure bias). One training step (docs/text.md has the box):

1. β ← schedule(t, T)                       (exponential base^(−t/T) by default)
2. for each sequence i of the batch: keep the data target with probability β,
   otherwise replace it by the student's own output ŷ_i (greedy or top-k
   sampling, batched, no_grad, KV cache, student in eval mode)
3. teacher and student read every prefix ŷ_<t (teacher forcing on the mixed targets)
   * full: the teacher's next-token distribution is compared with the student's
     (default objective: forward KL)
   * hard: the targets are the teacher's argmax tokens (default objective: NLL on them)
4. the configured objectives compute the loss; back-propagate through the student only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Comparison, Student, Task, Teacher, WeightedObjective
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX, Signal, Signals, SparseLogits, request
from kd_plugins.text.baselines import SeqKDConfig, TeacherSequences
from kd_plugins.text.generation import Generated, Strategy, generate, generation_length_limit, longest_target
from kd_plugins.text.method import TextMethod, merge_rows, take_rows
from kd_plugins.text.models import HFTextModel
from kd_plugins.text.schedules import BetaSchedule

log = logging.getLogger(__name__)


#: Generation cap when neither method.generation.max_new_tokens nor the task's data.max_target_tokens gives one.
DEFAULT_MAX_NEW_TOKENS = 128


class StudentGeneration(BaseModel):
    """How the student decodes the sequences that replace data targets."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field("greedy", description="greedy or top_k sampling")
    top_k: int = Field(5, ge=1, description="top_k: candidates per step")
    temperature: float = Field(1.0, gt=0.0, description="top_k: softmax temperature")
    max_new_tokens: int | None = Field(
        None, ge=1, description="hard cap on generated tokens; null: the task's longest training target "
                                "(data.max_target_tokens), else 128")
    max_length_ratio: float | None = Field(
        2.0, gt=0.0, description="also cap at ratio x the longest data target of the batch, plus max_length_offset "
                                 "(null: only max_new_tokens)")
    max_length_offset: int = Field(5, ge=0)
    with_dropout: bool = Field(False, description="generate in train mode (dropout on); the authors' default is off")

    def limit(self, data_labels: torch.Tensor) -> int:
        """Generation length cap for a batch whose data targets are ``data_labels``."""
        return generation_length_limit(longest_target(data_labels), self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                       self.max_length_ratio, self.max_length_offset)


@dataclass
class MixedBatch:
    """A batch whose targets are a β-mixture of data and student outputs."""

    # input_ids, attention_mask, labels (the mixed sequences, -100 padded). Seq2seq: the sources are
    # unchanged and labels are the mixed targets; causal LMs: rows are rebuilt as prompt + target,
    # right-padded, labels aligned with input_ids (-100 on the prompt).
    batch: dict[str, Any]
    replaced: torch.Tensor  # (B,) bool: True where the student's output replaced the data target
    beta: float
    generated_length: float  # mean length of the student's outputs (0 when none were generated)


class ImitationConfig(BaseModel):
    """Options of the ``imitation`` plugin (``method.*`` keys); how the two sides are compared is ``objectives``."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["hard", "full"] = Field(
        "full", description="full: the teacher's distribution on the mixed prefixes; hard: the teacher's argmax "
                            "tokens (the labels, and a one-hot teacher distribution)")
    schedule: BetaSchedule = Field(default_factory=BetaSchedule)
    generation: StudentGeneration = Field(default_factory=StudentGeneration)
    hard_data_targets: Literal["data", "teacher"] = Field(
        "data", description="hard variant, sequences that keep their data target: train on the data tokens (as the "
                            "authors' code) or on the teacher's argmax")
    targets_from: Literal["data", "teacher_outputs"] = Field(
        "data", description="what the 'data' sequences are: the task's targets (ImitKD) or the teacher's beam-search "
                            "outputs, generated once per example and cached as seq-kd's (ImitKD*)")
    teacher_outputs: SeqKDConfig = Field(
        default_factory=SeqKDConfig, description="targets_from: teacher_outputs: how the teacher decodes them (seq-kd's "
                                                 "options)")

    @model_validator(mode="after")
    def _hard_options_need_the_hard_variant(self) -> "ImitationConfig":
        if self.variant == "full" and self.hard_data_targets != "data":
            raise ValueError("hard_data_targets chooses the hard variant's targets on kept sequences; with variant "
                             "'full' there are none. Set variant: hard, or leave hard_data_targets at 'data'.")
        if self.targets_from == "data" and self.teacher_outputs != SeqKDConfig():
            raise ValueError("teacher_outputs sets how the teacher decodes the sequences that replace the data, but "
                             "targets_from is 'data' (the task's targets are used). Set targets_from: "
                             "teacher_outputs (ImitKD*, --preset imitkd-star), or remove teacher_outputs.")
        return self


def one_hot_teacher(targets: torch.Tensor, vocab_size: int) -> Signals:
    """The teacher as its hard decisions: probability 1 on each target token (``targets`` aligned with the logits).

    A divergence to it is the NLL of the targets; ignored positions (-100) point at token 0 and are masked by the
    labels.
    """
    ids = targets.clamp_min(0).unsqueeze(-1)
    return Signals(logits=SparseLogits(torch.zeros(ids.shape, device=ids.device), ids, vocab_size))


def student_generate(student: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     options: StudentGeneration, max_new_tokens: int,
                     generator: torch.Generator | None = None) -> Generated:
    """The student's own outputs for a batch of sources, without gradients and (by default) without dropout."""
    was_training = student.training
    student.train(options.with_dropout)
    try:
        return generate(student, input_ids, attention_mask, strategy=options.strategy, top_k=options.top_k,
                        temperature=options.temperature, max_new_tokens=max_new_tokens, generator=generator)
    finally:
        student.train(was_training)


def _split_causal_row(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """(tokens, labels) of one right-padded causal-LM row, and its prompt (tokens before the first target)."""
    attended = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    row_labels = labels[:attended.shape[0]] if attention_mask is None else labels[attention_mask.bool()]
    targets = (row_labels != IGNORE_INDEX).nonzero()
    prompt_length = int(targets[0]) if targets.numel() else attended.shape[0]
    return attended.tolist(), row_labels.tolist(), attended[:prompt_length].tolist()


def mix_causal_batch(student: HFTextModel, batch: Batch, rows: torch.Tensor, options: StudentGeneration,
                     generator: torch.Generator | None) -> tuple[dict[str, Any], float]:
    """Decoder-only ImitKD: replace the targets of ``rows`` by the student's continuation of their prompts.

    The prompt of a row is its attended tokens before the first label that is not -100.
    Returns the rebuilt right-padded batch (labels aligned with input_ids, -100 on
    prompts and padding) and the mean generated length.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    device = input_ids.device
    split = [_split_causal_row(input_ids[i], None if attention_mask is None else attention_mask[i], labels[i])
             for i in range(input_ids.shape[0])]
    tokens = [row[0] for row in split]
    row_labels = [row[1] for row in split]
    chosen = rows.tolist()
    generated_length = 0.0
    if chosen:
        prompts = [split[i][2] for i in chosen]
        prompt_ids = pad_rows(prompts, student.pad_token_id, left=True, device=device)
        prompt_mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True, device=device)
        generated = student_generate(student, prompt_ids, prompt_mask, options, options.limit(labels[rows]), generator)
        for index, prompt, continuation in zip(chosen, prompts, generated.to_lists()):
            tokens[index] = prompt + continuation
            row_labels[index] = [IGNORE_INDEX] * len(prompt) + continuation
        generated_length = float(generated.lengths.float().mean())
    mixed = {"input_ids": pad_rows(tokens, student.pad_token_id, device=device),
             "attention_mask": pad_rows([[1] * len(t) for t in tokens], 0, device=device),
             "labels": pad_rows(row_labels, IGNORE_INDEX, device=device)}
    return mixed, generated_length


class ImitationKD(TextMethod):
    """ImitKD: teacher and student meet on a β-mixture of data and student-generated prefixes."""

    name: ClassVar[str] = "imitation"
    description: ClassVar[str] = ("ImitKD (Lin et al. 2020): student-generated prefixes, teacher next-token targets "
                                  "(hard or full), β schedule")
    Config: ClassVar[type[BaseModel]] = ImitationConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "hard": {"method": {"variant": "hard"}, "objectives": {"kd": {"name": "nll"}}},
        "full": {"method": {"variant": "full"}, "objectives": {"kd": {"name": "forward_kl"}}},
        "summarization": {"method": {"schedule": {"kind": "exponential", "base": 10.0}}},
        "on-policy": {"method": {"schedule": {"kind": "constant", "value": 0.0}}},
        # ImitKD* as the authors' configs/wmt/imitkdstar*.yaml run it: the teacher's beam-5 outputs (at most 100
        # tokens) are the data, β = 2^(-t/T), the student's greedy rollouts capped at a fixed 100 tokens.
        "imitkd-star": {"method": {"variant": "hard", "targets_from": "teacher_outputs",
                                   "schedule": {"kind": "exponential", "base": 2.0},
                                   "teacher_outputs": {"num_beams": 5, "max_new_tokens": 100, "max_length_ratio": None},
                                   "generation": {"max_new_tokens": 100, "max_length_ratio": None}},
                        "objectives": {"kd": {"name": "nll"}}},
        "imitkd-star-full": {"method": {"variant": "full", "targets_from": "teacher_outputs",
                                        "schedule": {"kind": "exponential", "base": 2.0},
                                        "teacher_outputs": {"num_beams": 5, "max_new_tokens": 100,
                                                            "max_length_ratio": None},
                                        "generation": {"max_new_tokens": 100, "max_length_ratio": None}},
                             "objectives": {"kd": {"name": "forward_kl"}}},
    }

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        assert isinstance(config, ImitationConfig)
        self.config: ImitationConfig = config
        if self.text_teacher.is_encoder_decoder != self.text_student.is_encoder_decoder:
            raise KDUserError("plugin 'imitation' needs a teacher and a student of the same kind: both encoder-decoder "
                              "('seq2seq') or both decoder-only ('causal-lm'); the teacher reads the student's prefixes "
                              "in the student's batch layout.")
        # A null exponential base is the task's (wmt 200, summarization 10): one default per task, and
        # the other plugins' configs stay free of ImitKD keys.
        self.schedule = config.schedule.for_task(task)
        if self.schedule.kind == "exponential":
            log.info("ImitKD β schedule: %g^(-t/T)%s.", self.schedule.base,
                     "" if config.schedule.base is not None else f" (task '{getattr(task, 'name', '?')}' default)")
        if config.generation.max_new_tokens is None:
            # Training targets are truncated to the task's data.max_target_tokens, so a generated sequence longer
            # than that trains the student on something no data target has; for summarization (48) this also
            # halves the cost of generating for a student that has not yet learnt to stop (2 x 48 + 5 otherwise).
            task_cap = getattr(getattr(task, "data_config", None), "max_target_tokens", None)
            config.generation.max_new_tokens = task_cap or DEFAULT_MAX_NEW_TOKENS
            log.info("ImitKD generation: at most %d new tokens (%s).", config.generation.max_new_tokens,
                     "the task's data.max_target_tokens" if task_cap else "default")
        # None: draw from torch's global RNG, which the engine seeds and checkpoints (resumable runs).
        self.generator: torch.Generator | None = None
        self.teacher_sequences = (TeacherSequences(self.text_teacher, task, config.teacher_outputs,
                                                   "plugin 'imitation' (method.targets_from: teacher_outputs)")
                                  if config.targets_from == "teacher_outputs" else None)
        if self.teacher_sequences is not None and not self.text_teacher.is_encoder_decoder:
            raise KDUserError("method.targets_from: teacher_outputs decodes with encoder-decoder teachers only "
                              "(teacher 'seq2seq'), as seq-kd does.")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        # Only the objective: the Config's own defaults apply to method.*, so that a task's defaults
        # (e.g. summarization's schedule base 10) are not overridden.
        return {"objectives": {"kd": {"name": "forward_kl"}}}

    def beta(self, step: int) -> float:
        """β_t for 0-based optimiser step ``step``."""
        return self.schedule.beta(step, self.total_steps)

    def replacement_mask(self, batch_size: int, beta: float) -> torch.Tensor:
        """Per sequence, True (replace by the student's output) with probability 1 − β."""
        draws = torch.rand(batch_size, generator=self.generator)
        return draws >= beta

    def prepare(self, batch: Batch, step: int) -> MixedBatch:
        """Steps 1-2 of the box: β_t, the per-sequence coin flips, and the student's replacement targets."""
        config, student = self.config, self.text_student
        if self.teacher_sequences is not None:  # ImitKD*: the teacher's outputs stand in for the data targets
            batch = {**batch, "labels": self.teacher_sequences.targets(batch)[0]}
        input_ids, attention_mask, data_labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        beta = self.beta(step)
        replaced = self.replacement_mask(data_labels.shape[0], beta).to(data_labels.device)
        rows = replaced.nonzero().squeeze(1)
        if not student.is_encoder_decoder:
            mixed, generated_length = mix_causal_batch(student, batch, rows, config.generation, self.generator)
            return MixedBatch(mixed, replaced, beta, generated_length)
        sequence_labels = data_labels
        generated_length = 0.0
        if rows.numel():
            sources = take_rows(batch, rows, ("input_ids", "attention_mask"))
            generated = student_generate(student, sources["input_ids"], sources["attention_mask"], config.generation,
                                         config.generation.limit(data_labels[rows]), self.generator)
            sequence_labels = merge_rows(data_labels, rows, generated.labels())
            generated_length = float(generated.lengths.float().mean())
        # Only the sequences go in: each model derives its decoder inputs by its own right shift.
        mixed = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": sequence_labels}
        return MixedBatch(mixed, replaced, beta, generated_length)

    def hard_targets(self, mixed: MixedBatch) -> torch.Tensor:
        """Step 3, hard variant: the teacher's argmax at every target position of the chosen rows.

        The result is aligned with the logits (``model.target_labels``): for seq2seq
        that is the labels' layout, for causal LMs the labels shifted by one.
        """
        aligned = self.text_student.target_labels(mixed.batch)
        if self.config.hard_data_targets == "data":
            rows = mixed.replaced.nonzero().squeeze(1)
        else:
            rows = torch.arange(aligned.shape[0], device=aligned.device)
        targets = aligned.clone()
        if rows.numel():
            teacher_batch = take_rows(mixed.batch, rows, ("input_ids", "labels", "attention_mask"))
            teacher_logits = self.text_teacher.signals(teacher_batch, request(Signal.LOGITS)).logits  # type: ignore[attr-defined]
            kept = aligned[rows] != IGNORE_INDEX
            targets[rows] = torch.where(kept, teacher_logits.argmax(dim=-1), aligned[rows])
        return targets

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Steps 1-3: teacher and student on the mixed prefixes (hard: with the teacher's argmax as the targets)."""
        mixed = self.prepare(batch, step)
        parts = {"beta": mixed.beta, "replaced_fraction": float(mixed.replaced.float().mean()),
                 "generated_length": mixed.generated_length}
        if self.config.variant == "full":
            return self.meet(mixed.batch, parts)
        targets = self.hard_targets(mixed)
        teacher = one_hot_teacher(targets, self.text_teacher.vocab_size) if self.teacher_request().signals else Signals()
        return self.meet(mixed.batch, parts, labels=targets, teacher_signals=teacher)


__all__ = ["ImitationConfig", "ImitationKD", "MixedBatch", "StudentGeneration", "mix_causal_batch", "one_hot_teacher",
           "student_generate"]
