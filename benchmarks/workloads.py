"""Workloads of the fused-vs-naive benchmark, and a subprocess runner that measures one of them.

Three ways to compute the same loss (JSD and the other kinds of :mod:`kdcore.objectives.divergence`)
from the student's and teacher's last hidden states and output projections:

* ``naive``: what one writes without this library -- materialise both ``(N, V)`` logits with
  ``F.linear`` and write the divergence with plain torch ops (log_softmax, exp, log, ...), so
  autograd saves every intermediate. This is the "naive" of issue 6's acceptance (its orientation
  numbers, 26 s and 6.5 GB at N=4096, V=32000, H=512, are of this kind).
* ``dense``: materialised logits, then :func:`kdcore.objectives.divergence` (the library's dense
  path, which already computes the logit gradient in closed form, chunk by chunk).
* ``fused``: :func:`kdcore.fused.fused_linear_divergence`, which never holds full logits.

Run as a script (``python benchmarks/workloads.py --variant fused --tokens 4096 ...``) it builds
the inputs, warms up on a tiny problem, then times ``rounds`` forward+backward passes and reports,
as one JSON line on stdout, the wall and process-CPU times (the CPU time is what the pass costs
when other processes share the cores) and the peak resident-memory growth over the baseline
taken after the inputs exist (``ru_maxrss`` high-water mark minus the RSS before the first pass).
Each measurement runs in a fresh process so that one variant's memory never hides another's.
Before the baseline is taken, ``malloc_trim(0)`` returns the memory glibc kept after earlier
frees (input creation, warm-up), so the baseline holds only live data and the high-water mark
counts what the pass really needs, with glibc's default allocation behaviour (the one users get).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

VARIANTS = ("naive", "dense", "fused", "hidden_per_layer", "hidden_multi")
# The hidden-state workload: DistilHuBERT-like, ``--tokens`` frames (batch x time), ``--hidden``
# features, ``--vocab`` reused as the number of predicted layers.
REPOSITORY = Path(__file__).resolve().parents[1]


def make_inputs(tokens: int, vocab: int, hidden: int, *, dtype: torch.dtype = torch.float32,
                device: str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """Student/teacher hidden states and heads, scaled so the logits have a spread of a few units."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    return {
        "student_hidden": randn(tokens, hidden).requires_grad_(),
        "student_weight": randn(vocab, hidden, scale=2.0 / hidden ** 0.5).requires_grad_(),
        "teacher_hidden": randn(tokens, hidden),
        "teacher_weight": randn(vocab, hidden, scale=3.0 / hidden ** 0.5),
    }


def naive_autograd_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str, *, beta: float = 0.5,
                              skew: float = 0.1, temperature: float = 1.0) -> Tensor:
    """The issue's formulas written directly with torch ops (autograd keeps every intermediate).

    Deliberately not the library's code: this is the baseline the fused path is compared with.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, -1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward_kl":
        per = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        per = (p_s * (log_s - log_t)).sum(-1)
    elif kind == "jsd":
        log_m = torch.log(beta * p_t + (1 - beta) * p_s)
        per = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    elif kind == "skew_forward_kl":
        per = (p_t * (log_t - torch.log(skew * p_t + (1 - skew) * p_s))).sum(-1)
    elif kind == "skew_reverse_kl":
        per = (p_s * (log_s - torch.log(skew * p_s + (1 - skew) * p_t))).sum(-1)
    elif kind == "tvd":
        per = 0.5 * (p_t - p_s).abs().sum(-1)
    else:
        raise ValueError(kind)
    return per.mean()


def make_hidden_inputs(frames: int, layers: int, features: int, *, dtype: torch.dtype = torch.float32,
                       device: str = "cpu", seed: int = 0) -> dict[str, list[Tensor]]:
    """Student predictions (leaves that require grad) and teacher layers, ``(frames, features)`` each."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    students = [torch.randn(frames, features, generator=generator).to(device=device, dtype=dtype).requires_grad_()
                for _ in range(layers)]
    teachers = [torch.randn(frames, features, generator=generator).to(device=device, dtype=dtype)
                for _ in range(layers)]
    return {"students": students, "teachers": teachers}


