"""ImitKD (Lin et al., EMNLP 2020): distillation of an autoregressive model as imitation learning.

The student is trained on prefixes it generated itself and the teacher says what
the next token should be on those prefixes, so the student learns to recover
from its own mistakes (exposure bias). One training step (docs/text.md has the box):

1. β ← schedule(t, T)                       (exponential base^(−t/T) by default; DistiLLM's
                                             adaptive schedule raises 1 − β after worse validations)
2. for each sequence i of the batch: keep the data target with probability β,
   otherwise replace it by the student's own output ŷ_i (greedy, top-k or
   full-vocabulary sampling, batched, no_grad, KV cache, student in eval mode);
   with ``method.replay``, a stored earlier output of the same example stands in
   for a fresh one with probability ``reuse`` (DistiLLM's off-policy replay)
3. teacher and student read every prefix ŷ_<t (teacher forcing on the mixed targets)
   * full: the teacher's next-token distribution is compared with the student's
     (default objective: forward KL)
   * hard: the targets are the teacher's argmax tokens (default objective: NLL on them)
4. the configured objectives compute the loss; back-propagate through the student only.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
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
from kd_plugins.text.schedules import AdaptiveFraction, BetaSchedule

log = logging.getLogger(__name__)


#: Generation cap when neither method.generation.max_new_tokens nor the task's data.max_target_tokens gives one.
DEFAULT_MAX_NEW_TOKENS = 128


class StudentGeneration(BaseModel):
    """How the student decodes the sequences that replace data targets."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field("greedy", description="greedy, top_k sampling, or sample (from the whole softmax, as "
                                                     "GKD and MiniLLM sample the student)")
    top_k: int = Field(5, ge=1, description="top_k: candidates per step")
    temperature: float = Field(1.0, gt=0.0, description="top_k and sample: softmax temperature")
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


#: Share of the run (t/T) the LLM presets spend on supervised distillation before the paper's objective.
SUPERVISED_WARMUP = 0.5
#: The paper presets' student: trained from random weights, as in the authors' code.
_RANDOM_INIT: dict[str, Any] = {"args": {"init": "random", "init_width": "match"}}


def _after_supervised_warmup(objective: dict[str, Any]) -> dict[str, Any]:
    """The LLM presets' objectives: forward KL on the data for the first SUPERVISED_WARMUP, then ``objective``."""
    return {"sft": {"name": "forward_kl", "active": {"stop": SUPERVISED_WARMUP}},
            "kd": {**objective, "active": {"start": SUPERVISED_WARMUP}}}


@dataclass
class MixedBatch:
    """A batch whose targets are a β-mixture of data and student outputs."""

    # input_ids, attention_mask, labels (the mixed sequences, -100 padded). Seq2seq: the sources are
    # unchanged and labels are the mixed targets; causal LMs: rows are rebuilt as prompt + target,
    # right-padded, labels aligned with input_ids (-100 on the prompt).
    batch: dict[str, Any]
    replaced: torch.Tensor  # (B,) bool: True where the student's output replaced the data target
    beta: float
    generated_length: float  # mean length of the student's outputs used, fresh or replayed (0 when none)
    reused: torch.Tensor | None = None  # (B,) bool with method.replay: the rows that took a stored generation


