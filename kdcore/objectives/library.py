"""Registered objectives (``objectives: {label: {name: ..., weight: ..., args: {...}}}`` in a run config).

Each class is a thin adapter from :class:`~kdcore.signals.Signals` to one function of the
objectives library; the math lives in :mod:`kdcore.objectives.divergence`,
:mod:`kdcore.objectives.hidden`, :mod:`kdcore.objectives.uld`, :mod:`kdcore.objectives.cross_tokenizer`
(with :mod:`kdcore.objectives.token_alignment`), :mod:`kdcore.objectives.nll` and :mod:`kdcore.fused`.
Formulas, use cases and config keys: docs/objectives.md.

Contract with models:

* logit objectives read ``student.logits`` (dense ``(..., V)``) and ``teacher.logits``
  (dense or :class:`~kdcore.signals.SparseLogits`) and ``batch.get("labels")``
  (``logits.shape[:-1]``, -100 ignored; absent: every position counts). With ``fused``
  not false they also request ``Signal.FINAL_HIDDEN`` and, when both models return
  ``final_hidden`` + ``output_weight`` (+ ``output_bias``), choose the path themselves:
  :func:`~kdcore.fused.fused_linear_divergence` (``fused: auto`` from
  :data:`FUSED_AUTO_MIN_VOCAB` vocabulary entries), otherwise the dense logits. A top-k
  teacher needs only the student's: :func:`~kdcore.fused.fused_linear_sparse_divergence`.
  A method may answer FINAL_HIDDEN and leave ``logits`` empty (the text methods do, so
  that the fused path never has the ``(B, T, V)`` logits built); the dense path then
  computes them from the final hidden state and the projection (``logits_of``).

The hidden-state objectives are in :mod:`kdcore.objectives.layers`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
import torch
from torch import Tensor

from kdcore.errors import KDUserError
from kdcore.fused import fused_linear_divergence, fused_linear_sparse_divergence
from kdcore.interfaces import Batch, Objective, ObjectiveOutput
from kdcore.objectives.cross_tokenizer import DISTANCES, batch_groups, cross_tokenizer_loss
from kdcore.objectives.divergence import divergence
from kdcore.objectives.inputs import counted_positions, labels_of, logits_of
from kdcore.objectives.nll import token_nll
from kdcore.objectives.uld import uld_loss
from kdcore.signals import Signal, SignalRequest, Signals, SparseLogits

# Below this vocabulary size full logits are small and the plain path is as fast: "auto" stays dense.
FUSED_AUTO_MIN_VOCAB = 8192


# --------------------------------------------------------------------------- configs
class _LogitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, description="both logits are divided by it")
    fused: bool | Literal["auto"] = Field(
        "auto", description="true: fused projection+divergence (refused when the models do not hand over final "
                            f"hidden states); auto: fused when they do and the vocabulary has >= "
                            f"{FUSED_AUTO_MIN_VOCAB} entries; false: always dense logits")
    chunk_size: int | None = Field(None, ge=1, description="positions per chunk (memory); automatic when unset")


class KLConfig(_LogitConfig):
    """Config of forward KL, reverse KL and TVD."""


class JSDConfig(_LogitConfig):
    """Config of the generalized JSD."""

    beta: float = Field(0.5, ge=0, le=1, description="M = beta*p_T + (1-beta)*p_S, strictly between 0 and 1 (at 0 or "
                                                     "1 the JSD is identically 0; forward_kl/reverse_kl are the limits)")

    @field_validator("beta")
    @classmethod
    def _beta_inside(cls, beta: float) -> float:
        if beta in (0.0, 1.0):
            side = "p_S" if beta == 0 else "p_T"
            raise ValueError(f"at beta = {beta:g} the mixture M is {side} itself, so the JSD is identically 0 and "
                             f"nothing would be learnt; use a beta strictly between 0 and 1 (near 0 it behaves like a scaled "
                             f"forward_kl, near 1 like a scaled reverse_kl: use those objectives for the limits)")
        return beta


class SkewConfig(_LogitConfig):
    """Config of the skew KLs."""

    skew: float = Field(0.1, ge=0, le=1, description="alpha: weight of the first distribution in the mixture, in "
                                                     "[0, 1) (at 1 the loss is identically 0)")

    @field_validator("skew")
    @classmethod
    def _skew_below_one(cls, skew: float) -> float:
        if skew == 1.0:
            raise ValueError("at skew = 1 the mixture is the first distribution itself, so the skew KL is identically "
                             "0 and nothing would be learnt; use a skew in [0, 1) (0 is the plain KL)")
        return skew


class NLLConfig(BaseModel):
    """Options of the token NLL."""

    model_config = ConfigDict(extra="forbid")

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="ε: target (1-ε) on the label + ε/V on every "
                                                                      "token (the ImitKD authors use 0.1 on CNN/DM)")


class ULDConfig(BaseModel):
    """Config of Universal Logit Distillation."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, description="both logits are divided by it")
    teacher_labels_key: str = Field(
        "teacher_labels", description="batch key of the teacher-tokenized labels (-100 = not a target); "
                                      "when absent from the batch every teacher position counts")


