"""The optimiser and its learning-rate schedule: AdamW with warm-up, then linear, cosine or constant decay."""
from __future__ import annotations

import math

import torch
from torch import nn

from kdcore.config import TrainerConfig


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


def build_optimizer(trainable: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``trainable``, without weight decay on 1-D ones."""
    decay, no_decay = [], []
    for parameter in trainable.parameters():
        if not parameter.requires_grad:
            continue
        # Biases and norm scales are 1-D; weight decay on them only hurts (standard AdamW practice).
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor`, stepped once per optimiser step (skipped steps included)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
