"""A small synthetic classification task, to try kd in seconds and to test the engine.

Inputs are Gaussian; labels come from a fixed random two-layer network plus
noise, so the mapping is nonlinear and a wide teacher clearly beats a narrow
student trained from scratch. Data depend only on ``data.seed`` (not the run
seed) so runs with different seeds are compared on the same data.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, PositiveInt
from torch import nn

from kdcore.checkpoint import load_weights, save_weights
from kdcore.config import StrictModel, TrainerConfig
from kdcore.interfaces import (
    Batch, BuildContext, DataSplits, Model, ModelFactory, Signal, SignalRequest, Signals, Student, Task, Teacher,
)
from kdcore.teacher_stage import ensure_teacher_cached, train_teacher_stage


class ToyDataConfig(StrictModel):
    n_train: PositiveInt = 4000
    n_valid: PositiveInt = 500
    n_test: PositiveInt = 1000
    n_features: PositiveInt = 16
    n_classes: int = Field(8, ge=2)
    label_noise: float = Field(0.2, ge=0.0, description="std of the noise added to the labelling network's logits")
    seed: int = 0


class ToyClassificationTask(Task):
    """Synthetic nonlinear classification (accuracy)."""

    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "Synthetic nonlinear classification: try kd in seconds, test the engine (accuracy)"
    DataConfig = ToyDataConfig
    metric: ClassVar[str] = "accuracy"
    greater_is_better: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"data": {"n_train": 512, "n_valid": 128, "n_test": 256},
                 "teacher": {"args": {"train_steps": 150}},
                 "trainer": {"max_steps": 40, "eval_every": 20, "checkpoint_every": 10, "log_every": 5}},
    }

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {
            "teacher": {"name": "toy-mlp-teacher", "args": {"hidden": 256, "layers": 3}},
            "student": {"name": "toy-mlp", "args": {"hidden": 32, "layers": 1}},
            "trainer": {"max_steps": 300, "batch_size": 64, "lr": 3e-3, "warmup_steps": 20, "eval_every": 100,
                        "checkpoint_every": 100, "log_every": 10},
        }

    def build_data(self, seed: int) -> DataSplits:  # noqa: ARG002 - data depend on data.seed only
        config: ToyDataConfig = self.data_config  # type: ignore[assignment]
        generator = torch.Generator().manual_seed(config.seed)
        total = config.n_train + config.n_valid + config.n_test
        inputs = torch.randn(total, config.n_features, generator=generator)
        first = torch.randn(config.n_features, 64, generator=generator) / config.n_features**0.5
        second = torch.randn(64, config.n_classes, generator=generator) / 8.0
        logits = torch.tanh(inputs @ first * 2.0) @ second * 4.0
        logits = logits + config.label_noise * torch.randn(logits.shape, generator=generator)
        labels = logits.argmax(-1)
        items = [(inputs[i], int(labels[i])) for i in range(total)]
        a, b = config.n_train, config.n_train + config.n_valid
        return DataSplits(train=items[:a], valid=items[a:b], test=items[b:])

    def collate(self, items: Sequence[Any]) -> Batch:
        return {"inputs": torch.stack([x for x, _ in items]), "labels": torch.tensor([y for _, y in items])}

    def evaluate(self, model: Model, dataset: Sequence[Any], device: torch.device, batch_size: int) -> dict[str, float]:
        correct, nll, count = 0, 0.0, 0
        request = SignalRequest(frozenset({Signal.LOGITS}))
        for start in range(0, len(dataset), batch_size):
            batch = self.collate(dataset[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model.forward_signals(batch, request).logits.float()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            nll += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            count += len(batch["labels"])
        return {"accuracy": correct / max(1, count), "nll": nll / max(1, count)}


class _MLP(nn.Module):
    def __init__(self, n_features: int, n_classes: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        blocks, width = [], n_features
        for _ in range(layers):
            blocks.append(nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)))
            width = hidden
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, n_classes)

    def signals(self, batch: Batch, request: SignalRequest) -> Signals:
        hidden = batch["inputs"]
        states = []
        for block in self.blocks:
            hidden = block(hidden)
            states.append(hidden)
        signals = Signals()
        if request.wants(Signal.HIDDEN_STATES):
            signals.hidden_states = tuple(states)
        if request.wants(Signal.FINAL_HIDDEN):
            signals.final_hidden, signals.output_weight, signals.output_bias = hidden, self.head.weight, self.head.bias
        if request.wants(Signal.LOGITS) or not request.signals:
            signals.logits = self.head(hidden)
        return signals


class _ToyMLPModel:
    """What the toy teacher and student share: an :class:`_MLP` answering the signal requests (mixed in first)."""

    def __init__(self, network: _MLP) -> None:
        super().__init__()
        self.network = network

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        return self.network.signals(batch, request)


class ToyMLPTeacher(_ToyMLPModel, Teacher):
    """The toy task's teacher: a (wide) MLP, frozen."""