class CrossTokenizerConfig(BaseModel):
    """Config of the cross-tokenizer likelihood matching (docs/objectives.md, "Across tokenizers")."""

    model_config = ConfigDict(extra="forbid")

    distance: Literal["binary_kl", "reverse_binary_kl", "abs_log", "abs_prob"] = Field(
        "binary_kl", description=f"distance between Bernoulli(p_T(group)) and Bernoulli(p_S(group)): "
                                 f"{', '.join(DISTANCES)}")
    temperature: float = Field(
        1.0, gt=0, description="ALM's binarisation temperature: each group's log-probability (not the logits) is "
                               "divided by it, p -> p^(1/T), before the distance; ALM's recipe uses 100")
    teacher_labels_key: str = Field(
        "teacher_labels", description="batch key of the teacher's target ids per teacher logit position (-100 = not "
                                      "a target)")
    teacher_offsets_key: str = Field(
        "teacher_offsets", description="batch key of (B, T_teacher, 2) character offsets of each teacher target "
                                       "token in the text, (0, 0) for none")
    student_offsets_key: str = Field(
        "student_offsets", description="batch key of (B, T_student, 2) character offsets of each student target "
                                       "token in the same text, (0, 0) for none")


# --------------------------------------------------------------------------- helpers
def _fused_ready(signals: Signals) -> bool:
    return signals.final_hidden is not None and signals.output_weight is not None


def _vocabulary_size(signals: Signals) -> int | None:
    if signals.output_weight is not None:
        return int(signals.output_weight.shape[0])
    if isinstance(signals.logits, SparseLogits):
        return int(signals.logits.vocab_size)
    if signals.logits is not None:
        return int(signals.logits.shape[-1])
    return None


#: ``Signals.extra`` key: how many rows of the model's head are real tokens (its tokenizer's size). Rows beyond it
#: are padding (a head rounded up to a multiple, as Qwen-style models have); the logit objectives ignore them.
TOKENIZER_VOCAB_SIZE = "tokenizer_vocab_size"


def _drop_padding_rows(signals: Signals, role: str, name: str) -> None:
    """Cut the head's padding rows (beyond the ``TOKENIZER_VOCAB_SIZE`` the signals report) off the logits, the
    output projection and a top-k teacher, in place: later objectives of the same step see the trimmed signals."""
    size = signals.extra.get(TOKENIZER_VOCAB_SIZE)
    head = _vocabulary_size(signals)
    if size is None or head is None or head == int(size):
        return
    size = int(size)
    if size > head:
        raise KDUserError(f"The {role} reports a tokenizer of {size} tokens but its head has only {head} rows "
                          f"(objective {name!r}): the model and its tokenizer do not belong together.")
    if isinstance(signals.logits, SparseLogits):
        if bool((signals.logits.indices >= size).any()):
            raise KDUserError(f"The {role}'s top-k logits hold ids of its head's padding rows (>= its tokenizer's "
                              f"{size} tokens), objective {name!r}: capture them from the logits of the real tokens.")
        signals.logits = replace(signals.logits, vocab_size=size)
    elif signals.logits is not None:
        signals.logits = signals.logits[..., :size]
    if signals.output_weight is not None:
        signals.output_weight = signals.output_weight[:size]
    if signals.output_bias is not None:
        signals.output_bias = signals.output_bias[:size]


def _check_same_vocabulary(student: Signals, teacher: Signals, name: str) -> None:
    """Token-level divergences need one vocabulary: heads that differ only by padding rows are trimmed to it
    (:data:`TOKENIZER_VOCAB_SIZE`); any other difference is refused, with what to use instead, before any math."""
    _drop_padding_rows(student, "student", name)
    _drop_padding_rows(teacher, "teacher", name)
    student_vocab, teacher_vocab = _vocabulary_size(student), _vocabulary_size(teacher)
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise KDUserError(
            f"Objective '{name}' compares distributions token by token, but the student predicts {student_vocab} "
            f"tokens and the teacher {teacher_vocab} (different vocabularies). Give the student the teacher's "
            f"tokenizer, or compare them across tokenizers: --set objectives.<label>=null --set "
            f"'objectives.xt={{name: cross_tokenizer}}' (matches the likelihoods of the text both tokenizations "
            f"cover; the batches must carry both sides' labels and character offsets) or 'objectives.uld={{name: "
            f"uld}}' (sorted probabilities, position i with position i). Heads that differ only by padding rows "
            f"beyond one shared tokenizer are accepted when the models report the tokenizer's size "
            f"(Signals.extra['{TOKENIZER_VOCAB_SIZE}']).")


