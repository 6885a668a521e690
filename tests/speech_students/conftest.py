"""Tiny random speech teachers and students for the speech-student tests (nothing is downloaded)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import HubertConfig, HubertModel, WavLMConfig, WavLMModel

from kdcore.interfaces import Batch, Teacher
from kdcore.signals import SignalRequest, Signals

#: A 3-layer CNN with a 20-sample hop: 3000 samples -> 149 frames, fast on CPU.
TINY_CONV = [[16, 10, 5], [16, 3, 2], [16, 2, 2]]
TINY_SIZES: dict[str, Any] = {"conv_layers": TINY_CONV, "hidden_size": 32, "num_heads": 4, "ffn_dim": 64,
                              "pos_conv_kernel": 16, "pos_conv_groups": 4, "target_layers": [2, 3, 4]}


def tiny_hf_config(kind: str, layers: int = 4) -> WavLMConfig | HubertConfig:
    """A tiny WavLM/HuBERT config whose CNN equals the tiny students'."""
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  conv_dim=[c for c, _, _ in TINY_CONV], conv_kernel=[k for _, k, _ in TINY_CONV],
                  conv_stride=[s for _, _, s in TINY_CONV], conv_bias=False, feat_extract_norm="group",
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0,
                  hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  layerdrop=0.0)
    if kind == "wavlm":
        return WavLMConfig(num_buckets=32, max_bucket_distance=64, **common)
    return HubertConfig(**common)


class HFHiddenStatesTeacher(Teacher):
    """Test double of the speech teacher contract: all hidden layers (layer 0 = pre-transformer) + frame_mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        output = self.model(batch["waveform"], output_hidden_states=True)
        frames = self.model._get_feat_extract_output_lengths(batch["waveform_lengths"])
        length = output.hidden_states[0].shape[1]
        mask = torch.arange(length)[None, :] < frames[:, None]
        return Signals(hidden_states=tuple(output.hidden_states), extra={"frame_mask": mask})


def make_teacher(kind: str = "wavlm", layers: int = 4, seed: int = 0) -> HFHiddenStatesTeacher:
    torch.manual_seed(seed)
    model = WavLMModel(tiny_hf_config(kind, layers)) if kind == "wavlm" else HubertModel(tiny_hf_config(kind, layers))
    return HFHiddenStatesTeacher(model).freeze()


@pytest.fixture
def audio_batch() -> dict[str, torch.Tensor]:
    """Two random utterances, the second one padded (2000 of 3000 samples)."""
    generator = torch.Generator().manual_seed(0)
    waveform = torch.randn(2, 3000, generator=generator)
    waveform[1, 2000:] = 0.0
    return {"waveform": waveform, "waveform_lengths": torch.tensor([3000, 2000])}


def require_hidden_state_loss() -> None:
    """Skip until kdcore.objectives.hidden_state_loss (another component) exists."""
    module = pytest.importorskip("kdcore.objectives")
    if not hasattr(module, "hidden_state_loss"):
        pytest.skip("kdcore.objectives.hidden_state_loss is not available yet")


@pytest.fixture
def teacher_factory():  # noqa: ANN201 - returns the builder
    """``teacher_factory(kind="wavlm", layers=4, seed=0)`` -> a tiny random frozen teacher."""
    return make_teacher


@pytest.fixture
def tiny_sizes() -> dict[str, Any]:
    """Student args matching the tiny teachers' widths and CNN."""
    return dict(TINY_SIZES)


@pytest.fixture
def hidden_state_loss_available() -> None:
    require_hidden_state_loss()
