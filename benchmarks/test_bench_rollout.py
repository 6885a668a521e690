"""ImitKD's student rollouts and training step: kd's rollout loop before and after it called the decoder stack directly.

Run with ``OMP_NUM_THREADS=1 pytest benchmarks/test_bench_rollout.py --benchmark-only -s``. The models have the
*current* default shapes (the wmt student ``kd_tasks.text.presets.STUDENTS["wmt"]``, the wmt teacher from
``TranslationTask.teacher_defaults``) with random weights and the embedded tokenizer's 8,000-token vocabulary. The
batch is 64 real sentence pairs from the committed wmt sample (``tests/text_tasks/data``), tokenised with a BPE
tokenizer trained on it and picked as the task's length bucketing picks them (similar target lengths, the middle
bucket). A random student never ends a sentence, so every rollout runs to ImitKD's cap (2 x the longest target + 5),
as an untrained student's do early in training.

* ``rollout``: :func:`rollout_before` (the loop as it was: the model's full forward per token, the logits cloned to
  ban the pad token) against :func:`kd_plugins.text.generation.generate` (the decoder stack and the LM head called
  directly, the ban folded into the bias) and Hugging Face ``generate`` (greedy; its tokens are compared, its time
  is reported): greedy and top-k sampling from the same RNG state, the same tokens asserted.
* ``step``: one ImitKD training step (β = 0: every target is the student's rollout, as for most of a run, since β
  falls below 1/2 after 13% of the steps on wmt; forward KL; backward; AdamW at learning rate 0, so that every
  variant works on the same student) with each rollout, and a scratch
  step beside them for scale.

Each round runs every variant once, interleaved, so a change of the shared machine's load hits all of them; the
best of the rounds counts, for the wall clock and for the process CPU time (what the pass costs when other
processes share the cores). The numbers go to ``benchmarks/results/rollout.json`` and docs/performance.md.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from kdcore.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "text_tasks" / "data" / "ha-en-de-sample.tsv"
THREADS = int(os.environ.get("KD_BENCH_THREADS", "1"))
ROUNDS = int(os.environ.get("KD_BENCH_ROUNDS", "5"))
VOCAB = 8000  # the embedded tasks' trained tokenizer size
BATCH = 64  # the wmt default trainer.batch_size
RESULT: dict[str, Any] = {}


@torch.no_grad()
def rollout_before(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, strategy: str = "greedy",
                   top_k: int = 5, temperature: float = 1.0, max_new_tokens: int = 64,
                   generator: torch.Generator | None = None) -> Any:
    """kd's seq2seq rollout before this change (``generate`` with the cache, as of commit adc2bbf), kept here as the
    baseline: the model's full forward for every token, then a copy of the logits with the pad token banned."""
    from kd_plugins.text.generation import Generated, _cache_argument, _lengths_from, _next_tokens

    hf = model.hf_model
    batch_size = input_ids.shape[0]
    encoder_outputs = hf.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    prefix = torch.full((batch_size, 1), model.decoder_start_token_id, dtype=torch.long)
    finished = torch.zeros(batch_size, dtype=torch.bool)
    cache_argument = _cache_argument(hf)
    past: Any = None
    produced: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        outputs = hf(encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                     decoder_input_ids=prefix[:, -1:] if past is not None else prefix, use_cache=True,
                     return_dict=True, **{cache_argument: past})
        past = outputs[cache_argument]
        logits = outputs.logits[:, -1, :].clone()
        logits[:, model.pad_token_id] = float("-inf")
        tokens = _next_tokens(logits, strategy, top_k, temperature, generator)  # type: ignore[arg-type]
        tokens = tokens.masked_fill(finished, model.pad_token_id)
        produced.append(tokens)
        finished = finished | (tokens == model.eos_token_id)
        if bool(finished.all()):
            break
        prefix = torch.cat([prefix, tokens[:, None]], dim=1)
    sequences = torch.stack(produced, dim=1)
    return Generated(sequences, _lengths_from(sequences, model.eos_token_id))


