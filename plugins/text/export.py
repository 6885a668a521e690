"""Exporting a text student: a transformers directory (``hf``) or ONNX graphs with past key/values (``onnx``).

``hf``: ``save_pretrained`` of the student's transformers model and tokenizer, with a
generation config holding the task's greedy decoding settings (decoder start, end and
pad ids, the pad token banned mid-sequence as kd's decoder does, ``max_new_tokens`` =
``data.max_new_tokens``, no forced end token), so ``AutoModelForSeq2SeqLM`` /
``AutoModelForCausalLM.from_pretrained(dir).generate(...)`` decodes as ``kd eval`` does.

``onnx``, in the file and tensor layout of Hugging Face Optimum, beside the same config,
generation config and tokenizer files; batch, lengths and past lengths are dynamic:

* encoder-decoder students: ``encoder_model.onnx`` (``input_ids``, ``attention_mask`` ->
  ``last_hidden_state``); ``decoder_model.onnx`` for the first step (``input_ids``,
  ``encoder_hidden_states``, ``encoder_attention_mask`` -> ``logits`` and, per layer
  ``i``, ``present.i.decoder.key/value`` (self-attention) and ``present.i.encoder.key/value``
  (cross-attention)); ``decoder_with_past_model.onnx`` for every later step (``input_ids``
  of the newest token, ``encoder_attention_mask``, ``past_key_values.i.decoder/encoder.key/value``
  -> ``logits``, ``present.i.decoder.key/value``): the self-attention cache grows by one
  position per step, the cross-attention cache is computed once by the first step.
  ``decoder_model.onnx`` also decodes without a cache (the whole prefix each step).
* decoder-only students: ``model.onnx`` (``input_ids``, ``attention_mask`` over past and
  new tokens, ``position_ids``, ``past_key_values.i.key/value`` -> ``logits``,
  ``present.i.key/value``); the first step feeds past key/values of length 0.

:func:`onnx_greedy_decode` and :func:`onnx_causal_greedy_decode` are greedy decoding on
those sessions (numpy only). Both formats check themselves against the kd student on the
task's test items before anything is renamed into place: the exported model's greedy
tokens equal kd's, and the ONNX logits (teacher-forced, with and without past
key/values) are within :data:`~kdcore.export.onnx_tools.ONNX_TOLERANCE` of PyTorch's.

A LoRA student (``student.args.lora``) is merged into a copy of its base for ``hf`` and
``onnx`` (checked against the LoRA student's logits first); ``peft`` writes its adapters as a
peft adapter directory instead (with the base under ``base/`` when it was built from a config),
checked by loading it with ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kdcore.errors import KDUserError
from kdcore.export.base import Exporter, ExportResult
from kdcore.export.onnx_tools import (
    ONNX_TOLERANCE, check_tolerance, export_module, max_abs_difference, run, seconds_per_call, session,
)
from kdcore.interfaces import Student
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX, Signal, request
from kd_plugins.text.generation import _cache_argument, generate, generation_length_limit
from kd_plugins.text.imitation import _split_causal_row
from kd_plugins.text.lora import base_copy, has_lora, merged_copy
from kd_plugins.text.models import HFTextModel, TextStudent

#: Test sources the self-test decodes (the first of the test split).
SELF_TEST_SENTENCES = 16
ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE = ("encoder_model.onnx", "decoder_model.onnx",
                                                      "decoder_with_past_model.onnx")
#: The one graph of a decoder-only student.
CAUSAL_FILE = "model.onnx"
PAST, PRESENT = "past_key_values", "present"


def export_generation_config(model: HFTextModel, max_new_tokens: int) -> Any:
    """The model's generation config set to kd's greedy decoding (see the module docstring)."""
    config = copy.deepcopy(model.hf_model.generation_config)
    config.update(num_beams=1, do_sample=False, max_new_tokens=max_new_tokens, max_length=None,
                  decoder_start_token_id=model.decoder_start_token_id if model.is_encoder_decoder else None,
                  eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id, forced_eos_token_id=None,
                  forced_bos_token_id=None, temperature=None, top_k=None, top_p=None)
    if model.pad_token_id is not None and model.pad_token_id != model.eos_token_id:
        config.bad_words_ids = [[model.pad_token_id]]  # kd's greedy decoder never emits padding mid-sequence
    return config


#: The Hugging Face pipeline (and hub ``pipeline_tag``) of each built-in text task's students, by task name.
PIPELINE_TAGS: dict[str, str] = {"wmt": "translation", "summarization": "summarization"}


def pipeline_task(task: Any) -> str:
    """The Hugging Face pipeline (and hub ``pipeline_tag``) of a text task's seq2seq students."""
    return PIPELINE_TAGS.get(getattr(task, "name", ""), "text2text-generation")


# ---------------------------------------------------------------------------------------------- graphs
def seq2seq_cache_names(layers: int, prefix: str, parts: Sequence[str] = ("decoder", "encoder")) -> list[str]:
    """``<prefix>.<layer>.<part>.key/value`` in graph order (``decoder`` = self-attention, ``encoder`` = cross)."""
    return [f"{prefix}.{layer}.{part}.{kind}" for layer in range(layers) for part in parts for kind in ("key", "value")]