# --------------------------------------------------------------------------- logit divergences
class _DivergenceObjective(Objective):
    """Shared adapter for the divergence kinds; subclasses set ``name`` (= the kind) and ``Config``."""

    Config: ClassVar[type[BaseModel]] = KLConfig

    def _request(self) -> SignalRequest:
        if self.config.fused is False:
            return SignalRequest(frozenset({Signal.LOGITS}))
        return SignalRequest(frozenset({Signal.LOGITS, Signal.FINAL_HIDDEN}))

    def student_request(self) -> SignalRequest:
        return self._request()

    def teacher_request(self) -> SignalRequest:
        return self._request()

    def _parameters(self) -> dict[str, float]:
        return {key: getattr(self.config, key) for key in ("beta", "skew") if hasattr(self.config, key)}

    def use_fused(self, student: Signals, teacher: Signals) -> bool:
        """Whether this batch goes through the fused path (config ``fused`` and what the models returned).

        ``fused: true`` is a promise the run must keep: when the models cannot take the fused path it is refused,
        not silently replaced by the dense one.
        """
        mode = self.config.fused
        if mode is False:
            return False
        # a top-k teacher (a teacher store, ImitKD's hard variant) needs no projection: its rows are read as they are
        sparse_teacher = isinstance(teacher.logits, SparseLogits)
        ready = _fused_ready(student) and (sparse_teacher or _fused_ready(teacher))
        if mode is True and not ready:
            why = ("the student did not hand over its final hidden state and output projection" if sparse_teacher else
                   "the models did not hand over their final hidden states and output projections")
            raise KDUserError(
                f"The objective {self.name!r} has fused: true, but {why}. Use fused: auto (fused whenever the "
                f"models allow it and the vocabulary is large) or fused: false.")
        if mode is True:
            return True
        return ready and student.output_weight is not None and student.output_weight.shape[0] >= FUSED_AUTO_MIN_VOCAB

    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        config = self.config
        _check_same_vocabulary(student, teacher, self.name)
        if self.use_fused(student, teacher):
            assert student.final_hidden is not None and student.output_weight is not None
            labels = labels_of(batch, (*student.final_hidden.shape[:-1], 0), self.name)
            if isinstance(teacher.logits, SparseLogits):
                loss = fused_linear_sparse_divergence(
                    student.final_hidden, student.output_weight, teacher.logits, self.name,
                    student_bias=student.output_bias, labels=labels, temperature=config.temperature,
                    chunk_size=config.chunk_size, **self._parameters())
            else:
                assert teacher.final_hidden is not None and teacher.output_weight is not None
                loss = fused_linear_divergence(
                    student.final_hidden, student.output_weight, teacher.final_hidden.to(student.final_hidden.device),
                    teacher.output_weight.to(student.final_hidden.device), self.name,
                    student_bias=student.output_bias, teacher_bias=teacher.output_bias, labels=labels,
                    temperature=config.temperature, chunk_size=config.chunk_size, **self._parameters())
            positions = student.final_hidden[..., 0].numel()
            return ObjectiveOutput(loss, {"fused": 1.0, "positions": counted_positions(labels, positions)})
        student_logits = logits_of(student, "student", self.name)
        teacher_logits = logits_of(teacher, "teacher", self.name)
        assert isinstance(student_logits, Tensor)
        labels = labels_of(batch, student_logits.shape, self.name)
        if isinstance(teacher_logits, Tensor):
            teacher_logits = teacher_logits.to(student_logits.device)
        loss = divergence(student_logits, teacher_logits, self.name, labels=labels, temperature=config.temperature,
                          chunk_size=config.chunk_size, **self._parameters())
        positions = student_logits[..., 0].numel()
        return ObjectiveOutput(loss, {"fused": 0.0, "positions": counted_positions(labels, positions)})


class ForwardKLObjective(_DivergenceObjective):
    name: ClassVar[str] = "forward_kl"
    description: ClassVar[str] = "Forward KL(p_T || p_S) with temperature; masks, sparse teacher logits, fused path"
    Config: ClassVar[type[BaseModel]] = KLConfig


