"""What every text method shares: the text models, and how teacher and student meet on a batch of prefixes.

A text method (ImitKD, word-level KD, sequence-level KD, scratch) only decides *which* prefixes the two models read
(data targets, the student's own outputs, the teacher's outputs) and which tokens are the targets there.
:meth:`TextMethod.meet` then runs the models and returns the :class:`~kdcore.interfaces.Comparison` on which the
configured objectives compute the loss.

Across tokenizers: where the task tokenises for the teacher with a tokenizer of its own (a text task's
``data.teacher_vocab_size``), its batches carry the teacher's reading (``teacher_input_ids``, ``teacher_labels``, ...)
and both sides' character offsets; the teacher then reads its own token ids, and only objectives that align the
two tokenizations (``aligns_tokenizers``: ``cross_tokenizer``, ``uld``) may compare the two models.

Signals: text models hand over logits and the final hidden state with the output projection (what a fused objective
reads). They do not offer hidden states: a teacher and a student of different depths and widths have no
layer-by-layer correspondence that a text method could state.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Comparison, Method, Student, Task, Teacher, WeightedObjective
from kdcore.objectives.library import CrossTokenizerObjective
from kdcore.signals import IGNORE_INDEX, Signal, SignalRequest, Signals
from kdcore.teacher_store import StoredTeacher
from kd_plugins.text.models import HFTextModel, check_vocab_compatible, teacher_reading

#: What a text method hands the objectives from each model.
TEXT_SIGNALS: frozenset[Signal] = frozenset({Signal.LOGITS, Signal.FINAL_HIDDEN})


def take_rows(batch: Mapping[str, Any], rows: torch.Tensor, keys: Sequence[str]) -> dict[str, Any]:
    """``batch[key][rows]`` for each of ``keys`` (a missing or None value stays None)."""
    return {key: None if batch.get(key) is None else batch[key][rows] for key in keys}


def merge_rows(data_labels: torch.Tensor, rows: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """``data_labels`` with the given rows replaced by ``replacement`` (both -100 padded; widths may differ)."""
    width = max(data_labels.shape[1], replacement.shape[1])
    merged = data_labels.new_full((data_labels.shape[0], width), IGNORE_INDEX)
    merged[:, :data_labels.shape[1]] = data_labels
    merged[rows] = IGNORE_INDEX
    merged[rows, :replacement.shape[1]] = replacement
    return merged


class TextMethod(Method):
    """A method on text teacher and student models (``seq2seq`` or ``causal-lm``).

    By default teacher and student meet on the task's own batch (its data prefixes and targets); methods that
    arrange other prefixes override :meth:`compare` and end it with :meth:`meet`.
    """

    student_offers: ClassVar[frozenset[Signal]] = TEXT_SIGNALS
    teacher_offers: ClassVar[frozenset[Signal]] = TEXT_SIGNALS
    #: Whether tokens pass between the two models whatever the objectives (the teacher reads the student's prefixes,
    #: or the student learns the teacher's outputs). Then, or when an objective compares the two, both must share
    #: one vocabulary.
    exchanges_tokens: ClassVar[bool] = True
    #: Whether the teacher must run on prefixes outside the data (generation, the student's outputs); then a
    #: stored teacher (:mod:`kdcore.teacher_store`) is refused.
    needs_teacher_model: ClassVar[bool] = True

    def __init__(self, config: BaseModel, task: Task, teacher: Teacher, student: Student,
                 objectives: Sequence[WeightedObjective]) -> None:
        super().__init__(config, task, teacher, student, objectives)
        if isinstance(teacher, StoredTeacher) and self.needs_teacher_model:
            raise KDUserError(f"plugin '{self.name}' runs the teacher on prefixes that are not in the data (the "
                              f"student's or the teacher's own outputs), so it needs the teacher model; a teacher "
                              f"store (teacher: store) holds the teacher's logits on the data only. Use teacher "
                              f"'{teacher.store.manifest['teacher'].get('name', 'the captured teacher')}', or a "
                              f"plugin that reads the data (word-kd).")
        if isinstance(teacher, StoredTeacher):
            teacher.check_temperatures(self.objectives, f"plugin '{self.name}'")
        if not isinstance(teacher, (HFTextModel, StoredTeacher)) or not isinstance(student, HFTextModel):
            raise KDUserError(f"plugin '{self.name}' needs text teacher and student models (teacher/student "
                              f"'seq2seq' or 'causal-lm', or a teacher 'store'); got {type(teacher).__name__} and "
                              f"{type(student).__name__}.")
        self.text_teacher: HFTextModel = teacher  # type: ignore[assignment] # a StoredTeacher answers the same calls
        self.text_student: HFTextModel = student
        self.check_tokenizers(task)

    def check_tokenizers(self, task: Task) -> None:
        """Refuse, before training, what the two tokenizations cannot do (exit 2 with what to use instead).

        With one tokenizer, token-level objectives and methods that exchange tokens need the same vocabulary. Where
        the task tokenises for the teacher with a tokenizer of its own, the teacher must be a model of that
        tokenizer, tokens cannot pass between the models, and every objective that reads the teacher must align
        the two tokenizations.
        """
        reading = [item for item in self.objectives if item.objective.teacher_request().signals]
        where = f"plugin '{self.name}'"
        data_config = getattr(task, "data_config", None)
        if not getattr(data_config, "separate_teacher_tokenizer", False):
            if self.exchanges_tokens or reading:
                check_vocab_compatible(self.teacher, self.student, where=where)
            offsets = [item.label for item in self.objectives if isinstance(item.objective, CrossTokenizerObjective)]
            if offsets:
                raise KDUserError(
                    f"The objective(s) {', '.join(repr(label) for label in offsets)} (cross_tokenizer) align two "
                    f"tokenizations of the text, but teacher and student share the task's tokenizer here, so the "
                    f"batches carry no teacher tokens or offsets. Give the teacher a tokenizer of its own with --set "
                    f"data.teacher_vocab_size=N (a text task), or compare token by token (objective forward_kl).")
            return
        sizes = f"data.vocab_size={data_config.vocab_size}, data.teacher_vocab_size={data_config.teacher_vocab_size}"
        if isinstance(self.teacher, StoredTeacher):
            raise KDUserError(f"A teacher store holds the teacher's logits on the task's own tokens, but this run "
                              f"gives the teacher a tokenizer of its own ({sizes}): use the teacher model (the "
                              f"default teacher), or drop data.teacher_vocab_size.")
        if self.exchanges_tokens:
            raise KDUserError(f"{where} passes tokens between teacher and student (the teacher reads the student's "
                              f"outputs or the student learns the teacher's), which needs one tokenizer, but this run "
                              f"gives them two ({sizes}). Drop data.teacher_vocab_size, or distil across the two "
                              f"tokenizers with --plugin word-kd --set objectives.kd.name=cross_tokenizer.")
        if not task.reads_teacher_view(self.teacher):  # type: ignore[attr-defined]
            raise KDUserError(f"This run gives the teacher a tokenizer of its own ({sizes}), but the teacher model "
                              f"has another one, so it would read token ids of another vocabulary. Use the "
                              f"task-trained teacher (teacher.name=task-trained-seq2seq) or a teacher built from "
                              f"teacher.args.config, which take the task's teacher tokenizer; or drop "
                              f"data.teacher_vocab_size.")
        token_level = [f"'{item.label}' ({item.objective.name})" for item in reading
                       if not getattr(item.objective, "aligns_tokenizers", False)]
        if token_level:
            raise KDUserError(f"The objective(s) {', '.join(token_level)} compare teacher and student token by token, "
                              f"but the two read the text through different tokenizers ({sizes}). Compare them "
                              f"across tokenizers: --set objectives.kd.name=cross_tokenizer (likelihoods of the text "
                              f"pieces both tokenizations cover; docs/objectives.md, 'Across tokenizers'), or drop "
                              f"data.teacher_vocab_size.")

    def compare(self, batch: Batch, step: int) -> Comparison:
        """Teacher and student on the batch's data prefixes."""
        return self.meet(batch, {})

    def merge_requests(self, requests: Sequence[SignalRequest]) -> SignalRequest:
        """What to ask a text model for, given what each objective asked of it.

        The LM head runs only when some objective cannot do without logits (it asked for them and not for the final
        hidden state). Otherwise the model returns its final hidden state and output projection: a fused objective
        then never has the ``(B, T, V)`` logits built, and a dense one derives them once with
        :func:`kdcore.objectives.inputs.logits_of`.
        """
        union = super().merge_requests(requests)
        needs_logits = any(item.wants(Signal.LOGITS) and not item.wants(Signal.FINAL_HIDDEN) for item in requests)
        if union.wants(Signal.FINAL_HIDDEN) and not needs_logits:
            return SignalRequest(union.signals - {Signal.LOGITS}, union.hidden_layers)
        return union

    def meet(self, model_batch: Batch, parts: dict[str, float], labels: torch.Tensor | None = None,
             teacher_signals: Signals | None = None) -> Comparison:
        """Both models read ``model_batch``'s prefixes; the objectives compare them there.

        ``labels`` are the targets aligned with the logits (default: the batch's own, through the student's
        :meth:`~kd_plugins.text.models.HFTextModel.target_labels`). The teacher runs only when an objective asks it
        for something, unless the method hands over ``teacher_signals`` of its own.
        """
        student_request, teacher_request = self.student_request(), self.teacher_request()
        teacher_batch = teacher_reading(model_batch)
        if teacher_signals is None:
            teacher_signals = (self.text_teacher.signals(teacher_batch, teacher_request)  # type: ignore[attr-defined]
                               if teacher_request.signals else Signals())
        student_signals = self.text_student.forward_signals(model_batch, student_request)
        aligned = self.text_student.target_labels(model_batch) if labels is None else labels
        comparison_batch = self.comparison_batch(model_batch, aligned)
        if teacher_batch is not model_batch:
            # Each side's targets and offsets at the logit positions that predict them.
            comparison_batch.update(
                teacher_labels=self.text_teacher.target_labels(teacher_batch),
                teacher_offsets=self.text_teacher.align_with_logits(model_batch["teacher_offsets"], 0),
                student_offsets=self.text_student.align_with_logits(model_batch["student_offsets"], 0))
        return Comparison(student_signals, teacher_signals, comparison_batch, parts)

    def comparison_batch(self, model_batch: Batch, labels: torch.Tensor) -> dict[str, Any]:
        """What the objectives read besides the signals: ``labels`` aligned with the logits, ``attention_mask``
        with the positions of the final hidden states (a seq2seq model's decoder positions: those with a target)."""
        if self.text_student.is_encoder_decoder:
            mask = model_batch.get("decoder_attention_mask")
            mask = (labels != IGNORE_INDEX).long() if mask is None else mask
        else:
            mask = model_batch.get("attention_mask")
        return {**model_batch, "labels": labels, "attention_mask": mask}


__all__ = ["TEXT_SIGNALS", "TextMethod", "merge_rows", "take_rows"]
