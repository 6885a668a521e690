"""onnxruntime greedy decoding of kd's exported text models: the wmt default student against its teacher, with and
without the key/value cache (``decoder_with_past_model.onnx``), side by side in one run.

Run with ``OMP_NUM_THREADS=1 pytest benchmarks/test_bench_onnx_decode.py --benchmark-only -s``. The models have the
wmt task's default shapes (student: Marian 2+1 layers, d=96; teacher: 3+3, d=256; an 8k vocabulary), randomly
initialised, exported with ``kd export``'s own functions (:func:`kd_plugins.text.export.export_onnx`) and decoded
with its onnxruntime loops (:func:`kd_plugins.text.export.onnx_greedy`). An untrained model never ends a sentence, so
every row decodes exactly ``NEW_TOKENS`` tokens: the lengths, and so the work, are the same for every variant. The
time of a trained model depends on where its sentences end; ``kd export --format onnx`` measures that one on the
run's test sources and writes it into the model card. Numbers: ``benchmarks/results/onnx_decode.json`` and
docs/export.md ("Speed").
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from test_bench_fused import recorder  # noqa: F401 - the session fixture that writes results/*.json

VOCAB, PAD, EOS = 8000, 0, 1
SENTENCES, SOURCE_TOKENS, NEW_TOKENS = 16, 24, 32
SHAPES = {"student": {"layers": (2, 1), "d_model": 96, "ffn_dim": 384},
          "teacher": {"layers": (3, 3), "d_model": 256, "ffn_dim": 1024}}


def build(role: str) -> object:
    """A randomly initialised text model of the wmt default shape for ``role``, as kd wraps it."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import TextStudent, marian_config

    values = marian_config(VOCAB, heads=4, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
                           dropout=0.0, **SHAPES[role])
    name = values.pop("model_type")
    torch.manual_seed(0)
    hf_model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(name, **values)).eval()
    # An untrained model that emitted its end-of-sequence token would stop early; forbid it, so that every
    # variant decodes the same number of tokens.
    with torch.no_grad():
        hf_model.final_logits_bias[..., EOS] = -1e4
    return TextStudent(hf_model)


def decode_batch() -> object:
    from kd_plugins.text.export import SelfTestBatch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (SENTENCES, SOURCE_TOKENS), generator=generator)
    ids[:, -1] = EOS
    mask = torch.ones_like(ids)
    labels = torch.randint(2, VOCAB, (SENTENCES, 8), generator=generator)
    return SelfTestBatch([{} for _ in range(SENTENCES)], {"input_ids": ids, "attention_mask": mask, "labels": labels},
                         ids, mask, NEW_TOKENS)


def test_onnx_greedy_decoding_student_vs_teacher(benchmark, recorder) -> None:  # noqa: F811
    from kd_plugins.text.export import export_onnx, onnx_greedy
    from kdcore.export.onnx_tools import seconds_per_call

    batch = decode_batch()
    seconds: dict[str, float] = {}

    def target() -> None:
        for role in ("student", "teacher"):
            model = build(role)
            with tempfile.TemporaryDirectory() as directory:
                sessions = export_onnx(model, Path(directory), batch)
                for use_cache in (True, False):
                    tokens = onnx_greedy(model, sessions, batch, use_cache)
                    assert np.asarray(tokens).shape[1] >= NEW_TOKENS  # every row decoded the full length
                    seconds[f"{role}, {'cache' if use_cache else 'no cache'}"] = seconds_per_call(
                        lambda: onnx_greedy(model, sessions, batch, use_cache))

    benchmark.group = "onnxruntime greedy decoding, wmt default shapes"
    benchmark.pedantic(target, rounds=1, iterations=1)
    row = {"sentences": SENTENCES, "source_tokens": SOURCE_TOKENS, "new_tokens": NEW_TOKENS,
           "seconds": seconds,
           "cache_speedup_student": seconds["student, no cache"] / seconds["student, cache"],
           "cache_speedup_teacher": seconds["teacher, no cache"] / seconds["teacher, cache"],
           "student_speedup_over_teacher": seconds["teacher, cache"] / seconds["student, cache"]}
    recorder.add("onnx_decode", row)
    benchmark.extra_info.update({key: value for key, value in row.items() if "speedup" in key})
    # the key/value cache must pay for itself on both models at 32 new tokens
    assert row["cache_speedup_student"] > 1 and row["cache_speedup_teacher"] > 1, row
