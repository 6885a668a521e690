"""Decoding speed of the text tasks' default student against their default teacher (issue: ≥ 3× faster).

Run with ``pytest benchmarks/test_bench_decode.py --benchmark-only``. Both models are
built from the *current* defaults (``kd_tasks.text.presets.STUDENTS`` and each task's
``teacher_defaults``), so this benchmark follows any change to them. Weights are random
and the end-of-sequence token is masked out (``final_logits_bias``), so every sentence
decodes exactly ``NEW_TOKENS`` tokens: the comparison is per generated token, not
flattered by a model that stops early. Same batch, same beam, same thread count,
measured side by side in one session; greedy uses kd's KV-cached decoder, beam search kd's
lean implementation of transformers' beam search (what the tasks' evaluation uses). The ratios are written to
``benchmarks/results/decode.json``.

``KD_BENCH_STUDENT='{"d_model": 128, "decoder_layers": 2}'`` (JSON, Marian config keys) measures a
candidate student instead of the default; its ratios go to ``decode-candidate.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from kdcore.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = int(os.environ.get("KD_BENCH_THREADS", "1"))
VOCAB = 8000          # the embedded tasks' trained tokenizer size
BATCH = 100         # the text tasks' eval_batch_size (wmt)
NEW_TOKENS = 24
SOURCE_TOKENS = {"wmt": 12, "summarization": 100}  # typical embedded source lengths
ROWS: list[dict] = []
STUDENT_OVERRIDES: dict = json.loads(os.environ.get("KD_BENCH_STUDENT", "{}"))


def _model(task: str, role: str):  # noqa: ANN202 - HFTextModel
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import TextTeacher
    from kd_tasks.text.presets import STUDENTS
    from kd_tasks.text.summarization import SummarizationTask
    from kd_tasks.text.teacher import TaskTeacherConfig, teacher_marian_config
    from kd_tasks.text.wmt import TranslationTask

    special = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
               "forced_eos_token_id": None}
    if role == "student":
        values = {**STUDENTS[task]["args"]["config"], **STUDENT_OVERRIDES, **special}
    else:
        task_class = {"wmt": TranslationTask, "summarization": SummarizationTask}[task]
        values = teacher_marian_config({**TaskTeacherConfig.FALLBACK, **task_class.teacher_defaults}, **special)
    values.pop("model_type")
    torch.manual_seed(0)
    hf_model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values)).eval()
    hf_model.final_logits_bias[..., 1] = -1e9  # never emit end-of-sequence: fixed-length outputs
    return TextTeacher(hf_model, tokenizer=None)


def _decode_seconds(model, num_beams: int, source_tokens: int) -> tuple[float, int]:  # noqa: ANN001
    from kd_plugins.text.generation import decode

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, VOCAB, (BATCH, source_tokens), generator=generator)
    mask = torch.ones_like(input_ids)
    decode(model, input_ids[:8], mask[:8], num_beams=num_beams, max_new_tokens=NEW_TOKENS)  # untimed warm-up
    started = time.perf_counter()
    result = decode(model, input_ids, mask, num_beams=num_beams, max_new_tokens=NEW_TOKENS)
    return time.perf_counter() - started, int(result.lengths.sum())


@pytest.fixture(scope="module", autouse=True)
def _write_results():  # noqa: ANN202
    yield
    if ROWS:
        RESULTS.mkdir(exist_ok=True)
        name = "decode-candidate.json" if STUDENT_OVERRIDES else "decode.json"
        atomic_write_json(RESULTS / name, {"group": "decode", "threads": THREADS, "batch": BATCH,
                                           "new_tokens": NEW_TOKENS, "student_overrides": STUDENT_OVERRIDES,
                                           "rows": list(ROWS)})


@pytest.mark.parametrize("num_beams", [1, 5])
@pytest.mark.parametrize("task", ["wmt", "summarization"])
def test_student_decodes_3x_faster_than_teacher(benchmark, task: str, num_beams: int) -> None:  # noqa: ANN001
    torch.set_num_threads(THREADS)
    teacher, student = _model(task, "teacher"), _model(task, "student")
    timings: dict[str, list[float]] = {"teacher": [], "student": []}
    tokens: dict[str, int] = {}

    def both() -> None:
        # Interleaved, so a change of machine load hits both models alike.
        for role, model in (("teacher", teacher), ("student", student)):
            seconds, tokens[role] = _decode_seconds(model, num_beams, SOURCE_TOKENS[task])
            timings[role].append(seconds)

    benchmark.group = f"decode {task} beams={num_beams}"
    benchmark.pedantic(both, rounds=3, iterations=1)
    best = {role: min(values) for role, values in timings.items()}
    speedup = best["teacher"] / best["student"]
    row = {"task": task, "num_beams": num_beams, "teacher_seconds": best["teacher"],
           "student_seconds": best["student"], "teacher_parameters": teacher.num_parameters(),
           "student_parameters": student.num_parameters(), "speedup": speedup,
           "sentences_per_second": {role: BATCH / seconds for role, seconds in best.items()},
           "tokens": tokens, "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    ROWS.append(row)
    benchmark.extra_info.update(row)
    assert tokens["teacher"] == tokens["student"]  # same work: equal output lengths
    assert speedup >= 3.0, row