def causal_cache_names(layers: int, prefix: str) -> list[str]:
    """``<prefix>.<layer>.key/value`` in graph order."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def _layer_states(cache: Any) -> list[torch.Tensor]:
    """The keys and values of every layer of a transformers cache, flat: key 0, value 0, key 1, ..."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        import transformers

        raise KDUserError(f"ONNX export with past key/values reads transformers' per-layer caches (cache.layers), "
                          f"which transformers {transformers.__version__} does not have; install the transformers "
                          f"version kd is tested with (pip install 'transformers>=5').")
    return [tensor for layer in layers for tensor in (layer.keys, layer.values)]


def _pairs(flat: Sequence[torch.Tensor], stride: int, offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) of each layer from graph inputs that hold ``stride`` tensors per layer, starting at ``offset``."""
    return [(flat[first + offset], flat[first + offset + 1]) for first in range(0, len(flat), stride)]


class _Encoder(nn.Module):
    def __init__(self, model: HFTextModel) -> None:
        super().__init__()
        self.encoder = model.hf_model.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _DecoderFirstStep(nn.Module):
    """The decoder without past (any prefix length): logits (the model's own LM head, final-logits bias included)
    and every layer's self- and cross-attention keys/values."""

    def __init__(self, model: HFTextModel) -> None:
        super().__init__()
        self.model = model
        self.decoder = model.hf_model.get_decoder()
        self.cache_argument = _cache_argument(self.decoder)

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask, use_cache=True, return_dict=True)
        cache = outputs[self.cache_argument]
        own, cross = _layer_states(cache.self_attention_cache), _layer_states(cache.cross_attention_cache)
        flat = [tensor for layer in range(0, len(own), 2) for tensor in (*own[layer:layer + 2], *cross[layer:layer + 2])]
        return (self.model.logits_from_hidden(outputs.last_hidden_state), *flat)


class _DecoderWithPast(nn.Module):
    """One decoder step on the cache: the newest tokens' logits and the grown self-attention keys/values."""

    def __init__(self, model: HFTextModel) -> None:
        super().__init__()
        self.model = model
        self.decoder = model.hf_model.get_decoder()
        self.cache_argument = _cache_argument(self.decoder)
        config = model.hf_model.config
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(_pairs(past, 4, 0)), DynamicCache(_pairs(past, 4, 2)))
        # A filled cross-attention cache is reused, so the encoder states are read only for their batch size and
        # length (masks); zeros of that shape stand in for them and the graph needs no encoder_hidden_states input.
        cross_key = past[2]
        placeholder = cross_key.new_zeros(cross_key.shape[0], cross_key.shape[2], self.width)
        outputs = self.decoder(input_ids=input_ids, encoder_hidden_states=placeholder,
                               encoder_attention_mask=encoder_attention_mask, use_cache=True, return_dict=True,
                               **{self.cache_argument: cache})
        return (self.model.logits_from_hidden(outputs.last_hidden_state), *_layer_states(cache.self_attention_cache))


class _CausalWithPast(nn.Module):
    """A decoder-only model on new tokens after past keys/values (of length 0 on the first step)."""

    def __init__(self, model: HFTextModel) -> None:
        super().__init__()
        self.model = model
        self.base = model.hf_model.base_model
        self.cache_argument = _cache_argument(self.base)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(_pairs(past, 2, 0), config=self.model.hf_model.config)
        outputs = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, return_dict=True, **{self.cache_argument: cache})
        return (self.model.logits_from_hidden(outputs.last_hidden_state), *_layer_states(cache))


def _with_columns(tokens: torch.Tensor, columns: int, fill: int) -> torch.Tensor:
    """``tokens`` with at least ``columns`` columns (``fill`` appended): graphs are traced with lengths >= 2 for
    past and new tokens, so that no length is recorded as a broadcastable 1."""
    if tokens.shape[1] >= columns:
        return tokens
    return torch.cat([tokens, tokens.new_full((tokens.shape[0], columns - tokens.shape[1]), fill)], dim=1)


def export_seq2seq_onnx(model: HFTextModel, directory: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        decoder_input_ids: torch.Tensor) -> None:
    """``encoder_model.onnx``, ``decoder_model.onnx`` and ``decoder_with_past_model.onnx`` of ``model`` in
    ``directory`` (traced on the given batch)."""
    encoder, first, later = _Encoder(model).eval(), _DecoderFirstStep(model).eval(), _DecoderWithPast(model).eval()
    source = {0: "batch", 1: "source_length"}
    export_module(encoder, (input_ids, attention_mask), directory / ENCODER_FILE, ["input_ids", "attention_mask"],
                  ["last_hidden_state"], {"input_ids": source, "attention_mask": source, "last_hidden_state": source})
    prefix = _with_columns(decoder_input_ids, 3, model.decoder_start_token_id)
    with torch.no_grad():
        hidden = encoder(input_ids, attention_mask)
        first_outputs = first(prefix[:, :2], hidden, attention_mask)
    layers = (len(first_outputs) - 1) // 4
    presents = seq2seq_cache_names(layers, PRESENT)
    own = {0: "batch", 2: "past_length"}
    cross = {0: "batch", 2: "source_length"}
    axes = {"input_ids": {0: "batch", 1: "target_length"}, "encoder_hidden_states": source,
            "encoder_attention_mask": source, "logits": {0: "batch", 1: "target_length"}}
    axes.update({name: own if ".decoder." in name else cross for name in presents})
    export_module(first, (prefix[:, :2], hidden, attention_mask), directory / DECODER_FILE,
                  ["input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits", *presents], axes)
    pasts = seq2seq_cache_names(layers, PAST)
    grown = seq2seq_cache_names(layers, PRESENT, ("decoder",))
    axes = {"input_ids": {0: "batch", 1: "new_tokens"}, "encoder_attention_mask": source,
            "logits": {0: "batch", 1: "new_tokens"}}
    axes.update({name: own if ".decoder." in name else cross for name in pasts})
    axes.update({name: {0: "batch", 2: "past_length_plus_new"} for name in grown})
    export_module(later, (prefix[:, 2:], attention_mask, *first_outputs[1:]), directory / DECODER_WITH_PAST_FILE,
                  ["input_ids", "encoder_attention_mask", *pasts], ["logits", *grown], axes)


