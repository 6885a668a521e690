"""Divergences between teacher and student output distributions: the one source of this math.

Everything that compares two categorical distributions given by logits goes through
:func:`divergence_chunk`, which returns, for a block of positions, the per-position loss
*and* its gradient with respect to the (temperature-scaled) student logits, in closed form.
:func:`divergence` (dense logits) and :func:`kdcore.fused.fused_linear_divergence` (logits
produced chunk by chunk from hidden states) both call it, so the two can never disagree.
A top-k teacher (:class:`~kdcore.signals.SparseLogits`) goes through
:func:`sparse_divergence_chunk`, which groups both distributions into the teacher's k tokens
plus "any other token" and calls :func:`divergence_chunk` on those k+1 atoms, in both paths.

Why closed-form gradients instead of autograd: the fused path must produce the gradient
while the logits of a chunk exist and then drop them; autograd would keep every chunk's
intermediate tensors alive until backward. The dense path uses the same code so that the
math has one implementation (and it needs less memory than autograd's saved tensors).

Conventions (see docs/objectives.md):

* ``p_S = softmax(student_logits / T)``, ``p_T = softmax(teacher_logits / T)``.
* The loss of a position is summed over the vocabulary; the result is the mean over the
  positions whose label is not ``-100`` (all positions when no labels are given). When
  no position counts, the loss is 0 (not NaN) and so is the gradient.
* No temperature-squared factor is applied: multiply the objective's weight by ``T**2``
  if you want Hinton et al.'s gradient scale.
* Logits equal to ``-inf`` (a masked vocabulary) are allowed: they get probability 0 and
  contribute 0 to the loss and to the gradient. Internally ``-inf`` is replaced by
  ``-1e30`` so that ``0 * log 0`` and ``(-inf) - (-inf)`` never produce NaN. Where the
  teacher puts mass on a token the student gives ``-inf``, forward KL is genuinely
  infinite and is reported as a huge finite number (about ``1e30``).
* Computation is in float32 whatever the input dtype (bf16/fp16 inputs are upcast chunk
  by chunk); the returned loss is float32, gradients come back in the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from kdcore.errors import KDUserError
from kdcore.signals import IGNORE_INDEX, SparseLogits

DivergenceKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
DIVERGENCE_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

# Stand-in for log(0) / -inf logits: exp() of it is exactly 0 in float32, and differences
# of two such values stay finite, so masked-vocabulary entries never create NaN.
LOG_FLOOR = -1e30
# Smallest normal float32: a mixture probability is clamped to it before log() so log M is finite.
_TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------- workspace
class Workspace:
    """Reusable float32 ``(rows, vocab)`` scratch buffers for one chunked computation.

    Allocating a fresh (rows x vocab) tensor per chunk costs page faults comparable to the
    arithmetic itself on CPU (measured ~10x slower than writing into a reused buffer), so
    every chunked loop allocates its buffers once and the chunk math writes into them.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.rows, self.vocab, self.device, self.dtype = rows, vocab, device, dtype
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, n: int) -> Tensor:
        """The buffer called ``name`` restricted to its first ``n`` rows (contents undefined)."""
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = torch.empty(self.rows, self.vocab, device=self.device, dtype=self.dtype)
            self._buffers[name] = buffer
        return buffer[:n]


