"""The teacher stage of the text tasks: train a Marian-style teacher on the task's data once, then reuse it.

When no pretrained teacher is named (the offline default), ``task-trained-seq2seq``
trains an encoder-decoder on the task's training split with the teacher's tokenizer
(the task's, or the teacher's own with ``data.teacher_vocab_size``: ``TextTask.teacher_tokenizer``)
and caches it under

``<cache>/text/teachers/<task>-<sha256[:16]>/``: ``config.json``,
``model.safetensors``, ``generation_config.json`` (transformers' ``save_pretrained``),
the tokenizer files, and the entry's content manifest ``kd-cache.json`` (:mod:`kdcore.cache`: written last; the
recipe, settings and data fingerprint it was built from, the stage's steps, seconds and final loss, and the size and
sha256 of every file, checked before the teacher is used: a damaged teacher is moved aside and trained again).

The key hashes the task name, the training data as the teacher reads them and its tokenizer
(``TextTask.teacher_data_fingerprint``) and the effective teacher settings, so a change
to any of them trains a new teacher and distillation runs on the same data reuse
the cached one, also runs whose student has another tokenizer (the teacher of
``data.teacher_vocab_size=8000`` is the one the default 8,000-token task trains).
Training is seeded by ``seed`` (not the run seed), so the teacher
does not change between the seeds of a comparison.

The stage trains on the one engine (:mod:`kdcore.teacher_stage`): its log.jsonl and
checkpoints are in ``<task>-<key>.partial/`` next to the cache entry, so a killed
stage continues from its last checkpoint on the next run with the same settings,
and the partial directory is removed once the teacher is cached. Under torchrun the stage is data-parallel (every
rank trains its slice of each global batch; rank 0 writes the cache entry).

Every setting left null takes the task's default (``TextTask.teacher_defaults``;
docs/text.md has the sizes, the measurements behind them and the times).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from kdcore.config import StrictModel, TrainerConfig
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, BuildContext, Comparison, Method, ModelFactory, Teacher
from kdcore.cache import MANIFEST
from kdcore.registry import Registry
from kdcore.teacher_stage import ensure_teacher_cached, partial_directory, train_teacher_stage

log = logging.getLogger(__name__)

#: Part of the cache key. /2: trained on the engine (its data order and no weight decay on biases and norms), so
#: the weights differ from /1's (the old separate loop) for the same settings.
TEACHER_RECIPE = "task-trained-marian/2"
#: The kind of its cache entries (kdcore.cache).
TEACHER_KIND = "text-teacher"


class _TeacherStageConfig(StrictModel):
    """What every task-trained teacher's ``teacher.args`` share: width, training and stage settings; null = the
    task's default."""

    #: The architecture and training settings of this kind of teacher, with their generic defaults (the task's
    #: ``teacher_defaults`` come first).
    FALLBACK: ClassVar[dict[str, Any]] = {}

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
    log_every: PositiveInt = Field(50, description="steps between the teacher stage's log.jsonl records")
    checkpoint_every: PositiveInt = Field(
        100, description="steps between the teacher stage's checkpoints (a killed stage continues from the last)")
    # strict: YAML's true must not pass as 1.0 minute
    time_budget_minutes: Annotated[float, Field(gt=0, strict=True)] | Literal[False] | None = Field(
        None, description="wall-clock minutes for the teacher stage (null: the task's default; false: no budget, "
                          "every one of train_steps, and a cached teacher that a budget cut is trained again); a "
                          "slower machine trains fewer steps, logged and recorded in the entry's kd-cache.json (not "
                          "part of the cache key)")


class TaskTeacherConfig(_TeacherStageConfig):
    """``teacher.args`` of ``task-trained-seq2seq``; null = the task's default."""

    FALLBACK: ClassVar[dict[str, Any]] = {
        "encoder_layers": 6, "decoder_layers": 6, "d_model": 256, "heads": 4, "ffn_dim": 1024, "dropout": 0.1,
        "train_steps": 1000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100, "precision": "fp32"}

    encoder_layers: PositiveInt | None = None
    decoder_layers: PositiveInt | None = None


class CausalTaskTeacherConfig(_TeacherStageConfig):
    """``teacher.args`` of ``task-trained-causal-lm``; null = the task's default."""

    FALLBACK: ClassVar[dict[str, Any]] = {
        "layers": 4, "d_model": 256, "heads": 4, "ffn_dim": 1024, "dropout": 0.0, "train_steps": 1000,
        "batch_size": 32, "lr": 1e-3, "warmup_steps": 100, "precision": "fp32"}

    layers: PositiveInt | None = Field(None, description="decoder layers")