class ReverseKLObjective(_DivergenceObjective):
    name: ClassVar[str] = "reverse_kl"
    description: ClassVar[str] = "Reverse KL(p_S || p_T): mode-seeking (MiniLLM-style)"
    Config: ClassVar[type[BaseModel]] = KLConfig


class JSDObjective(_DivergenceObjective):
    name: ClassVar[str] = "jsd"
    description: ClassVar[str] = "Generalized JSD(beta) of GKD: beta->0 forward KL, beta->1 reverse KL"
    Config: ClassVar[type[BaseModel]] = JSDConfig


class SkewForwardKLObjective(_DivergenceObjective):
    name: ClassVar[str] = "skew_forward_kl"
    description: ClassVar[str] = "Skew forward KL of DistiLLM: KL(p_T || a p_T + (1-a) p_S)"
    Config: ClassVar[type[BaseModel]] = SkewConfig


class SkewReverseKLObjective(_DivergenceObjective):
    name: ClassVar[str] = "skew_reverse_kl"
    description: ClassVar[str] = "Skew reverse KL of DistiLLM: KL(p_S || a p_S + (1-a) p_T)"
    Config: ClassVar[type[BaseModel]] = SkewConfig


class TVDObjective(_DivergenceObjective):
    name: ClassVar[str] = "tvd"
    description: ClassVar[str] = "Total variation distance 1/2 sum |p_T - p_S|"
    Config: ClassVar[type[BaseModel]] = KLConfig


# --------------------------------------------------------------------------- NLL
class TokenNLLObjective(Objective):
    """Cross-entropy of the student on ``batch["labels"]`` (teacher not needed)."""

    name: ClassVar[str] = "nll"
    description: ClassVar[str] = "Cross-entropy of the student on the data labels (-100 ignored)"
    Config: ClassVar[type[BaseModel]] = NLLConfig

    def student_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))

    def teacher_request(self) -> SignalRequest:
        return SignalRequest()

    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        labels = batch.get("labels")
        if labels is None:
            raise KDUserError("The objective 'nll' needs batch['labels'] (the target ids, -100 = ignore), but the "
                              "task's batches have no 'labels'. Remove 'nll' from the config's 'objectives' or use a "
                              "task with labels.")
        logits = logits_of(student, "student", self.name)
        assert isinstance(logits, Tensor)
        labels = labels_of(batch, logits.shape, self.name)
        assert labels is not None
        return ObjectiveOutput(token_nll(logits, labels, self.config.label_smoothing),
                               {"positions": counted_positions(labels, 0)})


# --------------------------------------------------------------------------- cross-tokenizer
class _AcrossTokenizers(Objective):
    """What the objectives that compare two tokenizations share: both sides' logits at their own positions."""

    #: Compares teacher and student across tokenizers (a text method lets it meet two tokenizations).
    aligns_tokenizers: ClassVar[bool] = True

    def student_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))

    def teacher_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))


class ULDObjective(_AcrossTokenizers):
    """ULD: L1 between sorted probability vectors; student and teacher may use different tokenizers.

    It pairs the i-th counted student position with the i-th counted teacher position, whatever text they cover:
    the fallback when no character offsets are at hand. :class:`CrossTokenizerObjective` aligns the text.
    """

    name: ClassVar[str] = "uld"
    description: ClassVar[str] = ("Universal Logit Distillation: L1 of sorted probabilities, position i with "
                                  "position i (the fallback of cross_tokenizer, which aligns the text)")
    Config: ClassVar[type[BaseModel]] = ULDConfig
    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        _drop_padding_rows(student, "student", self.name)
        _drop_padding_rows(teacher, "teacher", self.name)
        student_logits = logits_of(student, "student", self.name)
        teacher_logits = logits_of(teacher, "teacher", self.name)
        assert isinstance(student_logits, Tensor)
        if student_logits.dim() != 3:
            raise KDUserError(f"The objective 'uld' expects (batch, time, vocab) logits, got student logits of shape "
                              f"{tuple(student_logits.shape)}; use it with sequence models.")
        student_labels = batch.get("labels")
        if student_labels is not None:
            student_labels = labels_of(batch, student_logits.shape, self.name)
        teacher_labels: Any = batch.get(self.config.teacher_labels_key)
        loss = uld_loss(student_logits, teacher_logits, temperature=self.config.temperature,
                        student_labels=student_labels, teacher_labels=teacher_labels)
        return ObjectiveOutput(loss)


