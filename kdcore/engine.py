"""The one training engine every plugin uses.

AdamW with warm-up and decay, gradient accumulation and clipping, mixed
precision where the device supports it, seeded and resumable data order,
evaluation in the loop with the best student kept, checkpoints, log.jsonl,
and at the end metrics.json and report.md.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from safetensors.torch import load_file

from kdcore import distributed
from kdcore.checkpoint import (
    LoadedCheckpoint, capture_rng, latest_valid_checkpoint, load_checkpoint, restore_rng, save_checkpoint,
    save_state_dict,
)
from kdcore.config import TrainerConfig, dump_yaml_atomic
from kdcore.distributed import DataParallelStudent
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, DataSplits, Model
from kdcore.io import atomic_write_json, read_jsonl, rewrite_jsonl
from kdcore.precision import autocast_dtype
from kdcore.registry import Registry
from kdcore.resolve import BuiltRun

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def lr_factor(step: int, config: TrainerConfig) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


@dataclass
class RunContext:
    """What lifecycle hooks see of a run."""

    out_dir: Path
    built: BuiltRun
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.built.resolved.config


class EpochSampler:
    """A seeded permutation per epoch; its position is part of the checkpoint."""

    def __init__(self, size: int, batch_size: int, seed: int,
                 epoch_batches: Callable[[torch.Generator], list[list[int]] | None] | None = None) -> None:
        if size == 0:
            raise KDUserError("The training set is empty: there is nothing to distil on. Check the task's data config.")
        self.size = size
        self.batch_size = min(batch_size, size)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._epoch_batches = epoch_batches
        self._batches = self._epoch()

    def _epoch(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self._epoch_batches is not None:
            batches = self._epoch_batches(generator)
            if batches is not None:
                batches = [batch for batch in batches if batch]
                if not batches:
                    raise KDUserError("The task's epoch_batches() returned no batches for a non-empty training set.")
                return batches
        order = torch.randperm(self.size, generator=generator).tolist()
        # Drop the ragged tail: every step sees a full batch.
        return [order[start:start + self.batch_size]
                for start in range(0, self.size - self.batch_size + 1, self.batch_size)]

    def next_indices(self) -> list[int]:
        """The next batch's dataset indices (``position`` counts batches within the epoch)."""
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch()
        indices = self._batches[self.position]
        self.position += 1
        return indices

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch()


class TrainingInterrupted(KDUserError):
    """Ctrl-C (SIGINT) or SIGTERM: a checkpoint was saved; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (then it checkpoints and exits).

    The handler only sets a flag, so a step is never cut in half (an optimiser
    update interrupted midway would leave weights and moments inconsistent). A
    second signal restores the default handler and interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is not None:  # the second one: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: stopping after this step and saving a checkpoint (send it again to stop at "
                    "once, without one).", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


@contextlib.contextmanager
def clear_write_errors(what: str, path: Path) -> Iterator[None]:
    """An OSError while writing (full disk, read-only or vanished directory) becomes a clear user error."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        hint = ("free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT)
                else "make the directory writable or choose another --out")
        raise KDUserError(f"Could not write {what} at '{path}': {reason} (errno {error.errno}). Nothing was "
                          f"half-written: earlier checkpoints are intact. {hint.capitalize()}, then continue with "
                          f"kd run --out <run dir> --resume.") from None