def effective_settings(config: _TeacherStageConfig, task: Any, device: torch.device | None = None) -> dict[str, Any]:
    """The config with every null replaced by the task's default (then the generic fallback).

    ``precision`` is resolved for ``device`` (default: the CPU) to what training will use, ``fp32`` or ``bf16``, so
    the cache key names the teacher that was really trained: a bf16-trained teacher differs from an fp32 one.
    """
    from kdcore.precision import autocast_dtype

    task_defaults = dict(getattr(task, "teacher_defaults", {}) or {})
    settings: dict[str, Any] = {}
    for key, fallback in type(config).FALLBACK.items():
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


def untrained_teacher(task: Any, settings: dict[str, Any]) -> Any:
    """The task-trained teacher's Marian model before training (initialised from the current torch RNG)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    tokenizer = task.teacher_tokenizer
    values = teacher_marian_config(settings, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                                   forced_eos_token_id=tokenizer.eos_token_id)
    values.pop("model_type")
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values))


def causal_teacher_config(settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The Llama ``config`` dict of a task-trained causal-LM teacher with these (effective) settings.

    Llama (rotary positions, RMSNorm, SwiGLU) because it is the architecture most decoder-only models people distil
    share, so what is measured on the embedded default carries over; no biases, tied input/output embeddings.
    """
    from .presets import llama_config

    return llama_config(layers=settings["layers"], d_model=settings["d_model"], heads=settings["heads"],
                        ffn_dim=settings["ffn_dim"], dropout=settings["dropout"], **extra)


def untrained_causal_teacher(task: Any, settings: dict[str, Any]) -> Any:
    """The task-trained causal-LM teacher before training (initialised from the current torch RNG)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = task.teacher_tokenizer
    values = causal_teacher_config(settings, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model_type = values.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))


def cache_directory(task: Any, settings: dict[str, Any], cache_dir: Path, recipe: str = TEACHER_RECIPE) -> Path:
    """The cache entry of the teacher with these effective settings: its key hashes recipe, task, data and settings."""
    key_material = json.dumps({"recipe": recipe, "task": task.name, "data": task.teacher_data_fingerprint(),
                               "settings": settings}, sort_keys=True)
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    return Path(cache_dir) / "text" / "teachers" / f"{task.name}-{key}"


def stage_trainer_config(settings: dict[str, Any], config: _TeacherStageConfig,
                         time_budget_minutes: float | None = None) -> TrainerConfig:
    """The engine settings of the teacher stage: AdamW (β2 0.98), linear warm-up, then linear decay to 10%.

    A short stage must end with a small learning rate, hence the floor; clipping at 1.0 as for students.
    """
    return TrainerConfig(max_steps=settings["train_steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                         betas=(0.9, 0.98), weight_decay=0.01, warmup_steps=settings["warmup_steps"],
                         schedule="linear", min_lr_ratio=0.1, clip_norm=1.0,
                         precision=settings.get("precision", "fp32"), log_every=config.log_every,
                         checkpoint_every=config.checkpoint_every, evaluate_teacher=False,
                         time_budget_minutes=time_budget_minutes)


def stage_time_budget(config: _TeacherStageConfig, task: Any) -> float | None:
    """The teacher stage's time budget in minutes: ``teacher.args.time_budget_minutes``, else the task's default;
    None when it is ``false`` (no budget)."""
    if config.time_budget_minutes is False:
        return None
    if config.time_budget_minutes is not None:
        return config.time_budget_minutes
    return (getattr(task, "teacher_defaults", {}) or {}).get("time_budget_minutes")


def budget_cut(manifest: dict[str, Any], config: _TeacherStageConfig) -> str | None:
    """Why a cached teacher cannot serve a stage whose budget is off (``time_budget_minutes: false``): a budget cut
    its training short. None when it can: the budget is on, or the teacher trained all its steps."""
    cut = (manifest.get("info") or {}).get("time_budget")
    if config.time_budget_minutes is not False or not cut:
        return None
    return (f"a time budget cut its training to {cut['max_steps']} of {cut['planned_steps']} steps, and "
            f"teacher.args.time_budget_minutes is false")


class NextTokenStageMethod(Method):
    """The text teacher stage's method: the NLL of each target at the logit position that predicts it (the model's
    own :meth:`~kd_plugins.text.models.HFTextModel.target_labels`: a causal LM's labels shifted by one, a seq2seq
    model's as they are)."""

    name: ClassVar[str] = "teacher-stage"

    def compare(self, batch: Batch, step: int) -> Comparison:
        from kdcore.signals import Signals

        signals = self.student.forward_signals(batch, self.student_request())
        return Comparison(signals, Signals(), {**batch, "labels": self.student.target_labels(batch)})  # type: ignore[attr-defined]


