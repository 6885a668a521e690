"""Exporting the speech students: DistilHuBERT as a transformers ``HubertModel``, GenDistiller with kd's loader,
and both as ONNX.

``hf`` (DistilHuBERT with post-LN layers, as the paper's and s3prl's): the front end and
layers are a HuBERT, so they become a ``transformers.HubertModel`` directory
(``config.json``, ``model.safetensors``, ``preprocessor_config.json`` for the
waveform normalisation) whose hidden states equal the kd student's; the
training-only prediction heads go to ``heads.safetensors``. Any tool that reads
HuBERT-style upstreams (hidden states per layer) can use it.

``safetensors`` (every speech student; the only native format of GenDistiller, which is
no transformers architecture): ``model.safetensors`` with the student's weights and
``config.json`` with what rebuilds it; :func:`from_pretrained` loads it back in kd.

``onnx`` (every speech student): ``model.onnx`` maps ``waveform`` ``(batch, samples)``
and ``waveform_lengths`` ``(batch,)`` to ``hidden_states`` ``(states, batch, frames,
dim)``, the hidden states kd's downstream probes read (GenDistiller: the generated
teacher layers, autoregressively), and ``frame_lengths`` ``(batch,)``; batch and lengths
are dynamic.

Every format checks itself on the task's test audio before it is renamed into place:
hidden states within 1e-5 (``hf``, ``safetensors``) or
:data:`~kdcore.export.onnx_tools.ONNX_TOLERANCE` (``onnx``) of the kd student's.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kdcore.errors import KDUserError
from kdcore.export.base import Exporter, ExportResult
from kdcore.export.onnx_tools import (
    ONNX_TOLERANCE, check_tolerance, export_module, max_abs_difference, run, seconds_per_call, session,
)
from kdcore.interfaces import Batch, Student
from kdcore.signals import Signal, SignalRequest
from kd_plugins.speech.distilhubert import DistilHubertStudent
from kd_plugins.speech.gendistiller import GenDistillerStudent
from kd_plugins.speech.student_base import SpeechStudent
from kd_plugins.speech.waveforms import SAMPLE_RATE

#: Largest difference allowed between an exported PyTorch model's hidden states and the kd student's.
HIDDEN_STATE_TOLERANCE = 1e-5
#: Test utterances of the self-test: the first batch traces the ONNX graph, the second (other shapes) checks it.
TRACE_ITEMS, CHECK_ITEMS = 3, 4
MODEL_FILE, CONFIG_FILE, HEADS_FILE, ONNX_FILE = "model.safetensors", "config.json", "heads.safetensors", "model.onnx"


# ---------------------------------------------------------------------- shared


def _hidden_request() -> SignalRequest:
    return SignalRequest(frozenset({Signal.HIDDEN_STATES}))


def student_hidden_states(student: SpeechStudent, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What kd's downstream probes read of ``student``: its hidden states and the frame mask."""
    with torch.no_grad():
        signals = student.forward_signals(batch, _hidden_request())
    assert signals.hidden_states is not None
    return list(signals.hidden_states), signals.extra["frame_mask"]