def _wmt_batch() -> dict[str, Any]:
    """64 sample pairs of similar target length (the middle length bucket), tokenised like the task does."""
    from kd_tasks.text.tokenizer import train_bpe_tokenizer
    from kdcore.padding import pad_rows

    pairs = [line.split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_bpe_tokenizer([text for pair in pairs for text in pair], VOCAB)
    sources = tokenizer([source for source, _ in pairs])["input_ids"]
    targets = tokenizer(text_target=[target for _, target in pairs])["input_ids"]
    by_length = sorted(range(len(pairs)), key=lambda i: (len(targets[i]), len(sources[i])))
    middle = len(pairs) // 2 - BATCH // 2
    chosen = by_length[middle:middle + BATCH]
    return {"input_ids": pad_rows([sources[i] for i in chosen], 0),
            "attention_mask": pad_rows([[1] * len(sources[i]) for i in chosen], 0),
            "labels": pad_rows([targets[i] for i in chosen], -100), "ids": [str(i) for i in chosen]}


def _models() -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import TextStudent, TextTeacher
    from kd_tasks.text.presets import STUDENTS
    from kd_tasks.text.teacher import TaskTeacherConfig, teacher_marian_config
    from kd_tasks.text.wmt import TranslationTask

    special = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    student_values = {**STUDENTS["wmt"]["args"]["config"], **special}
    teacher_values = teacher_marian_config({**TaskTeacherConfig.FALLBACK, **TranslationTask.teacher_defaults}, **special)
    built = []
    for seed, values in enumerate((student_values, teacher_values)):
        values = dict(values)
        values.pop("model_type")
        torch.manual_seed(seed)
        built.append(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values)))
    return TextStudent(built[0]), TextTeacher(built[1].eval()).freeze()


def _best_of(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Best wall and process-CPU seconds of each variant over ``rounds`` interleaved rounds (one warm-up round)."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    for round_index in range(rounds + 1):
        for name, run in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if round_index:  # round 0 warms up (allocator growth, kernel selection)
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {kind: min(values) for kind, values in kinds.items()} for name, kinds in times.items()}


def _cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


@pytest.fixture(scope="module")
def setup() -> SimpleNamespace:
    torch.set_num_threads(THREADS)
    student, teacher = _models()
    batch = _wmt_batch()
    yield SimpleNamespace(student=student, teacher=teacher, batch=batch)
    if RESULT:
        # A run of one of the two tests (-k) replaces its own part of the file and keeps the other's.
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "rollout.json"
        kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        machine = {"threads": THREADS, "rounds": ROUNDS, "cpu": _cpu_model(), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}
        atomic_write_json(path, {**kept, "group": "rollout",
                                 **{part: {**values, **machine} for part, values in RESULT.items()}})


def _ratios(seconds: dict[str, dict[str, float]], before: str, after: str) -> dict[str, float]:
    return {kind: seconds[before][kind] / seconds[after][kind] for kind in ("wall", "cpu")}


