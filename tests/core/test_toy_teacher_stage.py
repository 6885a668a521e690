"""The toy task's teacher stage trains on the one engine: cached once, the same teacher in every cache, and the
outer run's random streams untouched (a cold and a warm cache build the same student)."""
from __future__ import annotations

from pathlib import Path

import torch

from kdcore.interfaces import BuildContext
from kdcore.registry import Registry
from kdcore.resolve import resolve_run


def _build_teacher(cache: Path) -> torch.nn.Module:
    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny")
    task = resolved.task_cls(resolved.data_config, cache)
    context = BuildContext(task=task, cache_dir=cache, device=torch.device("cpu"), seed=5)
    return resolved.teacher_factory().build(resolved.teacher_config, context)


def test_the_toy_teacher_stage_caches_one_teacher_and_leaves_the_run_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    cold = _build_teacher(tmp_path / "a")
    after_cold = torch.rand(3)
    (cached,) = (tmp_path / "a" / "toy").glob("teacher-*/teacher.safetensors")
    assert not list((tmp_path / "a" / "toy").glob("*.partial"))  # removed once the teacher is cached
    torch.manual_seed(123)
    warm = _build_teacher(tmp_path / "a")
    assert torch.equal(torch.rand(3), after_cold)  # the stage restored the caller's random streams
    again = _build_teacher(tmp_path / "b")
    for a, b, c in zip(cold.state_dict().values(), warm.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