def evaluate_model(built: BuiltRun, model: Model, dataset: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's metrics for ``model``, without touching the training RNG streams."""
    was_training = model.training
    model.eval()
    try:
        devices = [built.device] if built.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = built.task.evaluate(model, dataset, built.device, batch_size)
    finally:
        model.train(was_training)
    if built.task.metric not in metrics:
        raise RuntimeError(f"task '{built.task.name}' did not report its metric '{built.task.metric}'")
    return {k: float(v) for k, v in metrics.items()}


class Trainer:
    """Trains ``built.method``'s student; owns the output directory layout."""

    def __init__(self, built: BuiltRun, splits: DataSplits, out_dir: Path, registry: Registry) -> None:
        self.built = built
        self.splits = splits
        self.out_dir = Path(out_dir)
        self.registry = registry
        self.config = built.resolved.config
        self.trainer_config = self.config.trainer
        self.context = RunContext(self.out_dir, built)
        self.log_path = self.out_dir / "log.jsonl"
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.best_dir = self.out_dir / "best"
        self.autocast = autocast_dtype(self.trainer_config.precision, built.device)
        self.dist = distributed.current()
        self.parallel: DataParallelStudent | None = None

    # ------------------------------------------------------------------ setup
    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for parameter in self.built.method.trainable_modules().parameters():
            if not parameter.requires_grad:
                continue
            # Biases and norm scales are 1-D; weight decay on them only hurts (standard AdamW practice).
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": self.trainer_config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.trainer_config.lr, betas=self.trainer_config.betas)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with clear_write_errors("the training log", self.log_path), open(self.log_path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()

    def _batches(self, sampler: EpochSampler) -> Iterator[tuple[Batch, float]]:
        """This rank's micro-batches and each one's share of the global batch (x world size; 1.0 when even).

        Every rank draws the same global batch and takes its own contiguous slice,
        so the examples of a step are those one process would see.
        """
        world = self.dist.world_size
        while True:
            indices = sampler.next_indices()
            local = distributed.rank_slice(indices)
            if world > 1 and len(indices) < world:
                raise KDUserError(f"A training batch of {len(indices)} examples cannot be split over {world} "
                                  f"processes; raise trainer.batch_size (the global batch) or use fewer processes.")
            items = [self.splits.train[i] for i in local]
            yield move_to_device(self.built.task.collate(items), self.built.device), len(local) * world / len(indices)

    def _eval_batch_size(self) -> int:
        return self.trainer_config.eval_batch_size or self.trainer_config.batch_size

    # ------------------------------------------------------------------ main loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        config, trainer_config, built = self.config, self.trainer_config, self.built
        student, method = built.student, built.method
        world = self.dist.world_size
        if trainer_config.batch_size % world:
            raise KDUserError(f"trainer.batch_size = {trainer_config.batch_size} is the global batch and must be "
                              f"divisible by the number of processes ({world}); e.g. "
                              f"--set trainer.batch_size={max(world, trainer_config.batch_size // world * world)}.")
        # Wrap before the optimizer exists: FSDP2 replaces the parameters by sharded ones.
        self.parallel = parallel = DataParallelStudent(student, method.trainable_modules(), trainer_config.distributed,
                                                       built.device)
        optimizer = self._optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, trainer_config))
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast == torch.float16)
        train = self.splits.train
        sampler = EpochSampler(
            len(train), trainer_config.batch_size, config.seed,
            lambda generator: self.built.task.epoch_batches(train, trainer_config.batch_size, generator))
        state: dict[str, Any] = {"best_metric": None, "best_step": None, "train_seconds": 0.0,
                                 "nonfinite_steps": 0, "consecutive_nonfinite": 0}
        step = 0
        checkpoint = self._find_checkpoint() if resume else None
        if resume and checkpoint is None and self.dist.is_main:
            log.warning("No complete checkpoint in %s: starting from step 0.", self.checkpoint_dir)
        if checkpoint is not None:
            step = self._restore(checkpoint, optimizer, scheduler, scaler, sampler, state)
        else:
            # Each rank its own random stream (dropout); rank 0 keeps the single-process one.
            seed_everything(config.seed + 1_000_003 * self.dist.rank)
            if self.dist.is_main:
                self.log_path.unlink(missing_ok=True)
        self.context.state = state
        method.on_train_start(trainer_config.max_steps)
        if self.dist.is_main:
            self.registry.hook.kd_on_train_start(context=self.context)

        show = {"on": True, "off": False}.get(trainer_config.progress, sys.stderr.isatty()) and self.dist.is_main
        progress = tqdm(total=trainer_config.max_steps, initial=step, disable=not show, unit="step",
                        dynamic_ncols=True, desc=f"{config.task}/{config.plugin}")
        batches = self._batches(sampler)
        student.train()
        started = time.perf_counter()
        seconds_before = state["train_seconds"]
        stop = _StopSignals()
        try:
            with stop:
                while step < trainer_config.max_steps:
                    step = self._train_step(step, batches, optimizer, scheduler, scaler, sampler, state, progress)
                    if step % trainer_config.eval_every == 0 or step == trainer_config.max_steps:
                        self._evaluate_in_loop(step, state)
                    saved = step % trainer_config.checkpoint_every == 0 or step == trainer_config.max_steps
                    if saved:
                        state["train_seconds"] = seconds_before + time.perf_counter() - started
                        self._checkpoint(step, optimizer, scheduler, scaler, sampler, state)
                    if distributed.any_rank(stop.received is not None):
                        signum = stop.received or signal.SIGINT
                        state["train_seconds"] = seconds_before + time.perf_counter() - started
                        path = (self.checkpoint_dir / f"step-{step:08d}" if saved else
                                self._checkpoint(step, optimizer, scheduler, scaler, sampler, state))
                        raise TrainingInterrupted(
                            f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {path}. "
                            f"Continue with: kd run --out {self.out_dir} --resume", signum)
        except KeyboardInterrupt:
            # A second Ctrl-C: the step may be half done, so nothing is saved.
            raise TrainingInterrupted(
                f"Interrupted twice during step {step + 1}: no checkpoint written for it. The last complete "
                f"checkpoint in {self.checkpoint_dir} is intact; continue with: kd run --out {self.out_dir} --resume",
                signal.SIGINT) from None
        finally:
            progress.close()
        state["train_seconds"] = seconds_before + time.perf_counter() - started
        return state

    def _train_step(self, step: int, batches: Iterator[tuple[Batch, float]], optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, sampler: EpochSampler, state: dict[str, Any], progress: Any) -> int:
        """One optimiser step (or a counted skip); returns the new step number."""
        trainer_config, method, parallel = self.trainer_config, self.built.method, self.parallel
        assert parallel is not None
        parts_sum: dict[str, float] = {}
        loss_sum = 0.0
        finite = True
        for micro in range(trainer_config.grad_accum):
            batch, share = next(batches)
            last = micro == trainer_config.grad_accum - 1
            with parallel.gradient_sync(last):
                with self._autocast():
                    output = self._method_step(batch, step)
                loss = output.loss / trainer_config.grad_accum
                # Every rank must agree before backward: a rank that skipped it would leave the others
                # waiting in the gradient all-reduce.
                finite = distributed.all_ranks_agree(bool(torch.isfinite(loss.detach())))
                if not finite:
                    break
                scaler.scale(loss * share if share != 1.0 else loss).backward()
            loss_sum += float(loss.detach())
            for key, value in output.parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / trainer_config.grad_accum
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            state["nonfinite_steps"] += 1
            state["consecutive_nonfinite"] += 1
            self._log({"type": "skip", "step": step, "reason": "non-finite loss"})
            if self.dist.is_main:
                log.warning("Step %d: non-finite loss, step skipped (%d in a row).", step,
                            state["consecutive_nonfinite"])
            if state["consecutive_nonfinite"] >= trainer_config.max_nonfinite_steps:
                raise KDUserError(
                    f"The loss was NaN or infinite for {state['consecutive_nonfinite']} consecutive steps "
                    f"(trainer.max_nonfinite_steps = {trainer_config.max_nonfinite_steps}), stopping at step "
                    f"{step}. The last checkpoint in {self.checkpoint_dir} is intact; lower trainer.lr, "
                    f"check the data, or use trainer.precision fp32.")
            scheduler.step()  # a skipped step still advances the schedule so resumed runs stay aligned
            return step + 1
        state["consecutive_nonfinite"] = 0
        scaler.unscale_(optimizer)
        grad_norm = None
        if trainer_config.clip_norm is not None:
            grad_norm = parallel.clip_grad_norm(trainer_config.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        logs = {"loss": loss_sum, **parts_sum}
        if self.dist.enabled:  # the global batch's loss parts: each rank weighted by its share
            logs = distributed.average_logs(logs, share)
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        if step % trainer_config.log_every == 0 or step == trainer_config.max_steps:
            record = {"type": "train", "step": step, "epoch": sampler.epoch, "lr": scheduler.get_last_lr()[0], **logs}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            self._log(record)
        if self.dist.is_main:
            self.registry.hook.kd_on_step_end(context=self.context, step=step, logs=logs)
        return step

    def _method_step(self, batch: Batch, step: int) -> Any:
        try:
            return self.built.method.training_step(batch, step)
        except RuntimeError as error:
            # FSDP2 gathers the student's shards only around forward_signals/generate; a method that calls
            # other student methods meets sharded DTensor parameters, which torch reports as "mixed
            # torch.Tensor and DTensor". That is a configuration the user can change, not a bug.
            if self.parallel is not None and self.parallel.sharded and "DTensor" in str(error):
                raise KDUserError(
                    f"trainer.distributed 'fsdp' does not work with plugin '{self.config.plugin}': it calls the "
                    f"student outside forward_signals/generate, where the sharded weights are not gathered "
                    f"({str(error).splitlines()[0][:160]}). Use trainer.distributed: ddp.") from None
            raise

    def _find_checkpoint(self) -> LoadedCheckpoint | None:
        """The newest valid checkpoint, chosen by rank 0 (it warns about damaged ones) and read by every rank."""
        path = latest_valid_checkpoint(self.checkpoint_dir) if self.dist.is_main else None
        path = distributed.broadcast_object(None if path is None else str(path))
        return None if path is None else load_checkpoint(Path(path))

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.autocast is None:
            yield
            return
        with torch.autocast(device_type=self.built.device.type, dtype=self.autocast):
            yield

    def _evaluate_in_loop(self, step: int, state: dict[str, Any]) -> None:
        """Validation metrics and ``best/``: on rank 0 (a sharded student: on every rank, rank 0 records)."""
        parallel = self.parallel
        assert parallel is not None
        all_ranks = parallel.evaluates_on_all_ranks()
        better = False
        if self.dist.is_main or all_ranks:
            with parallel.local_forward() if not all_ranks else contextlib.nullcontext():
                metrics = evaluate_model(self.built, self.built.student, self.splits.valid, self._eval_batch_size())
            value = metrics[self.built.task.metric]
            best = state["best_metric"]
            better = (self.trainer_config.select == "last" or best is None
                      or (value > best if self.built.task.greater_is_better else value < best))
        if self.dist.is_main:
            self._log({"type": "eval", "step": step, "split": "valid", **metrics})
            self.registry.hook.kd_on_evaluation_end(context=self.context, step=step, metrics=metrics)
        if all_ranks:
            model_state = parallel.model_state() if better else None  # a collective: every rank takes part
        if self.dist.is_main and better:
            state["best_metric"], state["best_step"] = value, step
            with clear_write_errors("the best student", self.best_dir):
                self.best_dir.mkdir(parents=True, exist_ok=True)
                save_state_dict(model_state if all_ranks else self.built.student.state_dict(),
                                self.best_dir / "student.safetensors")
                atomic_write_json(self.best_dir / "info.json", {"step": step, "metric": self.built.task.metric,
                                                                "value": value})
        distributed.barrier()

    def _checkpoint(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    sampler: EpochSampler, state: dict[str, Any]) -> Path:
        """Save ``step-N`` on rank 0 with every rank's RNG; all ranks learn whether it worked."""
        parallel = self.parallel
        assert parallel is not None
        model_state = parallel.model_state()  # collectives first (FSDP gathers), identical order on all ranks
        optimizer_state = parallel.optimizer_state(optimizer)
        rank_rngs = distributed.gather_objects(capture_rng())
        path = self.checkpoint_dir / f"step-{step:08d}"
        problem: str | None = None
        if self.dist.is_main:
            trainer_state = {"sampler": sampler.state(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), **state}
            try:
                with clear_write_errors(f"checkpoint step {step}", self.checkpoint_dir):
                    path = save_checkpoint(self.checkpoint_dir, step, model_state, optimizer_state, trainer_state,
                                           self.trainer_config.keep_checkpoints, rank_rngs)
            except KDUserError as error:
                problem = str(error)
        problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise KDUserError(problem)
        if self.dist.is_main:
            self.registry.hook.kd_on_checkpoint_saved(context=self.context, step=step, path=path)
        return path

    def _restore(self, checkpoint: LoadedCheckpoint, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                 sampler: EpochSampler, state: dict[str, Any]) -> int:
        parallel = self.parallel
        assert parallel is not None
        parallel.load_model_state(load_file(str(checkpoint.path / "student.safetensors"), device="cpu"))
        parallel.load_optimizer_state(optimizer, checkpoint.optimizer_state)
        saved = checkpoint.trainer_state
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        sampler.restore(saved["sampler"])
        for key in state:
            state[key] = saved.get(key, state[key])
        rng = checkpoint.rng_for_rank(self.dist.rank)
        if rng is not None:
            restore_rng(*rng)
        else:
            log.warning("Checkpoint %s was written by %d process(es); rank %d starts a fresh random stream.",
                        checkpoint.path, saved.get("world_size", 1), self.dist.rank)
            seed_everything(self.config.seed + 1_000_003 * self.dist.rank + checkpoint.step)
        if self.dist.is_main:
            # Entries written after the checkpoint belong to steps that will be redone.
            with clear_write_errors("the training log", self.log_path):
                rewrite_jsonl(self.log_path, [r for r in read_jsonl(self.log_path)
                                              if int(r.get("step", 0)) <= checkpoint.step])
            log.info("Resumed from %s (step %d).", checkpoint.path, checkpoint.step)
        return checkpoint.step


def write_resolved_config(out_dir: Path, resolved_dict: dict[str, Any]) -> None:
    dump_yaml_atomic(resolved_dict, out_dir / "config.yaml")