def hidden_forward_backward(variant: str, inputs: dict[str, list[Tensor]], kind: str) -> float:
    """Sum over layers of the hidden-state loss, one autograd graph per layer or one node for all."""
    from kdcore.objectives import hidden_state_loss, multi_layer_hidden_loss

    for student in inputs["students"]:
        student.grad = None
    if variant == "hidden_per_layer":
        loss = sum(hidden_state_loss(s, t, kind) for s, t in zip(inputs["students"], inputs["teachers"]))
    else:
        loss, _ = multi_layer_hidden_loss(inputs["students"], inputs["teachers"], kind)
    loss.backward()
    return float(loss.detach())


def forward_backward(variant: str, inputs: dict, kind: str, chunk_size: int | None = None) -> float:
    """One forward + backward pass of ``variant``; returns the loss value."""
    from kdcore.fused import fused_linear_divergence
    from kdcore.objectives import divergence

    if variant.startswith("hidden_"):
        return hidden_forward_backward(variant, inputs, kind)
    student_hidden, student_weight = inputs["student_hidden"], inputs["student_weight"]
    teacher_hidden, teacher_weight = inputs["teacher_hidden"], inputs["teacher_weight"]
    student_hidden.grad = student_weight.grad = None
    if variant == "fused":
        loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind,
                                       chunk_size=chunk_size)
    else:
        student_logits = F.linear(student_hidden, student_weight)
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight)
        if variant == "naive":
            loss = naive_autograd_divergence(student_logits, teacher_logits, kind)
        elif variant == "dense":
            loss = divergence(student_logits, teacher_logits, kind, chunk_size=chunk_size)
        else:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        del student_logits, teacher_logits
    loss.backward()
    if student_hidden.is_cuda:
        torch.cuda.synchronize()
    return float(loss.detach())


