"""Exporting a text student: a transformers directory (``hf``) or encoder/decoder ONNX graphs (``onnx``).

``hf``: ``save_pretrained`` of the student's transformers model and tokenizer, with a
generation config holding the task's greedy decoding settings (decoder start, end and
pad ids, the pad token banned mid-sequence as kd's decoder does, ``max_new_tokens`` =
``data.max_new_tokens``, no forced end token), so ``AutoModelForSeq2SeqLM`` /
``AutoModelForCausalLM.from_pretrained(dir).generate(...)`` decodes as ``kd eval`` does.

``onnx`` (encoder-decoder students): ``encoder_model.onnx`` (``input_ids``,
``attention_mask`` -> ``last_hidden_state``) and ``decoder_model.onnx``
(``decoder_input_ids``, ``encoder_hidden_states``, ``encoder_attention_mask`` ->
``logits``), batch and lengths dynamic, beside the same config, generation config and
tokenizer files. The decoder takes no past key/values: each step re-reads the whole
prefix. :func:`onnx_greedy_decode` is greedy decoding on the two sessions (numpy only).

Both formats check themselves against the kd student on the task's test sources before
anything is renamed into place: the exported model's greedy tokens equal kd's, and the
ONNX logits are within :data:`~kdcore.export.onnx_tools.ONNX_TOLERANCE` of PyTorch's.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kdcore.export.base import Exporter, ExportResult
from kdcore.export.onnx_tools import (
    ONNX_TOLERANCE, check_tolerance, export_module, max_abs_difference, run, seconds_per_call, session,
)
from kdcore.interfaces import Student
from kd_plugins.text.generation import generate, generation_length_limit
from kd_plugins.text.models import HFTextModel, TextStudent

#: Test sources the self-test decodes (the first of the test split).
SELF_TEST_SENTENCES = 16
ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model.onnx"


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


class _Encoder(nn.Module):
    def __init__(self, model: HFTextModel) -> None:
        super().__init__()
        self.encoder = model.hf_model.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class _Decoder(nn.Module):
    """Decoder stack and LM head (the model's own projection, final-logits bias included)."""

    def __init__(self, model: HFTextModel) -> None:
        super().__init__()
        self.model = model
        self.decoder = model.hf_model.get_decoder()

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden_states,
                              encoder_attention_mask=encoder_attention_mask, use_cache=False,
                              return_dict=True).last_hidden_state
        return self.model.logits_from_hidden(hidden)


