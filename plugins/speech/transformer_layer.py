"""The speech students' transformer layer: HuBERT/WavLM-base, able to attend to earlier positions.

Built from ``torch.nn.MultiheadAttention``; unlike ``nn.TransformerEncoderLayer`` it can attend to *earlier* positions
passed as ``memory``, which GenDistiller's autoregressive generation needs (see :mod:`kd_plugins.speech.gendistiller`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from kd_plugins.speech.student_base import SpeechStudentConfig


class SpeechTransformerLayer(nn.Module):
    """A HuBERT/WavLM-base transformer layer that may also attend to earlier positions (``memory``).

    Names mirror transformers' layers (``attention``, ``layer_norm``,
    ``feed_forward.intermediate_dense``/``output_dense``, ``final_layer_norm``)
    so :func:`~kd_plugins.speech.teacher_init.copy_transformer_layer` can fill it from a teacher layer.
    Attention is ``nn.MultiheadAttention`` (scaled-dot-product kernels), not hand-written.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_dim: int, *, dropout: float = 0.1,
                 attention_dropout: float = 0.1, activation_dropout: float = 0.1, layer_norm_first: bool = False,
                 layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=attention_dropout, batch_first=True)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.feed_forward = nn.ModuleDict({
            "intermediate_dense": nn.Linear(hidden_size, ffn_dim),
            "output_dense": nn.Linear(ffn_dim, hidden_size),
        })
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.activation_dropout(F.gelu(self.feed_forward["intermediate_dense"](hidden)))
        return self.dropout(self.feed_forward["output_dense"](inner))

    def forward(self, hidden: torch.Tensor, *, memory: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Update ``hidden`` ``(B, Tq, D)``.

        ``memory`` ``(B, Tm, D)``: this layer's inputs at earlier positions, put
        before ``hidden`` as extra keys/values. ``key_padding_mask``
        ``(B, Tm + Tq)`` and ``attn_mask`` ``(Tq, Tm + Tq)`` are True where
        attention is *blocked* (PyTorch's convention).
        """
        keys = hidden if memory is None else torch.cat([memory, hidden], dim=1)
        if self.layer_norm_first:
            query, keys = self.layer_norm(hidden), self.layer_norm(keys)
        else:
            query = hidden
        attended, _ = self.attention(query, keys, keys, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                     need_weights=False)
        hidden = hidden + self.dropout(attended)
        if self.layer_norm_first:
            return hidden + self._feed_forward(self.final_layer_norm(hidden))
        hidden = self.layer_norm(hidden)
        return self.final_layer_norm(hidden + self._feed_forward(hidden))


def make_layers(config: SpeechStudentConfig) -> nn.ModuleList:
    """``config.num_layers`` transformer layers of the configured size."""
    return nn.ModuleList(
        SpeechTransformerLayer(config.hidden_size, config.num_heads, config.ffn_dim, dropout=config.dropout,
                               attention_dropout=config.attention_dropout,
                               activation_dropout=config.activation_dropout,
                               layer_norm_first=config.layer_norm_first, layer_norm_eps=config.layer_norm_eps)
        for _ in range(config.num_layers))


__all__ = ["SpeechTransformerLayer", "make_layers"]
