"""Initialising a speech student from a WavLM/HuBERT teacher, as DistilHuBERT does.

The student's front end and transformer layers mirror transformers' module names
(:mod:`kd_plugins.speech.front_end`, :mod:`kd_plugins.speech.transformer_layer`), so the teacher's CNN, feature
projection, positional conv, encoder layer norm and first layers copy over by name. A front end with the ``s3prl``
layout takes what s3prl's ``DistillerForPretrain`` copies: the CNN, the projection's linear map (it has no LayerNorm
over the CNN channels), the positional conv and the layers, not the encoder layer norm.

A Whisper encoder teacher gives its first transformer layers only: its front end is a convolution over log-mel
frames, the student's a CNN over the waveform, so the student's front end keeps its random initialisation. Whisper's
layers are pre-LN, so only a ``layer_norm_first`` student with Whisper's head count and widths takes them.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from kdcore.errors import KDUserError
from kd_plugins.speech.front_end import SpeechFrontEnd
from kd_plugins.speech.teacher_shape import find_hf_speech_model
from kd_plugins.speech.transformer_layer import SpeechTransformerLayer

log = logging.getLogger(__name__)


def _fill_layer(target: SpeechTransformerLayer, query: nn.Linear, key: nn.Linear, value: nn.Linear,
                out: nn.Linear, attention_norm: nn.Module, intermediate: nn.Linear, output: nn.Linear,
                final_norm: nn.Module) -> None:
    """Fill ``target`` from a teacher layer's parts: separate q/k/v projections go into the fused input projection
    (a projection without bias, as Whisper's key, contributes a zero bias)."""
    with torch.no_grad():
        target.attention.in_proj_weight.copy_(torch.cat([query.weight, key.weight, value.weight], dim=0))
        target.attention.in_proj_bias.copy_(torch.cat(
            [part.bias if part.bias is not None else torch.zeros_like(query.bias) for part in (query, key, value)]))
        target.attention.out_proj.load_state_dict(out.state_dict())
        target.layer_norm.load_state_dict(attention_norm.state_dict())
        target.feed_forward["intermediate_dense"].load_state_dict(intermediate.state_dict())
        target.feed_forward["output_dense"].load_state_dict(output.state_dict())
        target.final_layer_norm.load_state_dict(final_norm.state_dict())


def copy_transformer_layer(target: SpeechTransformerLayer, source: nn.Module) -> None:
    """Fill ``target`` from a transformers HuBERT/WavLM/wav2vec2 encoder layer (WavLM's relative-position
    bias has no counterpart in the student and is left out, as DistilHuBERT does)."""
    attention = source.attention
    _fill_layer(target, attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj, source.layer_norm,
                source.feed_forward.intermediate_dense, source.feed_forward.output_dense, source.final_layer_norm)


def copy_whisper_layer(target: SpeechTransformerLayer, source: nn.Module) -> None:
    """Fill a pre-LN ``target`` from a transformers ``WhisperEncoderLayer``."""
    attention = source.self_attn
    _fill_layer(target, attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj,
                source.self_attn_layer_norm, source.fc1, source.fc2, source.final_layer_norm)


def find_whisper_encoder(module: nn.Module) -> nn.Module | None:
    """The transformers ``WhisperEncoder`` inside a teacher wrapper (a cached teacher included), or None."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return next((candidate for candidate in module.modules() if isinstance(candidate, WhisperEncoder)), None)


def _init_from_whisper(layers: Sequence[SpeechTransformerLayer], encoder: nn.Module) -> str | None:
    """Copy the Whisper encoder's first layers into ``layers``; the problem that prevents it, or None."""
    config = encoder.config
    if not layers:
        return "the student has no transformer layers to take from a Whisper teacher (its front end cannot be copied)"
    if not layers[0].layer_norm_first:
        return "Whisper's layers are pre-LN and the student's are not (set student.args.layer_norm_first: true)"
    if layers[0].attention.num_heads != config.encoder_attention_heads:
        return (f"the student has {layers[0].attention.num_heads} attention heads and the Whisper teacher "
                f"{config.encoder_attention_heads} (set student.args.num_heads: {config.encoder_attention_heads})")
    if len(encoder.layers) < len(layers):
        return f"the teacher has {len(encoder.layers)} layers, fewer than the student's {len(layers)}"
    staged = [copy.deepcopy(layer) for layer in layers]
    try:
        for target, teacher_layer in zip(staged, encoder.layers):
            copy_whisper_layer(target, teacher_layer)
    except (RuntimeError, AttributeError, KeyError) as error:
        return f"the shapes differ ({str(error).splitlines()[0]})"
    for layer, filled in zip(layers, staged):
        layer.load_state_dict(filled.state_dict())
    log.info("student initialised from the Whisper teacher: its first %d layer(s); the front end stays random "
             "(Whisper's reads log-mel frames, the student's CNN reads the waveform)", len(layers))
    return None


def init_from_teacher(front_end: SpeechFrontEnd, layers: Sequence[SpeechTransformerLayer], teacher: nn.Module,
                      mode: bool | Literal["auto"]) -> bool:
    """Copy the teacher's CNN, projection, positional conv, encoder layer norm (``transformers`` layout only) and
    first ``len(layers)`` layers; from a Whisper encoder teacher, its first ``len(layers)`` layers only.

    Returns whether weights were copied. ``mode=True`` raises :class:`KDUserError`
    when the teacher is neither a transformers WavLM/HuBERT model nor a Whisper encoder, or the shapes differ;
    ``"auto"`` then keeps the random initialisation and says so in the log.
    """
    if mode is False:
        return False
    source = find_hf_speech_model(teacher)
    whisper = find_whisper_encoder(teacher) if source is None else None
    problem = None
    if whisper is not None and mode == "auto":
        # Opt-in only: the copied layers then read a random front end, and no measurement yet shows that start
        # beating a random one on the superb budget (docs/speech-methods.md).
        problem = "a Whisper teacher's layers are copied only with init_from_teacher: true"
    elif whisper is not None:
        problem = _init_from_whisper(layers, whisper)
        if problem is None:
            return True
    elif source is None:
        problem = (f"the teacher {type(teacher).__name__} holds no transformers WavLM/HuBERT/wav2vec2 model or "
                   f"Whisper encoder")
    elif getattr(source.config, "do_stable_layer_norm", False) != front_end.layer_norm_first:
        problem = ("the teacher's layer-norm placement (do_stable_layer_norm="
                   f"{source.config.do_stable_layer_norm}) differs from the student's layer_norm_first="
                   f"{front_end.layer_norm_first}")
    elif len(source.encoder.layers) < len(layers):
        problem = f"the teacher has {len(source.encoder.layers)} layers, fewer than the student's {len(layers)}"
    else:
        try:
            _copy_front_end_and_layers(front_end, layers, source)
        except (RuntimeError, AttributeError, KeyError) as error:
            problem = f"the shapes differ ({str(error).splitlines()[0]})"
    if problem is None:
        log.info("student initialised from the teacher: CNN, projection, positional conv%s and %d layer(s)",
                 ", encoder layer norm" if front_end.layout == "transformers" else "", len(layers))
        return True
    if mode == "auto":
        log.info("student not initialised from the teacher (%s); random initialisation", problem)
        return False
    raise KDUserError(f"student.args.init_from_teacher is true, but {problem}. Set init_from_teacher to 'auto' "
                      f"or false, or use a WavLM/HuBERT teacher with the student's sizes.")


def _copy_front_end_and_layers(front_end: SpeechFrontEnd, layers: Sequence[SpeechTransformerLayer],
                               source: nn.Module) -> None:
    # Load into copies first so a shape error leaves the student untouched.
    staged_front = copy.deepcopy(front_end)
    staged_front.feature_extractor.load_state_dict(source.feature_extractor.state_dict())
    staged_front.pos_conv_embed.load_state_dict(source.encoder.pos_conv_embed.state_dict())
    if front_end.layout == "transformers":
        staged_front.feature_projection.load_state_dict(source.feature_projection.state_dict())
        staged_front.layer_norm.load_state_dict(source.encoder.layer_norm.state_dict())
    else:  # s3prl copies post_extract_proj alone and leaves the encoder's layer norm at its initialisation
        staged_front.feature_projection.projection.load_state_dict(source.feature_projection.projection.state_dict())
    staged_layers = [copy.deepcopy(layer) for layer in layers]
    for staged, teacher_layer in zip(staged_layers, source.encoder.layers):
        copy_transformer_layer(staged, teacher_layer)
    front_end.load_state_dict(staged_front.state_dict())
    for layer, staged in zip(layers, staged_layers):
        layer.load_state_dict(staged.state_dict())


__all__ = ["copy_transformer_layer", "copy_whisper_layer", "find_whisper_encoder", "init_from_teacher"]
