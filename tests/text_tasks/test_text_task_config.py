"""Every text task x plugin x preset combination resolves to a valid run config (no building, no data)."""
from __future__ import annotations

import pytest

from kdcore.registry import Registry
from kdcore.resolve import resolve_run


@pytest.mark.parametrize("task", ["wmt", "summarization"])
@pytest.mark.parametrize("plugin", ["imitation", "scratch", "word-kd", "seq-kd"])
def test_defaults_resolve_for_every_plugin(task: str, plugin: str) -> None:
    resolved = resolve_run(Registry.discover(), task=task, plugin=plugin)
    assert resolved.teacher_factory.name == "task-trained-seq2seq"
    assert resolved.student_factory.name == "seq2seq"
    config = resolved.student_config.config
    expected = {"wmt": (2, 1, 96, 384), "summarization": (2, 2, 128, 512)}[task]
    assert (config["encoder_layers"], config["decoder_layers"], config["d_model"], config["decoder_ffn_dim"]) == expected
    assert resolved.config.trainer.max_steps == {"wmt": 2000, "summarization": 900}[task]
    assert resolved.config.trainer.select == {"wmt": "best", "summarization": "last"}[task]
    # The default student must decode much faster than the default teacher: a shallower and narrower decoder.
    teacher = resolved.task_cls.teacher_defaults
    assert config["decoder_layers"] < teacher["decoder_layers"] and config["d_model"] < teacher["d_model"]
    assert config["decoder_ffn_dim"] < teacher["ffn_dim"]
    # Time budgets (kdcore.time_budget): the student loop within the 15-minute cached run, and teacher stage plus
    # student loop leaving at least 4 of the 30 cold minutes for start-up and the test decoding.
    budget = resolved.config.trainer.time_budget_minutes
    assert budget == {"wmt": 10, "summarization": 9}[task]
    assert teacher["time_budget_minutes"] + budget <= 26


@pytest.mark.parametrize(("task", "preset", "teacher"), [
    ("wmt", "tiny", "task-trained-seq2seq"), ("summarization", "tiny", "task-trained-seq2seq"),
    ("wmt", "opus-mt-en-de", "seq2seq"), ("summarization", "bart-base", "seq2seq")])
def test_presets_resolve(task: str, preset: str, teacher: str) -> None:
    resolved = resolve_run(Registry.discover(), task=task, plugin="imitation", preset=preset)
    assert resolved.teacher_factory.name == teacher
    if teacher == "seq2seq":
        # The hub teacher's tokenizer tokenises the data, so the student shares its vocabulary.
        assert resolved.data_config.tokenizer == resolved.teacher_config.source


def test_imitation_beta_base_is_the_tasks() -> None:
    from kd_plugins.text.schedules import BetaSchedule
    from kd_tasks.text.summarization import SummarizationTask
    from kd_tasks.text.wmt import TranslationTask

    resolved = resolve_run(Registry.discover(), task="summarization", plugin="imitation")
    assert resolved.method_config.schedule.base is None
    assert BetaSchedule().for_task(SummarizationTask).base == 10.0
    assert BetaSchedule().for_task(TranslationTask).base == 200.0