class TaskTrainedTeacherFactory(ModelFactory):
    """Teacher stage: a Marian encoder-decoder trained on the task's own data once, then read from the cache."""

    name: ClassVar[str] = "task-trained-seq2seq"
    description: ClassVar[str] = ("Marian encoder-decoder trained on the text task's data at first use and cached "
                                  "(the offline default teacher)")
    Config: ClassVar[type[_TeacherStageConfig]] = TaskTeacherConfig
    builds_on_all_ranks: ClassVar[bool] = True  # under torchrun its teacher stage trains data-parallel
    #: Part of the cache key: what kind of model the stage trains, and how.
    recipe: ClassVar[str] = TEACHER_RECIPE
    #: The tasks whose data it can train on (named in the refusal).
    trains_on: ClassVar[str] = "a seq2seq text task's data (wmt, summarization)"

    #: Whether it trains a decoder-only model (on a task whose ``decoder_only`` is true) or an encoder-decoder.
    decoder_only: ClassVar[bool] = False

    @classmethod
    def untrained(cls, task: Any, settings: dict[str, Any]) -> Any:
        """The teacher's transformers model before training."""
        return (untrained_causal_teacher if cls.decoder_only else untrained_teacher)(task, settings)

    @classmethod
    def load(cls, directory: Path) -> Any:
        """The cached teacher's transformers model."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForCausalLM if cls.decoder_only else AutoModelForSeq2SeqLM
        return auto.from_pretrained(str(directory), local_files_only=True)

    @classmethod
    def fits(cls, task: Any) -> bool:
        """Whether ``task`` is one this teacher trains on."""
        return (hasattr(task, "teacher_data_fingerprint") and hasattr(task, "teacher_tokenizer")
                and bool(getattr(task, "decoder_only", False)) == cls.decoder_only)

    def build(self, config: _TeacherStageConfig, context: BuildContext) -> Teacher:  # type: ignore[override]
        from kd_plugins.text.models import TextTeacher

        task = context.task
        if not self.fits(task):
            raise KDUserError(f"teacher '{self.name}' trains on {self.trains_on}; task '{task.name}' is not one. "
                              f"Name a teacher with teacher.name (task 'lm': task-trained-causal-lm).")
        settings = effective_settings(config, task, context.device)
        directory = cache_directory(task, settings, context.cache_dir, self.recipe)
        if context.dry_run and not (directory / MANIFEST).is_file():
            # A plan (or kd eval, which scores only the student) must not cost the minutes of the teacher stage; an
            # untrained model of the same config has the same shape and parameter count, all either reads of it.
            log.info("The teacher is not cached (%s); a kd run would train it first (%d steps of %d). Built "
                     "untrained with the same shape for this plan or evaluation.", directory,
                     settings["train_steps"], settings["batch_size"])
            return TextTeacher(self.untrained(task, settings).eval(), task.teacher_tokenizer)
        built_from = {"recipe": self.recipe, "task": task.name, "settings": settings,
                      "data_fingerprint": task.teacher_data_fingerprint()}
        hf_model = ensure_teacher_cached(
            directory, TEACHER_KIND, built_from,
            lambda: train_teacher(task, settings, directory, context.device, config, registry=context.registry,
                                  factory=type(self)),
            lambda trained, staging: _write_teacher(task, staging, *trained),
            lambda: self.load(directory), what=f"the {task.name} teacher",
            reject=lambda manifest: budget_cut(manifest, config))
        log.info("Using the task-trained teacher cached in %s.", directory)
        return TextTeacher(hf_model.eval(), task.teacher_tokenizer)


class CausalTaskTrainedTeacherFactory(TaskTrainedTeacherFactory):
    """Teacher stage of the ``lm`` task: a Llama-style decoder-only model trained on its prompts and completions."""

    name: ClassVar[str] = "task-trained-causal-lm"
    description: ClassVar[str] = ("Llama-style decoder-only model trained on the lm task's prompts and completions at "
                                  "first use and cached (the offline default teacher of task lm)")
    Config: ClassVar[type[_TeacherStageConfig]] = CausalTaskTeacherConfig
    recipe: ClassVar[str] = "task-trained-llama/1"
    trains_on: ClassVar[str] = "a decoder-only text task's data (lm)"
    decoder_only: ClassVar[bool] = True


def _write_teacher(task: Any, staging: Path, hf_model: Any, stats: dict) -> dict:
    """Write the trained teacher's files into its entry's staging directory; return its stats for the manifest."""
    hf_model.save_pretrained(str(staging), safe_serialization=True)
    task.teacher_tokenizer.save_pretrained(str(staging))
    log.info("Teacher stage done in %.0f s of training (final training loss %.3f); caching it.",
             stats["seconds"], stats["final_loss"])
    return stats


def train_teacher(task: Any, settings: dict[str, Any], cache_entry: Path, device: torch.device,
                  config: _TeacherStageConfig | None = None, registry: Registry | None = None,
                  factory: type[TaskTrainedTeacherFactory] | None = None) -> tuple[Any, dict]:
    """The teacher stage: train ``factory``'s model (default: the Marian of ``task-trained-seq2seq``) on ``task``'s
    training split on the engine; return the model and its stats.

    ``settings`` are effective settings (:func:`effective_settings`); ``cache_entry`` is where the teacher will be
    cached: the stage keeps its log.jsonl and checkpoints in the partial directory next to it and continues from its
    last checkpoint. The caller writes the cache entry, then removes the partial directory.
    """
    from kd_plugins.text.models import COLLAPSED_ENCODER_SPREAD, TextStudent, encoder_spread

    factory = factory or TaskTrainedTeacherFactory
    config = config if config is not None else factory.Config()
    train = task.teacher_items(task.build_data(0).train)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings["seed"])  # the initial weights depend on the teacher seed only
        hf_model = factory.untrained(task, settings)
    model = TextStudent(hf_model, task.teacher_tokenizer).to(device)  # the trainable wrapper of every text model
    trainer = stage_trainer_config(settings, config, stage_time_budget(config, task))
    depth = (f"{settings['layers']}-layer" if "layers" in settings
             else f"{settings['encoder_layers']}+{settings['decoder_layers']}-layer")
    log.info("Teacher stage: training a %s d=%d %s (%s parameters) for %d steps of %d examples on %d training "
             "examples in %s; log.jsonl and checkpoints in %s (cached afterwards).", depth, settings["d_model"],
             type(hf_model).__name__, f"{model.num_parameters():,}", trainer.max_steps, trainer.batch_size,
             len(train), "bf16 autocast" if settings.get("precision") == "bf16" else "fp32",
             partial_directory(cache_entry))
    result = train_teacher_stage(task, model, factory, config, trainer, train=train, seed=settings["seed"],
                                 cache_entry=cache_entry, device=device, registry=registry,
                                 method_class=NextTokenStageMethod)
    hf_model.eval()
    stats = {"steps": result.steps, "seconds": round(result.train_seconds, 1), "final_loss": round(result.final_loss, 4),
             "parameters": model.num_parameters()}
    if model.is_encoder_decoder:
        # The spread shows an encoder collapse: one encoder pass over the first training batch (cheap).
        probe = task.collate(train[:trainer.batch_size])
        with torch.no_grad():
            spread = encoder_spread(hf_model, probe["input_ids"].to(device), probe["attention_mask"].to(device))
        if spread < COLLAPSED_ENCODER_SPREAD:
            log.warning("Teacher stage: the teacher's encoder collapsed (its output varies by %.2g relative to its "
                        "size over a batch of different inputs), so the teacher cannot read its source and writes the "
                        "same output for every input. Lower teacher.args.lr (now %g) or raise "
                        "teacher.args.warmup_steps (now %d); docs/text.md, 'Teacher stage'.", spread, settings["lr"],
                        settings["warmup_steps"])
        stats["encoder_spread"] = spread
    if result.time_budget is not None:  # a slower machine trained fewer steps than the settings name
        stats["time_budget"] = result.time_budget
    return hf_model, stats


__all__ = ["TEACHER_KIND", "TEACHER_RECIPE", "CausalTaskTeacherConfig", "CausalTaskTrainedTeacherFactory",
           "TaskTeacherConfig", "TaskTrainedTeacherFactory", "cache_directory", "causal_teacher_config",
           "untrained_causal_teacher",
           "effective_settings", "stage_trainer_config", "teacher_marian_config", "train_teacher", "untrained_teacher"]
