"""The speech students' front end: waveform -> frame features, HuBERT's pre-transformer part.

It reuses transformers' HuBERT modules, so its parameter names and shapes equal those of a WavLM/HuBERT teacher and
its weights can be copied from one (:mod:`kd_plugins.speech.teacher_init`). Two layouts (``front_end_layout``):

* ``transformers`` (the default): HuBERT as transformers builds it, a LayerNorm over the CNN channels before the
  projection and dropout after it;
* ``s3prl``: DistilHuBERT's student as s3prl builds it (``s3prl.upstream.distiller.model.DistillerModel``): the
  projection reads the CNN output directly, with no dropout before the positional convolution.

``feature_grad_mult`` scales the gradient that reaches the CNN (s3prl's and fairseq's ``feature_grad_mult``;
0 freezes the CNN).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers.models.hubert.modeling_hubert import (
    HubertFeatureEncoder, HubertFeatureProjection, HubertPositionalConvEmbedding,
)

from kd_plugins.speech.waveforms import (
    checked_waveform, conv_output_lengths, lengths_to_mask, normalize_per_utterance, receptive_field,
)

if TYPE_CHECKING:
    from kd_plugins.speech.student_base import SpeechStudentConfig

#: HuBERT/WavLM-base CNN: (channels, kernel, stride) per layer; 400-sample receptive field, 320-sample hop.
DEFAULT_CONV_LAYERS: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2

#: Where the front end's layout comes from (see the module docstring).
FrontEndLayout = Literal["transformers", "s3prl"]


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` itself in the forward pass; the gradient through it is multiplied by ``scale`` (fairseq's
    ``GradMultiply``, which s3prl's distiller applies to the CNN output)."""
    if scale != 1.0 and tensor.requires_grad:
        tensor.register_hook(lambda grad: grad * scale)
    return tensor


class SpeechFrontEnd(nn.Module):
    """Waveform -> ``(B, T, hidden)`` features with the frame mask (HuBERT's pre-transformer part).

    Module names equal transformers' HuBERT/WavLM ones (``feature_extractor``,
    ``feature_projection``, ``pos_conv_embed``, ``layer_norm``) so teacher
    weights load by name. With the ``s3prl`` layout ``feature_projection`` holds
    no LayerNorm (and the teacher's is not copied).
    """

    def __init__(self, config: SpeechStudentConfig) -> None:
        super().__init__()
        hubert_config = config.hubert_config()
        self.conv_layers = [tuple(layer) for layer in config.conv_layers]
        self.normalize_waveform = config.normalize_waveform
        self.layer_norm_first = config.layer_norm_first
        self.layout: FrontEndLayout = config.front_end_layout
        self.feature_grad_mult = config.feature_grad_mult
        self.feature_extractor = HubertFeatureEncoder(hubert_config)
        self.feature_projection = HubertFeatureProjection(hubert_config)
        self.pos_conv_embed = HubertPositionalConvEmbedding(hubert_config)
        # Post-LN models normalise right after the positional embedding; pre-LN ones at the very end (HuBERT large).
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def receptive_field(self) -> int:
        """Samples needed for one frame."""
        return receptive_field([(kernel, stride) for _, kernel, stride in self.conv_layers])

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, T, hidden)`` and the valid-frame mask ``(B, T)``."""
        waveform, lengths = checked_waveform(waveform, lengths, self.receptive_field, "the student's CNN")
        lengths = lengths.to(waveform.device)
        if self.normalize_waveform:
            waveform = normalize_per_utterance(waveform, lengths)
        if self.feature_grad_mult == 0.0:
            with torch.no_grad():
                features = self.feature_extractor(waveform)
        else:
            features = scale_gradient(self.feature_extractor(waveform), self.feature_grad_mult)
        features = features.transpose(1, 2)
        frame_mask = lengths_to_mask(conv_output_lengths(lengths, self.conv_layers), features.shape[1])
        hidden = self.feature_projection(features)
        hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)  # padding must not leak through the pos conv
        hidden = hidden + self.pos_conv_embed(hidden)
        if not self.layer_norm_first:
            hidden = self.layer_norm(hidden)
        return self.dropout(hidden), frame_mask


__all__ = ["DEFAULT_CONV_LAYERS", "FrontEndLayout", "SpeechFrontEnd", "scale_gradient"]
