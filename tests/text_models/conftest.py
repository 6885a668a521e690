"""Tiny random text models for the text-model tests (no downloads, a 32-token vocabulary).

Tests get the helpers through the ``tiny`` fixture (the suite runs with
``--import-mode=importlib``, so test files cannot import a sibling module).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

VOCAB = 32
PAD, EOS = 0, 1


def tiny_config(model_type: str, layers: int = 1, d_model: int = 32) -> dict[str, Any]:
    """A transformers config dict for a tiny model of ``model_type`` (marian, bart, mbart, t5)."""
    if model_type == "t5":
        return {"model_type": "t5", "vocab_size": VOCAB, "d_model": d_model, "d_kv": d_model // 2, "d_ff": 2 * d_model,
                "num_layers": layers, "num_decoder_layers": layers, "num_heads": 2, "pad_token_id": PAD,
                "eos_token_id": EOS, "decoder_start_token_id": PAD}
    values = {"model_type": model_type, "vocab_size": VOCAB, "d_model": d_model, "encoder_layers": layers,
              "decoder_layers": layers, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
              "encoder_ffn_dim": 2 * d_model, "decoder_ffn_dim": 2 * d_model, "max_position_embeddings": 64,
              "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": PAD, "dropout": 0.0}
    if model_type == "bart":
        values.update(bos_token_id=2, decoder_start_token_id=EOS, forced_eos_token_id=None)
    return values


def tiny_hf(model_type: str = "marian", seed: int = 0, layers: int = 1, d_model: int = 32) -> Any:
    """A randomly initialised transformers seq2seq model."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    values = tiny_config(model_type, layers, d_model)
    name = values.pop("model_type")
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(name, **values)).eval()


def tiny_pair(seed: int = 0) -> tuple[Any, Any]:
    """(teacher, student): a frozen 2+2 Marian teacher and a 1+1 Marian student with the same vocabulary."""
    from kd_plugins.text.models import TextStudent, TextTeacher

    teacher = TextTeacher(tiny_hf("marian", seed=seed + 1, layers=2)).freeze()
    student = TextStudent(tiny_hf("marian", seed=seed, layers=1))
    return teacher, student


def random_batch(batch_size: int, source_len: int = 6, target_len: int = 5, seed: int = 0) -> dict[str, Any]:
    """Sources and -100 padded data targets of varying lengths, ids >= 2 (no pad/eos inside)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch_size, source_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, VOCAB, (batch_size, target_len), generator=generator)
    for row in range(batch_size):
        source_length = 2 + row % (source_len - 1)
        input_ids[row, source_length:] = PAD
        attention_mask[row, source_length:] = 0
        target_length = 1 + row % target_len
        labels[row, target_length - 1] = EOS
        labels[row, target_length:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "ids": [f"ex{row}" for row in range(batch_size)]}


def tiny_causal(seed: int = 0, layers: int = 1) -> Any:
    """A randomly initialised GPT-2 with the tiny vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                                  bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(config).eval()


def causal_batch(batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Right-padded prompt + target rows; labels aligned with input_ids, -100 on prompts and padding."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for row in range(batch_size):
        prompt = torch.randint(2, VOCAB, (2 + row % 3,), generator=generator).tolist()
        target = torch.randint(2, VOCAB, (row % 4,), generator=generator).tolist() + [EOS]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, width), PAD)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    label_tensor = torch.full((batch_size, width), -100)
    for index, (tokens, row_labels) in enumerate(zip(rows, labels)):
        input_ids[index, :len(tokens)] = torch.tensor(tokens)
        attention_mask[index, :len(tokens)] = 1
        label_tensor[index, :len(tokens)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}


def objective(name: str, label: str = "kd", weight: float = 1.0, **args: Any) -> Any:
    """The registered objective ``name`` with ``args``, as a method receives it from the run config."""
    from kdcore.interfaces import WeightedObjective
    from kdcore.registry import Registry

    cls = Registry.discover(entry_points=False).load("objective", name)
    return WeightedObjective(label, cls(cls.Config(**args)), weight)


@pytest.fixture
def tiny() -> SimpleNamespace:
    """The helpers above and the vocabulary constants."""
    return SimpleNamespace(hf=tiny_hf, pair=tiny_pair, batch=random_batch, config=tiny_config, causal=tiny_causal,
                           causal_batch=causal_batch, objective=objective, VOCAB=VOCAB, PAD=PAD, EOS=EOS)


@pytest.fixture
def fake_task(tmp_path: Any) -> SimpleNamespace:
    """The only thing the text methods read from a task: its cache directory."""
    return SimpleNamespace(cache_dir=tmp_path / "cache", name="fake")


@pytest.fixture
def objectives() -> Any:
    """kdcore.objectives (skips the test while that package is not available)."""
    module = pytest.importorskip("kdcore.objectives")
    if not hasattr(module, "divergence") or not hasattr(module, "token_nll"):
        pytest.skip("kdcore.objectives does not export divergence/token_nll yet")
    return module
