"""Fused output projection + divergence that never materialises full-size logits.

``fused_linear_divergence`` equals ``divergence(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, kind)``
but walks over the positions in chunks: for each chunk it computes the student and teacher
logits, the per-position loss and the closed-form d loss / d logits with
:func:`kdcore.objectives.divergence.divergence_chunk` (the same function the dense path
uses), and immediately turns that gradient into the gradients for the student's hidden
states, weight and bias. Only one chunk of logits exists at a time, and backward is a
multiplication of the stored (small) gradients by the incoming scalar.
``fused_linear_sparse_divergence`` does the same against a top-k teacher (rows of its
:class:`~kdcore.signals.SparseLogits` instead of projected teacher logits).

Plain PyTorch only: no Triton, no torch.compile. Where an optional CUDA extension is
built (:mod:`kdcore.fused.cuda_ext`), it is used on CUDA for the per-chunk step.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from kdcore.fused.cuda_ext import load_extension, student_chunk_step
from kdcore.objectives.divergence import (
    Workspace,
    auto_chunk_rows,
    check_divergence_args,
    check_sparse_teacher,
    divergence_chunk,
    sparse_divergence_chunk,
    sparse_on,
    valid_positions,
)
from kdcore.signals import SparseLogits

# float64 inputs also take the "matmul dtype" route: the divergence math itself runs in float32.
_FULL_PRECISION = (torch.float32,)


def _rows(flat: Tensor, rows: slice | Tensor) -> Tensor:
    return flat[rows] if isinstance(rows, slice) else flat.index_select(0, rows)


# --------------------------------------------------------------------------- CPU GEMM choice
_ONEDNN_STATE: dict[str, bool | None] = {"usable": None}


def onednn_gemm_usable() -> bool:
    """Whether float32 CPU matmuls of the fused path go through oneDNN (``KD_FUSED_ONEDNN=0``: never).

    Why: torch.mm on CPU calls MKL's sgemm, which does not use AVX-512 on AMD processors;
    oneDNN does, and computes the same float32 product (no bf16/tf32 shortcut under torch's
    default ``fp32_precision``) about twice as fast on the AMD EPYC this was measured on
    (docs/performance.md). oneDNN is reached through ``torch.ops.mkldnn._linear_pointwise``,
    the op torch's own CPU compiler uses for linear layers; if it is missing or fails, the
    fused path uses torch.mm.
    """
    if os.environ.get("KD_FUSED_ONEDNN", "1") == "0":
        return False
    if _ONEDNN_STATE["usable"] is None:
        usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if usable:
            try:  # a tiny product against torch.mm: any build or dispatch problem shows here, once
                probe_x, probe_w = torch.randn(3, 5), torch.randn(7, 5)
                probe = torch.ops.mkldnn._linear_pointwise(probe_x, probe_w, None, "none", [], "")
                usable = bool(torch.allclose(probe, probe_x @ probe_w.t(), rtol=1e-5, atol=1e-5))
            except (RuntimeError, NotImplementedError):
                usable = False
        _ONEDNN_STATE["usable"] = usable
    return bool(_ONEDNN_STATE["usable"])


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, use_onednn: bool) -> Tensor:
    """``x @ weight.T (+ bias)`` as a new tensor: oneDNN for float32 on CPU when usable, else torch."""
    if use_onednn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def _scaled(tensor: Tensor | None, factor: float) -> Tensor | None:
    """``tensor * factor`` (a new tensor), or ``tensor`` itself when the factor is 1."""
    if tensor is None or factor == 1.0:
        return tensor
    return tensor * factor


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,  # type: ignore[override]
                teacher_hidden: Tensor | SparseLogits, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
                labels: Tensor | None, kind: str, beta: float, skew: float, temperature: float,
                chunk_size: int | None) -> Tensor:
        # The teacher is either its hidden states and head (logits projected chunk by chunk) or
        # top-k logits (rows taken from the sparse tensors and compared by sparse_divergence_chunk).
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_grad = need_hidden or need_weight or need_bias
        device = student_hidden.device
        vocab = student_weight.shape[0]
        student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
        sparse = teacher_hidden if isinstance(teacher_hidden, SparseLogits) else None
        if sparse is not None:
            teacher_flat = sparse.values.reshape(-1, sparse.k)
            teacher_ids = sparse.indices.reshape(-1, sparse.k)
            teacher_tail = None if sparse.tail_log_mass is None else sparse.tail_log_mass.reshape(-1)
            teacher_dtype = student_hidden.dtype
        else:
            assert isinstance(teacher_hidden, Tensor) and teacher_weight is not None
            teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            teacher_dtype = teacher_hidden.dtype
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
            low_precision = student_hidden.dtype not in _FULL_PRECISION or teacher_dtype not in _FULL_PRECISION
            use_onednn = device.type == "cpu" and not low_precision and onednn_gemm_usable()
            use_cuda_kernel = device.type == "cuda" and load_extension() is not None
            # Logits are finite unless a bias masks tokens with -inf: then the -inf clamp pass is needed.
            finite = all(bias is None or bool(torch.isfinite(bias).all()) for bias in (student_bias, teacher_bias))
            chunk = chunk_size or auto_chunk_rows(vocab, n_valid, device, buffers=7 if low_precision else 6,
                                                  head_bytes=4 * student_weight.numel() if need_weight else 0)
            chunk = min(chunk, n_valid)
            ws = Workspace(chunk, vocab, device)
            student_lp = teacher_lp = weight_lp = None
            if low_precision:
                student_lp = torch.empty(chunk, vocab, dtype=student_hidden.dtype, device=device)
                teacher_lp = (student_lp if teacher_dtype == student_hidden.dtype
                              else torch.empty(chunk, vocab, dtype=teacher_dtype, device=device))
                if need_weight:
                    weight_lp = torch.empty(student_weight.shape, dtype=student_hidden.dtype, device=device)
            # logits / T = (h / T) @ W.T + b / T: dividing the (n, H) hidden states and the bias is a
            # pass over H columns instead of V.
            inv_t = 1.0 / temperature
            # biases in the matmul dtype of their side (a float32 bias with bf16 hidden states is common)
            if student_bias is not None:
                student_bias = student_bias.to(student_hidden.dtype)
            if teacher_bias is not None:
                teacher_bias = teacher_bias.to(teacher_dtype)
            student_bias_t = _scaled(student_bias, inv_t)
            teacher_bias_t = _scaled(teacher_bias, inv_t)
            # d loss / d raw logits = d loss_row / d (logits / T) / T, averaged over counted positions
            scale = 1.0 / (temperature * n_valid)
            for start in range(0, n_valid, chunk):
                rows: slice | Tensor = (slice(start, min(start + chunk, n_rows)) if valid is None
                                        else valid[start:start + chunk])
                hidden_s = _rows(student_flat, rows)
                teacher_rows = _rows(teacher_flat, rows)  # hidden states, or top-k values
                n = hidden_s.shape[0]
                if low_precision:
                    assert student_lp is not None
                    # the matmul runs in the input dtype (fp32 accumulation inside), as the unfused
                    # model would produce its logits; the divergence math then runs in float32
                    logits_s = ws.get("student", n).copy_(torch.addmm(student_bias, hidden_s, student_weight.t(),
                                                                      out=student_lp[:n])
                                                          if student_bias is not None else
                                                          torch.mm(hidden_s, student_weight.t(), out=student_lp[:n]))
                    if temperature != 1.0:
                        logits_s.mul_(inv_t)
                else:
                    logits_s = _linear(_scaled(hidden_s, inv_t), student_weight, student_bias_t, use_onednn)
                if sparse is not None:
                    result = sparse_divergence_chunk(
                        logits_s, teacher_rows.float() * inv_t, _rows(teacher_ids, rows),
                        None if teacher_tail is None else _rows(teacher_tail, rows), kind, beta=beta, skew=skew,
                        student_grad=need_grad, finite=finite)
                else:
                    assert teacher_weight is not None
                    if low_precision:
                        assert teacher_lp is not None
                        logits_t = ws.get("teacher", n).copy_(
                            torch.addmm(teacher_bias, teacher_rows, teacher_weight.t(), out=teacher_lp[:n])
                            if teacher_bias is not None else
                            torch.mm(teacher_rows, teacher_weight.t(), out=teacher_lp[:n]))
                        if temperature != 1.0:
                            logits_t.mul_(inv_t)
                    else:
                        logits_t = _linear(_scaled(teacher_rows, inv_t), teacher_weight, teacher_bias_t, use_onednn)
                    if use_cuda_kernel and need_grad:
                        result = student_chunk_step(logits_s, logits_t, kind, beta=beta, skew=skew, workspace=ws)
                    else:
                        result = divergence_chunk(logits_s, logits_t, kind, beta=beta, skew=skew,
                                                  student_grad=need_grad, workspace=ws, finite=finite)
                    del logits_t
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
                    # grad_logits @ W: oneDNN takes W.T as a strided (H, V) view, no copy of the head
                    chunk_grad = (_linear(grad_logits, student_weight.t(), None, True) if use_onednn
                                  else torch.mm(grad_logits, student_weight)).mul_(scale)
                    if isinstance(rows, slice):
                        grad_hidden[rows] = chunk_grad
                    else:
                        grad_hidden.index_copy_(0, rows, chunk_grad.to(grad_hidden.dtype))
                if grad_weight is not None:
                    # accumulated in place (MKL): oneDNN has no in-place accumulation, and a fresh
                    # (V, H) result per chunk would cost more in page faults than it saves
                    if weight_lp is None:
                        grad_weight.addmm_(grad_logits.t(), hidden_s, alpha=scale)
                    else:
                        grad_weight.add_(torch.mm(grad_logits.t(), hidden_s, out=weight_lp), alpha=scale)
                del logits_s, grad_logits, result

        # Kept as plain attributes rather than save_for_backward: backward hands these tensors
        # over as the gradients (scaled in place), so no second weight-sized tensor is allocated.
        ctx.gradients = [grad_hidden.view(student_hidden.shape) if grad_hidden is not None else None,
                         grad_weight, grad_bias]
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
        return (total / max(n_valid, 1)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.gradients is None:
            raise RuntimeError("fused_linear_divergence computes its gradients in the forward pass and hands them over "
                               "in the first backward; a second backward through the same graph (retain_graph=True) "
                               "is not supported: run the forward again")
        gradients, ctx.gradients = ctx.gradients, None
        outputs = []
        for gradient, dtype in zip(gradients, ctx.dtypes):
            if gradient is not None:
                gradient = gradient.mul_(grad_output.to(gradient.dtype)).to(dtype)
            outputs.append(gradient)
        return (*outputs, None, None, None, None, None, None, None, None, None)


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


def fused_linear_sparse_divergence(student_hidden: Tensor, student_weight: Tensor, teacher: SparseLogits, kind: str, *,
                                   student_bias: Tensor | None = None, labels: Tensor | None = None, beta: float = 0.5,
                                   skew: float = 0.1, temperature: float = 1.0,
                                   chunk_size: int | None = None) -> Tensor:
    """``divergence(student_hidden @ student_weight.T + student_bias, teacher, kind, ...)`` for a top-k teacher
    (:class:`~kdcore.signals.SparseLogits`, e.g. from a teacher store) without holding the full student logits.

    The student's logits are produced chunk by chunk as in :func:`fused_linear_divergence`; the teacher's
    rows are taken from ``teacher`` (``(..., k)``, same positions as ``student_hidden``) and each chunk
    goes through :func:`kdcore.objectives.divergence.sparse_divergence_chunk`, the function the dense
    path uses, so both give the same value. With ``teacher.tail_log_mass`` every kind is computable
    (at ``temperature == teacher.tail_temperature``); without it the teacher is renormalised over its
    top k and ``reverse_kl`` is refused.

    Returns:
        A float32 scalar with gradients for ``student_hidden``, ``student_weight`` and ``student_bias``.

    Raises:
        KDUserError: a top-k teacher the kind cannot use (see :func:`~kdcore.objectives.divergence.check_sparse_teacher`).
    """
    check_divergence_args(kind, beta, skew, temperature)
    if student_hidden.shape[:-1] != teacher.values.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and sparse teacher "
                         f"{tuple(teacher.values.shape)} must have the same leading (position) shape")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student weight {tuple(student_weight.shape)} must be (V, {student_hidden.shape[-1]})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    check_sparse_teacher(teacher, kind, temperature, int(student_weight.shape[0]))
    student_weight_matched = student_weight.to(student_hidden.dtype) if student_weight.dtype != student_hidden.dtype \
        else student_weight
    return _FusedLinearDivergence.apply(student_hidden, student_weight_matched, student_bias,
                                        sparse_on(teacher, student_hidden.device), None, None, labels, kind, beta,
                                        skew, temperature, chunk_size)
