"""Registered objectives (``objectives: {label: {name: ..., weight: ..., args: {...}}}`` in a run config).

Each class is a thin adapter from :class:`~kdcore.signals.Signals` to one function of the
objectives library; the math lives in :mod:`kdcore.objectives.divergence`,
:mod:`kdcore.objectives.hidden`, :mod:`kdcore.objectives.uld`, :mod:`kdcore.objectives.nll`
and :mod:`kdcore.fused`. Formulas, use cases and config keys: docs/objectives.md.

Contract with models:

* logit objectives read ``student.logits`` (dense ``(..., V)``) and ``teacher.logits``
  (dense or :class:`~kdcore.signals.SparseLogits`) and ``batch.get("labels")``
  (``logits.shape[:-1]``, -100 ignored; absent: every position counts). With ``fused``
  not false they also request ``Signal.FINAL_HIDDEN`` and, when both models return
  ``final_hidden`` + ``output_weight`` (+ ``output_bias``), choose the path themselves:
  :func:`~kdcore.fused.fused_linear_divergence` (``fused: auto`` from
  :data:`FUSED_AUTO_MIN_VOCAB` vocabulary entries), otherwise the dense logits.
  A method may answer FINAL_HIDDEN and leave ``logits`` empty (the text methods do, so
  that the fused path never has the ``(B, T, V)`` logits built); the dense path then
  computes them from the final hidden state and the projection (``logits_of``).

The hidden-state objectives are in :mod:`kdcore.objectives.layers`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from kdcore.errors import KDUserError
from kdcore.fused import fused_linear_divergence
from kdcore.interfaces import Batch, Objective, ObjectiveOutput
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


def _check_same_vocabulary(student: Signals, teacher: Signals, name: str) -> None:
    """Token-level divergences need one vocabulary: say so (and what to use instead) before any math."""
    student_vocab, teacher_vocab = _vocabulary_size(student), _vocabulary_size(teacher)
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise KDUserError(
            f"Objective '{name}' compares distributions token by token, but the student predicts {student_vocab} "
            f"tokens and the teacher {teacher_vocab} (different vocabularies). Give the student the teacher's "
            f"tokenizer, or use the cross-tokenizer objective instead: --set objectives.<label>=null "
            f"--set 'objectives.uld={{name: uld}}'.")


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
        ready = _fused_ready(student) and _fused_ready(teacher) and not isinstance(teacher.logits, SparseLogits)
        if mode is True and not ready:
            why = ("the teacher's logits are top-k (a logit cache, or ImitKD's hard variant), which has no hidden "
                   "state to project" if isinstance(teacher.logits, SparseLogits) else
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
            assert teacher.final_hidden is not None and teacher.output_weight is not None
            labels = labels_of(batch, (*student.final_hidden.shape[:-1], 0), self.name)
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
class ULDObjective(Objective):
    """ULD: L1 between sorted probability vectors; student and teacher may use different tokenizers."""

    name: ClassVar[str] = "uld"
    description: ClassVar[str] = "Universal Logit Distillation: L1 of sorted probabilities, for different tokenizers"
    Config: ClassVar[type[BaseModel]] = ULDConfig

    def student_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))

    def teacher_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))

    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
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


__all__ = [
    "ForwardKLObjective", "JSDObjective", "ReverseKLObjective", "SkewForwardKLObjective", "SkewReverseKLObjective", "TVDObjective",
    "TokenNLLObjective", "ULDObjective", "FUSED_AUTO_MIN_VOCAB",
]
