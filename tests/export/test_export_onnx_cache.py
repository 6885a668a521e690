"""ONNX graphs with past key/values for text students, on tiny random models (no kd run): encoder-decoder students
(Marian, BART, T5) as encoder + decoder + decoder-with-past, decoder-only students (GPT-2, Llama) as one model.onnx;
onnxruntime's logits equal PyTorch's within 1e-4 with and without the cache, and greedy decoding on the cache
gives kd's tokens, also on batch shapes the graphs were not traced on."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kdcore.export.onnx_tools import ONNX_TOLERANCE
from kdcore.export.run import pick_exporter
from kdcore.padding import pad_rows
from kd_plugins.text.generation import generate
from kd_plugins.text.models import TextStudent, TextTeacher

pytest.importorskip("onnxruntime")

from kd_plugins.text.export import (  # noqa: E402 - after the skip: these tests need onnxruntime
    CAUSAL_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE, ENCODER_FILE, TextStudentExporter, causal_cache_names,
    export_onnx, logit_differences, onnx_causal_greedy_decode, onnx_greedy, onnx_greedy_decode, seq2seq_cache_names,
)

VOCAB, PAD, EOS = 40, 0, 1


def _seq2seq(kind: str, seed: int, layers: int) -> Any:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if kind == "t5":
        values = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": layers, "num_decoder_layers": layers,
                  "num_heads": 2, "decoder_start_token_id": PAD}
    else:
        values = {"d_model": 32, "encoder_layers": layers, "decoder_layers": layers, "encoder_attention_heads": 2,
                  "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                  "max_position_embeddings": 64, "decoder_start_token_id": PAD}
        if kind == "bart":
            values.update(bos_token_id=2, decoder_start_token_id=EOS, forced_eos_token_id=None)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, **values)
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def _causal(kind: str, seed: int, layers: int) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "gpt2":
        values = {"n_embd": 32, "n_layer": layers, "n_head": 2, "n_positions": 64}
    else:  # grouped-query attention: 4 query heads share 2 key/value heads
        values = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD,
                                  **values)
    return AutoModelForCausalLM.from_config(config).eval()


def _items(count: int) -> list[dict[str, list[int]]]:
    """Sources of 2-8 tokens and targets of 1-5 tokens ending with the end token (ids >= 3)."""
    generator = torch.Generator().manual_seed(0)
    return [{"source_ids": torch.randint(3, VOCAB, (2 + index % 7,), generator=generator).tolist(),
             "target_ids": torch.randint(3, VOCAB, (index % 5,), generator=generator).tolist() + [EOS]}
            for index in range(count)]


def _collate(causal: bool) -> Any:
    def collate(chunk: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if causal:  # a decoder-only row: prompt + target, right-padded, labels -100 on the prompt
            rows = [item["source_ids"] + item["target_ids"] for item in chunk]
            labels = [[-100] * len(item["source_ids"]) + item["target_ids"] for item in chunk]
        else:
            rows, labels = [item["source_ids"] for item in chunk], [item["target_ids"] for item in chunk]
        return {"input_ids": pad_rows(rows, PAD), "attention_mask": pad_rows([[1] * len(row) for row in rows], 0),
                "labels": pad_rows(labels, -100)}
    return collate


def _built(student: TextStudent, teacher: TextTeacher | None, causal: bool) -> tuple[Any, Any]:
    """What an exporter reads of a built run: the models and the task's collate and decoding settings."""
    data = SimpleNamespace(max_new_tokens=10, max_length_ratio=2.0, max_length_offset=4, max_source_tokens=64)
    task = SimpleNamespace(name="toy-text", tokenizer=None, collate=_collate(causal), data_config=data)
    config = SimpleNamespace(student=SimpleNamespace(name="causal-lm" if causal else "seq2seq"))
    return (SimpleNamespace(student=student, teacher=teacher, task=task, resolved=SimpleNamespace(config=config)),
            SimpleNamespace(test=_items(16)))


def _kd_rows(student: TextStudent, input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: int
             ) -> list[list[int]]:
    return generate(student, input_ids, attention_mask, max_new_tokens=limit).to_lists()


def _rows(tokens: np.ndarray) -> list[list[int]]:
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in tokens.tolist()]


