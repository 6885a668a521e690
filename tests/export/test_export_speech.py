"""Exporting the speech students: DistilHuBERT as a transformers HubertModel with equal hidden states, GenDistiller
to ONNX within 1e-4 of PyTorch and back through kd's loader; pre-LN DistilHuBERT refused for ``hf``. Tiny random
students and test audio (nothing downloaded); the real ``kd export`` on superb runs is the slow test at the end."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from kdcore.errors import KDUserError
from kdcore.export.run import pick_exporter
from kd_plugins.speech.distilhubert import DistilHubertStudent, DistilHubertStudentConfig
from kd_plugins.speech.export import (
    DistilHubertExporter, GenDistillerExporter, from_pretrained, student_hidden_states,
)
from kd_plugins.speech.gendistiller import GenDistillerStudent, GenDistillerStudentConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speech_students"))
from conftest import TINY_SIZES, make_teacher  # noqa: E402  (the speech-student tests' tiny teachers)


def _collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(item) for item in items])
    waveform = torch.zeros(len(items), int(lengths.max()))
    for row, item in enumerate(items):
        waveform[row, :len(item)] = item
    return {"waveform": waveform, "waveform_lengths": lengths}


def _utterances(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(int(length), generator=generator) * 0.1
            for length in torch.randint(1600, 4000, (count,), generator=generator)]


def _exporter(cls: type, student: Any, name: str) -> Any:
    """The exporter on a stand-in of a built run: the student, the tiny teacher, a task that pads waveforms."""
    built = SimpleNamespace(student=student.eval(), teacher=make_teacher("hubert"),
                            task=SimpleNamespace(collate=_collate),
                            resolved=SimpleNamespace(config=SimpleNamespace(student=SimpleNamespace(name=name))))
    return cls(built, SimpleNamespace(test=_utterances(7, seed=1)))


def _distilhubert(**changes: Any) -> DistilHubertStudent:
    torch.manual_seed(0)
    config = DistilHubertStudentConfig(**{**TINY_SIZES, "normalize_waveform": True, **changes})
    return DistilHubertStudent(config, 32, [2, 3, 4])


def _gendistiller(**changes: Any) -> GenDistillerStudent:
    torch.manual_seed(0)
    config = GenDistillerStudentConfig(**{**TINY_SIZES, "num_layers": 2, **changes})
    return GenDistillerStudent(config, 32, [2, 3, 4])


def test_distilhubert_exports_as_a_hubert_model_with_equal_hidden_states(tmp_path: Path) -> None:
    from transformers import AutoFeatureExtractor, HubertModel

    student = _distilhubert()
    result = _exporter(DistilHubertExporter, student, "distilhubert-student").write("hf", tmp_path)
    assert result.library_name == "transformers" and result.checks["max_abs_difference"] <= 1e-5
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "heads.safetensors"} <= set(result.files)
    # From the outside, on utterances the self-test did not see.
    model = HubertModel.from_pretrained(str(tmp_path)).eval()
    extractor = AutoFeatureExtractor.from_pretrained(str(tmp_path))
    utterances = _utterances(3, seed=7)
    ours, mask = student_hidden_states(student, _collate(utterances))
    inputs = extractor([u.numpy() for u in utterances], sampling_rate=16000, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**inputs, output_hidden_states=True).hidden_states
    assert len(theirs) == len(ours) == student.config.num_layers + 1
    assert max(float((a - b).abs()[mask].max()) for a, b in zip(ours, theirs)) <= 1e-5
    from safetensors import safe_open

    with safe_open(str(tmp_path / "heads.safetensors"), "pt") as heads:
        assert json.loads(heads.metadata()["target_layers"]) == [2, 3, 4]
        assert heads.get_tensor("heads.0.weight").shape == (32, 32)


def test_pre_ln_distilhubert_is_refused_for_hf_and_offered_the_others() -> None:
    exporter = _exporter(DistilHubertExporter, _distilhubert(layer_norm_first=True), "distilhubert-student")
    built, splits = exporter.built, exporter.splits
    with pytest.raises(KDUserError, match="pre-LN") as error:
        pick_exporter(built, splits, "hf")
    assert "safetensors, onnx" in str(error.value)
    with pytest.raises(KDUserError, match="does not fit"):
        pick_exporter(built, splits, "hf-typo")


def test_gendistiller_onnx_reproduces_its_layers_within_1e_4(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    student = _gendistiller(current_block_attention="same_time")
    exporter = _exporter(GenDistillerExporter, student, "gendistiller-student")
    assert pick_exporter(exporter.built, exporter.splits, "onnx")[1] == "onnx"
    result = exporter.write("onnx", tmp_path)
    assert result.checks["max_abs_difference"] <= 1e-4 and result.speed["onnxruntime seconds per test batch, student"]
    # Another batch size and other lengths than the traced batch.
    batch = _collate(_utterances(5, seed=11))
    ours, mask = student_hidden_states(student, batch)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    hidden, frames = session.run(None, {"waveform": batch["waveform"].numpy(),
                                        "waveform_lengths": batch["waveform_lengths"].numpy()})
    assert hidden.shape[:2] == (len(ours), 5) and frames.tolist() == mask.sum(1).tolist()
    assert max(float(np.abs(a.numpy() - b)[mask.numpy()].max()) for a, b in zip(ours, hidden)) <= 1e-4


def test_pre_ln_distilhubert_exports_to_onnx_by_default(tmp_path: Path) -> None:
    """The embedded superb default's layout (pre-LN) cannot take hf; its default format is then safetensors, and
    ONNX reproduces its hidden states on other shapes than the traced ones."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    student = _distilhubert(layer_norm_first=True)
    exporter = _exporter(DistilHubertExporter, student, "distilhubert-student")
    assert pick_exporter(exporter.built, exporter.splits, None)[1] == "safetensors"
    result = exporter.write("onnx", tmp_path)
    assert result.checks["max_abs_difference"] <= 1e-4
    batch = _collate(_utterances(2, seed=5))
    ours, mask = student_hidden_states(student, batch)
    hidden, _ = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).run(
        None, {"waveform": batch["waveform"].numpy(), "waveform_lengths": batch["waveform_lengths"].numpy()})
    assert len(hidden) == student.config.num_layers + 1
    assert max(float(np.abs(a.numpy() - b)[mask.numpy()].max()) for a, b in zip(ours, hidden)) <= 1e-4


