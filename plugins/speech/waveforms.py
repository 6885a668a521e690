"""Batched 16 kHz waveforms and their frames: the arithmetic the speech teachers and students share.

A speech batch holds ``waveform`` ``(B, samples)`` and, optionally, ``waveform_lengths`` ``(B,)`` (the valid samples of
each utterance; the rest is padding). A model turns an utterance into frames of a fixed hop and marks the valid ones
in a ``(B, frames)`` mask.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kdcore.errors import KDUserError

SAMPLE_RATE = 16000


def waveform_lengths(waveform: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Valid samples per utterance (long, on the CPU): ``lengths``, or the full width where a batch gives none."""
    if lengths is None:
        return torch.full((waveform.shape[0],), waveform.shape[1], dtype=torch.long)
    return torch.as_tensor(lengths).long().cpu()


def checked_waveform(waveform: torch.Tensor, lengths: torch.Tensor | None, minimum_samples: int,
                     model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``waveform`` and its valid samples per utterance (long, on the CPU; the full width where ``lengths`` is None).

    Refuses, naming ``model`` (e.g. "the wavlm teacher"), a waveform that is not ``(batch, samples)`` and an utterance
    shorter than ``minimum_samples``, the receptive field of the model's first frame.
    """
    if waveform.dim() != 2:
        raise KDUserError(f"{model[0].upper()}{model[1:]} expects batch['waveform'] of shape (batch, samples) at "
                          f"16 kHz; got shape {tuple(waveform.shape)}. Down-mix and batch the audio in the task's "
                          f"collate.")
    lengths = waveform_lengths(waveform, lengths)
    if int(lengths.min()) < minimum_samples:
        raise KDUserError(f"An utterance of {int(lengths.min())} samples is too short for {model}: its first frame "
                          f"needs {minimum_samples} samples ({minimum_samples / SAMPLE_RATE * 1000:.0f} ms at 16 kHz, "
                          f"the receptive field). Drop or pad such clips in the data.")
    return waveform, lengths


def receptive_field(kernels_and_strides: Sequence[tuple[int, int]]) -> int:
    """Samples one output frame of a conv stack sees, from its ``(kernel, stride)`` per layer."""
    field, hop = 1, 1
    for kernel, stride in kernels_and_strides:
        field += (kernel - 1) * hop
        hop *= stride
    return field


def conv_output_lengths(lengths: torch.Tensor, conv_layers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Frames a valid (unpadded) conv stack of ``(channels, kernel, stride)`` layers makes from ``lengths`` samples."""
    frames = lengths.long()
    for _, kernel, stride in conv_layers:
        frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
    return frames.clamp(min=0)


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``(B, max_length)`` bool mask, True on valid frames."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def normalize_per_utterance(waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its valid samples (padding stays 0).

    Same as transformers' ``Wav2Vec2FeatureExtractor(do_normalize=True)``, but over the valid samples only.
    """
    mask = lengths_to_mask(lengths, waveform.shape[1]).to(waveform.dtype)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (waveform * mask).sum(1, keepdim=True) / count
    var = (((waveform - mean) * mask) ** 2).sum(1, keepdim=True) / count
    return (waveform - mean) / torch.sqrt(var + 1e-7) * mask


__all__ = ["SAMPLE_RATE", "checked_waveform", "conv_output_lengths", "lengths_to_mask", "normalize_per_utterance",
           "receptive_field", "waveform_lengths"]