class ToyMLPStudent(_ToyMLPModel, Student):
    """The toy task's student: a (narrow) MLP."""


class ToyMLPConfig(StrictModel):
    hidden: PositiveInt = 32
    layers: PositiveInt = 1
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class ToyTeacherConfig(ToyMLPConfig):
    hidden: PositiveInt = 256
    layers: PositiveInt = 3
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    train_steps: PositiveInt = 400
    lr: float = Field(3e-3, gt=0)


def _shape(context: BuildContext) -> tuple[int, int]:
    data_config = context.task.data_config
    return int(getattr(data_config, "n_features")), int(getattr(data_config, "n_classes"))


class ToyMLPStudentFactory(ModelFactory):
    """A small MLP student for the toy task."""

    name: ClassVar[str] = "toy-mlp"
    description: ClassVar[str] = "MLP student for the toy task (random init)"
    Config = ToyMLPConfig

    def build(self, config: ToyMLPConfig, context: BuildContext) -> Student:  # type: ignore[override]
        n_features, n_classes = _shape(context)
        return ToyMLPStudent(_MLP(n_features, n_classes, config.hidden, config.layers, config.dropout))


#: Part of the toy teacher's cache key. /2: trained on the engine (teacher stage), not by a loop of its own.
TOY_TEACHER_RECIPE = "toy-mlp-teacher/2"
#: The kind of its cache entry ``<cache>/toy/teacher-<key>/`` (kdcore.cache), and the weights file in it.
TOY_TEACHER_KIND = "toy-teacher"
TOY_TEACHER_WEIGHTS = "teacher.safetensors"


class ToyMLPTeacherFactory(ModelFactory):
    """Teacher stage for the toy task: trains a wide MLP on the labels once (on the engine) and caches it."""

    name: ClassVar[str] = "toy-mlp-teacher"
    description: ClassVar[str] = "Wide MLP teacher for the toy task, trained on first use and cached"
    Config = ToyTeacherConfig
    builds_on_all_ranks: ClassVar[bool] = True  # under torchrun its teacher stage trains data-parallel

    def build(self, config: ToyTeacherConfig, context: BuildContext) -> Teacher:  # type: ignore[override]
        n_features, n_classes = _shape(context)
        built_from = {"recipe": TOY_TEACHER_RECIPE, "data": context.task.data_config.model_dump(),
                      "teacher": config.model_dump()}
        key = hashlib.sha256(json.dumps(built_from, sort_keys=True).encode()).hexdigest()[:16]
        entry = context.cache_dir / "toy" / f"teacher-{key}"
        teacher = ToyMLPTeacher(_MLP(n_features, n_classes, config.hidden, config.layers, config.dropout))
        if context.dry_run and not entry.exists():
            return teacher  # a plan reports the parameter count only: the untrained model has the same
        ensure_teacher_cached(entry, TOY_TEACHER_KIND, built_from, lambda: self._train(config, context, entry),
                              lambda network, directory: save_weights(ToyMLPTeacher(network),
                                                                      directory / TOY_TEACHER_WEIGHTS),
                              lambda: load_weights(teacher, entry / TOY_TEACHER_WEIGHTS), what="the toy teacher")
        return teacher

    @staticmethod
    def _train(config: ToyTeacherConfig, context: BuildContext, path: Path) -> _MLP:
        """The teacher stage: Adam at a constant rate on batches of 128, seeded by 0 (not the run seed)."""
        n_features, n_classes = _shape(context)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            network = _MLP(n_features, n_classes, config.hidden, config.layers, config.dropout)
        model = ToyMLPStudent(network).to(context.device)  # the same state_dict keys as ToyMLPTeacher
        trainer = TrainerConfig(max_steps=config.train_steps, batch_size=128, lr=config.lr, weight_decay=0.0,
                                schedule="constant", clip_norm=None, precision="fp32", log_every=50,
                                checkpoint_every=100, evaluate_teacher=False)
        train_teacher_stage(context.task, model, ToyMLPTeacherFactory, config, trainer,
                            train=context.task.build_data(context.seed).train, seed=0, cache_entry=path,
                            device=context.device, registry=context.registry)
        return network

