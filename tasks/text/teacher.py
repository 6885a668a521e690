"""The teacher stage of the text tasks: train a Marian-style teacher on the task's data once, then reuse it.

When no pretrained teacher is named (the offline default), ``task-trained-seq2seq``
trains an encoder-decoder on the task's training split with the task's tokenizer
and caches it under

``<cache>/text/teachers/<task>-<sha256[:16]>/``: ``config.json``,
``model.safetensors``, ``generation_config.json`` (transformers' ``save_pretrained``),
the tokenizer files, and ``kd-teacher.json`` (written last, atomically: the
settings, data fingerprint, steps, seconds and final loss).

The key hashes the task name, the tokenised training data and tokenizer
(``TextTask.data_fingerprint``) and the effective teacher settings, so a change
to any of them trains a new teacher and distillation runs on the same data reuse
the cached one. Training is seeded by ``seed`` (not the run seed), so the teacher
does not change between the seeds of a comparison.

Every setting left null takes the task's default (``TextTask.teacher_defaults``;
docs/text.md has the sizes, the measurements behind them and the times).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from kdcore.config import StrictModel
from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext, ModelFactory, Teacher
from kdcore.io import atomic_write_json

log = logging.getLogger(__name__)

TEACHER_RECIPE = "task-trained-marian/1"


class TaskTeacherConfig(StrictModel):
    """``teacher.args`` of ``task-trained-seq2seq``; null = the task's default."""

    encoder_layers: PositiveInt | None = None
    decoder_layers: PositiveInt | None = None
    d_model: PositiveInt | None = None
    heads: PositiveInt | None = None
    ffn_dim: PositiveInt | None = None
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    train_steps: PositiveInt | None = Field(None, description="optimiser steps of the teacher stage")
    batch_size: PositiveInt | None = None
    lr: PositiveFloat | None = None
    warmup_steps: int | None = Field(None, ge=0)
    precision: Literal["fp32", "bf16", "native-bf16"] | None = Field(
        None, description="autocast of the teacher stage's forward pass; native-bf16: bf16 where the device computes "
                          "it in hardware (CUDA, CPUs with AVX512-BF16/AMX), else fp32")
    seed: int = Field(0, description="teacher initialisation and data order (independent of the run seed)")
    log_every: PositiveInt = 50


FALLBACK = {"encoder_layers": 6, "decoder_layers": 6, "d_model": 256, "heads": 4, "ffn_dim": 1024, "dropout": 0.1,
            "train_steps": 1000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "precision": "fp32"}


def effective_settings(config: TaskTeacherConfig, task: Any, device: torch.device | None = None) -> dict[str, Any]:
    """The config with every null replaced by the task's default (then the generic fallback).

    ``precision`` is resolved for ``device`` (default: the CPU) to what training will use, ``fp32`` or ``bf16``, so
    the cache key names the teacher that was really trained: a bf16-trained teacher differs from an fp32 one.
    """
    from kdcore.precision import autocast_dtype

    task_defaults = dict(getattr(task, "teacher_defaults", {}) or {})
    settings: dict[str, Any] = {}
    for key, fallback in FALLBACK.items():
        value = getattr(config, key)
        settings[key] = value if value is not None else task_defaults.get(key, fallback)
    dtype = autocast_dtype(settings["precision"], device or torch.device("cpu"))
    settings["precision"] = "fp32" if dtype is None else "bf16"
    if settings["precision"] == "fp32":
        # fp32 teachers keep the cache keys they had before the setting existed.
        del settings["precision"]
    settings["seed"] = config.seed
    return settings


def teacher_marian_config(settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The Marian ``config`` dict of a task-trained teacher with these (effective) settings."""
    from kd_plugins.text.models import marian_config

    return marian_config(layers=(settings["encoder_layers"], settings["decoder_layers"]), d_model=settings["d_model"],
                         heads=settings["heads"], ffn_dim=settings["ffn_dim"], dropout=settings["dropout"], **extra)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to 10% (a short run must end with a small learning rate)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.1, 1.0 - 0.9 * progress)


def untrained_teacher(task: Any, settings: dict[str, Any]) -> Any:
    """The task-trained teacher's Marian model before training (initialised from the current torch RNG)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    tokenizer = task.tokenizer
    values = teacher_marian_config(settings, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                                   forced_eos_token_id=tokenizer.eos_token_id)
    values.pop("model_type")
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values))