class ReplayConfig(BaseModel):
    """DistiLLM's off-policy replay of student generations (``method.replay``)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(..., ge=1, description="most generations kept, one per training example (the oldest stored "
                                             "goes first)")
    reuse: float = Field(..., ge=0.0, le=1.0, description="probability that a row to be replaced by the student's "
                                                          "output takes its example's stored generation, when there "
                                                          "is one, instead of a fresh one")


class ReplayBuffer:
    """The student's generations by training-example id (the batch's ``ids``), oldest stored evicted first.

    DistiLLM keeps student generations and trains on them again instead of
    generating each time; here a stored generation is reused for the example it
    was generated for, so the batch keeps its examples (the authors' buffer draws
    whole batches of any past examples).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[str, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> list[int] | None:
        """The stored generation of example ``key`` (None when there is none)."""
        return self.entries.get(key)

    def put(self, key: str, tokens: list[int]) -> None:
        """Store (or replace) the generation of example ``key``; beyond ``size`` the oldest stored goes."""
        self.entries.pop(key, None)
        self.entries[key] = list(tokens)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready contents, oldest first."""
        return {"entries": [[key, tokens] for key, tokens in self.entries.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents by what :meth:`state_dict` saved."""
        self.entries = OrderedDict()
        for key, tokens in state["entries"]:
            self.put(str(key), [int(token) for token in tokens])


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
    replay: ReplayConfig | None = Field(
        None, description="DistiLLM's replay buffer {size, reuse}: student generations are stored by example id and "
                          "reused with probability 'reuse' instead of generating afresh; null: always generate")

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
                     generator: torch.Generator | None,
                     stored: Mapping[int, list[int]] | None = None) -> tuple[dict[str, Any], dict[int, list[int]]]:
    """Decoder-only ImitKD: replace the targets of ``rows`` by the student's continuation of their prompts.

    The prompt of a row is its attended tokens before the first label that is not -100.
    ``stored`` gives continuations (by row) that are used as they are (replayed
    generations); the student generates for ``rows``. Returns the rebuilt
    right-padded batch (labels aligned with input_ids, -100 on prompts and
    padding) and the continuation of every replaced row, by row.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    device = input_ids.device
    split = [_split_causal_row(input_ids[i], None if attention_mask is None else attention_mask[i], labels[i])
             for i in range(input_ids.shape[0])]
    tokens = [row[0] for row in split]
    row_labels = [row[1] for row in split]
    chosen = rows.tolist()
    continuations = dict(stored or {})
    if chosen:
        prompts = [split[i][2] for i in chosen]
        prompt_ids = pad_rows(prompts, student.pad_token_id, left=True, device=device)
        prompt_mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True, device=device)
        generated = student_generate(student, prompt_ids, prompt_mask, options, options.limit(labels[rows]), generator)
        continuations.update(zip(chosen, generated.to_lists()))
    for index, continuation in continuations.items():
        prompt = split[index][2]
        tokens[index] = prompt + continuation
        row_labels[index] = [IGNORE_INDEX] * len(prompt) + continuation
    mixed = {"input_ids": pad_rows(tokens, student.pad_token_id, device=device),
             "attention_mask": pad_rows([[1] * len(t) for t in tokens], 0, device=device),
             "labels": pad_rows(row_labels, IGNORE_INDEX, device=device)}
    return mixed, continuations


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
        # The hard variant as the authors' configs/cnndm/imitkd.yaml runs it: NLL of the teacher's argmax with label
        # smoothing 0.1, β = 10^(-t/T), the student's greedy rollouts capped at a fixed 99 tokens. (Their evaluation
        # decodes beam 5 up to 128 tokens: the task's data.eval_beams / data.max_new_tokens.)
        "summarization-hard": {"method": {"variant": "hard", "schedule": {"kind": "exponential", "base": 10.0},
                                          "generation": {"max_new_tokens": 99, "max_length_ratio": None}},
                               "objectives": {"kd": {"name": "nll", "args": {"label_smoothing": 0.1}}}},
        "on-policy": {"method": {"schedule": {"kind": "constant", "value": 0.0}}},
        # ImitKD* as the authors' configs/wmt/imitkdstar*.yaml run it: the teacher's beam-5 outputs (at most 100
        # tokens) are the data, β = 2^(-t/T), the student's greedy rollouts capped at a fixed 100 tokens, and a
        # student trained from random weights (the wmt default starts it from the teacher's).
        "imitkd-star": {"method": {"variant": "hard", "targets_from": "teacher_outputs",
                                   "schedule": {"kind": "exponential", "base": 2.0},
                                   "teacher_outputs": {"num_beams": 5, "max_new_tokens": 100, "max_length_ratio": None},
                                   "generation": {"max_new_tokens": 100, "max_length_ratio": None}},
                        "objectives": {"kd": {"name": "nll"}}, "student": _RANDOM_INIT},
        "imitkd-star-full": {"method": {"variant": "full", "targets_from": "teacher_outputs",
                                        "schedule": {"kind": "exponential", "base": 2.0},
                                        "teacher_outputs": {"num_beams": 5, "max_new_tokens": 100,
                                                            "max_length_ratio": None},
                                        "generation": {"max_new_tokens": 100, "max_length_ratio": None}},
                             "objectives": {"kd": {"name": "forward_kl"}}, "student": _RANDOM_INIT},
        # The LLM-distillation methods as settings of this plugin (docs/lm.md, "The LLM-distillation presets").
        # Each paper distils a student already fine-tuned on the data; kd makes that the first SUPERVISED_WARMUP of
        # the run: data targets only (β = 1), the teacher's distribution by forward KL (objective 'sft'), then the
        # paper's objective ('kd') on its mixture of data and student samples.
        # GKD (Agarwal et al. 2024): generalized JSD(0.5) on a λ = 0.5 mixture of data and student samples
        # (temperature 1, whole vocabulary).
        "gkd": {"method": {"variant": "full",
                           "schedule": {"kind": "constant", "value": 0.5, "warmup": SUPERVISED_WARMUP},
                           "generation": {"strategy": "sample", "temperature": 1.0}},
                "objectives": _after_supervised_warmup({"name": "jsd", "args": {"beta": 0.5}})},
        # DistiLLM (Ko et al. 2024), the authors' scripts: skew KL α = 0.1; student samples (top_k 0, top_p 1,
        # temperature 1) for a fraction that starts at 0 and rises by 0.1 (at most to 1) after a validation worse
        # than the one of the last raise; replay buffer of 1000 generations, reused about half the time. The
        # adaptive fraction starts at 0, so the warm-up needs no schedule key.
        "distillm": {"method": {"variant": "full",
                                "schedule": {"kind": "adaptive", "initial": 0.0, "step": 0.1, "max": 1.0,
                                             "compare_with": "last_raise"},
                                "generation": {"strategy": "sample", "temperature": 1.0},
                                "replay": {"size": 1000, "reuse": 0.5}},
                     "objectives": _after_supervised_warmup({"name": "skew_reverse_kl", "args": {"skew": 0.1}})},
        # MiniLLM's objective (Gu et al. 2024), reverse KL on the student's own samples, minimised token by token
        # with the teacher's full distribution instead of MiniLLM's policy gradient.
        "minillm-rkl": {"method": {"variant": "full",
                                   "schedule": {"kind": "constant", "value": 0.0, "warmup": SUPERVISED_WARMUP},
                                   "generation": {"strategy": "sample", "temperature": 1.0}},
                        "objectives": _after_supervised_warmup({"name": "reverse_kl"})},
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
        self.adaptive: AdaptiveFraction | None = None
        if self.schedule.kind == "adaptive":
            self.adaptive = AdaptiveFraction.start(self.schedule)
            self.watched_metric, self.watched_greater_is_better = self._watched_metric(task)
        self.replay = ReplayBuffer(config.replay.size) if config.replay is not None else None
        self.teacher_sequences = (TeacherSequences(self.text_teacher, task, config.teacher_outputs,
                                                   "plugin 'imitation' (method.targets_from: teacher_outputs)")
                                  if config.targets_from == "teacher_outputs" else None)
        if self.teacher_sequences is not None and not self.text_teacher.is_encoder_decoder:
            raise KDUserError("method.targets_from: teacher_outputs decodes with encoder-decoder teachers only "
                              "(teacher 'seq2seq'), as seq-kd does.")

    def _watched_metric(self, task: Task) -> tuple[str, bool]:
        """The validation metric the adaptive schedule watches, and whether greater is better for it."""
        schedule = self.config.schedule
        task_metric = getattr(task, "metric", None)
        name = schedule.metric or task_metric
        if name is None:
            raise KDUserError("method.schedule.kind 'adaptive' watches a validation metric, and the task names none: "
                              "set method.schedule.metric (and method.schedule.greater_is_better).")
        if schedule.greater_is_better is not None:
            return name, schedule.greater_is_better
        if name != task_metric:
            raise KDUserError(f"method.schedule.metric '{name}' is not the task's selection metric ('{task_metric}'), "
                              f"so its direction is unknown: set method.schedule.greater_is_better (true or false).")
        return name, bool(getattr(task, "greater_is_better", True))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        # Only the objective: the Config's own defaults apply to method.*, so that a task's defaults
        # (e.g. summarization's schedule base 10) are not overridden.
        return {"objectives": {"kd": {"name": "forward_kl"}}}

    def beta(self, step: int) -> float:
        """β_t for 0-based optimiser step ``step``."""
        return self.schedule.beta(step, self.total_steps, self.adaptive)

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Adaptive schedule: raise the student fraction after a validation worse than its reference."""
        if self.adaptive is None:
            return
        if self.watched_metric not in metrics:
            raise KDUserError(f"method.schedule watches the validation metric '{self.watched_metric}', which this "
                              f"task does not report; set method.schedule.metric to one of: "
                              f"{', '.join(sorted(metrics))}.")
        before = self.adaptive.fraction
        if self.adaptive.observe(float(metrics[self.watched_metric]), self.schedule, self.watched_greater_is_better):
            log.info("Step %d: validation %s got worse; student-generated fraction %.2f -> %.2f.", step,
                     self.watched_metric, before, self.adaptive.fraction)

    def state_dict(self) -> dict[str, Any]:
        """The adaptive schedule's state and the replay buffer (the checkpoint keeps them for --resume)."""
        state: dict[str, Any] = {}
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result; a part this configuration does not keep is refused."""
        unexpected = sorted(set(state) - set(self.state_dict()))
        if unexpected:
            raise KDUserError(f"The checkpoint holds ImitKD run state ({', '.join(unexpected)}) that this run's "
                              f"method settings do not keep (method.schedule.kind / method.replay changed?); resume "
                              f"with the settings that wrote it, or start a new --out.")
        if self.adaptive is not None and "adaptive" in state:
            self.adaptive = AdaptiveFraction.from_state(state["adaptive"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])

    def replacement_mask(self, batch_size: int, beta: float) -> torch.Tensor:
        """Per sequence, True (replace by the student's output) with probability 1 − β."""
        draws = torch.rand(batch_size, generator=self.generator)
        return draws >= beta

    def replayed(self, batch: Batch, replaced: torch.Tensor) -> dict[int, list[int]]:
        """Replay: the replaced rows that take their example's stored generation, by row (one draw per row)."""
        if self.replay is None or self.config.replay is None:
            return {}
        draws = torch.rand(replaced.shape[0], generator=self.generator)
        ids = self.example_ids(batch)
        chosen = {}
        for row in replaced.nonzero().squeeze(1).tolist():
            stored = self.replay.get(ids[row])
            if stored is not None and float(draws[row]) < self.config.replay.reuse:
                chosen[row] = stored
        return chosen

    def example_ids(self, batch: Batch) -> list[str]:
        """The batch's example ids (the replay buffer's keys)."""
        ids = batch.get("ids")
        if ids is None:
            raise KDUserError("method.replay stores student generations by training example, and this task's "
                              "batches carry no example ids ('ids'); remove method.replay.")
        return [str(identifier) for identifier in ids]

    def prepare(self, batch: Batch, step: int) -> MixedBatch:
        """Steps 1-2 of the box: β_t, the per-sequence coin flips, and the student's replacement targets."""
        config, student = self.config, self.text_student
        if self.teacher_sequences is not None:  # ImitKD*: the teacher's outputs stand in for the data targets
            batch = {**batch, "labels": self.teacher_sequences.targets(batch)[0]}
        input_ids, attention_mask, data_labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        beta = self.beta(step)
        replaced = self.replacement_mask(data_labels.shape[0], beta).to(data_labels.device)
        stored = self.replayed(batch, replaced)
        reused = torch.zeros_like(replaced)
        reused[list(stored)] = True
        fresh = (replaced & ~reused).nonzero().squeeze(1)
        if not student.is_encoder_decoder:
            mixed, continuations = mix_causal_batch(student, batch, fresh, config.generation, self.generator, stored)
        else:
            continuations = dict(stored)
            if fresh.numel():
                sources = take_rows(batch, fresh, ("input_ids", "attention_mask"))
                generated = student_generate(student, sources["input_ids"], sources["attention_mask"],
                                             config.generation, config.generation.limit(data_labels[fresh]),
                                             self.generator)
                continuations.update(zip(fresh.tolist(), generated.to_lists()))
            sequence_labels = data_labels
            if continuations:
                rows = sorted(continuations)
                sequence_labels = merge_rows(data_labels, torch.tensor(rows, device=data_labels.device),
                                             pad_rows([continuations[row] for row in rows], IGNORE_INDEX,
                                                      device=data_labels.device))
            # Only the sequences go in: each model derives its decoder inputs by its own right shift.
            mixed = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": sequence_labels}
        if self.replay is not None and fresh.numel():
            ids = self.example_ids(batch)
            for row in fresh.tolist():
                self.replay.put(ids[row], continuations[row])
        lengths = [len(tokens) for tokens in continuations.values()]
        generated_length = sum(lengths) / len(lengths) if lengths else 0.0
        return MixedBatch(mixed, replaced, beta, generated_length,
                          reused.to(data_labels.device) if self.replay is not None else None)

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
        if mixed.reused is not None:
            parts["reused_fraction"] = float(mixed.reused.float().mean())
        if self.config.variant == "full":
            return self.meet(mixed.batch, parts)
        targets = self.hard_targets(mixed)
        teacher = one_hot_teacher(targets, self.text_teacher.vocab_size) if self.teacher_request().signals else Signals()
        return self.meet(mixed.batch, parts, labels=targets, teacher_signals=teacher)


__all__ = ["ImitationConfig", "ImitationKD", "MixedBatch", "ReplayBuffer", "ReplayConfig", "StudentGeneration",
           "mix_causal_batch", "one_hot_teacher", "student_generate"]