def _row_dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Row-wise dot product ``(a * b).sum(-1)`` using ``scratch`` for the product (no allocation)."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _centered_dot_(values: Tensor, prob: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """Shift each row of ``values`` in place by its entry at the row's most probable token; return
    ``(shift, <prob, shifted values>)``, so that ``<prob, values> = shift + dot``.

    Why: the gradients below have the form ``P * (v - <P, v>)``. For the dominant token of a
    confident row, ``v_i - <P, v>`` is a tiny difference of two O(1) numbers and float32 loses it
    (a relative error of 1e-3 was seen). After the shift that token's own term is exactly 0 and
    the others are small, so the difference is computed from small numbers and stays accurate.
    """
    shift = values.gather(-1, prob.argmax(-1, keepdim=True))
    values.sub_(shift)
    return shift.squeeze(-1), _row_dot(prob, values, scratch)


def _floored_log_softmax_(logits: Tensor, finite: bool = False) -> Tensor:
    """In-place log-softmax over the last dim with -inf replaced by :data:`LOG_FLOOR` first.

    ``finite=True`` promises there is no -inf and skips that pass over the chunk.
    """
    if not finite:
        logits.clamp_(min=LOG_FLOOR)
    return torch.log_softmax(logits, -1, out=logits)


# --------------------------------------------------------------------------- per-chunk math
@dataclass
class ChunkResult:
    """Per-position loss and gradients for one chunk of positions.

    ``student_grad``/``teacher_grad`` are d loss_i / d (logits_i / T) for each row i
    (unscaled by 1/T and by the number of positions); they may alias the input buffers.
    """

    loss: Tensor
    student_grad: Tensor | None
    teacher_grad: Tensor | None


def _kl(p: Tensor, q: Tensor, need_p: bool, need_q: bool, ws: Workspace,
        finite: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """KL(P || Q) per row, with d/dp = P*(log P - log Q - KL) and d/dq = Q - P."""
    n = p.shape[0]
    log_p = _floored_log_softmax_(p, finite)
    log_q = _floored_log_softmax_(q, finite)
    prob_p = torch.exp(log_p, out=ws.get("prob_a", n))
    log_ratio = log_p.sub_(log_q)
    grad_p = None
    if need_p:
        shift, centered = _centered_dot_(log_ratio, prob_p, ws.get("scratch", n))
        loss = shift + centered
        grad_p = log_ratio.sub_(centered.unsqueeze(-1)).mul_(prob_p)
    else:
        # an elementwise product may write over one of its operands: log_ratio is its own scratch
        loss = _row_dot(prob_p, log_ratio, log_ratio)
    grad_q = log_q.exp_().sub_(prob_p) if need_q else None
    return loss, grad_p, grad_q


def _skew_kl(p: Tensor, q: Tensor, alpha: float, need_p: bool, need_q: bool,
             ws: Workspace, finite: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """KL(P || M) with M = alpha*P + (1-alpha)*Q, per row.

    d/dp = P*(u - <P,u>) with u = log P - log M - alpha*P/M;
    d/dq = -(1-alpha)*Q*(r - <Q,r>) with r = P/M.
    """
    n = p.shape[0]
    log_p = _floored_log_softmax_(p, finite)
    prob_q = _floored_log_softmax_(q, finite).exp_()
    prob_p = torch.exp(log_p, out=ws.get("prob_a", n))
    # The mixture is formed from probabilities. logaddexp of the log-probabilities would keep more
    # precision where M is close to 1, but it is not vectorised on CPU (about 20x the cost of exp).
    mixture = torch.mul(prob_q, 1.0 - alpha, out=ws.get("mixture", n)).add_(prob_p, alpha=alpha).clamp_min_(_TINY)
    p_over_m = torch.div(prob_p, mixture, out=ws.get("ratio", n)) if need_p or need_q else None
    grad_q = None
    if need_q:
        assert p_over_m is not None
        # (1-alpha)*(Q*sum(w) - w) with w = Q*r, r = P/M, is -(1-alpha)*Q*(r - <Q,r>): centred like the others
        ratio = ws.get("weight", n).copy_(p_over_m) if need_p else p_over_m
        _, centered_q = _centered_dot_(ratio, prob_q, ws.get("scratch", n))
        grad_q = ratio.sub_(centered_q.unsqueeze(-1)).mul_(prob_q).mul_(-(1.0 - alpha))
    log_ratio = log_p.sub_(mixture.log_())
    loss = _row_dot(prob_p, log_ratio, ws.get("scratch", n) if need_p else log_ratio)
    grad_p = None
    if need_p:
        assert p_over_m is not None
        u = log_ratio.sub_(p_over_m, alpha=alpha)
        _, centered = _centered_dot_(u, prob_p, ws.get("scratch", n))
        grad_p = u.sub_(centered.unsqueeze(-1)).mul_(prob_p)
    return loss, grad_p, grad_q


def _jsd(student: Tensor, teacher: Tensor, beta: float, need_s: bool, need_t: bool,
         ws: Workspace, finite: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Generalized JSD of GKD: beta*KL(P_T||M) + (1-beta)*KL(P_S||M), M = beta*P_T + (1-beta)*P_S.

    d/ds = (1-beta)*P_S*(a_S - KL(P_S||M)) with a_S = log P_S - log M (and symmetrically for t):
    the terms from M's dependence on p_S cancel, leaving only this.
    """
    n = student.shape[0]
    log_s = _floored_log_softmax_(student, finite)
    log_t = _floored_log_softmax_(teacher, finite)
    prob_s = torch.exp(log_s, out=ws.get("prob_a", n))
    prob_t = torch.exp(log_t, out=ws.get("prob_b", n))
    # formed from probabilities (logaddexp of log-probabilities is not vectorised on CPU: 20x exp)
    log_m = torch.mul(prob_s, 1.0 - beta, out=ws.get("mixture", n)).add_(prob_t, alpha=beta).clamp_min_(_TINY).log_()
    a_s = log_s.sub_(log_m)
    a_t = log_t.sub_(log_m)
    scratch = log_m  # log M is no longer needed: reuse it as scratch
    grad_s = grad_t = None
    if need_s:
        shift_s, centered_s = _centered_dot_(a_s, prob_s, scratch)
        kl_s = shift_s + centered_s
        grad_s = a_s.sub_(centered_s.unsqueeze(-1)).mul_(prob_s).mul_(1.0 - beta)
    else:
        kl_s = _row_dot(prob_s, a_s, scratch)
    if need_t:
        shift_t, centered_t = _centered_dot_(a_t, prob_t, scratch)
        kl_t = shift_t + centered_t
        grad_t = a_t.sub_(centered_t.unsqueeze(-1)).mul_(prob_t).mul_(beta)
    else:
        kl_t = _row_dot(prob_t, a_t, scratch)
    loss = kl_t.mul(beta).add_(kl_s, alpha=1.0 - beta)
    return loss, grad_s, grad_t


