"""The one training loop every plugin (and every task-trained teacher) uses.

AdamW with warm-up and decay, gradient accumulation and clipping, mixed precision where the device supports it,
seeded and resumable data order, evaluation in the loop with the best student kept, checkpoints, log.jsonl,
lifecycle hooks that see a :class:`~kdcore.hooks.RunState` and may stop the run through a
:class:`~kdcore.hooks.RunControl`. metrics.json and report.md are written afterwards by :mod:`kdcore.runner`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kdcore import distributed
from kdcore.batches import EpochSampler, move_to_device
from kdcore.checkpoint import (
    LoadedCheckpoint, capture_rng, latest_valid_checkpoint, load_checkpoint, restore_rng, save_checkpoint,
    save_state_dict,
)
from kdcore.distributed import DataParallelStudent
from kdcore.early_stopping import EarlyStopping
from kdcore.errors import KDUserError
from kdcore.evaluation import evaluate_model
from kdcore.hooks import RunContext, RunControl, RunState
from kdcore.interfaces import Batch, DataSplits, objective_summary
from kdcore.interrupts import StopSignals, TrainingInterrupted
from kdcore.io import atomic_write_json, read_jsonl, rewrite_jsonl
from kdcore.optimization import build_optimizer, build_scheduler
from kdcore.precision import autocast, autocast_dtype, precision_name
from kdcore.progress import Progress
from kdcore.registry import Registry
from kdcore.resolve import BuiltRun
from kdcore.seeding import seed_everything
from kdcore.time_budget import BudgetPlanner
from kdcore.write_errors import clear_write_errors

log = logging.getLogger(__name__)

#: The name the trainer registers its early-stopping hook under while a run with ``trainer.early_stopping`` trains.
EARLY_STOPPING_PLUGIN = "kd-early-stopping"


class Trainer:
    """Trains ``built.method``'s student; owns the output directory layout."""

    def __init__(self, built: BuiltRun, splits: DataSplits, out_dir: Path, registry: Registry, *,
                 evaluate_in_loop: bool = True) -> None:
        """``evaluate_in_loop=False`` trains without validations and without ``best/`` (a teacher stage)."""
        self.built = built
        self.evaluate_in_loop = evaluate_in_loop
        self.splits = splits
        self.out_dir = Path(out_dir)
        self.registry = registry
        self.config = built.resolved.config
        # A copy: a time budget may lower its max_steps (and the schedule reading it) during the run.
        self.trainer_config = self.config.trainer.model_copy()
        self.state = RunState(out_dir=self.out_dir, task=self.config.task, plugin=self.config.plugin,
                              metric=built.task.metric, greater_is_better=built.task.greater_is_better,
                              max_steps=self.trainer_config.max_steps)
        self.control = RunControl()
        self.context = RunContext(self.state, self.control, built, self.config)
        self.log_path = self.out_dir / "log.jsonl"
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.best_dir = self.out_dir / "best"
        self.autocast = autocast_dtype(self.trainer_config.precision, built.device)
        self.dist = distributed.current()
        self.parallel: DataParallelStudent | None = None
        # Training time (data, forward, backward, update) and steps since the last train record: its throughput.
        self._seconds_since_log, self._steps_since_log = 0.0, 0
        if self.trainer_config.early_stopping is not None and not evaluate_in_loop:
            raise KDUserError("trainer.early_stopping needs validations during training, and this training stage "
                              "has none; remove trainer.early_stopping from its settings.")

    # ------------------------------------------------------------------ setup
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with clear_write_errors("the training log", self.log_path), open(self.log_path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
        self.registry.hook.kd_on_log(context=self.context, record=record)

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

    def eval_batch_size(self) -> int:
        """The batch size of every evaluation (``trainer.eval_batch_size``, else the training batch size)."""
        return self.trainer_config.eval_batch_size or self.trainer_config.batch_size

    @contextlib.contextmanager
    def _run_plugins(self) -> Iterator[None]:
        """The trainer's own hook plugins (early stopping), registered for the duration of :meth:`fit`."""
        stopping = self.trainer_config.early_stopping
        if stopping is None:
            yield
            return
        manager = self.registry.plugin_manager
        plugin = EarlyStopping(stopping.patience, stopping.min_delta)
        manager.register(plugin, name=EARLY_STOPPING_PLUGIN)
        try:
            yield
        finally:
            manager.unregister(plugin)

    # ------------------------------------------------------------------ main loop
    def fit(self, resume: bool = False) -> RunState:
        """Train from step 0 (or, with ``resume``, from the newest valid checkpoint) to ``max_steps`` or a stop.

        Returns the final :class:`RunState` (best metric and step, training time, why it stopped early if it did).
        """
        with self._run_plugins():
            return self._fit(resume)

    def _fit(self, resume: bool) -> RunState:
        config, trainer_config, built, state = self.config, self.trainer_config, self.built, self.state
        student, method = built.student, built.method
        world = self.dist.world_size
        if trainer_config.batch_size % world:
            raise KDUserError(f"trainer.batch_size = {trainer_config.batch_size} is the global batch and must be "
                              f"divisible by the number of processes ({world}); e.g. "
                              f"--set trainer.batch_size={max(world, trainer_config.batch_size // world * world)}.")
        # Wrap before the optimizer exists: FSDP2 replaces the parameters by sharded ones.
        self.parallel = DataParallelStudent(student, method.trainable_modules(), trainer_config.distributed,
                                            built.device)
        optimizer = build_optimizer(method.trainable_modules(), trainer_config)
        scheduler = build_scheduler(optimizer, trainer_config)
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast == torch.float16)
        train = self.splits.train
        sampler = EpochSampler(
            len(train), trainer_config.batch_size, config.seed,
            lambda generator: self.built.task.epoch_batches(train, trainer_config.batch_size, generator))
        if self.dist.is_main:
            with clear_write_errors("the output directory", self.out_dir):
                self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self._find_checkpoint() if resume else None
        if resume and checkpoint is None and self.dist.is_main:
            log.warning("No complete checkpoint in %s: starting from step 0.", self.checkpoint_dir)
        if checkpoint is not None:
            state.step = self._restore(checkpoint, optimizer, scheduler, scaler, sampler)
        else:
            # Each rank its own random stream (dropout); rank 0 keeps the single-process one.
            seed_everything(config.seed + 1_000_003 * self.dist.rank)
            if self.dist.is_main:
                self.log_path.unlink(missing_ok=True)
            # What is trained, in the log itself: each objective's label with the registered name and weight behind
            # it (a label such as "kd" may name any objective), the precision the forward pass really uses and the
            # number of processes that train it.
            self._log({"type": "start", "step": 0, "precision": precision_name(self.autocast),
                       "world_size": self.dist.world_size,
                       "objectives": {item.label: objective_summary(item.objective.name, item.weight, item.start,
                                                                    item.stop) for item in method.objectives}})
        method.on_train_start(trainer_config.max_steps)
        if self.dist.is_main:
            self.registry.hook.kd_on_train_start(context=self.context)
            if state.stop_reason is not None:
                log.info("This run stopped at step %d (%s); nothing left to train.", state.stopped_at_step,
                         state.stop_reason)

        progress = Progress(f"{config.task}/{config.plugin}", trainer_config.max_steps, unit="step",
                            initial=state.step, mode=trainer_config.progress if self.dist.is_main else "off")
        batches = self._batches(sampler)
        student.train()
        started = time.perf_counter()
        seconds_before = state.train_seconds
        stop = StopSignals()
        budget = (BudgetPlanner(trainer_config.time_budget_minutes * 60.0,
                                trainer_config.eval_every if self.evaluate_in_loop else None)
                  if trainer_config.time_budget_minutes is not None else None)
        steps_here = 0

        def elapsed() -> float:
            return seconds_before + time.perf_counter() - started

        try:
            with stop, progress:
                while state.step < trainer_config.max_steps and state.stop_reason is None:
                    step_started = time.perf_counter()
                    self._train_step(batches, optimizer, scheduler, scaler, sampler, progress)
                    if budget is not None:
                        budget.record_step(steps_here, time.perf_counter() - step_started)
                    steps_here += 1
                    step = state.step
                    validated = False
                    if self.evaluate_in_loop and (step % trainer_config.eval_every == 0
                                                  or step == trainer_config.max_steps):
                        validation_started = time.perf_counter()
                        self._evaluate_in_loop(step)
                        validated = True
                        if budget is not None:
                            budget.record_validation(time.perf_counter() - validation_started)
                    if budget is not None and step < trainer_config.max_steps and budget.due(validated):
                        self._apply_budget(budget, step, elapsed(), progress)
                    interrupted, stop_requested = distributed.any_rank_each(stop.received is not None,
                                                                            self.control.should_stop)
                    if stop_requested and not interrupted and step < trainer_config.max_steps:
                        self._record_stop(distributed.broadcast_object(self.control.stop_reason))
                    if (step % trainer_config.checkpoint_every == 0 or step == trainer_config.max_steps
                            or interrupted or state.stop_reason is not None):
                        state.train_seconds = elapsed()
                        path = self._checkpoint(step, optimizer, scheduler, scaler, sampler)
                    if interrupted:
                        signum = stop.received or signal.SIGINT
                        raise TrainingInterrupted(
                            f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {path}. "
                            f"Continue with: kd run --out {self.out_dir} --resume", signum)
        except KeyboardInterrupt:
            # A second Ctrl-C: the step may be half done, so nothing is saved.
            raise TrainingInterrupted(
                f"Interrupted twice during step {state.step + 1}: no checkpoint written for it. The last complete "
                f"checkpoint in {self.checkpoint_dir} is intact; continue with: kd run --out {self.out_dir} --resume",
                signal.SIGINT) from None
        state.train_seconds = elapsed()
        return state

    def _apply_budget(self, budget: BudgetPlanner, step: int, elapsed: float, progress: Progress) -> None:
        """Change ``max_steps`` when the time budget's projection says so (rank 0 decides for every rank): lower it
        when the plan does not fit, raise a lowered plan again (at most to the configured steps) when more fit."""
        state = self.state
        planned = state.time_budget["planned_steps"] if state.time_budget else self.trainer_config.max_steps
        plan = budget.plan(done=step, planned=self.trainer_config.max_steps, elapsed=elapsed, ceiling=planned)
        plan = distributed.broadcast_object(plan)
        if plan is None:
            return
        steps, reason = plan
        self.trainer_config.max_steps = state.max_steps = steps
        state.time_budget = {"planned_steps": planned, "max_steps": steps,
                             "budget_minutes": self.trainer_config.time_budget_minutes, "reason": reason}
        self.built.method.on_train_start(steps)  # schedules over the run's steps (ImitKD's beta) follow
        progress.set_total(steps)
        self._log({"type": "budget", "step": step, **state.time_budget})
        if self.dist.is_main:
            log.warning("Time budget: training %d steps instead of %d (%s; trainer.time_budget_minutes). The "
                        "learning-rate schedule ends at the new last step.", steps, planned, reason)

    def _record_stop(self, reason: str) -> None:
        """A hook asked for a clean stop: say so in log.jsonl and the log; the checkpoint keeps it for --resume."""
        state = self.state
        state.stop_reason, state.stopped_at_step = reason, state.step
        self._log({"type": "stop", "step": state.step, "reason": reason})
        if self.dist.is_main:
            log.info("Stopping at step %d of %d: %s.", state.step, state.max_steps, reason)

    def _train_step(self, batches: Iterator[tuple[Batch, float]], optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, sampler: EpochSampler, progress: Progress) -> None:
        """One optimiser step (or a counted skip); advances ``state.step``."""
        started = time.perf_counter()
        trainer_config, state, parallel = self.trainer_config, self.state, self.parallel
        assert parallel is not None
        step = state.step
        parts_sum: dict[str, float] = {}
        loss_sum = 0.0
        finite = True
        for micro in range(trainer_config.grad_accum):
            batch, share = next(batches)
            last = micro == trainer_config.grad_accum - 1
            with parallel.gradient_sync(last):
                with autocast(self.built.device, self.autocast):
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
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            self._log({"type": "skip", "step": step, "reason": "non-finite loss"})
            if self.dist.is_main:
                log.warning("Step %d: non-finite loss, step skipped (%d in a row).", step, state.consecutive_nonfinite)
            if state.consecutive_nonfinite >= trainer_config.max_nonfinite_steps:
                raise KDUserError(
                    f"The loss was NaN or infinite for {state.consecutive_nonfinite} consecutive steps "
                    f"(trainer.max_nonfinite_steps = {trainer_config.max_nonfinite_steps}), stopping at step "
                    f"{step}. The last checkpoint in {self.checkpoint_dir} is intact; lower trainer.lr, "
                    f"check the data, or use trainer.precision fp32.")
            scheduler.step()  # a skipped step still advances the schedule so resumed runs stay aligned
            state.step = step + 1
            progress.update(1)
            return
        state.consecutive_nonfinite = 0
        scaler.unscale_(optimizer)
        grad_norm = None
        if trainer_config.clip_norm is not None:
            grad_norm = parallel.clip_grad_norm(trainer_config.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state.step = step
        logs = {"loss": loss_sum, **parts_sum}
        if self.dist.enabled:  # the global batch's loss parts: each rank weighted by its share
            logs = distributed.average_logs(logs, share)
        progress.update(1, loss=logs["loss"])
        self._seconds_since_log += time.perf_counter() - started
        self._steps_since_log += 1
        if step % trainer_config.log_every == 0 or step == trainer_config.max_steps:
            examples = self._steps_since_log * trainer_config.batch_size * trainer_config.grad_accum
            record = {"type": "train", "step": step, "epoch": sampler.epoch, "lr": scheduler.get_last_lr()[0],
                      "examples_per_second": examples / self._seconds_since_log, **logs}
            self._seconds_since_log, self._steps_since_log = 0.0, 0
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            self._log(record)
        if self.dist.is_main:
            self.registry.hook.kd_on_step_end(context=self.context, step=step, logs=logs)

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

    def _evaluate_in_loop(self, step: int) -> None:
        """Validation metrics and ``best/``: on rank 0 (a sharded student: on every rank, rank 0 records)."""
        parallel, state = self.parallel, self.state
        assert parallel is not None
        all_ranks = parallel.evaluates_on_all_ranks()
        better = False
        if self.dist.is_main or all_ranks:
            with parallel.local_forward() if not all_ranks else contextlib.nullcontext():
                metrics = evaluate_model(self.built, self.built.student, self.splits.valid, self.eval_batch_size())
            value = metrics[state.metric]
            better = self.trainer_config.select == "last" or state.is_better(value, state.best_metric)
        if self.dist.is_main:
            state.last_metrics = metrics
            if better:
                state.best_metric, state.best_step = value, step
            self._log({"type": "eval", "step": step, "split": "valid", **metrics})
            # A line per validation: without a terminal the progress lines pause while it runs.
            if self.trainer_config.select == "last":
                log.info("Validation at step %d: %s %.4g.", step, state.metric, value)
            else:
                log.info("Validation at step %d: %s %.4g (best %.4g, at step %d).", step, state.metric, value,
                         state.best_metric, state.best_step)
            self.registry.hook.kd_on_evaluation_end(context=self.context, step=step, metrics=metrics)
        # Every process's method sees the same metrics, so adaptive schedules stay in step across ranks.
        self.built.method.on_validation(step, distributed.broadcast_object(metrics if self.dist.is_main else None))
        if all_ranks:
            model_state = parallel.model_state() if better else None  # a collective: every rank takes part
        if self.dist.is_main and better:
            with clear_write_errors("the best student", self.best_dir):
                self.best_dir.mkdir(parents=True, exist_ok=True)
                save_state_dict(model_state if all_ranks else self.built.student.state_dict(),
                                self.best_dir / "student.safetensors")
                atomic_write_json(self.best_dir / "info.json", {"step": step, "metric": state.metric,
                                                                "value": value})
        distributed.barrier()

    def _checkpoint(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    sampler: EpochSampler) -> Path:
        """Save ``step-N`` on rank 0 with every rank's RNG; all ranks learn whether it worked."""
        parallel = self.parallel
        assert parallel is not None
        model_state = parallel.model_state()  # collectives first (FSDP gathers), identical order on all ranks
        optimizer_state = parallel.optimizer_state(optimizer)
        rank_rngs = distributed.gather_objects(capture_rng())
        method_states = distributed.gather_objects(self.built.method.state_dict())  # e.g. each rank's replay buffer
        path = self.checkpoint_dir / f"step-{step:08d}"
        problem: str | None = None
        if self.dist.is_main:
            trainer_state = {"sampler": sampler.state(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), **self.state.saved_fields()}
            if any(method_states):
                trainer_state["method_state"] = method_states
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
                 sampler: EpochSampler) -> int:
        parallel = self.parallel
        assert parallel is not None
        parallel.load_model_state(load_file(str(checkpoint.path / "student.safetensors"), device="cpu"))
        parallel.load_optimizer_state(optimizer, checkpoint.optimizer_state)
        saved = checkpoint.trainer_state
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        sampler.restore(saved["sampler"])
        self.state.restore(saved)
        method_states = saved.get("method_state") or []
        if method_states and self.dist.rank >= len(method_states):
            raise KDUserError(f"Checkpoint {checkpoint.path} holds the plugin's run state of {len(method_states)} "
                              f"process(es) and this is process {self.dist.rank}: resume with as many processes as "
                              f"wrote it.")
        self.built.method.load_state_dict(method_states[self.dist.rank] if method_states else {})
        if self.state.time_budget:  # a budget lowered the steps before the checkpoint: keep its plan
            self.trainer_config.max_steps = self.state.max_steps = int(self.state.time_budget["max_steps"])
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
