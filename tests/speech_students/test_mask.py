"""GenDistiller's attention over (layer, time) positions: causal across layers, full across time."""
from __future__ import annotations

import itertools

import pytest
import torch

from kd_plugins.speech.gendistiller import (
    GenDistillerStudent, GenDistillerStudentConfig, attention_masks, block_causal_mask,
)


@pytest.mark.parametrize("blocks,frames", [(1, 1), (3, 4), (4, 2)])
def test_full_mask_matches_definition_elementwise(blocks: int, frames: int) -> None:
    mask = block_causal_mask(blocks, frames, "full")
    assert mask.shape == (blocks * frames, blocks * frames) and mask.dtype == torch.bool
    for (layer, time), (key_layer, key_time) in itertools.product(
            itertools.product(range(blocks), range(frames)), repeat=2):
        expected = key_layer <= layer  # any time, own block included
        assert bool(mask[layer * frames + time, key_layer * frames + key_time]) is expected


def test_same_time_mask_sees_earlier_blocks_fully_and_itself_only() -> None:
    blocks, frames = 3, 4
    mask = block_causal_mask(blocks, frames, "same_time")
    for (layer, time), (key_layer, key_time) in itertools.product(
            itertools.product(range(blocks), range(frames)), repeat=2):
        expected = key_layer < layer or (key_layer == layer and key_time == time)
        assert bool(mask[layer * frames + time, key_layer * frames + key_time]) is expected


def test_attention_masks_never_leave_a_query_without_keys() -> None:
    allowed = block_causal_mask(2, 3, "same_time")
    key_valid = torch.tensor([[True, True, False] * 2])  # the third frame is padding
    attn_mask, padding = attention_masks(allowed, key_valid, num_heads=2)
    assert padding is None and attn_mask.shape == (2, 6, 6)
    assert not attn_mask.all(-1).any()  # every row keeps at least one key
    assert attn_mask[0, 0].tolist() == [False, True, True, True, True, True]  # valid frames keep their pattern
    assert attn_mask[0, 3].tolist() == [False, False, True, False, True, True]  # padding keys blocked
    # Without such rows the cheap form (2-D mask + key padding) is used.
    attn_mask, padding = attention_masks(block_causal_mask(2, 3), key_valid, num_heads=2)
    assert torch.equal(attn_mask, ~block_causal_mask(2, 3)) and torch.equal(padding, ~key_valid)


def _student(tiny_sizes: dict, **overrides: object) -> GenDistillerStudent:
    torch.manual_seed(0)
    config = GenDistillerStudentConfig(**{**tiny_sizes, "num_layers": 2, "target_layers": [1, 2, 3],
                                          "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                                          **overrides})
    return GenDistillerStudent(config, teacher_dim=24).eval()


@pytest.mark.parametrize("mode", ["full", "same_time"])
def test_generator_output_depends_only_on_allowed_positions(tiny_sizes: dict, mode: str) -> None:
    """Changing one frame of block 1's input moves blocks 1 and 2 (at every frame when time is full), never block 0."""
    student = _student(tiny_sizes, current_block_attention=mode)
    frames = 6
    front_end = torch.randn(1, frames, 32)
    mask = torch.ones(1, frames, dtype=torch.bool)
    inputs = [torch.randn(1, frames, 24), torch.randn(1, frames, 24)]
    changed_inputs = [inputs[0].clone(), inputs[1]]
    changed_inputs[0][0, 2] += 3.0
    with torch.no_grad():
        before = student.teacher_forced(front_end, mask, inputs)
        after = student.teacher_forced(front_end, mask, changed_inputs)
    moved = [(a - b).abs().amax(-1)[0] > 1e-6 for a, b in zip(before, after)]
    assert not moved[0].any()  # block 0 cannot see block 1 (causal across layers)
    assert moved[2].all()  # block 2 sees all of block 1 (full across time in earlier blocks)
    if mode == "full":
        assert moved[1].all()  # full across time within the current block
    else:
        assert moved[1].tolist() == [t == 2 for t in range(frames)]
