"""Default run settings and presets of the text tasks (one place, so wmt and summarization stay aligned)."""
from __future__ import annotations

import copy
from typing import Any

from kd_plugins.text.models import marian_config


def llama_config(vocab_size: int | None = None, *, layers: int = 2, d_model: int = 128, heads: int = 4,
                 ffn_dim: int | None = None, dropout: float = 0.0, max_positions: int | None = None,
                 **extra: Any) -> dict[str, Any]:
    """A ``config`` dict for a small Llama (rotary positions, RMSNorm, SwiGLU, tied embeddings, no biases);
    ``max_positions`` null: Llama's default context (2,048 tokens)."""
    values: dict[str, Any] = {
        "model_type": "llama", "hidden_size": d_model, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "intermediate_size": ffn_dim or 4 * d_model, "tie_word_embeddings": True,
        "attention_dropout": dropout, "rms_norm_eps": 1e-6}
    if max_positions is not None:
        values["max_position_embeddings"] = max_positions
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    values.update(extra)
    return values

#: The default student of each task: a Marian with a shallow, narrow decoder (vocabulary from the task's tokenizer).
#: Decoding cost is per generated token and grows with decoder depth and width, so a shallow, narrow decoder is what
#: makes a student decode several times faster than its teacher (docs/text.md, "Sizes").
#: wmt: 2-layer encoder, 1-layer decoder, d=96 (1.24M parameters with the 8k vocabulary).
#: summarization: 2 + 2 layers, d=128, FFN 512 (2.08M). The d=96 student wrote one sentence for every document after
#: 1,000 and 2,000 steps (test share of distinct outputs <= 0.04); at 2 + 2, d=128 the distilled students read their
#: documents by step 500-1,000 and still decode 3.9x (greedy) / 4.6x (beam 5) faster than the teacher
#: (docs/text.md, "Summarization").
#: The wmt student starts from its teacher's weights where the teacher allows it (init: auto; weight selection from
#: d=256 to d=96, encoder layers [0, 2] and decoder layer [0] of the 3 + 3 teacher), which nearly tripled the
#: imitation student's BLEU over three seeds (docs/results/wmt-fp32-teacher-seeds.md).
STUDENTS: dict[str, dict[str, Any]] = {
    "wmt": {"name": "seq2seq", "args": {"config": marian_config(layers=(2, 1), d_model=96, heads=4, ffn_dim=384),
                                        "init": "auto", "init_width": "select"}},
    "summarization": {"name": "seq2seq",
                      "args": {"config": marian_config(layers=(2, 2), d_model=128, heads=4, ffn_dim=512)}},
    # lm: a 2-layer d=128 Llama (the teacher: 4 layers, d=256).
    "lm": {"name": "causal-lm", "args": {"config": llama_config(layers=2, d_model=128, heads=4, ffn_dim=512)}},
}

_TRAINER: dict[str, dict[str, Any]] = {
    # wmt: native-bf16 for the 15-minute cached run on slower 2-core machines (an imitation step of the d=96 student
    # with the 3+3 teacher: 0.33 s under bf16 against 0.42 s in fp32 on a 100-step probe, 2026-12-06).
    "wmt": {"max_steps": 2000, "batch_size": 64, "eval_batch_size": 100, "lr": 1e-3, "warmup_steps": 100,
            "eval_every": 500, "checkpoint_every": 500, "log_every": 20, "precision": "native-bf16",
            "time_budget_minutes": 10},
    # At lr 1e-3 after 50 warm-up steps the summarization student's encoder collapsed as the teacher's had
    # (encoder spread 0.01, one output for all valid documents); at 5e-4 after 300 it stays spread (~1.1).
    # 900 steps: the 2 + 2, d=128 students read from step 500 (imitation) / 750-1,000 (word-kd) of a 1,500-step
    # probe; 1,200 steps and a 2,000-step teacher took 34.6 minutes cold on a 2-core machine where the issue's
    # 6 + 6 reference step takes 0.65 s (the issue measured 1.1 s), so the default had to shrink. native-bf16: bf16 autocast where the CPU computes it natively (0.43 s per step there),
    # fp32 elsewhere; evaluation always runs in fp32.
    # select: last. On 300 valid docstrings a generic fixed sentence ("Returns the ...") scores ROUGE-L ~11, as
    # high as students that read: the best rule kept imitation seed 2's step-300 checkpoint (one output for every
    # document, valid 11.3) over its step-1,200 student (87 distinct of 300, valid 10.6); docs/text.md.
    "summarization": {"max_steps": 900, "batch_size": 32, "eval_batch_size": 50, "lr": 5e-4, "warmup_steps": 300,
                      "eval_every": 300, "checkpoint_every": 300, "log_every": 20, "precision": "native-bf16",
                      "select": "last", "time_budget_minutes": 9},
}

