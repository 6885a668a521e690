"""Greedy decoding with kd's key/value cache against re-running the decoder over the whole prefix.

Run with ``pytest benchmarks/test_bench_kv_cache.py --benchmark-only``. A random 2+2-layer d=256
Marian decodes 16 sentences x 64 tokens both ways, interleaved in one session (same outputs,
asserted); the ratio of tokens/s is the claim in docs/text.md ("Decoding").
"""
from __future__ import annotations

import torch

from kd_plugins.text.generation import measure_speed
from kd_plugins.text.models import TextStudent, marian_config


def test_kv_cache_is_faster_than_recomputing_the_prefix(benchmark) -> None:  # noqa: ANN001
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    values = marian_config(256, layers=(2, 2), d_model=256, max_positions=128)
    values.pop("model_type")
    torch.manual_seed(0)
    hf = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", pad_token_id=0, eos_token_id=1,
                                                                decoder_start_token_id=0, **values)).eval()
    hf.final_logits_bias[..., 1] = -1e9  # no end-of-sequence: every sentence decodes all 64 tokens
    model = TextStudent(hf)
    input_ids = torch.randint(2, 256, (16, 20), generator=torch.Generator().manual_seed(0))
    speeds: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, int] = {}

    def both() -> None:
        for use_cache in (True, False):
            speed = measure_speed(model, input_ids, max_new_tokens=64, use_cache=use_cache)
            speeds[use_cache].append(speed.tokens_per_second)
            tokens[use_cache] = speed.tokens

    benchmark.group = "greedy decoding: KV cache vs none"
    benchmark.pedantic(both, rounds=3, iterations=1)
    ratio = max(speeds[True]) / max(speeds[False])
    benchmark.extra_info.update({"tokens_per_second_cache": max(speeds[True]),
                                 "tokens_per_second_no_cache": max(speeds[False]), "ratio": ratio})
    print(f"\nKV cache: {max(speeds[True]):.0f} tokens/s; no cache: {max(speeds[False]):.0f} tokens/s ({ratio:.1f}x)")
    assert tokens[True] == tokens[False] == 16 * 64
    assert ratio > 2.0
