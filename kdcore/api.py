"""The public API for kd plugin authors: everything a third-party objective, method or hook needs, in one import.

``from kdcore.api import ...`` is the supported surface; the modules behind it may move. docs/writing-plugins.md
walks through a complete objective and a complete method (examples/kd-example-objective, examples/kd-example-method).

An **objective** decides *how* teacher and student are compared:

* :class:`Objective` -- subclass it; set ``name`` and ``description`` (one line, what ``kd list`` shows) and
  optionally a ``Config`` (a :class:`StrictModel`: its fields are the objective's ``args``, unknown keys refused);
  return the signals it reads from ``student_request()`` / ``teacher_request()``, and compute the loss in
  ``__call__(student, teacher, batch) -> ObjectiveOutput(loss, parts)`` (``parts``: extra floats to log).
* :func:`request` ``(Signal.LOGITS)`` builds a :class:`SignalRequest`; :class:`Signal` names what a model can return
  (``LOGITS``, ``HIDDEN_STATES``, ...); :class:`Signals` holds what it returned.
* Readers with clear errors: :func:`logits_of` ``(signals, role, objective_name)`` (a tensor ``(..., V)``, or
  :class:`SparseLogits` top-k when the teacher logits come from a cache), :func:`labels_of` ``(batch,
  logits.shape, objective_name)`` (one id per logit position, or None), :func:`hidden_states_of`, and
  :func:`counted_positions` ``(labels, n)`` (how many positions a mean runs over).
* :data:`IGNORE_INDEX` (-100): the label of a position that no loss scores.
* The core's math, to reuse rather than copy: :func:`divergence` (KL, reverse KL, JSD, skew KLs, TVD),
  :func:`hidden_state_loss`, :func:`token_nll`.

A **method** (``kd run --plugin NAME``) decides *where* they meet:

* :class:`Method` -- subclass it; override ``compare(batch, step) -> Comparison`` and, for the paper's loss,
  ``defaults()`` returning ``{"objectives": {...}}``. Inside ``compare``, ``self.teacher.signals(batch,
  self.teacher_request())`` and ``self.student.forward_signals(batch, self.student_request())`` run the models on
  what the configured objectives ask for. Do not override ``training_step``: the loss is always the weighted sum of
  the configured objectives over the comparison.
* :class:`Comparison` ``(student, teacher, batch, parts)`` -- both sides' signals on the same positions, the batch
  the objectives read (``labels``, ``attention_mask``) and the method's own numbers to log.
* ``student_offers`` / ``teacher_offers`` (class attributes, sets of :class:`Signal`): what ``compare`` can hand
  over; planning refuses an objective asking for anything else. :data:`ALL_SIGNALS` is the default.

**Registration and hooks**: decorate module-level functions with :data:`hookimpl` -- ``kd_register_objectives()``,
``kd_register_methods()`` (also ``_tasks``, ``_teachers``, ``_students``) return your classes -- and point a
``kd.plugins`` entry point at the module. Lifecycle hooks (``kd_on_step_end(context, step, logs)``,
``kd_on_evaluation_end(context, step, metrics)``, ...) receive a :class:`RunContext`: ``context.state`` is the
:class:`RunState` (step, metrics, best so far, output directory, ...), ``context.control`` the :class:`RunControl`
(``request_stop(reason)`` ends the run cleanly after the step).

**Errors**: raise :class:`KDUserError` for a user's mistake (a bad setting, an unusable input): kd prints its one
paragraph and exits 2, without a traceback. ``Batch`` is the type of a batch (a mapping of names to tensors).
"""
from __future__ import annotations

from kdcore.config import StrictModel
from kdcore.errors import KDUserError
from kdcore.hooks import RunContext, RunControl, RunState
from kdcore.hookspecs import hookimpl
from kdcore.interfaces import ALL_SIGNALS, Batch, Comparison, Method, Objective, ObjectiveOutput
from kdcore.objectives import divergence, hidden_state_loss, token_nll
from kdcore.objectives.inputs import counted_positions, hidden_states_of, labels_of, logits_of
from kdcore.signals import IGNORE_INDEX, Signal, SignalRequest, Signals, SparseLogits, request

__all__ = [
    "ALL_SIGNALS", "Batch", "Comparison", "IGNORE_INDEX", "KDUserError", "Method", "Objective", "ObjectiveOutput",
    "RunContext", "RunControl", "RunState", "Signal", "SignalRequest", "Signals", "SparseLogits", "StrictModel",
    "counted_positions", "divergence", "hidden_state_loss", "hidden_states_of", "hookimpl", "labels_of",
    "logits_of", "request", "token_nll",
]