# time_budget_minutes (kdcore.time_budget): the training loop's share of the 15-minute cached run, so that a CPU slower
# than the one that sized max_steps (or one without bf16 units, where native-bf16 runs fp32) trains fewer steps
# instead of blowing the limit; start-up and the final test decoding of teacher and student come on top.

_TRAINER["lm"] = {"max_steps": 1000, "batch_size": 32, "eval_batch_size": 100, "lr": 2e-3, "warmup_steps": 100,
                  "eval_every": 250, "checkpoint_every": 250, "log_every": 20, "precision": "native-bf16",
                  "time_budget_minutes": 10}

_TINY: dict[str, dict[str, Any]] = {
    "wmt": {"data": {"max_train": 400, "max_valid": 16, "max_test": 24, "vocab_size": 600, "eval_beams": [1, 2]}},
    "summarization": {"data": {"packages": ["stdlib"], "valid_size": 16, "test_size": 24, "max_train": 300,
                               "vocab_size": 800, "max_source_tokens": 64, "max_target_tokens": 24,
                               "eval_beams": [1, 2], "max_length_ratio": 0.25, "max_length_offset": 8}},
}

_TINY["lm"] = {"data": {"max_train_per_instruction": 300, "valid_size": 16, "test_size": 24, "vocab_size": 800,
                         "max_source_tokens": 48, "max_target_tokens": 24}}

#: Each task's task-trained default teacher.
_TEACHERS = {"wmt": "task-trained-seq2seq", "summarization": "task-trained-seq2seq", "lm": "task-trained-causal-lm"}
#: The tiny preset's teacher architecture, by teacher.
_TINY_TEACHER = {"task-trained-seq2seq": {"encoder_layers": 1, "decoder_layers": 1},
                 "task-trained-causal-lm": {"layers": 1}}
_TINY_STUDENT = {
    "task-trained-seq2seq": {"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_layers": 1,
                             "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2},
    "task-trained-causal-lm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2}}

_HUB: dict[str, dict[str, dict[str, Any]]] = {
    "wmt": {"opus-mt-en-de": {"source": "Helsinki-NLP/opus-mt-en-de"}},
    "summarization": {"bart-base": {"source": "facebook/bart-base"}},
    "lm": {"qwen2.5-1.5b": {"source": "Qwen/Qwen2.5-1.5B-Instruct"}},
}


def text_task_defaults(task: str) -> dict[str, Any]:
    """Run-config fragment of a text task: the task-trained teacher, the task's small student, the trainer."""
    return {"teacher": {"name": _TEACHERS[task]}, "student": copy.deepcopy(STUDENTS[task]),
            "trainer": dict(_TRAINER[task])}


def text_presets(task: str) -> dict[str, dict[str, Any]]:
    """``tiny`` (CI: well under a minute) and the hub-teacher presets of a text task."""
    presets: dict[str, dict[str, Any]] = {
        "tiny": {
            **copy.deepcopy(_TINY[task]),
            "teacher": {"args": {**_TINY_TEACHER[_TEACHERS[task]], "d_model": 64, "heads": 2, "ffn_dim": 128,
                                 "train_steps": 40, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5}},
            "student": {"args": {"config": dict(_TINY_STUDENT[_TEACHERS[task]])}},
            "trainer": {"max_steps": 12, "batch_size": 16, "eval_batch_size": 24, "warmup_steps": 2,
                        "eval_every": 6, "checkpoint_every": 6, "log_every": 3},
        },
    }
    kind = "causal-lm" if _TEACHERS[task] == "task-trained-causal-lm" else "seq2seq"
    for name, teacher in _HUB[task].items():
        # A pretrained teacher brings its tokenizer; the task tokenises with it and the student shares it.
        presets[name] = {"teacher": {"name": kind, "args": {**teacher, "local_files_only": False}},
                         "data": {"tokenizer": teacher["source"], "local_files_only": False}}
    return presets


__all__ = ["STUDENTS", "text_presets", "text_task_defaults"]