def _feature_extractor(student: SpeechStudent) -> Any:
    """The transformers feature extractor of the student's input: 16 kHz mono, normalised as kd normalises."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=bool(student.config.normalize_waveform), return_attention_mask=True)


def _worst(reference: list[torch.Tensor], candidate: list[Any], mask: torch.Tensor) -> float:
    if len(reference) != len(candidate):
        raise RuntimeError(f"export self-test failed: {len(candidate)} hidden states instead of the kd student's "
                           f"{len(reference)}")
    return max(max_abs_difference(ours, theirs, mask) for ours, theirs in zip(reference, candidate))


# ---------------------------------------------------------------------- DistilHuBERT -> HubertModel


def hubert_config(student: DistilHubertStudent) -> Any:
    """The ``HubertConfig`` of the student's front end and layers (no SpecAugment or layer drop: kd trains
    without them)."""
    config = student.config.hubert_config()
    config.update({"mask_time_prob": 0.0, "mask_feature_prob": 0.0, "layerdrop": 0.0,
                   "hidden_dropout": student.config.dropout, "attention_dropout": student.config.attention_dropout,
                   "activation_dropout": student.config.activation_dropout, "hidden_act": "gelu"})
    config.architectures = ["HubertModel"]
    return config


def hubert_state_dict(student: DistilHubertStudent) -> dict[str, torch.Tensor]:
    """The student's front end and layers under ``HubertModel``'s parameter names (attention split into q/k/v)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in student.front_end.state_dict().items():
        encoder_part = key.startswith(("pos_conv_embed.", "layer_norm."))
        state[f"encoder.{key}" if encoder_part else key] = value
    for index, layer in enumerate(student.layers):
        prefix = f"encoder.layers.{index}."
        for name, weight in zip(("q_proj", "k_proj", "v_proj"), layer.attention.in_proj_weight.chunk(3)):
            state[f"{prefix}attention.{name}.weight"] = weight
        for name, bias in zip(("q_proj", "k_proj", "v_proj"), layer.attention.in_proj_bias.chunk(3)):
            state[f"{prefix}attention.{name}.bias"] = bias
        for key, value in layer.state_dict().items():
            if not key.startswith("attention.in_proj_"):
                state[prefix + key] = value
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def to_hubert_model(student: DistilHubertStudent) -> Any:
    """A ``transformers.HubertModel`` with the student's weights."""
    from transformers import HubertModel

    model = HubertModel(hubert_config(student)).eval()
    model.load_state_dict(hubert_state_dict(student), strict=True)
    return model


# ---------------------------------------------------------------------- kd's own format


def _rebuild(config: dict[str, Any]) -> SpeechStudent:
    from kdcore.registry import Registry

    factory = Registry.discover().load("student", config["kd_student"])
    return factory.student_class(factory.Config(**config["args"]), int(config["teacher_dim"]),
                                 config["target_layers"])