def export_causal_lm_onnx(model: HFTextModel, directory: Path, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> None:
    """``model.onnx`` of the decoder-only ``model`` in ``directory`` (traced on the batch, split into past and new
    tokens)."""
    graph = _CausalWithPast(model).eval()
    input_ids = _with_columns(input_ids, 4, model.pad_token_id)
    attention_mask = _with_columns(attention_mask, 4, 0)
    positions = position_ids_of(attention_mask)
    with torch.no_grad():  # the past of the first two tokens, from the model itself
        outputs = model.hf_model.base_model(input_ids=input_ids[:, :2], attention_mask=attention_mask[:, :2],
                                            position_ids=positions[:, :2], use_cache=True, return_dict=True)
    past = _layer_states(outputs[graph.cache_argument])
    layers = len(past) // 2
    pasts, presents = causal_cache_names(layers, PAST), causal_cache_names(layers, PRESENT)
    axes = {"input_ids": {0: "batch", 1: "new_tokens"}, "attention_mask": {0: "batch", 1: "past_length_plus_new"},
            "position_ids": {0: "batch", 1: "new_tokens"}, "logits": {0: "batch", 1: "new_tokens"}}
    axes.update({name: {0: "batch", 2: "past_length"} for name in pasts})
    axes.update({name: {0: "batch", 2: "past_length_plus_new"} for name in presents})
    export_module(graph, (input_ids[:, 2:], attention_mask, positions[:, 2:], *past), directory / CAUSAL_FILE,
                  ["input_ids", "attention_mask", "position_ids", *pasts], ["logits", *presents], axes)


# ---------------------------------------------------------------------------------------------- decoding
def position_ids_of(attention_mask: Any) -> Any:
    """Positions that count attended tokens only (left padding does not shift a row), as kd's decoder feeds them."""
    return (attention_mask.cumsum(-1) - 1).clip(min=0)


def greedy_loop(step: Callable[[np.ndarray | None], np.ndarray], batch_size: int, *, eos_token_id: int | None,
                pad_token_id: int, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding around ``step``: ``step(None)`` returns the first next-token logits ``(batch, vocab)``,
    ``step(tokens)`` appends each row's token and returns the next ones.

    Returns ``(batch, steps)`` token ids; after its end token a row holds ``pad_token_id``. As kd's decoder, the
    pad token is never chosen (when it differs from the end token).
    """
    produced: list[np.ndarray] = []
    finished = np.zeros(batch_size, dtype=bool)
    logits = step(None) if max_new_tokens > 0 else None
    while logits is not None:
        if pad_token_id != eos_token_id:
            logits[:, pad_token_id] = -np.inf
        tokens = np.where(finished, pad_token_id, logits.argmax(axis=-1)).astype(np.int64)
        produced.append(tokens)
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        logits = None if finished.all() or len(produced) == max_new_tokens else step(tokens)
    return np.stack(produced, axis=1) if produced else np.zeros((batch_size, 0), dtype=np.int64)


def _as_past(names: Sequence[str], values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """A session's ``present.*`` outputs as the ``past_key_values.*`` inputs of the next step."""
    return {PAST + name[len(PRESENT):]: value for name, value in zip(names, values)}


def onnx_greedy_decode(encoder: Any, decoder: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                       decoder_start_token_id: int, eos_token_id: int | None, pad_token_id: int,
                       max_new_tokens: int, decoder_with_past: Any = None) -> np.ndarray:
    """Greedy decoding with onnxruntime sessions of an encoder-decoder export.

    With ``decoder_with_past`` (a session of ``decoder_with_past_model.onnx``) ``decoder``
    runs the first step and returns the key/values that every later step extends by one
    token; without it ``decoder`` re-reads the whole prefix at each step. Returns
    ``(batch, steps)`` token ids without the start token (see :func:`greedy_loop`). Needs
    only numpy and onnxruntime.
    """
    input_ids, attention_mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
    hidden = encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
    first_names = [output.name for output in decoder.get_outputs()][1:]
    later_names = ([output.name for output in decoder_with_past.get_outputs()][1:]
                   if decoder_with_past is not None else [])
    prefix = np.full((input_ids.shape[0], 1), decoder_start_token_id, dtype=np.int64)
    past: dict[str, np.ndarray] = {}

    def step(tokens: np.ndarray | None) -> np.ndarray:
        nonlocal prefix
        if tokens is not None and decoder_with_past is not None:
            outputs = decoder_with_past.run(None, {"input_ids": tokens[:, None], "encoder_attention_mask": attention_mask,
                                                   **past})
            past.update(_as_past(later_names, outputs[1:]))  # the cross-attention entries stay those of step one
            return outputs[0][:, -1, :]
        if tokens is not None:
            prefix = np.concatenate([prefix, tokens[:, None]], axis=1)
        outputs = decoder.run(None, {"input_ids": prefix, "encoder_hidden_states": hidden,
                                     "encoder_attention_mask": attention_mask})
        if decoder_with_past is not None:
            past.update(_as_past(first_names, outputs[1:]))
        return outputs[0][:, -1, :]

    return greedy_loop(step, input_ids.shape[0], eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       max_new_tokens=max_new_tokens)


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def empty_past(model: Any, batch_size: int) -> dict[str, np.ndarray]:
    """Past key/values of length 0 for every ``past_key_values.*`` input of a ``model.onnx`` session."""
    return {graph_input.name: np.zeros((batch_size, graph_input.shape[1], 0, graph_input.shape[3]),
                                       dtype=_NUMPY_TYPES.get(graph_input.type, np.float32))
            for graph_input in model.get_inputs() if graph_input.name.startswith(PAST + ".")}


def onnx_causal_greedy_decode(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                              eos_token_id: int | None, pad_token_id: int, max_new_tokens: int,
                              use_cache: bool = True) -> np.ndarray:
    """Greedy continuation of left-padded prompts with an onnxruntime session of a decoder-only ``model.onnx``.

    The first step reads the prompts after past key/values of length 0; each later step
    feeds one token per row and the past key/values the step before returned
    (``use_cache=False``: the whole sequence again, after an empty past). Returns the
    continuation, ``(batch, steps)`` (see :func:`greedy_loop`). Needs only numpy and
    onnxruntime.
    """
    sequence, mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
    batch_size = sequence.shape[0]
    names = [output.name for output in model.get_outputs()][1:]
    positions = position_ids_of(mask)
    past = empty_past(model, batch_size)

    def step(tokens: np.ndarray | None) -> np.ndarray:
        nonlocal sequence, mask, positions, past
        feeds = sequence
        if tokens is not None:
            sequence = np.concatenate([sequence, tokens[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((batch_size, 1), dtype=np.int64)], axis=1)
            positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
            feeds = tokens[:, None] if use_cache else sequence
        outputs = model.run(None, {"input_ids": feeds, "attention_mask": mask,
                                   "position_ids": positions[:, -feeds.shape[1]:], **past})
        if use_cache:
            past = _as_past(names, outputs[1:])
        return outputs[0][:, -1, :]

    return greedy_loop(step, batch_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       max_new_tokens=max_new_tokens)


def _rows(tokens: np.ndarray | torch.Tensor, eos: int | None) -> list[list[int]]:
    """Token rows cut after their first end token (padding dropped)."""
    rows = []
    for row in np.asarray(tokens).tolist():
        rows.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


@dataclass
class SelfTestBatch:
    """Test items, their collated batch, what kd's greedy decoder reads for them (sources, or the left-padded
    prompts of a decoder-only student) and kd's decoding limit for the batch."""

    items: list[Any]
    batch: dict[str, torch.Tensor]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    limit: int


class TextStudentExporter(Exporter):
    """Text students (``seq2seq``, ``causal-lm``)."""

    formats: ClassVar[dict[str, str]] = {
        "hf": "a transformers directory (config, safetensors, generation config, tokenizer) for from_pretrained",
        "onnx": "ONNX graphs with past key/values (encoder, decoder and decoder-with-past, or one decoder-only "
                "graph) with the config and tokenizer; greedy decoding in onnxruntime",
        "peft": "LoRA students only: a peft adapter directory (adapter_config.json, adapter_model.safetensors) for "
                "PeftModel.from_pretrained on the base model (hf and onnx merge the adapters instead)",
    }
    #: A LoRA student's adapters merged into a copy of its base (set by :meth:`write` for hf and onnx).
    _merged: TextStudent | None = None

    @classmethod
    def fits(cls, student: Student) -> bool:
        return isinstance(student, TextStudent)

    @property
    def student(self) -> TextStudent:
        """The student the formats write: a LoRA student's merged copy (hf, onnx), else the run's student."""
        return self._merged or self.built.student  # type: ignore[return-value]

    def refusal(self, fmt: str) -> str | None:
        if fmt == "peft" and not has_lora(self.built.student):
            return ("only a LoRA student (student.args.lora) has adapters to write as a peft directory; this student "
                    "is a plain transformers model")
        return None

    def describe_student(self) -> str:
        config = self.student.hf_model.config
        layers = (f"{config.encoder_layers}+{config.decoder_layers} layers" if hasattr(config, "encoder_layers")
                  else f"{getattr(config, 'num_hidden_layers', '?')} layers")
        width = getattr(config, "d_model", None) or getattr(config, "hidden_size", "?")
        return f"{type(self.student.hf_model).__name__} ({layers}, width {width})"

    # ------------------------------------------------------------------ shared pieces
    @property
    def tokenizer(self) -> Any:
        return self.student.tokenizer or self.built.task.tokenizer

    def self_test_batches(self) -> list[SelfTestBatch]:
        """Batches of 8 of the first test items, with kd's decoding inputs and limit for each."""
        items = list(self.splits.test[:SELF_TEST_SENTENCES])
        data = self.built.task.data_config
        student = self.student
        batches = []
        for start in range(0, len(items), 8):
            chunk = items[start:start + 8]
            batch = self.built.task.collate(chunk)
            if student.is_encoder_decoder:
                prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
            else:  # a decoder-only row is prompt + target; kd continues its prompt, left-padded
                prompts = [_split_causal_row(ids, mask, labels)[2] for ids, mask, labels
                           in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]
                prompt_ids = pad_rows(prompts, student.pad_token_id, left=True)
                prompt_mask = pad_rows([[1] * len(prompt) for prompt in prompts], 0, left=True)
            limit = generation_length_limit(int(prompt_mask.sum(dim=1).max()), data.max_new_tokens,
                                            data.max_length_ratio, data.max_length_offset)
            batches.append(SelfTestBatch(chunk, batch, prompt_ids, prompt_mask, limit))
        return batches

    def _save_configs(self, directory: Path) -> Any:
        """config.json, generation_config.json and the tokenizer files (both formats carry them)."""
        student = self.student
        generation = export_generation_config(student, self.built.task.data_config.max_new_tokens)
        student.hf_model.config.save_pretrained(str(directory))
        generation.save_pretrained(str(directory))
        if self.tokenizer is None:
            return generation
        tokenizer = copy.deepcopy(self.tokenizer)
        # kd feeds its models input ids and attention masks only; a tokenizer that also returns token_type_ids
        # would make `model.generate(**tokenizer(texts))` fail on a seq2seq model.
        names = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask")]
        tokenizer.model_input_names = names
        tokenizer.init_kwargs["model_input_names"] = names
        tokenizer.save_pretrained(str(directory))
        return generation

    def write(self, fmt: str, directory: Path) -> ExportResult:
        if fmt == "peft":
            return self._write_peft(directory)
        merge_check: dict[str, Any] = {}
        if has_lora(self.built.student):
            merge_check = self._merge()
        generation = self._save_configs(directory)
        result = self._write_hf(directory, generation) if fmt == "hf" else self._write_onnx(directory, generation)
        result.checks.update(merge_check)
        return result

    # ------------------------------------------------------------------ LoRA students
    def _lora_logit_difference(self, other: Any) -> float:
        """Largest difference between the kd LoRA student's logits and ``other``'s (a transformers model or a
        PeftModel) on the self-test items, teacher-forced, real target positions only."""
        lora = self.built.student
        worst = 0.0
        for test in self.self_test_batches():
            batch = test.batch
            with torch.no_grad():
                ours = lora.forward_signals(batch, request(Signal.LOGITS)).logits
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                if lora.is_encoder_decoder:
                    inputs["decoder_input_ids"] = lora.decoder_inputs_from_labels(batch["labels"])
                theirs = other(**inputs, use_cache=False).logits
            valid = lora.target_labels(batch) != IGNORE_INDEX
            worst = max(worst, max_abs_difference(ours, theirs.numpy(), valid))
        return worst

    def _merge(self) -> dict[str, Any]:
        """Merge the adapters into a copy of the base (the formats then write that plain model) and check that it
        computes the LoRA student's logits."""
        lora = self.built.student
        merged = TextStudent(merged_copy(lora).eval(), lora.tokenizer)
        difference = self._lora_logit_difference(merged.hf_model)
        check_tolerance("the model with merged LoRA adapters", difference)
        self._merged = merged
        return {"lora": "adapters merged into the base weights (merge_and_unload)",
                "merged_logits_max_abs_difference": difference}

    def _write_peft(self, directory: Path) -> ExportResult:
        """adapter_config.json + adapter_model.safetensors (+ the base under base/ when the student's base was built
        from a config, so nothing else holds it), the tokenizer and generation config; checked by loading it with
        PeftModel.from_pretrained and comparing logits."""
        import json

        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        lora = self.built.student
        source = getattr(self.built.resolved.student_config, "source", None)
        lora.peft_model.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)  # peft's template; kd writes the model card
        if source is None:
            base_dir = directory / "base"
            base_copy(lora).save_pretrained(str(base_dir))
            base_name, base_location = "base", "EXPORT_DIR/base"
        else:
            base_name = base_location = str(source)
        config_path = directory / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = base_name
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        generation = export_generation_config(lora, self.built.task.data_config.max_new_tokens)
        generation.save_pretrained(str(directory))
        if self.tokenizer is not None:
            copy.deepcopy(self.tokenizer).save_pretrained(str(directory))
        auto = AutoModelForSeq2SeqLM if lora.is_encoder_decoder else AutoModelForCausalLM
        base_path = str(directory / "base") if source is None else str(source)
        base = auto.from_pretrained(base_path, local_files_only=True).eval()
        loaded = PeftModel.from_pretrained(base, str(directory)).eval()
        difference = self._lora_logit_difference(loaded)
        check_tolerance("the adapters loaded with PeftModel.from_pretrained", difference)
        usage = f"""With transformers and peft (no kd needed):

```python
from peft import PeftModel
from transformers import AutoTokenizer, {auto.__name__}

base = {auto.__name__}.from_pretrained("{base_location}")
model = PeftModel.from_pretrained(base, "EXPORT_DIR")      # or .merge_and_unload() for a plain model
tokenizer = AutoTokenizer.from_pretrained("EXPORT_DIR")
```"""
        files = sorted(p.name for p in directory.iterdir())
        tag = pipeline_task(self.built.task) if lora.is_encoder_decoder else "text-generation"
        return ExportResult("peft", files, {
            "logits_max_abs_difference": difference, "tolerance": ONNX_TOLERANCE,
            "compared": "teacher-forced logits of PeftModel.from_pretrained(base, export) and the kd LoRA student on "
                        "the first test items, real tokens only",
            "base": base_name}, usage, pipeline_tag=tag, tags=["peft", "lora", tag], limitations=self._limitations())

    def _limitations(self) -> list[str]:
        data = self.built.task.data_config
        return [f"kd stops decoding a batch after {data.max_length_ratio:g} x its longest source + "
                f"{data.max_length_offset} tokens (at most {data.max_new_tokens}); the generation config holds only "
                f"the fixed cap max_new_tokens={data.max_new_tokens}, so a sentence that does not end by kd's limit "
                f"is decoded further outside kd. Pass max_new_tokens to generate() for kd's exact limit.",
                f"Sources longer than {data.max_source_tokens} tokens were truncated by kd (data.max_source_tokens); "
                f"truncate them the same way (tokenizer(..., truncation=True, max_length={data.max_source_tokens})) "
                f"to reproduce kd's outputs."]

    # ------------------------------------------------------------------ hf
    def _write_hf(self, directory: Path, generation: Any) -> ExportResult:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        student = self.student
        student.hf_model.save_pretrained(str(directory))
        generation.save_pretrained(str(directory))  # save_pretrained of the model writes the model's own
        auto = AutoModelForSeq2SeqLM if student.is_encoder_decoder else AutoModelForCausalLM
        loaded = auto.from_pretrained(str(directory), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        compared = equal = 0
        ids_equal = True
        for test in self.self_test_batches():
            chunk, limit = test.items, test.limit
            encoded = tokenizer([item["source"] for item in chunk], truncation=True,
                                max_length=self.built.task.data_config.max_source_tokens)["input_ids"]
            ids_equal &= [list(ids) for ids in encoded] == [item["source_ids"] for item in chunk]
            with torch.no_grad():
                # kd's inputs: the sources (encoder-decoder), or the left-padded prompts a decoder-only model
                # continues; transformers returns the decoder start token, or the prompt, before the new tokens
                generated = loaded.generate(input_ids=test.prompt_ids, attention_mask=test.prompt_mask,
                                            max_new_tokens=limit)
                theirs = generated[:, 1:] if student.is_encoder_decoder else generated[:, test.prompt_ids.shape[1]:]
                ours = generate(student, test.prompt_ids, test.prompt_mask, max_new_tokens=limit).sequences
            compared += len(chunk)
            equal += sum(a == b for a, b in zip(_rows(theirs, student.eos_token_id),
                                                _rows(ours, student.eos_token_id)))
        if compared and (equal != compared or not ids_equal):
            raise RuntimeError(f"export self-test failed: transformers' greedy decoding of the export equals kd's "
                               f"on {equal} of {compared} test sources (tokenizer ids equal: {ids_equal}); the export "
                               f"was not written")
        task = pipeline_task(self.built.task) if student.is_encoder_decoder else "text-generation"
        auto_name = auto.__name__
        usage = f"""With transformers (no kd needed):

```python
from transformers import AutoTokenizer, {auto_name}

tokenizer = AutoTokenizer.from_pretrained("EXPORT_DIR")
model = {auto_name}.from_pretrained("EXPORT_DIR")
inputs = tokenizer(["Turn on the kitchen lights."], return_tensors="pt", padding=True)
outputs = model.generate(**inputs)  # greedy, with the decoding settings kd used (generation_config.json)
print(tokenizer.batch_decode(outputs, skip_special_tokens=True))
```

With transformers 4.x the same directory also loads as `pipeline("{task}", model="EXPORT_DIR")`
(transformers 5 removed the translation and summarization pipelines)."""
        files = sorted(p.name for p in directory.iterdir())
        return ExportResult("transformers", files, {
            "greedy_outputs_equal_kd": f"{equal}/{compared}", "tokenizer_ids_equal_kd": ids_equal,
            "compared_on": f"the first {compared} test sources, kd's decoding limit per batch of 8"},
            usage, pipeline_tag=task, tags=[task], limitations=self._limitations())

    # ------------------------------------------------------------------ onnx
    def _write_onnx(self, directory: Path, generation: Any) -> ExportResult:
        student = self.student
        batches = self.self_test_batches()
        sessions = export_onnx(student, directory, batches[0])
        differences: dict[str, float] = {}
        equal = {True: 0, False: 0}  # greedy outputs equal to kd's, with and without the key/value cache
        compared = 0
        for test in batches:
            for graph, difference in logit_differences(student, sessions, test).items():
                differences[graph] = max(differences.get(graph, 0.0), difference)
            ours = _rows(generate(student, test.prompt_ids, test.prompt_mask, max_new_tokens=test.limit).sequences,
                         student.eos_token_id)
            compared += len(test.items)
            for use_cache in equal:
                theirs = _rows(onnx_greedy(student, sessions, test, use_cache), student.eos_token_id)
                equal[use_cache] += sum(a == b for a, b in zip(theirs, ours))
        worst = max(differences.values())
        check_tolerance("the ONNX output (" + ", ".join(f"{k} {v:.3g}" for k, v in differences.items()) + ")", worst)
        if equal[True] != compared or equal[False] != compared:
            raise RuntimeError(f"export self-test failed: onnxruntime greedy decoding equals kd's on {equal[True]} of "
                               f"{compared} test items with the key/value cache and {equal[False]} without; the "
                               f"export was not written")
        speed = self._onnx_speed(directory, batches, sessions)
        seq2seq = student.is_encoder_decoder
        tag = pipeline_task(self.built.task) if seq2seq else "text-generation"
        files = sorted(p.name for p in directory.iterdir())
        return ExportResult("onnx", files, {
            "max_abs_difference": worst, "max_abs_difference_by_output": differences, "tolerance": ONNX_TOLERANCE,
            "compared": (("encoder hidden states and teacher-forced decoder logits (the whole prefix at once, and "
                          "token by token with past key/values)") if seq2seq else
                         ("teacher-forced logits (the whole sequence after an empty past, and its second half after "
                          "the first half's past key/values)")) + f" on the first {compared} test items, real tokens "
                                                                    f"only",
            "greedy_outputs_equal_kd": f"{equal[True]}/{compared}",
            "greedy_outputs_equal_kd_without_cache": f"{equal[False]}/{compared}"},
            self._onnx_usage(generation), pipeline_tag=tag, tags=["onnx", tag],
            limitations=self._limitations(), speed=speed)

    def _onnx_usage(self, generation: Any) -> str:
        student = self.student
        if student.is_encoder_decoder:
            return f"""With onnxruntime, numpy and the tokenizer (no kd or torch needed; `onnx_greedy_decode` is a
numpy loop you can copy from kd_plugins/text/export.py, and docs/export.md spells the cached loop out):

```python
import onnxruntime
from transformers import AutoTokenizer
from kd_plugins.text.export import onnx_greedy_decode

tokenizer = AutoTokenizer.from_pretrained("EXPORT_DIR")
encoder = onnxruntime.InferenceSession("EXPORT_DIR/{ENCODER_FILE}")
decoder = onnxruntime.InferenceSession("EXPORT_DIR/{DECODER_FILE}")
decoder_with_past = onnxruntime.InferenceSession("EXPORT_DIR/{DECODER_WITH_PAST_FILE}")
inputs = tokenizer(["Turn on the kitchen lights."], return_tensors="np", padding=True)
tokens = onnx_greedy_decode(encoder, decoder, inputs["input_ids"], inputs["attention_mask"],
                            decoder_with_past=decoder_with_past,
                            decoder_start_token_id={student.decoder_start_token_id},
                            eos_token_id={student.eos_token_id}, pad_token_id={student.pad_token_id},
                            max_new_tokens={generation.max_new_tokens})
print(tokenizer.batch_decode(tokens, skip_special_tokens=True))
```"""
        return f"""With onnxruntime, numpy and the tokenizer (no kd or torch needed; `onnx_causal_greedy_decode` is a
numpy loop you can copy from kd_plugins/text/export.py). Prompts are left-padded:

```python
import onnxruntime
from transformers import AutoTokenizer
from kd_plugins.text.export import onnx_causal_greedy_decode

tokenizer = AutoTokenizer.from_pretrained("EXPORT_DIR", padding_side="left")
model = onnxruntime.InferenceSession("EXPORT_DIR/{CAUSAL_FILE}")
inputs = tokenizer(["Once upon a time"], return_tensors="np", padding=True)
tokens = onnx_causal_greedy_decode(model, inputs["input_ids"], inputs["attention_mask"],
                                   eos_token_id={student.eos_token_id}, pad_token_id={student.pad_token_id},
                                   max_new_tokens={generation.max_new_tokens})
print(tokenizer.batch_decode(tokens, skip_special_tokens=True))
```"""

    def _onnx_speed(self, directory: Path, batches: Sequence[SelfTestBatch], sessions: dict[str, Any]
                    ) -> dict[str, Any]:
        """Greedy decoding time of the test batches in onnxruntime with and without the key/value cache, the
        student's and the teacher's (exported the same way into a scratch directory inside the staging one, removed
        afterwards)."""

        def timed(model: HFTextModel, graphs: dict[str, Any]) -> tuple[float, float]:
            """Seconds to decode every batch with the cache, and without it."""
            def decode_all(use_cache: bool) -> None:
                for test in batches:
                    onnx_greedy(model, graphs, test, use_cache)

            return seconds_per_call(lambda: decode_all(True)), seconds_per_call(lambda: decode_all(False))

        student_seconds, student_uncached = timed(self.student, sessions)
        speed: dict[str, Any] = {
            "onnxruntime greedy seconds, student": student_seconds,
            "onnxruntime greedy seconds without the key/value cache, student": student_uncached,
            "key/value cache speed-up, student": student_uncached / max(student_seconds, 1e-9),
            "sentences": sum(len(test.items) for test in batches)}
        teacher = self.built.teacher
        if isinstance(teacher, HFTextModel) and teacher.is_encoder_decoder == self.student.is_encoder_decoder:
            scratch = directory / ".teacher-onnx"
            scratch.mkdir()
            try:
                teacher_seconds, teacher_uncached = timed(teacher, export_onnx(teacher, scratch, batches[0]))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            speed.update({
                "onnxruntime greedy seconds, teacher": teacher_seconds,
                "onnxruntime greedy seconds without the key/value cache, teacher": teacher_uncached,
                "key/value cache speed-up, teacher": teacher_uncached / max(teacher_seconds, 1e-9),
                "onnxruntime speed-up over the teacher": teacher_seconds / max(student_seconds, 1e-9)})
        return speed


def export_onnx(model: HFTextModel, directory: Path, test: SelfTestBatch) -> dict[str, Any]:
    """The ONNX graphs of ``model`` (traced on ``test``'s batch) in ``directory``, opened as onnxruntime sessions by
    file name."""
    batch = test.batch
    if model.is_encoder_decoder:
        export_seq2seq_onnx(model, directory, batch["input_ids"], batch["attention_mask"],
                            model.decoder_inputs_from_labels(batch["labels"]))
        names: tuple[str, ...] = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
    else:
        export_causal_lm_onnx(model, directory, batch["input_ids"], batch["attention_mask"])
        names = (CAUSAL_FILE,)
    return {name: session(directory / name) for name in names}


def onnx_greedy(model: HFTextModel, sessions: dict[str, Any], test: SelfTestBatch, use_cache: bool) -> np.ndarray:
    """onnxruntime's greedy tokens for ``test`` (kd's inputs and limit), with or without the key/value cache."""
    ids, mask = test.prompt_ids.numpy(), test.prompt_mask.numpy()
    if model.is_encoder_decoder:
        return onnx_greedy_decode(sessions[ENCODER_FILE], sessions[DECODER_FILE], ids, mask,
                                  decoder_with_past=sessions[DECODER_WITH_PAST_FILE] if use_cache else None,
                                  decoder_start_token_id=model.decoder_start_token_id,
                                  eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id,
                                  max_new_tokens=test.limit)
    return onnx_causal_greedy_decode(sessions[CAUSAL_FILE], ids, mask, eos_token_id=model.eos_token_id,
                                     pad_token_id=model.pad_token_id, max_new_tokens=test.limit, use_cache=use_cache)


def logit_differences(model: HFTextModel, sessions: dict[str, Any], test: SelfTestBatch) -> dict[str, float]:
    """Largest difference between PyTorch's and each ONNX graph's outputs on ``test``'s teacher-forced batch (real
    tokens only), by output."""
    batch = test.batch
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        reference = model.forward_signals(batch, request(Signal.LOGITS)).logits
    if not model.is_encoder_decoder:
        graph = sessions[CAUSAL_FILE]
        positions = position_ids_of(mask)
        nothing = empty_past(graph, input_ids.shape[0])
        whole = run(graph, {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **nothing})
        half = max(1, input_ids.shape[1] // 2)
        first = run(graph, {"input_ids": input_ids[:, :half], "attention_mask": mask[:, :half],
                            "position_ids": positions[:, :half], **nothing})
        second = run(graph, {"input_ids": input_ids[:, half:], "attention_mask": mask,
                             "position_ids": positions[:, half:],
                             **_as_past([o.name for o in graph.get_outputs()][1:], first[1:])})
        valid = mask.bool()
        return {"logits": max_abs_difference(reference, whole[0], valid),
                "logits with past": max_abs_difference(reference, np.concatenate([first[0], second[0]], axis=1), valid)}
    encoder, decoder, later = sessions[ENCODER_FILE], sessions[DECODER_FILE], sessions[DECODER_WITH_PAST_FILE]
    with torch.no_grad():
        hidden = _Encoder(model)(input_ids, mask)
    onnx_hidden = run(encoder, {"input_ids": input_ids, "attention_mask": mask})[0]
    prefix = model.decoder_inputs_from_labels(batch["labels"])
    whole = run(decoder, {"input_ids": prefix, "encoder_hidden_states": onnx_hidden, "encoder_attention_mask": mask})
    outputs = run(decoder, {"input_ids": prefix[:, :1], "encoder_hidden_states": onnx_hidden,
                            "encoder_attention_mask": mask})
    past = _as_past([o.name for o in decoder.get_outputs()][1:], outputs[1:])
    stepped = [outputs[0]]
    for column in range(1, prefix.shape[1]):
        outputs = run(later, {"input_ids": prefix[:, column:column + 1], "encoder_attention_mask": mask, **past})
        past.update(_as_past([o.name for o in later.get_outputs()][1:], outputs[1:]))
        stepped.append(outputs[0])
    valid = batch["labels"] != IGNORE_INDEX
    return {"encoder": max_abs_difference(hidden, onnx_hidden, mask.bool()),
            "decoder logits": max_abs_difference(reference, whole[0], valid),
            "decoder logits with past": max_abs_difference(reference, np.concatenate(stepped, axis=1), valid)}


__all__ = ["CAUSAL_FILE", "DECODER_FILE", "DECODER_WITH_PAST_FILE", "ENCODER_FILE", "PIPELINE_TAGS",
           "SELF_TEST_SENTENCES", "SelfTestBatch", "TextStudentExporter", "causal_cache_names", "empty_past",
           "export_causal_lm_onnx", "export_generation_config", "export_onnx", "export_seq2seq_onnx", "greedy_loop",
           "logit_differences", "onnx_causal_greedy_decode", "onnx_greedy", "onnx_greedy_decode", "pipeline_task",
           "position_ids_of", "seq2seq_cache_names"]