def _release_free_heap() -> None:
    """Give memory that glibc keeps after frees back to the system, so the baseline RSS holds only live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(variant: str, tokens: int, vocab: int, hidden: int, *, kind: str = "jsd", rounds: int = 1,
            dtype: str = "float32", device: str = "cpu", chunk_size: int | None = None) -> dict:
    """Time ``rounds`` forward+backward passes and the peak memory of the first (call in a fresh process)."""
    torch_dtype = getattr(torch, dtype)
    build = make_hidden_inputs if variant.startswith("hidden_") else make_inputs
    # warm-up on a tiny problem: thread pools, MKL/oneDNN dispatch, the CUDA context and kernels
    forward_backward(variant, build(64, 3 if variant.startswith("hidden_") else 256, 32, dtype=torch_dtype,
                                    device=device), kind)
    inputs = build(tokens, vocab, hidden, dtype=torch_dtype, device=device)
    _release_free_heap()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()
    times, cpu_times, loss = [], [], float("nan")
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            loss = forward_backward(variant, inputs, kind, chunk_size)
        except torch.OutOfMemoryError:
            # naive at the CUDA size may not fit on the device: a result too, reported as such
            return {"variant": variant, "tokens": tokens, "vocab": vocab, "hidden": hidden, "kind": kind,
                    "dtype": dtype, "device": device, "error": "out of memory",
                    "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
        device_name = torch.cuda.get_device_name()
    else:
        # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        device_name = "cpu"
    return {"variant": variant, "tokens": tokens, "vocab": vocab, "hidden": hidden, "kind": kind, "dtype": dtype,
            "device": device, "device_name": device_name, "threads": torch.get_num_threads(),
            "chunk_size": chunk_size, "times_s": times, "time_s": min(times), "cpu_times_s": cpu_times,
            "cpu_time_s": min(cpu_times), "peak_bytes": int(peak),
            "loss": loss}


def measure_in_subprocess(variant: str, tokens: int, vocab: int, hidden: int, *, kind: str = "jsd", rounds: int = 1,
                          dtype: str = "float32", device: str = "cpu", chunk_size: int | None = None,
                          threads: int | None = None, timeout: float = 3600) -> dict:
    """:func:`measure` in a fresh Python process (its own memory high-water mark)."""
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--tokens", str(tokens),
               "--vocab", str(vocab), "--hidden", str(hidden), "--kind", kind, "--rounds", str(rounds),
               "--dtype", dtype, "--device", device]
    if chunk_size is not None:
        command += ["--chunk-size", str(chunk_size)]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY,
                               timeout=timeout, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- a whole causal-LM training step
# A whole optimiser step of word-level KD between two causal LMs, built through the pieces `kd run` uses:
# kdcore.resolve (config layers, the causal-lm factories, the registered objective with its `fused` option, the
# word-kd method) and kdcore.optimization (AdamW and its schedule). The models are small in hidden size so that the
# vocabulary dominates, as it does for the output layer of real LMs.
LM_STEP_VARIANTS = ("dense", "fused")
LM_STEP_SHAPE = {"batch": 32, "prompt": 24, "completion": 40, "hidden": 256, "student_layers": 2, "teacher_layers": 4}


def lm_architecture(vocab: int, hidden: int, layers: int) -> dict:
    """A Llama config dict (``causal-lm`` ``args.config``): tied input/output embeddings, as small Llamas have."""
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
            "num_key_value_heads": max(1, hidden // 64), "max_position_embeddings": 256,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def lm_batch(vocab: int, *, batch: int = 8, prompt: int = 24, completion: int = 40, seed: int = 0) -> dict[str, Tensor]:
    """A batch shaped like the ``lm`` task's: ``input_ids`` = prompt + completion, right-padded; ``labels`` = the
    completion tokens (-100 on the prompt and the padding); prompt and completion lengths vary around the given ones
    (+-1/3) so the padding is real."""
    generator = torch.Generator().manual_seed(seed)

    def lengths(mean: int) -> list[int]:
        spread = max(1, mean // 3)
        return (torch.randint(mean - spread, mean + spread + 1, (batch,), generator=generator)).tolist()

    prompts, completions = lengths(prompt), lengths(completion)
    width = max(p + c for p, c in zip(prompts, completions))
    input_ids = torch.zeros(batch, width, dtype=torch.long)  # 0 = the pad id of lm_architecture
    labels = torch.full((batch, width), -100, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        tokens = torch.randint(3, vocab, (p + c,), generator=generator)
        input_ids[row, :p + c] = tokens
        labels[row, p:p + c] = tokens[p:]
        attention_mask[row, :p + c] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_lm_step(vocab: int, variant: str, *, kind: str = "jsd", hidden: int = 256, student_layers: int = 2,
                  teacher_layers: int = 4, cache_dir: str | None = None, seed: int = 0):
    """``(method, optimizer, scheduler, trainer_config)`` of a word-kd run between two random causal LMs.

    ``variant`` ``fused`` leaves the objective at its default (``fused: auto``: the method then asks the models for
    their final hidden states and the objective takes the fused path at this vocabulary); ``dense`` sets
    ``fused: false`` (the models' LM heads build the logits).
    """
    import tempfile

    from kdcore.optimization import build_optimizer, build_scheduler
    from kdcore.registry import Registry
    from kdcore.resolve import build_components, resolve_run

    if variant not in LM_STEP_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {LM_STEP_VARIANTS}")
    sets = ["teacher=" + json.dumps({"name": "causal-lm",
                                     "args": {"config": lm_architecture(vocab, hidden, teacher_layers)}}),
            "student=" + json.dumps({"name": "causal-lm",
                                     "args": {"config": lm_architecture(vocab, hidden, student_layers)}}),
            f"objectives.kd.name={kind}", "trainer.precision=fp32", "trainer.warmup_steps=0"]
    if variant == "dense":
        sets.append("objectives.kd.args.fused=false")
    # The toy task only hosts the run (its data are not read): the lm task is not needed to build the models,
    # method and optimiser, and the batches below have the lm task's layout.
    resolved = resolve_run(Registry.discover(entry_points=False), task="toy", plugin="word-kd", sets=sets, seed=seed)
    built = build_components(resolved, torch.device("cpu"), cache_dir=cache_dir or tempfile.mkdtemp(prefix="kd-bench-"))
    built.student.train()
    optimizer = build_optimizer(built.method.trainable_modules(), resolved.config.trainer)
    scheduler = build_scheduler(optimizer, resolved.config.trainer)
    return built.method, optimizer, scheduler, resolved.config.trainer


def lm_train_step(method, optimizer, scheduler, trainer_config, batch: dict[str, Tensor], step: int) -> dict:
    """One optimiser step as the engine takes it (kdcore.trainer): the method's loss (teacher forward without
    gradients, student forward, objectives), backward, gradient clipping, AdamW, schedule, ``zero_grad``."""
    output = method.training_step(batch, step)
    output.loss.backward()
    if trainer_config.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(method.trainable_modules().parameters(), trainer_config.clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(output.loss.detach()), "fused": float(output.parts.get("kd/fused", float("nan")))}


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark to its current RSS (Linux >= 4.0: ``/proc/self/clear_refs``
    ``5``; ``ru_maxrss`` follows). False where that is not possible: the peak then includes the warm-up steps."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure_lm_step(variant: str, vocab: int, *, kind: str = "jsd", warmup: int = 2, rounds: int = 3,
                    seed: int = 0, batch: int | None = None, prompt: int | None = None,
                    completion: int | None = None) -> dict:
    """Time ``rounds`` whole training steps after ``warmup`` steps, and their peak resident-memory growth.

    The warm-up steps create AdamW's state and pay the one-time costs (thread pools, oneDNN primitives), so the
    measured steps are steady-state ones, as in a run. Before the measured steps ``malloc_trim(0)`` returns freed
    heap (:func:`_release_free_heap`), the RSS is the baseline (parameters, AdamW state, the batch) and the
    high-water mark is reset to it; the peak is the high-water mark's growth over the baseline. Losses of every
    step are reported (the first is before any update). ``batch``, ``prompt``, ``completion``: the batch's shape
    (default :data:`LM_STEP_SHAPE`).
    """
    shape = {**LM_STEP_SHAPE, **{key: value for key, value in
                                 (("batch", batch), ("prompt", prompt), ("completion", completion)) if value}}
    method, optimizer, scheduler, trainer_config = build_lm_step(
        vocab, variant, kind=kind, hidden=shape["hidden"], student_layers=shape["student_layers"],
        teacher_layers=shape["teacher_layers"], seed=seed)
    batch = lm_batch(vocab, batch=shape["batch"], prompt=shape["prompt"], completion=shape["completion"], seed=seed)
    steps = [lm_train_step(method, optimizer, scheduler, trainer_config, batch, step) for step in range(warmup)]
    _release_free_heap()
    baseline = _rss_bytes()
    peak_reset = _reset_peak_rss()
    times, cpu_times = [], []
    for step in range(warmup, warmup + rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        steps.append(lm_train_step(method, optimizer, scheduler, trainer_config, batch, step))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss: KiB on Linux
    student = method.student
    return {"variant": variant, "vocab": vocab, "kind": kind, **shape,
            "positions": int(batch["input_ids"].numel()), "scored_positions": int((batch["labels"] != -100).sum()),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "student_request": sorted(s.value for s in method.student_request().signals),
            "fused_path": steps[-1]["fused"], "threads": torch.get_num_threads(), "device": "cpu",
            "warmup_steps": warmup, "times_s": times, "time_s": min(times), "cpu_times_s": cpu_times,
            "cpu_time_s": min(cpu_times), "peak_bytes": int(peak), "baseline_bytes": int(baseline),
            "peak_reset": peak_reset, "losses": [item["loss"] for item in steps]}


def measure_lm_step_in_subprocess(variant: str, vocab: int, *, kind: str = "jsd", warmup: int = 2, rounds: int = 3,
                                  batch: int | None = None, prompt: int | None = None, completion: int | None = None,
                                  threads: int | None = None, timeout: float = 3600) -> dict:
    """:func:`measure_lm_step` in a fresh Python process (its own memory high-water mark)."""
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    code = (f"import json, sys; sys.path[:0] = [{str(REPOSITORY)!r}, {str(Path(__file__).resolve().parent)!r}]; "
            f"from workloads import measure_lm_step; print(json.dumps(measure_lm_step({variant!r}, {vocab}, "
            f"kind={kind!r}, warmup={warmup}, rounds={rounds}, batch={batch}, prompt={prompt}, "
            f"completion={completion})))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                               cwd=REPOSITORY, timeout=timeout, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--kind", default="jsd")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPOSITORY))
    result = measure(args.variant, args.tokens, args.vocab, args.hidden, kind=args.kind, rounds=args.rounds,
                     dtype=args.dtype, device=args.device, chunk_size=args.chunk_size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
