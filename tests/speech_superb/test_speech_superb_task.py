"""The superb task on hand-made items: collate, length-bucketed batches, evaluation suites and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.speech.gendistiller import GenDistillerStudent, GenDistillerStudentConfig
from kd_tasks.speech.corpora import SpeechItem
from kd_tasks.speech.superb import SpeechSplit, SuperbDataConfig, SuperbTask

KEYWORDS = ("yes", "no", "up", "_unknown_")
SPEAKERS = ("voice-a", "voice-b", "voice-c")


def _tone(frequency: float, seconds: float, speaker: int, generator: torch.Generator) -> torch.Tensor:
    time = torch.arange(int(seconds * 16000)) / 16000
    return (0.3 * torch.sin(2 * math.pi * frequency * time) * (1 + 0.3 * speaker)
            + 0.01 * torch.randn(time.shape, generator=generator)).float()


def _items(split: str, per_class: int, seed: int) -> list[SpeechItem]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for k, keyword in enumerate(KEYWORDS):
        for s, speaker in enumerate(SPEAKERS):
            for n in range(per_class):
                seconds = 0.4 + 0.1 * int(torch.randint(0, 5, (1,), generator=generator))
                items.append(SpeechItem(_tone(200 + 150 * k, seconds, s, generator), f"{split}-kw-{k}-{s}-{n}",
                                        text=keyword, keyword=keyword, speaker=speaker))
    for n in range(per_class * 2):
        words = ["one", "two", "three"][: 1 + n % 3]
        items.append(SpeechItem(_tone(300 + 40 * n, 0.3 * len(words) + 0.2, n % 3, generator), f"{split}-asr-{n}",
                                text=" ".join(words), speaker=SPEAKERS[n % 3]))
    items.append(SpeechItem(torch.zeros(16000), f"{split}-silence", keyword="_silence_"))
    return items


def _task(tmp_path, **evaluation) -> SuperbTask:  # noqa: ANN001
    heads = {"keyword": {"steps": 40, "hidden": 32}, "speaker": {"steps": 40, "hidden": 0},
             "asr": {"steps": 5, "lstm_layers": 0, "projection": 16}}
    config = SuperbDataConfig(evaluation={**heads, **evaluation}, bucket_size=2)
    task = SuperbTask(config, tmp_path)
    task.use_items(_items("train", 3, 0), _items("valid", 1, 1), _items("test", 2, 2))
    return task


def _student() -> GenDistillerStudent:
    torch.manual_seed(0)
    config = GenDistillerStudentConfig(conv_layers=[[16, 10, 5], [16, 3, 2], [16, 3, 2], [16, 2, 2], [16, 2, 2]],
                                       hidden_size=32, num_heads=4, ffn_dim=64, pos_conv_kernel=8, pos_conv_groups=4,
                                       target_layers=[1, 2], teacher_hidden_size=32)
    return GenDistillerStudent(config, 32).eval()


def test_collate_pads_and_reports_lengths(tmp_path) -> None:  # noqa: ANN001
    task = _task(tmp_path)
    items = [SpeechItem(torch.ones(5), "a"), SpeechItem(torch.full((3,), 2.0), "b")]
    batch = task.collate(items)
    assert batch["waveform"].shape == (2, 5) and batch["waveform"].dtype == torch.float32
    assert batch["waveform_lengths"].tolist() == [5, 3]
    assert batch["waveform"][1].tolist() == [2.0, 2.0, 2.0, 0.0, 0.0]


def test_epoch_batches_are_length_bucketed_seeded_and_cover_the_data(tmp_path) -> None:  # noqa: ANN001
    task = _task(tmp_path)
    train = task.build_data(0).train
    assert isinstance(train, SpeechSplit) and train.split == "train"
    lengths = [item.waveform.numel() for item in train]
    batches = task.epoch_batches(train, 4, torch.Generator().manual_seed(3))
    again = task.epoch_batches(train, 4, torch.Generator().manual_seed(3))
    other = task.epoch_batches(train, 4, torch.Generator().manual_seed(4))
    assert batches == again and batches != other
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) and len(flat) >= len(train) - 2 * 4 * 2  # at most a ragged tail per pool
    assert all(len(batch) == 4 for batch in batches)
    # within a batch lengths are sorted neighbours of one pool: the spread is far below a random batch's
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    permutation = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    random_batches = permutation[:len(train) // 4 * 4].view(-1, 4)
    random_spread = sum(max(lengths[i] for i in b.tolist()) - min(lengths[i] for i in b.tolist())
                        for b in random_batches) / len(random_batches)
    assert spread < 0.6 * random_spread, (spread, random_spread)


def test_evaluation_is_deterministic_and_valid_runs_only_the_cheap_suite(tmp_path) -> None:  # noqa: ANN001
    task = _task(tmp_path)
    splits = task.build_data(0)
    student = _student()
    full = task.evaluate(student, splits.test, torch.device("cpu"), 8)
    assert set(full) >= {"keyword_accuracy", "asr_wer", "asr_cer", "speaker_accuracy"}
    assert full["keyword_items"] == len(KEYWORDS) * len(SPEAKERS) * 2 + 1  # + silence (no speaker: keyword only)
    assert full["speaker_items"] == len(KEYWORDS) * len(SPEAKERS) * 2 + 4
    assert 0.0 <= full["keyword_accuracy"] <= 1.0 and full["asr_wer"] >= 0.0
    assert task.evaluate(student, splits.test, torch.device("cpu"), 5) == full  # batch size does not matter
    valid = task.evaluate(student, splits.valid, torch.device("cpu"), 8)
    assert {key.split("_")[0] for key in valid} == {"keyword"}
    # the head seed follows the run seed given to build_data
    task.build_data(1)
    assert task.evaluate(student, splits.test, torch.device("cpu"), 8) != full


def test_data_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="keyword"):
        SuperbDataConfig(evaluation={"valid_downstreams": ["asr"]})
    with pytest.raises(ValueError, match="audio_folder"):
        SuperbDataConfig(distill_on="folder")
    with pytest.raises(ValueError, match="librispeech"):
        SuperbDataConfig(source="local")


@pytest.mark.parametrize("plugin", ["gendistiller", "distilhubert"])
def test_embedded_students_are_pre_ln_and_paper_students_post_ln(plugin: str) -> None:
    # The embedded Whisper teacher cannot initialise the student (random init: pre-LN trains far faster); the
    # paper presets initialise from a post-LN Base teacher, so they must stay post-LN (init checks it).
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    registry = Registry.discover(entry_points=False)
    embedded = resolve_run(registry, task="superb", plugin=plugin)
    paper = resolve_run(registry, task="superb", plugin=plugin, preset="paper")
    assert embedded.student_config.layer_norm_first is True
    assert paper.student_config.layer_norm_first is False
    assert embedded.teacher_config.source == "embedded"


@pytest.mark.parametrize("preset", ["paper", "wavlm-base-plus", "hubert-base"])
def test_gendistiller_trains_on_its_generation_by_default_and_paper_presets_teacher_force(preset: str) -> None:
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    registry = Registry.discover(entry_points=False)
    assert resolve_run(registry, task="superb", plugin="gendistiller").method_config.train_inputs == "generated"
    assert resolve_run(registry, task="superb", plugin="gendistiller",
                       preset=preset).method_config.train_inputs == "teacher"
