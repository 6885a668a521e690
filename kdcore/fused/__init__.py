"""Memory-saving fused paths (plain PyTorch, optional CUDA extension; no Triton).

:func:`fused_linear_divergence` computes ``divergence(h_S W_S^T + b_S, h_T W_T^T + b_T)`` chunk
by chunk with the gradient produced in the forward pass, so full-size logits never exist;
:func:`fused_linear_sparse_divergence` does the same against a top-k (+ tail mass) teacher.
See docs/performance.md for measurements.
"""
from kdcore.fused.linear_divergence import fused_linear_divergence, fused_linear_sparse_divergence

__all__ = ["fused_linear_divergence", "fused_linear_sparse_divergence"]