def _tvd(student: Tensor, teacher: Tensor, need_s: bool, need_t: bool,
         ws: Workspace, finite: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """1/2 sum |P_T - P_S|; d/ds = P_S*(g - <P_S,g>) with g = sign(P_S - P_T)/2 (0 at ties, as autograd)."""
    prob_s = _floored_log_softmax_(student, finite).exp_()
    prob_t = _floored_log_softmax_(teacher, finite).exp_()
    n = student.shape[0]
    difference = torch.sub(prob_s, prob_t, out=ws.get("mixture", n))
    loss = torch.linalg.vector_norm(difference, 1, dim=-1).mul_(0.5)
    half_sign = difference.sign_().mul_(0.5)
    grad_t = None
    if need_t:
        # g_T = -half_sign: P_T*(g_T - <P_T,g_T>) = -P_T*(half_sign - <P_T,half_sign>)
        values_t = ws.get("ratio", n).copy_(half_sign) if need_s else half_sign
        _, centered_t = _centered_dot_(values_t, prob_t, ws.get("scratch", n))
        grad_t = values_t.sub_(centered_t.unsqueeze(-1)).mul_(prob_t).neg_()
    grad_s = None
    if need_s:
        _, centered_s = _centered_dot_(half_sign, prob_s, ws.get("scratch", n))
        grad_s = half_sign.sub_(centered_s.unsqueeze(-1)).mul_(prob_s)
    return loss, grad_s, grad_t


def divergence_chunk(student: Tensor, teacher: Tensor, kind: str, *, beta: float = 0.5, skew: float = 0.1,
                     student_grad: bool = True, teacher_grad: bool = False,
                     workspace: Workspace | None = None, finite: bool = False) -> ChunkResult:
    """Per-position divergence and its closed-form gradients for one chunk.

    ``student`` and ``teacher`` are float32 ``(n, V)`` logits already divided by the
    temperature; they are used as scratch space and overwritten. Every position counts
    (the caller drops ignored positions first). Used by :func:`divergence` and by the
    fused path, so both compute exactly the same thing. ``finite=True`` promises that no
    logit is -inf (e.g. they come from a matmul without a masking bias) and saves a pass.
    """
    if student.dtype != torch.float32 or teacher.dtype != torch.float32:
        raise TypeError("divergence_chunk expects float32 scratch tensors")
    ws = workspace or Workspace(student.shape[0], student.shape[1], student.device)
    if kind == "forward_kl":
        loss, grad_t, grad_s = _kl(teacher, student, teacher_grad, student_grad, ws, finite)
    elif kind == "reverse_kl":
        loss, grad_s, grad_t = _kl(student, teacher, student_grad, teacher_grad, ws, finite)
    elif kind == "jsd":
        loss, grad_s, grad_t = _jsd(student, teacher, beta, student_grad, teacher_grad, ws, finite)
    elif kind == "skew_forward_kl":
        loss, grad_t, grad_s = _skew_kl(teacher, student, skew, teacher_grad, student_grad, ws, finite)
    elif kind == "skew_reverse_kl":
        loss, grad_s, grad_t = _skew_kl(student, teacher, skew, student_grad, teacher_grad, ws, finite)
    elif kind == "tvd":
        loss, grad_s, grad_t = _tvd(student, teacher, student_grad, teacher_grad, ws, finite)
    else:
        raise ValueError(check_kind_message(kind))
    return ChunkResult(loss, grad_s, grad_t)


def _log1mexp(log_x: Tensor) -> Tensor:
    """``log(1 - exp(log_x))`` for ``log_x <= 0``, accurate at both ends (Maechler's two branches)."""
    return torch.where(log_x > -math.log(2.0), torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


def _first_finite_occurrences(values: Tensor, indices: Tensor) -> Tensor:
    """Which of the ``(n, k)`` teacher entries form the top-k set: a finite value whose id did not occur
    earlier in its row. Stored padding rows (ids 0..k-1 with -inf values) and repeated ids are left out,
    so the k atoms and the rest always partition the vocabulary."""
    member = values > float("-inf")
    if indices.shape[-1] > 1:
        sorted_ids, order = indices.sort(dim=-1, stable=True)
        repeated = torch.zeros_like(member)
        repeated[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
        member &= ~torch.empty_like(member).scatter_(-1, order, repeated)
    return member


def sparse_divergence_chunk(student: Tensor, teacher_values: Tensor, teacher_indices: Tensor,
                            teacher_tail: Tensor | None, kind: str, *, beta: float = 0.5, skew: float = 0.1,
                            student_grad: bool = True, finite: bool = False) -> ChunkResult:
    """Per-position divergence to a top-k (+ tail mass) teacher and its gradient wrt the dense student logits.

    Both distributions are reduced to k+1 atoms: the teacher's top-k ids and "everything else".
    The teacher's atoms are its top-k probabilities and its tail mass ``exp(teacher_tail)``; the
    student's are its probabilities of the same ids and its own mass on all other ids. The
    divergence of these two distributions is :func:`divergence_chunk` on their log-probabilities.
    It equals the full-vocabulary divergence when the teacher's tail is distributed like the
    student's, and is a lower bound of it otherwise (data-processing inequality). With
    ``teacher_tail`` None the teacher has no mass outside its top k (it is renormalised over them),
    and then the result equals the full-vocabulary divergence exactly, for every kind.

    Args:
        student: float32 ``(n, V)`` student logits already divided by the temperature; used as
            scratch and overwritten (``student_grad`` of the result aliases it).
        teacher_values: ``(n, k)`` teacher logits of the top-k ids, divided by the same temperature.
        teacher_indices: ``(n, k)`` their vocabulary ids. Entries with value -inf, and repeats of an
            id already in the row, are not part of the top-k set (their mass stays in the tail).
        teacher_tail: ``(n,)`` log of the teacher's probability outside the top k at this
            temperature, or None.
        kind, beta, skew, student_grad, finite: as in :func:`divergence_chunk`.

    Returns:
        The per-position loss and d loss / d student (no teacher gradient: the teacher is a constant).
    """
    if student.dtype != torch.float32:
        raise TypeError("sparse_divergence_chunk expects float32 student scratch logits")
    n, k = teacher_values.shape
    indices = teacher_indices.long()
    member = _first_finite_occurrences(teacher_values, indices)

    # teacher atoms: log p_T of the top-k ids (renormalised, then scaled to 1 - tail mass) and the tail
    teacher_bucket = torch.empty(n, k + 1, dtype=torch.float32, device=student.device)
    top = teacher_bucket[:, :k]
    top.copy_(torch.log_softmax(teacher_values.float().clamp(min=LOG_FLOOR).masked_fill_(~member, LOG_FLOOR), -1))
    if teacher_tail is None:
        teacher_bucket[:, k] = LOG_FLOOR
    else:
        tail = teacher_tail.float().clamp(max=0.0)  # the top k always carry some mass; rounding may say otherwise
        top.add_(_log1mexp(tail).clamp_(min=LOG_FLOOR).unsqueeze(-1))
        teacher_bucket[:, k] = tail.clamp(min=LOG_FLOOR)
    top.masked_fill_(~member, LOG_FLOOR)

    # student atoms: log p_S of the same ids, and the log of its mass on all other ids
    log_p = _floored_log_softmax_(student, finite)
    student_bucket = torch.empty_like(teacher_bucket)
    student_bucket[:, :k] = log_p.gather(-1, indices).masked_fill_(~member, LOG_FLOOR)
    # drop the top-k ids (order-independent with repeated ids: the minimum of -inf and anything is -inf)
    log_p.scatter_reduce_(-1, indices, torch.where(member, float("-inf"), float("inf")), "amin")
    peak = log_p.amax(-1, keepdim=True)
    peak.masked_fill_(peak == float("-inf"), 0.0)  # no other id: every factor below is 0
    share = log_p.sub_(peak).exp_()  # p_v / exp(peak) on the other ids, 0 on the top k
    total = share.sum(-1, keepdim=True)
    student_bucket[:, k:] = (peak + total.log()).clamp_(min=LOG_FLOOR)

    result = divergence_chunk(student_bucket, teacher_bucket, kind, beta=beta, skew=skew, student_grad=student_grad,
                              workspace=Workspace(n, k + 1, student.device))
    if not student_grad:
        return ChunkResult(result.loss, None, None)
    bucket_grad = result.student_grad
    assert bucket_grad is not None
    # The loss depends on z only through the atoms, whose gradients sum to 0 (softmax): a top-k id
    # gets its atom's gradient, another id v its share p_v / m_S of the tail atom's gradient.
    factor = torch.where(total > 0, bucket_grad[:, k:] / total, torch.zeros_like(total))
    grad = share.mul_(factor)
    grad.scatter_add_(-1, indices, bucket_grad[:, :k].masked_fill(~member, 0.0))
    return ChunkResult(result.loss, grad, None)


# --------------------------------------------------------------------------- argument checks
def check_kind_message(kind: object) -> str:
    return f"unknown divergence kind {kind!r}; expected one of {', '.join(DIVERGENCE_KINDS)}"


def check_divergence_args(kind: str, beta: float, skew: float, temperature: float) -> None:
    """Raise ``ValueError`` for an unknown kind or an out-of-range parameter."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(check_kind_message(kind))
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def check_sparse_teacher(teacher: SparseLogits, kind: str, temperature: float, vocab: int) -> None:
    """Refuse a top-k teacher that the divergence ``kind`` cannot use at ``temperature`` (KDUserError),
    or whose ids do not fit a vocabulary of ``vocab`` entries (ValueError)."""
    if teacher.vocab_size != vocab:
        raise ValueError(f"the sparse teacher's vocabulary ({teacher.vocab_size}) and the student's ({vocab}) differ")
    if teacher.indices.numel() and (int(teacher.indices.min()) < 0 or int(teacher.indices.max()) >= vocab):
        raise ValueError(f"sparse teacher ids must lie in [0, {vocab}), got ids from {int(teacher.indices.min())} "
                         f"to {int(teacher.indices.max())}")
    if teacher.tail_log_mass is None:
        if kind == "reverse_kl":
            raise KDUserError(
                "The objective kind 'reverse_kl' cannot use top-k teacher logits without their tail mass: the teacher "
                "then gives probability 0 outside its top-k tokens, so KL(p_S || p_T) is infinite. Use a teacher "
                "store captured with the tail mass (kd teacher capture records it), 'skew_reverse_kl' (finite for "
                "skew > 0), 'jsd' or 'forward_kl', or run the teacher live.")
        return
    if not math.isclose(temperature, teacher.tail_temperature, rel_tol=1e-6):
        raise KDUserError(
            f"The objective kind '{kind}' uses temperature {temperature:g}, but the top-k teacher's tail mass was "
            f"recorded at temperature {teacher.tail_temperature:g}, and the mass outside the top k at another "
            f"temperature cannot be recovered from the top k alone. Set the objective's temperature to "
            f"{teacher.tail_temperature:g}, or capture the teacher store again at temperature {temperature:g}.")


def sparse_on(teacher: SparseLogits, device: torch.device) -> SparseLogits:
    """``teacher`` with its tensors on ``device``, detached (a sparse teacher is a constant)."""
    tail = teacher.tail_log_mass
    return replace(teacher, values=teacher.values.detach().to(device), indices=teacher.indices.to(device),
                   tail_log_mass=None if tail is None else tail.detach().to(device))


def valid_positions(labels: Tensor | None, leading_shape: torch.Size, device: torch.device) -> Tensor | None:
    """Flat indices of positions whose label is not -100, or None when every position counts."""
    if labels is None:
        return None
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits' positions are {tuple(leading_shape)}")
    keep = labels.reshape(-1).to(device) != IGNORE_INDEX
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(-1)


def auto_chunk_rows(vocab: int, n_rows: int, device: torch.device, buffers: int = 6, head_bytes: int = 0) -> int:
    """Rows per chunk so that ``buffers`` float32 ``(rows, vocab)`` scratch tensors fit a memory budget.

    CPU: 256 MiB in all, or up to half of ``head_bytes`` (the size of the output head's float32
    gradient, which the fused path holds anyway) when that is larger -- with a big head, every
    chunk streams the whole weight through the matmuls, so taller chunks are faster (measured
    12% at V=128256, H=2048 for 256 instead of 80 rows) -- and at most 1/8 of available RAM;
    each buffer at most 32 MiB when that still gives 128 rows or more (see below).
    CUDA: a quarter of free device memory, at most 4 GiB, since larger matmuls do use the GPU
    better. Rounded down to a multiple of 16.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, 4 << 30)
    else:
        try:
            import psutil

            available = psutil.virtual_memory().available
        except Exception:  # psutil is a dependency, but a chunk size must never be the reason to fail
            available = 8 << 30
        budget = min(max(256 << 20, head_bytes // 2), available // 8)
        # glibc serves allocations below its mmap threshold (which grows to at most 32 MiB) from its
        # heap and reuses them; larger ones are mapped and page-faulted afresh each time. Chunk
        # tensors (e.g. the logits of a matmul) of at most 32 MiB are therefore much cheaper to
        # allocate: measured 12% faster at V=32000 (256 rows instead of 336). Only when that still
        # leaves tall enough matmuls (128 rows).
        heap_rows = (32 << 20) // (vocab * 4) // 16 * 16
        if heap_rows >= 128:
            budget = min(budget, heap_rows * buffers * vocab * 4)
    rows = max(16, int(budget // (buffers * vocab * 4)) // 16 * 16)
    return max(1, min(rows, n_rows))


# --------------------------------------------------------------------------- dense divergence
def _chunk_indices(valid: Tensor | None, n_rows: int, chunk: int):
    """Yield (slice or index tensor, count) over the rows that count, ``chunk`` at a time."""
    if valid is None:
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            yield slice(start, stop), stop - start
    else:
        for start in range(0, valid.numel(), chunk):
            index = valid[start:start + chunk]
            yield index, index.numel()


def _take_rows(flat: Tensor, rows: slice | Tensor) -> Tensor:
    return flat[rows] if isinstance(rows, slice) else flat.index_select(0, rows)


def _put_rows(flat: Tensor, rows: slice | Tensor, values: Tensor) -> None:
    if isinstance(rows, slice):
        flat[rows].copy_(values)
    else:
        flat.index_copy_(0, rows, values.to(flat.dtype))


class _DenseDivergence(torch.autograd.Function):
    """Dense-logits divergence whose gradient is computed in forward by :func:`divergence_chunk`
    (or, for a top-k teacher, :func:`sparse_divergence_chunk`)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor | SparseLogits, labels: Tensor | None,  # type: ignore[override]
                kind: str, beta: float, skew: float, temperature: float, chunk_size: int | None) -> Tensor:
        vocab = student_logits.shape[-1]
        student_flat = student_logits.reshape(-1, vocab)
        sparse = teacher_logits if isinstance(teacher_logits, SparseLogits) else None
        if sparse is not None:
            teacher_flat = sparse.values.reshape(-1, sparse.k)
            teacher_ids = sparse.indices.reshape(-1, sparse.k)
            teacher_tail = None if sparse.tail_log_mass is None else sparse.tail_log_mass.reshape(-1)
        else:
            assert isinstance(teacher_logits, Tensor)
            teacher_flat = teacher_logits.reshape(-1, vocab)
            teacher_shape = teacher_logits.shape
        n_rows = student_flat.shape[0]
        valid = valid_positions(labels, student_logits.shape[:-1], student_logits.device)
        n_valid = n_rows if valid is None else valid.numel()
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and sparse is None
        total = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        grad_s_flat = grad_t_flat = None
        if n_valid:
            chunk = chunk_size or auto_chunk_rows(vocab, n_valid, student_logits.device)
            ws = Workspace(min(chunk, n_valid), vocab, student_logits.device)
            # d loss / d logits = d loss_row / d (logits/T) * 1/T, averaged over the positions that count
            scale = 1.0 / (temperature * n_valid)
            new_grad = torch.empty if valid is None else torch.zeros
            if need_s:
                grad_s_flat = new_grad(student_flat.shape, dtype=student_logits.dtype, device=student_logits.device)
            if need_t:
                grad_t_flat = new_grad(teacher_flat.shape, dtype=teacher_flat.dtype, device=teacher_flat.device)
            for rows, n in _chunk_indices(valid, n_rows, chunk):
                student = ws.get("student", n).copy_(_take_rows(student_flat, rows))
                if temperature != 1.0:
                    student.mul_(1.0 / temperature)
                if sparse is not None:
                    result = sparse_divergence_chunk(
                        student, _take_rows(teacher_flat, rows).float() * (1.0 / temperature),
                        _take_rows(teacher_ids, rows), None if teacher_tail is None else _take_rows(teacher_tail, rows),
                        kind, beta=beta, skew=skew, student_grad=need_s)
                else:
                    teacher = ws.get("teacher", n).copy_(_take_rows(teacher_flat, rows))
                    if temperature != 1.0:
                        teacher.mul_(1.0 / temperature)
                    result = divergence_chunk(student, teacher, kind, beta=beta, skew=skew, student_grad=need_s,
                                              teacher_grad=need_t, workspace=ws)
                total += result.loss.sum(dtype=torch.float64)
                if grad_s_flat is not None and result.student_grad is not None:
                    _put_rows(grad_s_flat, rows, result.student_grad.mul_(scale))
                if grad_t_flat is not None and result.teacher_grad is not None:
                    _put_rows(grad_t_flat, rows, result.teacher_grad.mul_(scale))
        elif need_s or need_t:
            grad_s_flat = torch.zeros_like(student_flat) if need_s else None
            grad_t_flat = torch.zeros_like(teacher_flat) if need_t else None
        ctx.save_for_backward(
            grad_s_flat.view(student_logits.shape) if grad_s_flat is not None else None,
            grad_t_flat.view(teacher_shape) if grad_t_flat is not None else None,
        )
        return (total / max(n_valid, 1)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_s, grad_t = ctx.saved_tensors
        out_s = grad_s * grad_output.to(grad_s.dtype) if grad_s is not None else None
        out_t = grad_t * grad_output.to(grad_t.dtype) if grad_t is not None else None
        return out_s, out_t, None, None, None, None, None, None


def divergence(student_logits: Tensor, teacher_logits: Tensor | SparseLogits, kind: str, *, beta: float = 0.5,
               skew: float = 0.1, temperature: float = 1.0, labels: Tensor | None = None,
               chunk_size: int | None = None) -> Tensor:
    """Divergence between teacher and student distributions, averaged over counted positions.

    Args:
        student_logits: ``(..., V)`` logits (any float dtype; computed in float32).
        teacher_logits: ``(..., V)`` logits, or :class:`~kdcore.signals.SparseLogits` (top-k values
            and ids, ``(..., k)``): with its ``tail_log_mass`` compared as k+1 atoms (top k + the
            rest, :func:`sparse_divergence_chunk`), without it renormalised over the top k. A sparse
            teacher is a constant (no gradient flows to its values).
        kind: one of :data:`DIVERGENCE_KINDS` (see the module docstring and docs/objectives.md).
        beta: JSD interpolation weight; ``M = beta*p_T + (1-beta)*p_S``.
        skew: alpha of the skew KLs.
        temperature: both logits are divided by it.
        labels: ``logits.shape[:-1]`` integers; positions equal to -100 are ignored.
        chunk_size: positions per chunk (memory), automatic when None.

    Returns:
        A float32 scalar. Gradients flow to both logits (to the teacher's only if it requires grad).

    Raises:
        KDUserError: a top-k teacher the kind cannot use (see :func:`check_sparse_teacher`).
    """
    check_divergence_args(kind, beta, skew, temperature)
    if isinstance(teacher_logits, SparseLogits):
        if student_logits.shape[:-1] != teacher_logits.values.shape[:-1]:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and sparse teacher "
                             f"{tuple(teacher_logits.values.shape)} must have the same positions")
        check_sparse_teacher(teacher_logits, kind, temperature, student_logits.shape[-1])
        return _DenseDivergence.apply(student_logits, sparse_on(teacher_logits, student_logits.device), labels, kind,
                                      beta, skew, temperature, chunk_size)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary)")
    return _DenseDivergence.apply(student_logits, teacher_logits, labels, kind, beta, skew, temperature, chunk_size)