def test_gendistiller_safetensors_loads_back_with_kds_loader(tmp_path: Path) -> None:
    student = _gendistiller()
    result = _exporter(GenDistillerExporter, student, "gendistiller-student").write("safetensors", tmp_path)
    assert result.library_name == "kd" and result.checks["max_abs_difference"] <= 1e-5
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, GenDistillerStudent) and not loaded.training
    batch = _collate(_utterances(2, seed=3))
    ours, mask = student_hidden_states(student, batch)
    theirs, _ = student_hidden_states(loaded, batch)
    assert all(torch.equal(a[mask], b[mask]) for a, b in zip(ours, theirs))
    with pytest.raises(KDUserError, match="not a kd speech-student export"):
        from_pretrained(tmp_path / "missing")


@pytest.mark.slow
def test_kd_export_of_superb_runs(tmp_path: Path, run_kd) -> None:  # noqa: ANN001
    """The real commands: a tiny post-LN distilhubert run to hf, a tiny gendistiller run to onnx."""
    tiny = ("run", "--task", "superb", "--preset", "tiny", "--set", "trainer.progress=off")
    runs = {"distilhubert": ("hf", "--set", "student.args.layer_norm_first=false"), "gendistiller": ("onnx",)}
    for plugin, (fmt, *extra) in runs.items():
        result = run_kd(*tiny, "--plugin", plugin, *extra, "--out", str(tmp_path / plugin), timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        result = run_kd("export", "--run", str(tmp_path / plugin), "--out", str(tmp_path / f"{plugin}-{fmt}"),
                        "--format", fmt, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / f"{plugin}-{fmt}" / "export.json").read_text(encoding="utf-8"))
        assert report["self_test"]["max_abs_difference"] <= (1e-5 if fmt == "hf" else 1e-4)