@pytest.mark.parametrize("kind", ["marian", "bart", "t5"])
def test_seq2seq_graphs_with_past_key_values_reproduce_kd(kind: str, tmp_path: Path) -> None:
    student = TextStudent(_seq2seq(kind, seed=0, layers=2))
    exporter = TextStudentExporter(*_built(student, None, causal=False))
    batches = exporter.self_test_batches()
    sessions = export_onnx(student, tmp_path, batches[0])
    later = sessions[DECODER_WITH_PAST_FILE]
    assert [i.name for i in later.get_inputs()] == ["input_ids", "encoder_attention_mask",
                                                    *seq2seq_cache_names(2, "past_key_values")]
    assert [o.name for o in later.get_outputs()] == ["logits", *seq2seq_cache_names(2, "present", ("decoder",))]
    for test in batches:  # the second batch has other lengths than the traced one
        differences = logit_differences(student, sessions, test)
        assert set(differences) == {"encoder", "decoder logits", "decoder logits with past"}
        assert max(differences.values()) <= ONNX_TOLERANCE, differences
        kd_rows = _kd_rows(student, test.prompt_ids, test.prompt_mask, test.limit)
        assert _rows(onnx_greedy(student, sessions, test, use_cache=True)) == kd_rows
        assert _rows(onnx_greedy(student, sessions, test, use_cache=False)) == kd_rows

    # Three sources of new lengths, through the public numpy loop; the self-attention cache grows by one position
    # per step while the cross-attention cache keeps the source length.
    sources = _collate(False)(_items(19)[16:])
    ids, mask = sources["input_ids"].numpy(), sources["attention_mask"].numpy()
    tokens = onnx_greedy_decode(sessions[ENCODER_FILE], sessions[DECODER_FILE], ids, mask,
                                decoder_with_past=later, decoder_start_token_id=student.decoder_start_token_id,
                                eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=7)
    assert _rows(tokens) == _kd_rows(student, sources["input_ids"], sources["attention_mask"], 7)
    hidden = sessions[ENCODER_FILE].run(None, {"input_ids": ids, "attention_mask": mask})[0]
    start = np.full((3, 1), student.decoder_start_token_id, dtype=np.int64)
    first = dict(zip([o.name for o in sessions[DECODER_FILE].get_outputs()],
                     sessions[DECODER_FILE].run(None, {"input_ids": start, "encoder_hidden_states": hidden,
                                                       "encoder_attention_mask": mask})))
    past = {name.replace("present", "past_key_values"): value for name, value in first.items() if name != "logits"}
    step = dict(zip([o.name for o in later.get_outputs()],
                    later.run(None, {"input_ids": np.full((3, 1), 5), "encoder_attention_mask": mask, **past})))
    assert first["present.1.decoder.key"].shape[2] == 1 and step["present.1.decoder.key"].shape[2] == 2
    assert first["present.1.encoder.value"].shape[2] == ids.shape[1]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_student_exports_model_onnx_with_past_key_values(kind: str, tmp_path: Path) -> None:
    student = TextStudent(_causal(kind, seed=0, layers=1))
    teacher = TextTeacher(_causal(kind, seed=1, layers=2)).freeze()
    built, splits = _built(student, teacher, causal=True)
    exporter, fmt = pick_exporter(built, splits, "onnx")  # decoder-only students are no longer refused
    result = exporter.write(fmt, tmp_path)
    assert CAUSAL_FILE in result.files and result.pipeline_tag == "text-generation"
    assert result.checks["greedy_outputs_equal_kd"] == "16/16"
    assert result.checks["greedy_outputs_equal_kd_without_cache"] == "16/16"
    assert set(result.checks["max_abs_difference_by_output"]) == {"logits", "logits with past"}
    assert result.checks["max_abs_difference"] <= ONNX_TOLERANCE
    for who in ("student", "teacher"):
        assert result.speed[f"onnxruntime greedy seconds, {who}"] > 0
        assert result.speed[f"key/value cache speed-up, {who}"] > 0
    assert not (tmp_path / ".teacher-onnx").exists()

    import onnxruntime

    model = onnxruntime.InferenceSession(str(tmp_path / CAUSAL_FILE))
    assert [i.name for i in model.get_inputs()] == ["input_ids", "attention_mask", "position_ids",
                                                    *causal_cache_names(1, "past_key_values")]
    # Left-padded prompts of new lengths: the cached loop, the uncached one and kd agree.
    prompts = [[5, 9, 12], [7], [30, 31, 32, 33, 34, 35]]
    ids, mask = pad_rows(prompts, PAD, left=True), pad_rows([[1] * len(p) for p in prompts], 0, left=True)
    kd_rows = _kd_rows(student, ids, mask, 9)
    for use_cache in (True, False):
        tokens = onnx_causal_greedy_decode(model, ids.numpy(), mask.numpy(), eos_token_id=EOS, pad_token_id=PAD,
                                           max_new_tokens=9, use_cache=use_cache)
        assert _rows(tokens) == kd_rows