def export_encoder_decoder_onnx(model: HFTextModel, directory: Path, batch: dict[str, torch.Tensor]) -> None:
    """``encoder_model.onnx`` and ``decoder_model.onnx`` of ``model`` in ``directory`` (traced on ``batch``)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    encoder, decoder = _Encoder(model).eval(), _Decoder(model).eval()
    export_module(encoder, (input_ids, mask), directory / ENCODER_FILE, ["input_ids", "attention_mask"],
                  ["last_hidden_state"], {"input_ids": {0: "batch", 1: "source_length"},
                                          "attention_mask": {0: "batch", 1: "source_length"},
                                          "last_hidden_state": {0: "batch", 1: "source_length"}})
    with torch.no_grad():
        hidden = encoder(input_ids, mask)
    prefix = batch["decoder_input_ids"]
    export_module(decoder, (prefix, hidden, mask), directory / DECODER_FILE,
                  ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits"],
                  {"decoder_input_ids": {0: "batch", 1: "target_length"},
                   "encoder_hidden_states": {0: "batch", 1: "source_length"},
                   "encoder_attention_mask": {0: "batch", 1: "source_length"},
                   "logits": {0: "batch", 1: "target_length"}})


def onnx_greedy_decode(encoder: Any, decoder: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                       decoder_start_token_id: int, eos_token_id: int, pad_token_id: int,
                       max_new_tokens: int) -> np.ndarray:
    """Greedy decoding with onnxruntime sessions of ``encoder_model.onnx`` and ``decoder_model.onnx``.

    Returns ``(batch, steps)`` token ids without the start token; after its end token a
    row holds ``pad_token_id``. As kd's decoder, the pad token is never chosen mid-sequence
    (when it differs from the end token). Needs only numpy and onnxruntime.
    """
    input_ids, attention_mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
    hidden = encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
    prefix = np.full((input_ids.shape[0], 1), decoder_start_token_id, dtype=np.int64)
    finished = np.zeros(input_ids.shape[0], dtype=bool)
    produced = []
    for _ in range(max_new_tokens):
        logits = decoder.run(None, {"decoder_input_ids": prefix, "encoder_hidden_states": hidden,
                                    "encoder_attention_mask": attention_mask})[0][:, -1, :]
        if pad_token_id != eos_token_id:
            logits[:, pad_token_id] = -np.inf
        tokens = np.where(finished, pad_token_id, logits.argmax(axis=-1))
        produced.append(tokens)
        finished |= tokens == eos_token_id
        if finished.all():
            break
        prefix = np.concatenate([prefix, tokens[:, None]], axis=1)
    return np.stack(produced, axis=1) if produced else np.zeros((input_ids.shape[0], 0), dtype=np.int64)


def _rows(tokens: np.ndarray | torch.Tensor, eos: int | None) -> list[list[int]]:
    """Token rows cut after their first end token (padding dropped)."""
    rows = []
    for row in np.asarray(tokens).tolist():
        rows.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


class TextStudentExporter(Exporter):
    """Text students (``seq2seq``, ``causal-lm``)."""

    formats: ClassVar[dict[str, str]] = {
        "hf": "a transformers directory (config, safetensors, generation config, tokenizer) for from_pretrained",
        "onnx": "encoder and decoder ONNX graphs with the config and tokenizer; greedy decoding in onnxruntime",
    }

    @classmethod
    def fits(cls, student: Student) -> bool:
        return isinstance(student, TextStudent)

    @property
    def student(self) -> TextStudent:
        return self.built.student  # type: ignore[return-value]

    def refusal(self, fmt: str) -> str | None:
        if fmt == "onnx" and not self.student.is_encoder_decoder:
            return (f"ONNX export is implemented for encoder-decoder students; "
                    f"{type(self.student.hf_model).__name__} is decoder-only (export it as hf)")
        return None

    def describe_student(self) -> str:
        config = self.student.hf_model.config
        layers = (f"{config.encoder_layers}+{config.decoder_layers} layers" if hasattr(config, "encoder_layers")
                  else f"{getattr(config, 'num_hidden_layers', '?')} layers")
        return f"{type(self.student.hf_model).__name__} ({layers}, d_model {getattr(config, 'd_model', '?')})"

    # ------------------------------------------------------------------ shared pieces
    @property
    def tokenizer(self) -> Any:
        return self.student.tokenizer or self.built.task.tokenizer

    def _test_batches(self) -> list[tuple[list[Any], dict[str, torch.Tensor], int]]:
        """Batches of the first test items, each with kd's decoding limit for it."""
        items = list(self.splits.test[:SELF_TEST_SENTENCES])
        data = self.built.task.data_config
        batches = []
        for start in range(0, len(items), 8):
            chunk = items[start:start + 8]
            batch = self.built.task.collate(chunk)
            limit = generation_length_limit(int(batch["attention_mask"].sum(dim=1).max()), data.max_new_tokens,
                                            data.max_length_ratio, data.max_length_offset)
            batches.append((chunk, batch, limit))
        return batches

    def _save_configs(self, directory: Path) -> Any:
        """config.json, generation_config.json and the tokenizer files (both formats carry them)."""
        student = self.student
        generation = export_generation_config(student, self.built.task.data_config.max_new_tokens)
        student.hf_model.config.save_pretrained(str(directory))
        generation.save_pretrained(str(directory))
        tokenizer = copy.deepcopy(self.tokenizer)
        # kd feeds its models input ids and attention masks only; a tokenizer that also returns token_type_ids
        # would make `model.generate(**tokenizer(texts))` fail on a seq2seq model.
        names = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask")]
        tokenizer.model_input_names = names
        tokenizer.init_kwargs["model_input_names"] = names
        tokenizer.save_pretrained(str(directory))
        return generation

    def write(self, fmt: str, directory: Path) -> ExportResult:
        generation = self._save_configs(directory)
        if fmt == "hf":
            return self._write_hf(directory, generation)
        return self._write_onnx(directory, generation)

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
        for chunk, batch, limit in (self._test_batches() if student.is_encoder_decoder else []):
            encoded = tokenizer([item["source"] for item in chunk], truncation=True,
                                max_length=self.built.task.data_config.max_source_tokens)["input_ids"]
            ids_equal &= [list(ids) for ids in encoded] == [item["source_ids"] for item in chunk]
            with torch.no_grad():
                theirs = loaded.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         max_new_tokens=limit)[:, 1:]
                ours = generate(student, batch["input_ids"], batch["attention_mask"], max_new_tokens=limit).sequences
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
        batches = self._test_batches()
        _, first, _ = batches[0]
        traced = dict(first)
        traced["decoder_input_ids"] = student.decoder_inputs_from_labels(first["labels"])
        export_encoder_decoder_onnx(student, directory, traced)
        encoder, decoder = session(directory / ENCODER_FILE), session(directory / DECODER_FILE)
        worst_logits, equal, compared = 0.0, 0, 0
        for chunk, batch, limit in batches:
            prefix = student.decoder_inputs_from_labels(batch["labels"])
            with torch.no_grad():
                hidden = _Encoder(student)(batch["input_ids"], batch["attention_mask"])
                logits = _Decoder(student)(prefix, hidden, batch["attention_mask"])
            onnx_hidden = run(encoder, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
            onnx_logits = run(decoder, {"decoder_input_ids": prefix, "encoder_hidden_states": onnx_hidden,
                                        "encoder_attention_mask": batch["attention_mask"]})[0]
            target_valid = batch["labels"] != -100
            worst_logits = max(worst_logits, max_abs_difference(logits, onnx_logits, target_valid),
                               max_abs_difference(hidden, onnx_hidden, batch["attention_mask"].bool()))
            ours = generate(student, batch["input_ids"], batch["attention_mask"], max_new_tokens=limit).sequences
            theirs = self._greedy(encoder, decoder, batch, limit)
            compared += len(chunk)
            equal += sum(a == b for a, b in zip(_rows(theirs, student.eos_token_id), _rows(ours, student.eos_token_id)))
        check_tolerance("the ONNX encoder/decoder output", worst_logits)
        if equal != compared:
            raise RuntimeError(f"export self-test failed: onnxruntime greedy decoding equals kd's on {equal} of "
                               f"{compared} test sources; the export was not written")
        speed = self._onnx_speed(directory, batches)
        usage = f"""With onnxruntime and the tokenizer (no kd or torch needed; `onnx_greedy_decode` is a
numpy loop you can copy from kd_plugins/text/export.py):

```python
import onnxruntime
from transformers import AutoTokenizer
from kd_plugins.text.export import onnx_greedy_decode

tokenizer = AutoTokenizer.from_pretrained("EXPORT_DIR")
encoder = onnxruntime.InferenceSession("EXPORT_DIR/{ENCODER_FILE}")
decoder = onnxruntime.InferenceSession("EXPORT_DIR/{DECODER_FILE}")
inputs = tokenizer(["Turn on the kitchen lights."], return_tensors="np", padding=True)
tokens = onnx_greedy_decode(encoder, decoder, inputs["input_ids"], inputs["attention_mask"],
                            decoder_start_token_id={student.decoder_start_token_id},
                            eos_token_id={student.eos_token_id}, pad_token_id={student.pad_token_id},
                            max_new_tokens={generation.max_new_tokens})
print(tokenizer.batch_decode(tokens, skip_special_tokens=True))
```"""
        files = sorted(p.name for p in directory.iterdir())
        return ExportResult("onnx", files, {
            "max_abs_difference": worst_logits, "tolerance": ONNX_TOLERANCE,
            "compared": "encoder hidden states and teacher-forced decoder logits on the first "
                        f"{compared} test sources (real tokens only)",
            "greedy_outputs_equal_kd": f"{equal}/{compared}"},
            usage, pipeline_tag=pipeline_task(self.built.task), tags=["onnx", pipeline_task(self.built.task)],
            limitations=[*self._limitations(),
                         "The ONNX decoder takes no past key/values: every step re-reads the whole prefix, so long "
                         "outputs decode more slowly than with a key/value cache (kd and transformers use one)."],
            speed=speed)

    def _greedy(self, encoder: Any, decoder: Any, batch: dict[str, torch.Tensor], limit: int) -> np.ndarray:
        student = self.student
        return onnx_greedy_decode(encoder, decoder, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                  decoder_start_token_id=student.decoder_start_token_id,
                                  eos_token_id=student.eos_token_id, pad_token_id=student.pad_token_id,
                                  max_new_tokens=limit)

    def _onnx_speed(self, directory: Path, batches: Sequence[tuple[list[Any], dict[str, torch.Tensor], int]]
                    ) -> dict[str, Any]:
        """Greedy decoding time of the test batches in onnxruntime, the student's and the teacher's (exported
        the same way into a scratch directory inside the staging one, removed afterwards)."""
        import shutil

        def timed(model: HFTextModel, folder: Path) -> float:
            encoder, decoder = session(folder / ENCODER_FILE), session(folder / DECODER_FILE)

            def decode_all() -> None:
                for _, batch, limit in batches:
                    onnx_greedy_decode(encoder, decoder, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                       decoder_start_token_id=model.decoder_start_token_id,
                                       eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id,
                                       max_new_tokens=limit)
            return seconds_per_call(decode_all)

        student_seconds = timed(self.student, directory)
        speed: dict[str, Any] = {"onnxruntime greedy seconds, student": student_seconds,
                                 "sentences": sum(len(chunk) for chunk, _, _ in batches)}
        teacher = self.built.teacher
        if isinstance(teacher, HFTextModel) and teacher.is_encoder_decoder:
            scratch = directory / ".teacher-onnx"
            scratch.mkdir()
            try:
                _, first, _ = batches[0]
                traced = dict(first)
                traced["decoder_input_ids"] = teacher.decoder_inputs_from_labels(first["labels"])
                export_encoder_decoder_onnx(teacher, scratch, traced)
                teacher_seconds = timed(teacher, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            speed["onnxruntime greedy seconds, teacher"] = teacher_seconds
            speed["onnxruntime speed-up over the teacher"] = teacher_seconds / max(student_seconds, 1e-9)
        return speed


__all__ = ["PIPELINE_TAGS", "SELF_TEST_SENTENCES", "TextStudentExporter", "export_encoder_decoder_onnx",
           "export_generation_config", "onnx_greedy_decode", "pipeline_task"]