def test_rollout_speed_up(benchmark, setup: SimpleNamespace) -> None:  # noqa: ANN001
    from kd_plugins.text.generation import generate
    from kd_plugins.text.imitation import StudentGeneration

    student, batch = setup.student, setup.batch
    student.eval()
    cap = StudentGeneration(max_new_tokens=128).limit(batch["labels"])
    sources = (batch["input_ids"], batch["attention_mask"])
    hf_config = {"do_sample": False, "num_beams": 1, "max_new_tokens": cap, "bad_words_ids": [[0]],
                 "forced_eos_token_id": None, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}

    def sampled(decoder: Callable[..., Any]) -> Any:
        return decoder(student, *sources, strategy="top_k", top_k=5, max_new_tokens=cap,
                       generator=torch.Generator().manual_seed(0))

    variants = {
        "greedy_before": lambda: rollout_before(student, *sources, max_new_tokens=cap),
        "greedy_after": lambda: generate(student, *sources, max_new_tokens=cap),
        "greedy_transformers": lambda: student.hf_model.generate(input_ids=sources[0], attention_mask=sources[1],
                                                                 **hf_config),
        "top_k_before": lambda: sampled(rollout_before),
        "top_k_after": lambda: sampled(generate),
    }
    greedy = generate(student, *sources, max_new_tokens=cap)
    assert torch.equal(greedy.sequences, rollout_before(student, *sources, max_new_tokens=cap).sequences)
    assert torch.equal(sampled(generate).sequences, sampled(rollout_before).sequences)
    transformers_tokens = variants["greedy_transformers"]()[:, 1:]
    seconds: dict[str, dict[str, float]] = {}

    def measure() -> None:
        seconds.update(_best_of(variants, ROUNDS))

    benchmark.group = "ImitKD rollout: before vs after"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    RESULT["rollout"] = {
        "batch": list(batch["input_ids"].shape), "target_tokens_max": int((batch["labels"] != -100).sum(1).max()),
        "new_tokens": int(greedy.sequences.shape[1]), "seconds": seconds,
        "greedy_speed_up": _ratios(seconds, "greedy_before", "greedy_after"),
        "top_k_speed_up": _ratios(seconds, "top_k_before", "top_k_after"),
        "transformers_over_after": _ratios(seconds, "greedy_transformers", "greedy_after"),
        "transformers_same_tokens": bool(torch.equal(transformers_tokens, greedy.sequences)),
    }
    benchmark.extra_info.update(RESULT["rollout"])
    print(f"\nrollout {RESULT['rollout']}")
    assert RESULT["rollout"]["greedy_speed_up"]["cpu"] > 1.0


def test_imitation_step_speed_up(benchmark, setup: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import kd_plugins.text.imitation as imitation
    from kd_plugins.text.baselines import ScratchMethod
    from kdcore.interfaces import WeightedObjective
    from kdcore.registry import Registry

    student, teacher, batch = setup.student, setup.teacher, setup.batch
    registry = Registry.discover(entry_points=False)

    def objective(name: str) -> WeightedObjective:
        cls = registry.load("objective", name)
        return WeightedObjective("kd", cls(cls.Config()), 1.0)

    task = SimpleNamespace(cache_dir=Path("/nonexistent"), name="wmt", data_config=SimpleNamespace(max_target_tokens=128))
    method = imitation.ImitationKD(imitation.ImitationConfig(schedule={"kind": "constant", "value": 0.0}), task,
                                   teacher, student, [objective("forward_kl")])
    scratch = ScratchMethod(ScratchMethod.Config(), task, teacher, student, [objective("nll")])
    for each in (method, scratch):
        each.on_train_start(100)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)  # all of AdamW's work, but the student stays as it is
    student.train()
    after = imitation.generate

    def step(runner: Any, rollout: Callable[..., Any]) -> Callable[[], None]:
        def run() -> None:
            monkeypatch.setattr(imitation, "generate", rollout)
            output = runner.training_step(batch, 0)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    variants = {"imitation_before": step(method, rollout_before), "imitation_after": step(method, after),
                "scratch": step(scratch, after)}
    seconds: dict[str, dict[str, float]] = {}

    def measure() -> None:
        seconds.update(_best_of(variants, ROUNDS))

    benchmark.group = "ImitKD training step: before vs after"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    RESULT["step"] = {
        "seconds": seconds, "imitation_speed_up": _ratios(seconds, "imitation_before", "imitation_after"),
        "imitation_over_scratch_before": _ratios(seconds, "imitation_before", "scratch"),
        "imitation_over_scratch_after": _ratios(seconds, "imitation_after", "scratch"),
    }
    benchmark.extra_info.update(RESULT["step"])
    print(f"\nstep {RESULT['step']}")
    # No assertion on the step: the rollout is a minor part of it (the teacher's forward, the divergence over the
    # rollout-length sequences and the student's backward are the rest), so its gain is within the shared machine's
    # noise; docs/performance.md gives the numbers.