def _batch_entry(batch: Batch, key: str, shape: tuple[int, ...], what: str, name: str) -> Any:
    """``batch[key]``, refused with the reason when absent or not of ``shape`` (a tensor, or nested lists)."""
    value = batch.get(key)
    if value is None:
        raise KDUserError(f"The objective {name!r} needs batch[{key!r}] ({what}), but the task's batches have no "
                          f"{key!r}. Teacher and student read the text through different tokenizers, so the batch must "
                          f"carry each side's targets and offsets (docs/objectives.md, 'Across tokenizers'); name "
                          f"another key with the objective's '*_key' args.")
    if isinstance(value, Tensor):
        found: Any = tuple(value.shape)
        fits = found == shape
    else:
        found = f"{len(value)} rows of lengths {sorted({len(row) for row in value})}"
        fits = len(value) == shape[0] and all(len(row) == shape[1] for row in value)
    if not fits:
        raise KDUserError(f"The objective {name!r} found batch[{key!r}] of shape {found}, expected {shape} ({what}): "
                          f"one entry per logit position of that side.")
    return value


class CrossTokenizerObjective(_AcrossTokenizers):
    """Likelihood matching of aligned text pieces (ALM; GOLD's token merging) between different tokenizers.

    Reads both models' logits at their own positions, their own target ids (``labels``, ``teacher_labels``) and
    both sides' character offsets of those targets; :mod:`kdcore.objectives.cross_tokenizer` has the math.
    """

    name: ClassVar[str] = "cross_tokenizer"
    description: ClassVar[str] = ("Different tokenizers: likelihoods of the text pieces both tokenizations cover "
                                  "(ALM / GOLD token merging)")
    Config: ClassVar[type[BaseModel]] = CrossTokenizerConfig
    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        config = self.config
        _drop_padding_rows(student, "student", self.name)
        _drop_padding_rows(teacher, "teacher", self.name)
        student_logits = logits_of(student, "student", self.name)
        teacher_logits = logits_of(teacher, "teacher", self.name)
        if isinstance(teacher_logits, SparseLogits):
            raise KDUserError(f"The objective {self.name!r} needs the teacher's log-probability of each of its own "
                              f"target tokens, which top-k logits lack whenever the target is outside the top k; give "
                              f"it the teacher's dense logits (a teacher model, not a store of top-k logits).")
        assert isinstance(student_logits, Tensor)
        if student_logits.dim() != 3 or teacher_logits.dim() != 3:
            raise KDUserError(f"The objective {self.name!r} expects (batch, time, vocab) logits, got student "
                              f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}; use it with "
                              f"sequence models.")
        if batch.get("labels") is None:
            raise KDUserError(f"The objective {self.name!r} needs batch['labels'] (the student's target ids per logit "
                              f"position, -100 = not scored), but the task's batches have none.")
        student_labels = labels_of(batch, student_logits.shape, self.name)
        assert student_labels is not None
        rows, t_length, s_length = student_logits.shape[0], teacher_logits.shape[1], student_logits.shape[1]
        teacher_labels = _batch_entry(batch, config.teacher_labels_key, (rows, t_length),
                                      "the teacher's target ids per teacher logit position, -100 = not scored",
                                      self.name)
        if not isinstance(teacher_labels, Tensor):
            teacher_labels = torch.as_tensor(teacher_labels, dtype=torch.long)
        teacher_offsets = _batch_entry(batch, config.teacher_offsets_key, (rows, t_length, 2),
                                       "character offsets of the teacher's target tokens", self.name)
        student_offsets = _batch_entry(batch, config.student_offsets_key, (rows, s_length, 2),
                                       "character offsets of the student's target tokens", self.name)
        groups = batch_groups(teacher_offsets, student_offsets, teacher_labels, student_labels)
        loss = cross_tokenizer_loss(student_logits, teacher_logits, student_labels, teacher_labels, groups,
                                    distance=config.distance, temperature=config.temperature)
        aligned = sum(len(group.student) for row in groups for group in row)
        scored = counted_positions(student_labels, 0)
        return ObjectiveOutput(loss, {"groups": float(sum(len(row) for row in groups)),
                                      "aligned_fraction": aligned / scored if scored else 0.0})


__all__ = [
    "ForwardKLObjective", "JSDObjective", "ReverseKLObjective", "SkewForwardKLObjective", "SkewReverseKLObjective", "TVDObjective",
    "TokenNLLObjective", "ULDObjective", "CrossTokenizerObjective", "FUSED_AUTO_MIN_VOCAB", "TOKENIZER_VOCAB_SIZE",
]
