"""Fused output projection + divergence that never materialises full-size logits.

``fused_linear_divergence`` equals ``divergence(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, kind)``
but walks over the positions in chunks: for each chunk it computes the student and teacher
logits, the per-position loss and the closed-form d loss / d logits with
:func:`kdcore.objectives.divergence.divergence_chunk` (the same function the dense path
uses), and immediately turns that gradient into the gradients for the student's hidden
states, weight and bias. Only one chunk of logits exists at a time, and backward is a
multiplication of the stored (small) gradients by the incoming scalar.

Plain PyTorch only: no Triton, no torch.compile. Where an optional CUDA extension is
built (:mod:`kdcore.fused.cuda_ext`), it is used on CUDA for the per-chunk step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdcore.objectives.divergence import (
    Workspace,
    auto_chunk_rows,
    check_divergence_args,
    divergence_chunk,
    valid_positions,
)

# float64 inputs also take the "matmul dtype" route: the divergence math itself runs in float32.
_FULL_PRECISION = (torch.float32,)


def _rows(flat: Tensor, rows: slice | Tensor) -> Tensor:
    return flat[rows] if isinstance(rows, slice) else flat.index_select(0, rows)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, out32: Tensor,
             low_precision_out: Tensor | None) -> Tensor:
    """``(hidden @ weight.T + bias) / T`` into the float32 buffer ``out32`` (one matmul, no extra pass)."""
    inv_t = 1.0 / temperature
    if hidden.dtype == torch.float32 and low_precision_out is None:
        if bias is None:
            torch.mm(hidden, weight.t(), out=out32)
            if temperature != 1.0:
                out32.mul_(inv_t)
        else:
            torch.addmm(bias.to(torch.float32), hidden, weight.t(), beta=inv_t, alpha=inv_t, out=out32)
        return out32
    # Low precision: the matmul runs in the input dtype (fp32 accumulation inside), like the
    # unfused model would produce its logits; the divergence math then runs in float32.
    assert low_precision_out is not None
    if bias is None:
        torch.mm(hidden, weight.t(), out=low_precision_out)
    else:
        torch.addmm(bias.to(hidden.dtype), hidden, weight.t(), out=low_precision_out)
    out32.copy_(low_precision_out)
    if temperature != 1.0:
        out32.mul_(inv_t)
    return out32


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,  # type: ignore[override]
                teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, labels: Tensor | None,
                kind: str, beta: float, skew: float, temperature: float, chunk_size: int | None) -> Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        device = student_hidden.device
        vocab = student_weight.shape[0]
        student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        n_rows = student_flat.shape[0]
        valid = valid_positions(labels, student_hidden.shape[:-1], device)
        n_valid = n_rows if valid is None else valid.numel()

        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden = (torch.empty_like if valid is None else torch.zeros_like)(student_flat)
        # Gradients of the head accumulate over chunks: keep them in float32 whatever the dtype.
        if need_weight:
            grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device)
        if need_bias:
            grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)

        if n_valid:
            low_precision = student_hidden.dtype not in _FULL_PRECISION or teacher_hidden.dtype not in _FULL_PRECISION
            chunk = chunk_size or auto_chunk_rows(vocab, n_valid, device, buffers=7 if low_precision else 6)
            chunk = min(chunk, n_valid)
            ws = Workspace(chunk, vocab, device)
            student_lp = teacher_lp = weight_lp = None
            if low_precision:
                student_lp = torch.empty(chunk, vocab, dtype=student_hidden.dtype, device=device)
                teacher_lp = (student_lp if teacher_hidden.dtype == student_hidden.dtype
                              else torch.empty(chunk, vocab, dtype=teacher_hidden.dtype, device=device))
                if need_weight:
                    weight_lp = torch.empty(student_weight.shape, dtype=student_hidden.dtype, device=device)
            # d loss / d raw logits = d loss_row / d (logits / T) / T, averaged over counted positions
            scale = 1.0 / (temperature * n_valid)
            for start in range(0, n_valid, chunk):
                rows: slice | Tensor = (slice(start, min(start + chunk, n_rows)) if valid is None
                                        else valid[start:start + chunk])
                hidden_s = _rows(student_flat, rows)
                hidden_t = _rows(teacher_flat, rows)
                n = hidden_s.shape[0]
                logits_s = _project(hidden_s, student_weight, student_bias, temperature, ws.get("student", n),
                                    None if student_lp is None else student_lp[:n])
                logits_t = _project(hidden_t, teacher_weight, teacher_bias, temperature, ws.get("teacher", n),
                                    None if teacher_lp is None else teacher_lp[:n])
                result = divergence_chunk(logits_s, logits_t, kind, beta=beta, skew=skew,
                                          student_grad=need_hidden or need_weight or need_bias, workspace=ws)
                total += result.loss.sum(dtype=torch.float64)
                grad_logits = result.student_grad
                if grad_logits is None:
                    continue
                if grad_bias is not None:
                    grad_bias.add_(grad_logits.sum(0), alpha=scale)
                if student_lp is not None:
                    # back to the matmul dtype for the two gradient matmuls (as autograd would do)
                    grad_logits = student_lp[:n].copy_(grad_logits)
                if grad_hidden is not None:
                    chunk_grad = torch.mm(grad_logits, student_weight).mul_(scale)
                    if isinstance(rows, slice):
                        grad_hidden[rows] = chunk_grad
                    else:
                        grad_hidden.index_copy_(0, rows, chunk_grad)
                if grad_weight is not None:
                    if weight_lp is None:
                        grad_weight.addmm_(grad_logits.t(), hidden_s, alpha=scale)
                    else:
                        grad_weight.add_(torch.mm(grad_logits.t(), hidden_s, out=weight_lp), alpha=scale)

        ctx.save_for_backward(
            grad_hidden.view(student_hidden.shape) if grad_hidden is not None else None,
            grad_weight, grad_bias,
        )
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
        return (total / max(n_valid, 1)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        dtype_hidden, dtype_weight, dtype_bias = ctx.dtypes
        scale = grad_output.to(torch.float32)
        out_hidden = None if grad_hidden is None else (grad_hidden * scale.to(grad_hidden.dtype)).to(dtype_hidden)
        out_weight = None if grad_weight is None else (grad_weight * scale).to(dtype_weight)
        out_bias = None if grad_bias is None else (grad_bias * scale).to(dtype_bias)
        return out_hidden, out_weight, out_bias, None, None, None, None, None, None, None, None, None


def fused_linear_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                            teacher_weight: Tensor, kind: str, *, student_bias: Tensor | None = None,
                            teacher_bias: Tensor | None = None, labels: Tensor | None = None, beta: float = 0.5,
                            skew: float = 0.1, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """``divergence(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias, kind, ...)``
    without ever holding the full ``(positions, V)`` logits.

    Args:
        student_hidden: ``(..., H_S)``, e.g. ``(B, T, H_S)`` or ``(N, H_S)``: the student's final hidden states.
        student_weight: ``(V, H_S)`` output projection (``nn.Linear`` layout); ``student_bias`` ``(V,)`` or None.
        teacher_hidden: ``(..., H_T)`` with the same leading shape; ``teacher_weight`` ``(V, H_T)``.
            The teacher side is treated as a constant (no gradient flows to it).
        kind, beta, skew, temperature, labels: as in :func:`kdcore.objectives.divergence`.
        chunk_size: positions per chunk; by default chosen from the vocabulary size and free memory.

    Returns:
        A float32 scalar with gradients for ``student_hidden``, ``student_weight`` and ``student_bias``.
        The gradients are computed during this call, chunk by chunk; backward only scales them.
    """
    check_divergence_args(kind, beta, skew, temperature)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same leading (position) shape")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student weight {tuple(student_weight.shape)} must be (V, {student_hidden.shape[-1]})")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher weight {tuple(teacher_weight.shape)} must be (V, {teacher_hidden.shape[-1]})")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_weight.shape[0]} differs from teacher vocabulary "
                         f"{teacher_weight.shape[0]}: use the ULD objective for different tokenizers")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    teacher_weight = teacher_weight.detach().to(teacher_hidden.dtype)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    student_weight_matched = student_weight.to(student_hidden.dtype) if student_weight.dtype != student_hidden.dtype \
        else student_weight
    return _FusedLinearDivergence.apply(student_hidden, student_weight_matched, student_bias, teacher_hidden.detach(),
                                        teacher_weight, teacher_bias, labels, kind, beta, skew, temperature, chunk_size)
