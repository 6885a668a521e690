"""Speech teacher stores: ``kd teacher capture`` of a teacher's hidden states on the superb task's tiny data, and
DistilHuBERT / GenDistiller learning from them with ``teacher.name=store`` (no teacher model in memory)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from kdcore.cli import main
from kdcore.registry import Registry
from kdcore.resolve import build_components, resolve_run
from kdcore.signals import Signal, SignalRequest
from kdcore.teacher_store import StoredTeacher

#: A WavLM with the students' 320-sample hop (HuBERT's CNN strides) but 16 channels, 32 wide, 2 layers.
CONV = [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2
TINY = ["--task", "superb", "--preset", "tiny"]


@pytest.fixture(scope="module")
def kd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "kd-cache"  # the session's cache (tests/conftest.py): one corpus


@pytest.fixture(scope="module")
def wavlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=[c for c, _, _ in CONV], conv_kernel=[k for _, k, _ in CONV],
                         conv_stride=[s for _, _, s in CONV], conv_bias=False, feat_extract_norm="group",
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
                         max_bucket_distance=64)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-wavlm")
    WavLMModel(config).save_pretrained(directory)
    return directory


def _teacher(wavlm_dir: Path) -> list[str]:
    return ["teacher.name=wavlm", f"teacher.args.source={wavlm_dir}", "teacher.args.cache=false"]


def _sets(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def _capture(out: Path, wavlm_dir: Path, kd_cache: Path, *extra: str) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KD_CACHE_DIR", str(kd_cache))
        patch.setenv("OMP_NUM_THREADS", "1")
        return main(["teacher", "capture", *TINY, "--plugin", "distilhubert", *_sets(_teacher(wavlm_dir)),
                     "--no-evaluate", "--shard-examples", "32", "--batch-size", "8", *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, wavlm_dir: Path, kd_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("speech-stores") / "superb"
    assert _capture(out, wavlm_dir, kd_cache) == 0
    return out


def _built(plugin: str, teacher: list[str]):  # noqa: ANN202
    resolved = resolve_run(Registry.discover(), task="superb", plugin=plugin, preset="tiny",
                           sets=[*teacher, "trainer.evaluate_teacher=false"])
    return build_components(resolved, torch.device("cpu"))


def test_capture_stores_every_layer_of_each_utterance(store: Path, wavlm_dir: Path) -> None:
    manifest = json.loads((store / "kd-store.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["signals"] == ["hidden_states"]  # distilhubert's objectives read hidden states
    assert manifest["hidden_states"] == {"teacher_layers": 2, "width": 32, "layers": [0, 1, 2]}
    live = _built("distilhubert", _teacher(wavlm_dir))
    stored = _built("distilhubert", ["teacher.name=store", f"teacher.args.path={store}"])
    assert isinstance(stored.teacher, StoredTeacher) and not list(stored.teacher.parameters())
    items = stored.task.build_data(0).train
    batch = stored.task.collate([items[i] for i in (5, 0, 41, 17)])  # not the capture's batches
    request = SignalRequest(frozenset({Signal.HIDDEN_STATES}))
    expected, read = live.teacher.signals(batch, request), stored.teacher.signals(batch, request)
    assert torch.equal(read.extra["frame_mask"], expected.extra["frame_mask"])
    assert len(read.hidden_states) == len(expected.hidden_states) == 3
    mask = expected.extra["frame_mask"]
    for ours, theirs in zip(read.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours[mask], theirs[mask], atol=2e-3, rtol=1e-3)  # stored as float16
        assert not ours[~mask].any()


@pytest.mark.parametrize("plugin", ["distilhubert", "gendistiller"])
def test_speech_methods_learn_from_the_store_as_from_the_teacher(store: Path, wavlm_dir: Path, plugin: str) -> None:
    live = _built(plugin, _teacher(wavlm_dir))
    stored = _built(plugin, ["teacher.name=store", f"teacher.args.path={store}"])
    assert stored.student.target_layers == live.student.target_layers == (1, 2)
    items = stored.task.build_data(0).train
    batch = stored.task.collate(items[:4])
    expected, output = live.method.training_step(batch, 0), stored.method.training_step(batch, 0)
    assert torch.isfinite(output.loss)
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-3, atol=1e-3)


def test_a_store_without_the_methods_layers_is_refused_at_planning(store: Path, wavlm_dir: Path, kd_cache: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "layer-2"
    assert _capture(partial, wavlm_dir, kd_cache, "--layers", "2") == 0
    assert json.loads((partial / "kd-store.json").read_text())["hidden_states"]["layers"] == [2]
    assert main(["run", *TINY, "--plugin", "gendistiller", *_sets(["teacher.name=store",
                f"teacher.args.path={partial}", "trainer.evaluate_teacher=false"]), "--dry-run",
                 "--out", str(tmp_path / "plan")]) == 2
    assert "stores only [2]" in capsys.readouterr().err
    # a layer the teacher does not have, and a speech capture that asks for logits
    assert _capture(tmp_path / "bad", wavlm_dir, kd_cache, "--layers", "3") == 2
    assert "hidden states 0..2" in capsys.readouterr().err
    assert _capture(tmp_path / "logits", wavlm_dir, kd_cache, "--signals", "logits") == 2
    assert "labels" in capsys.readouterr().err


def test_kd_run_distils_from_the_speech_store(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "--plugin", "distilhubert", *_sets(["teacher.name=store", f"teacher.args.path={store}",
                 "trainer.evaluate_teacher=false"]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["student"]["keyword_accuracy"] <= 1.0 and metrics["teacher"] == {}