def from_pretrained(directory: str | Path) -> SpeechStudent:
    """A speech student exported with ``kd export --format safetensors``, in eval mode.

    ``directory`` holds ``config.json`` (the student factory's registered name, its
    arguments, the teacher width and target layers) and ``model.safetensors``. The
    student answers ``forward_signals({"waveform": (B, samples), "waveform_lengths": (B,)},
    request)`` as in training; ``preprocessor_config.json`` in the same directory says
    how waveforms are normalised (the student also does it itself when configured).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        student = _rebuild(config)
        student.load_state_dict(load_file(str(directory / MODEL_FILE), device="cpu"), strict=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise KDUserError(f"'{directory}' is not a kd speech-student export ({type(error).__name__}: {error}); "
                          f"write one with 'kd export --format safetensors'.") from None
    return student.eval()


def _kd_config(exporter: "SpeechStudentExporter") -> dict[str, Any]:
    student = exporter.speech_student
    return {"kd_student": exporter.built.resolved.config.student.name,
            "args": student.config.model_dump(mode="json"), "teacher_dim": student.teacher_dim,
            "target_layers": list(student.target_layers), "sampling_rate": SAMPLE_RATE}


# ---------------------------------------------------------------------- ONNX


@contextlib.contextmanager
def separate_key_and_value(student: nn.Module) -> Iterator[None]:
    """While tracing: every ``nn.MultiheadAttention`` of ``student`` gets its value as a view, not the key object.

    The layers pass one tensor as key and value. When it is not also the query (GenDistiller's blocks attend to
    earlier blocks), PyTorch projects key and value together and splits them with ``unflatten``, which the ONNX
    tracer records with the traced length as a constant, so the graph fails on other lengths. A value that is a
    different object takes PyTorch's general path (three projections), which traces with dynamic lengths.
    """
    patched = [module for module in student.modules() if isinstance(module, nn.MultiheadAttention)]

    def aliased(forward: Any) -> Any:
        def call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return forward(query, key, value.view_as(value) if value is key else value, *args, **kwargs)
        return call

    for module in patched:
        module.forward = aliased(module.forward)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again


class _HiddenStatesGraph(nn.Module):
    """waveform, waveform_lengths -> stacked hidden states, frame lengths (what the ONNX graph computes)."""

    def __init__(self, student: SpeechStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, waveform: torch.Tensor, waveform_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signals = self.student.forward_signals({"waveform": waveform, "waveform_lengths": waveform_lengths},
                                               _hidden_request())
        assert signals.hidden_states is not None
        return torch.stack(list(signals.hidden_states)), signals.extra["frame_mask"].sum(dim=1)


# ---------------------------------------------------------------------- the exporters


class SpeechStudentExporter(Exporter):
    """What the speech exporters share: test batches, the kd format, ONNX."""

    formats: ClassVar[dict[str, str]] = {}

    @property
    def speech_student(self) -> SpeechStudent:
        return self.built.student  # type: ignore[return-value]

    def describe_student(self) -> str:
        config = self.speech_student.config
        return (f"{type(self.speech_student).__name__} ({config.num_layers} layer(s), {config.hidden_size} wide, "
                f"predicting teacher layers {list(self.speech_student.target_layers)})")

    def _batches(self) -> tuple[Batch, Batch]:
        test = list(self.splits.test)
        if len(test) < 2:
            raise KDUserError("The task's test split has fewer than 2 utterances; the export's self-test needs some.")
        trace = test[:TRACE_ITEMS]
        check = test[TRACE_ITEMS:TRACE_ITEMS + CHECK_ITEMS] or test[:CHECK_ITEMS]
        return self.built.task.collate(trace), self.built.task.collate(check)

    def _write_kd(self, directory: Path) -> ExportResult:
        from kdcore.checkpoint import save_state_dict
        from kdcore.io import atomic_write_json

        student = self.speech_student
        save_state_dict(student.state_dict(), directory / MODEL_FILE)
        atomic_write_json(directory / CONFIG_FILE, _kd_config(self))
        _feature_extractor(student).save_pretrained(str(directory))
        loaded = from_pretrained(directory)
        worst = 0.0
        for batch in self._batches():
            ours, mask = student_hidden_states(student, batch)
            theirs, _ = student_hidden_states(loaded, batch)
            worst = max(worst, _worst(ours, theirs, mask))
        check_tolerance("the reloaded student's hidden states", worst, HIDDEN_STATE_TOLERANCE)
        usage = """With kd installed:

```python
import torch
from kd_plugins.speech.export import from_pretrained
from kdcore.signals import Signal, SignalRequest

student = from_pretrained("EXPORT_DIR")
waveform = torch.zeros(1, 16000)  # 1 s of 16 kHz mono audio
signals = student.forward_signals({"waveform": waveform, "waveform_lengths": torch.tensor([16000])},
                                  SignalRequest(frozenset({Signal.HIDDEN_STATES})))
hidden_states, frame_mask = signals.hidden_states, signals.extra["frame_mask"]
```"""
        return ExportResult("kd", sorted(p.name for p in directory.iterdir()), {
            "max_abs_difference": worst, "tolerance": HIDDEN_STATE_TOLERANCE,
            "compared": "hidden states of the reloaded student on two batches of test utterances (valid frames)"},
            usage, pipeline_tag="feature-extraction", tags=["speech", "audio"])

    def _write_onnx(self, directory: Path) -> ExportResult:
        student = self.speech_student
        trace, check = self._batches()
        graph = _HiddenStatesGraph(student).eval()
        with separate_key_and_value(student):
            export_module(graph, (trace["waveform"], trace["waveform_lengths"]), directory / ONNX_FILE,
                          ["waveform", "waveform_lengths"], ["hidden_states", "frame_lengths"],
                          {"waveform": {0: "batch", 1: "samples"}, "waveform_lengths": {0: "batch"},
                           "hidden_states": {1: "batch", 2: "frames"}, "frame_lengths": {0: "batch"}})
        onnx_session = session(directory / ONNX_FILE)
        worst = 0.0
        for batch in (trace, check):
            ours, mask = student_hidden_states(student, batch)
            hidden, lengths = run(onnx_session, {"waveform": batch["waveform"],
                                                 "waveform_lengths": batch["waveform_lengths"]})
            if lengths.tolist() != mask.sum(dim=1).tolist():
                raise RuntimeError("export self-test failed: the ONNX frame lengths differ from the kd student's")
            worst = max(worst, _worst(ours, list(hidden), mask))
        check_tolerance("the ONNX hidden states", worst)
        from kdcore.io import atomic_write_json

        atomic_write_json(directory / CONFIG_FILE, _kd_config(self))
        _feature_extractor(student).save_pretrained(str(directory))
        feeds = {"waveform": check["waveform"], "waveform_lengths": check["waveform_lengths"]}
        onnx_seconds = seconds_per_call(lambda: run(onnx_session, feeds))
        torch_seconds = seconds_per_call(lambda: student_hidden_states(student, check))
        teacher_seconds = seconds_per_call(lambda: self.built.teacher.signals(check, student.teacher_request()))
        speed = {"onnxruntime seconds per test batch, student": onnx_seconds,
                 "PyTorch seconds per test batch, student": torch_seconds,
                 "PyTorch seconds per test batch, teacher": teacher_seconds,
                 "onnxruntime student speed-up over the PyTorch teacher": teacher_seconds / max(onnx_seconds, 1e-9),
                 "utterances per batch": int(check["waveform"].shape[0])}
        usage = f"""With onnxruntime and numpy only (16 kHz mono float32 audio; normalise it first when
`preprocessor_config.json` says `do_normalize: true`, e.g. with transformers' `Wav2Vec2FeatureExtractor`):

```python
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession("EXPORT_DIR/{ONNX_FILE}")
waveform = np.zeros((1, 16000), dtype=np.float32)
hidden_states, frame_lengths = session.run(None, {{"waveform": waveform,
                                                  "waveform_lengths": np.array([16000], dtype=np.int64)}})
# hidden_states: (states, batch, frames, dim); frames past frame_lengths are padding
```"""
        return ExportResult("onnx", sorted(p.name for p in directory.iterdir()), {
            "max_abs_difference": worst, "tolerance": ONNX_TOLERANCE,
            "compared": f"hidden states on {TRACE_ITEMS} test utterances (the traced batch) and "
                        f"{int(check['waveform'].shape[0])} others of other lengths (valid frames)"},
            usage, pipeline_tag="feature-extraction", tags=["onnx", "speech", "audio"], speed=speed,
            limitations=["The waveform must be 16 kHz mono; batches are zero-padded with their valid lengths in "
                         "waveform_lengths."])

    def write(self, fmt: str, directory: Path) -> ExportResult:
        if fmt == "onnx":
            return self._write_onnx(directory)
        if fmt == "safetensors":
            return self._write_kd(directory)
        return self._write_hf(directory)

    def _write_hf(self, directory: Path) -> ExportResult:
        raise NotImplementedError


class DistilHubertExporter(SpeechStudentExporter):
    """DistilHuBERT students: ``hf`` (HubertModel), ``safetensors`` (kd), ``onnx``."""

    formats: ClassVar[dict[str, str]] = {
        "hf": "a transformers HubertModel directory (+ heads.safetensors) with the student's hidden states",
        "safetensors": "the kd student's weights and config, loaded with kd_plugins.speech.export.from_pretrained",
        "onnx": "an ONNX graph: waveform -> hidden states, dynamic batch and length",
    }

    @classmethod
    def fits(cls, student: Student) -> bool:
        return isinstance(student, DistilHubertStudent)

    def refusal(self, fmt: str) -> str | None:
        if fmt == "hf" and self.speech_student.config.layer_norm_first:
            return ("the student has pre-LN layers (student.args.layer_norm_first: true, the embedded superb "
                    "default); transformers' pre-LN HuBERT normalises its last hidden state, which this student does "
                    "not, so a HubertModel could not reproduce its hidden states")
        return None

    def _write_hf(self, directory: Path) -> ExportResult:
        from transformers import AutoFeatureExtractor, HubertModel

        from kdcore.checkpoint import save_state_dict

        student: DistilHubertStudent = self.speech_student  # type: ignore[assignment]
        to_hubert_model(student).save_pretrained(str(directory))
        save_state_dict({f"heads.{key}": value for key, value in student.heads.state_dict().items()},
                        directory / HEADS_FILE,
                        metadata={"target_layers": json.dumps(list(student.target_layers)),
                                  "head": str(getattr(student.config, "head", "linear")),
                                  "teacher_dim": str(student.teacher_dim)})
        _feature_extractor(student).save_pretrained(str(directory))
        loaded = HubertModel.from_pretrained(str(directory), local_files_only=True).eval()
        extractor = AutoFeatureExtractor.from_pretrained(str(directory), local_files_only=True)
        worst = 0.0
        for batch in self._batches():
            ours, mask = student_hidden_states(student, batch)
            audio = [row[:length].numpy() for row, length in zip(batch["waveform"], batch["waveform_lengths"])]
            inputs = extractor(audio, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
            with torch.no_grad():
                theirs = loaded(inputs["input_values"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=True).hidden_states
            worst = max(worst, _worst(ours, [t.numpy() for t in theirs], mask))
        check_tolerance("transformers HubertModel's hidden states", worst, HIDDEN_STATE_TOLERANCE)
        usage = """With transformers (no kd needed):

```python
import numpy as np
from transformers import AutoFeatureExtractor, HubertModel

extractor = AutoFeatureExtractor.from_pretrained("EXPORT_DIR")
model = HubertModel.from_pretrained("EXPORT_DIR")
inputs = extractor([np.zeros(16000, dtype=np.float32)], sampling_rate=16000, return_tensors="pt")
hidden_states = model(**inputs, output_hidden_states=True).hidden_states  # front end + each layer
```

The prediction heads of distillation (not needed downstream) are in `heads.safetensors`
(`heads.<i>.*` predicts teacher layer `target_layers[i]`, listed in its metadata)."""
        return ExportResult("transformers", sorted(p.name for p in directory.iterdir()), {
            "max_abs_difference": worst, "tolerance": HIDDEN_STATE_TOLERANCE,
            "compared": "HubertModel hidden states (through the exported feature extractor) against the kd "
                        "student's on two batches of test utterances (valid frames)"},
            usage, pipeline_tag="feature-extraction", tags=["hubert", "speech", "audio"])


class GenDistillerExporter(SpeechStudentExporter):
    """GenDistiller students: ``safetensors`` (kd), ``onnx``."""

    formats: ClassVar[dict[str, str]] = {
        "safetensors": "the kd student's weights and config, loaded with kd_plugins.speech.export.from_pretrained",
        "onnx": "an ONNX graph: waveform -> generated teacher layers, dynamic batch and length",
    }

    @classmethod
    def fits(cls, student: Student) -> bool:
        return isinstance(student, GenDistillerStudent)


__all__ = ["DistilHubertExporter", "GenDistillerExporter", "HIDDEN_STATE_TOLERANCE", "SpeechStudentExporter",
           "from_pretrained", "hubert_config", "hubert_state_dict", "student_hidden_states", "to_hubert_model"]