def train_teacher(task: Any, settings: dict[str, Any], device: torch.device, log_every: int = 50) -> tuple[Any, dict]:
    """Train a Marian encoder-decoder on ``task``'s training split; return the HF model and training stats."""
    from kd_plugins.text.losses import LOGITS, nll_loss
    from kd_plugins.text.models import COLLAPSED_ENCODER_SPREAD, TextStudent, encoder_spread

    tokenizer = task.tokenizer
    train = task.build_data(0).train
    steps, batch_size = settings["train_steps"], settings["batch_size"]
    bf16 = settings.get("precision", "fp32") == "bf16"  # weights and optimiser stay fp32; only the forward autocasts
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings["seed"])
        hf_model = untrained_teacher(task, settings).to(device)
        model = TextStudent(hf_model, tokenizer)  # the trainable wrapper: same forward as every text model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.98), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, settings["warmup_steps"], steps))
        generator = torch.Generator().manual_seed(settings["seed"])
        batches: list[list[int]] = []
        started = time.perf_counter()
        recent: list[float] = []
        log.info("Teacher stage: training a %d+%d-layer d=%d Marian (%s parameters) for %d steps of %d examples "
                 "on %d training pairs in %s (cached afterwards).", settings["encoder_layers"],
                 settings["decoder_layers"], settings["d_model"], f"{model.num_parameters():,}", steps, batch_size,
                 len(train), "bf16 autocast" if bf16 else "fp32")
        for step in range(steps):
            if not batches:
                batches = task.epoch_batches(train, batch_size, generator) or []
            batch = task.collate([train[i] for i in batches.pop()])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model.forward_signals(batch, LOGITS).logits
                loss = nll_loss(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            recent = (recent + [float(loss.detach())])[-log_every:]
            if (step + 1) % log_every == 0 or step + 1 == steps:
                elapsed = time.perf_counter() - started
                # The spread shows an encoder collapse as it happens (one encoder pass on this batch: cheap).
                spread = encoder_spread(hf_model, batch["input_ids"], batch["attention_mask"])
                log.info("Teacher stage: step %d/%d, loss %.3f, encoder spread %.3g, %.0f s elapsed, ~%.0f s left.",
                         step + 1, steps, sum(recent) / len(recent), spread, elapsed,
                         elapsed / (step + 1) * (steps - step - 1))
            if not math.isfinite(float(loss.detach())):
                raise KDUserError(f"The task-trained teacher's loss became {float(loss)} at step {step + 1}; lower "
                                  f"teacher.args.lr (now {settings['lr']}).")
    hf_model.eval()
    stats = {"steps": steps, "seconds": round(time.perf_counter() - started, 1),
             "final_loss": round(sum(recent) / max(1, len(recent)), 4), "parameters": model.num_parameters(),
             "encoder_spread": spread if steps else float("nan")}
    if steps and spread < COLLAPSED_ENCODER_SPREAD:
        log.warning("Teacher stage: the teacher's encoder collapsed (its output varies by %.2g relative to its size "
                    "over a batch of different inputs), so the teacher cannot read its source and writes the same "
                    "output for every input. Lower teacher.args.lr (now %g) or raise teacher.args.warmup_steps "
                    "(now %d); docs/text.md, 'Teacher stage'.", spread, settings["lr"], settings["warmup_steps"])
    return hf_model, stats


class TaskTrainedTeacherFactory(ModelFactory):
    """Teacher stage: a Marian encoder-decoder trained on the task's own data once, then read from the cache."""

    name: ClassVar[str] = "task-trained-seq2seq"
    description: ClassVar[str] = ("Marian encoder-decoder trained on the text task's data at first use and cached "
                                  "(the offline default teacher)")
    Config = TaskTeacherConfig

    def build(self, config: TaskTeacherConfig, context: BuildContext) -> Teacher:  # type: ignore[override]
        from transformers import AutoModelForSeq2SeqLM

        from kd_plugins.text.models import TextTeacher

        task = context.task
        if not hasattr(task, "data_fingerprint") or not hasattr(task, "tokenizer"):
            raise KDUserError(f"teacher 'task-trained-seq2seq' trains on a text task's data (wmt, summarization); "
                              f"task '{task.name}' is not one. Name a teacher with teacher.name.")
        settings = effective_settings(config, task, context.device)
        key_material = json.dumps({"recipe": TEACHER_RECIPE, "task": task.name, "data": task.data_fingerprint(),
                                   "settings": settings}, sort_keys=True)
        key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
        directory = Path(context.cache_dir) / "text" / "teachers" / f"{task.name}-{key}"
        manifest_path = directory / "kd-teacher.json"
        if manifest_path.is_file():
            log.info("Using the cached task-trained teacher in %s.", directory)
            hf_model = AutoModelForSeq2SeqLM.from_pretrained(str(directory), local_files_only=True)
            return TextTeacher(hf_model.eval(), task.tokenizer)
        if context.dry_run:
            # A plan must not cost the 15-20 minutes of the teacher stage; an untrained model of the same config
            # has the same parameter count, which is all a plan reports about it.
            log.info("Dry run: the teacher is not cached (%s); kd run would train it first (%d steps of %d). "
                     "Planned with an untrained model of the same size.", directory, settings["train_steps"],
                     settings["batch_size"])
            return TextTeacher(untrained_teacher(task, settings).eval(), task.tokenizer)
        hf_model, stats = train_teacher(task, settings, context.device, config.log_every)
        directory.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(str(directory), safe_serialization=True)
        task.tokenizer.save_pretrained(str(directory))
        atomic_write_json(manifest_path, {"recipe": TEACHER_RECIPE, "task": task.name, "settings": settings,
                                          "data_fingerprint": task.data_fingerprint(), **stats})
        log.info("Teacher stage done in %.0f s (final training loss %.3f); cached in %s.", stats["seconds"],
                 stats["final_loss"], directory)
        return TextTeacher(hf_model.to("cpu").eval(), task.tokenizer)


__all__ = ["TaskTeacherConfig", "TaskTrainedTeacherFactory", "effective_settings", "teacher_marian_config",
           "train_teacher", "untrained_teacher"]
