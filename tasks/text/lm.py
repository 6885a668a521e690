"""Task ``lm``: prompt -> completion distillation of decoder-only language models.

A row is a prompt and its completion; a decoder-only model reads ``prompt + completion`` and learns only the
completion (the prompt's labels are -100: :func:`~.collate.collate_causal`).

Data: the embedded default is instruction-style text built from the two corpora the text tasks ship, "Translate to
German: <Home Assistant string>" -> its German translation and "Write a one-line summary of: <name>: <docstring
body>" -> the docstring's first sentence, interleaved; or the user's files (``data.corpus: files``) in the text tasks'
formats (TSV, CSV, JSONL, datasets saved to disk) with ``prompt``/``completion`` columns (also ``source``/``target``,
``instruction``/``output`` and chat records, a ``messages`` list whose last message is the assistant's reply). Chat
records, and every prompt with ``data.prompt_format: chat``, are rendered with the tokenizer's chat template or
``data.chat_template``.

Metrics (greedy completions; a decoder-only model has no beam search here): ROUGE-L F1 (the selection metric) and
chrF of the completions against the references, overall and per instruction of the embedded default, the model's
perplexity on the reference completions, the share of distinct outputs and the generation speed; with a teacher
model, the student's agreement with the teacher's next-token choices on the references
(:meth:`LMTask.compare_models`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from kdcore.batches import move_to_device
from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Model
from kdcore.objectives.token_alignment import Span

from .base import TextTask
from .collate import collate_causal, collate_prompts
from .data_config import TextDataConfig
from .decoding import decode_items
from .encoding import NO_TEXT
from .files import Layout, TextRecord
from .presets import text_presets

log = logging.getLogger(__name__)

#: The instructions of the embedded default: the prompt's first words, and which corpus gives the examples.
INSTRUCTIONS: dict[str, str] = {"translate": "Translate to German: ", "summarize": "Write a one-line summary of: "}


def end_with_eos(ids: list[int], offsets: list[Span] | None, eos: int | None, text: str,
                 limit: int) -> tuple[list[int], list[Span] | None]:
    """Completion ids (at most ``limit``) that end with ``eos``, and their character offsets in ``text`` when given.

    The appended end-of-sequence token marks the end of the text, ``(len(text), len(text))``, when the kept tokens
    read all of it, else it covers no text (the convention of :mod:`kd_tasks.text.encoding`).
    """
    if eos is None or (ids and ids[-1] == eos):
        return ids, offsets
    kept = ids[:limit - 1]
    if offsets is None:
        return kept + [eos], None
    kept_offsets = [tuple(span) for span in offsets[:len(kept)]]
    whole = len(kept) == len(ids) and (not kept_offsets or kept_offsets[-1][1] >= len(text.rstrip()))
    return kept + [eos], kept_offsets + [(len(text), len(text)) if whole else NO_TEXT]


class LMDataConfig(TextDataConfig):
    """``data.*`` of ``lm``: ``max_source_tokens`` limits the prompt, ``max_target_tokens`` the completion."""

    # Translation only by default: on the mix, a 3-layer d=256 teacher trained within the cold-run budget (1,242
    # steps of 32) was no better than the 2-layer d=128 student trained from scratch (test perplexity 183 vs 171), and
    # both wrote one generic sentence for every docstring; the docstring share (long prompts) took most of its tokens.
    instructions: list[Literal["translate", "summarize"]] = Field(
        default_factory=lambda: ["translate"],
        description="embedded default: which instructions it mixes (translate, summarize or both)")
    max_train_per_instruction: PositiveInt | None = Field(
        None, description="embedded default: at most this many training examples of each instruction")
    prompt_format: Literal["plain", "chat"] = Field(
        "plain", description="plain: the prompt text as it is; chat: the prompt as a user message rendered with the "
                             "chat template (records with a 'messages' list are always rendered)")
    chat_template: str | None = Field(
        None, description="a Jinja chat template (text, or the path of a file holding it) used instead of the "
                          "tokenizer's own")
    valid_size: PositiveInt = Field(200, description="held-out valid examples when no valid files are given")
    test_size: PositiveInt = Field(400, description="held-out test examples when no test files are given")
    # Training cost grows with the tokens per batch: docstring prompts are long, so 48 prompt tokens (a summary can be
    # written from a docstring's first lines) and 40 completion tokens; the truncation counts are logged at start-up.
    max_source_tokens: PositiveInt = Field(48, description="longer prompts are truncated (counted, logged)")
    max_target_tokens: PositiveInt = Field(40, description="longer completions are truncated (counted, logged)")
    eval_beams: list[PositiveInt] = Field(default_factory=lambda: [1],
                                          description="decoder-only models are scored on greedy completions: [1]")
    max_length_ratio: float = Field(1.0, gt=0, description="complete at most ratio x longest prompt + offset tokens")
    max_length_offset: int = Field(16, ge=0)
    max_new_tokens: PositiveInt = Field(40, description="hard cap on completion tokens")

    @field_validator("eval_beams", "valid_beams")
    @classmethod
    def _greedy_only(cls, value: list[int]) -> list[int]:
        if sorted(set(value)) != [1]:
            raise ValueError("task 'lm' scores greedy completions only (kd's beam search decodes encoder-decoder "
                             "models); set it to [1]")
        return [1]

    @model_validator(mode="after")
    def _instructions_given(self) -> "LMDataConfig":
        if not self.instructions:
            raise ValueError("data.instructions is empty: name 'translate', 'summarize' or both")
        return self


def interleave(*lists: Sequence[TextRecord]) -> list[TextRecord]:
    """One record of each list in turn (a mixed stream whose every prefix has each instruction's share)."""
    merged: list[TextRecord] = []
    for index in range(max((len(records) for records in lists), default=0)):
        merged.extend(records[index] for records in lists if index < len(records))
    return merged


def read_chat_template(value: str) -> str:
    """``data.chat_template``: a file's text where ``value`` names a file, else ``value`` itself."""
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


class LMTask(TextTask):
    """Prompt -> completion distillation of decoder-only models: ROUGE-L/chrF, perplexity, teacher agreement."""

    name: ClassVar[str] = "lm"
    description: ClassVar[str] = ("Decoder-only prompt -> completion (embedded instruction data or your JSONL/CSV/chat "
                                  "files): ROUGE-L/chrF of greedy completions, perplexity, teacher agreement")
    DataConfig = LMDataConfig
    metric: ClassVar[str] = "rougeL"
    item_metrics: ClassVar[tuple[str, ...]] = ("rougeL", "chrf")
    greater_is_better: ClassVar[bool] = True
    #: Its models are decoder-only (the task-trained teacher is a causal LM).
    decoder_only: ClassVar[bool] = True
    imitation_beta_base: ClassVar[float] = 10.0
    layouts: ClassVar[tuple[Layout, ...]] = (  # type: ignore[misc]
        Layout("chat messages", "messages", "messages", "id"),
        Layout("prompt/completion", "prompt", "completion", "id"),
        Layout("instruction/output", "instruction", "output", "id"),
        Layout("source/target", "source", "target", "id"))
    eval_file_roles: ClassVar[tuple[str, ...]] = ("source", "reference")
    #: Teacher stage defaults (docs/lm.md, "Sizes and times").
    teacher_defaults: ClassVar[dict[str, Any]] = {"layers": 4, "d_model": 256, "heads": 4, "ffn_dim": 1024,
                                                  "dropout": 0.0, "train_steps": 2000, "batch_size": 64, "lr": 2e-3,
                                                  "warmup_steps": 200, "precision": "native-bf16",
                                                  "time_budget_minutes": 13}
    presets: ClassVar[dict[str, dict[str, Any]]] = text_presets("lm")

    # ------------------------------------------------------------------ data
    def embedded_records(self) -> dict[str, list[TextRecord]]:
        from .summarization import document_title
        from .summarization_data import load_summarization_corpus
        from .translation_data import load_translation_corpus

        config: LMDataConfig = self.data_config  # type: ignore[assignment]
        per_instruction: dict[str, dict[str, list[TextRecord]]] = {}
        if "translate" in config.instructions:
            corpus = load_translation_corpus(self.cache_dir)
            per_instruction["translate"] = {
                split: [{"id": f"translate:{row['id']}", "source": INSTRUCTIONS["translate"] + row["source"],
                         "target": row["target"], "origin": f"translation corpus {row['id']}"} for row in rows]
                for split, rows in (("train", corpus.train), ("valid", corpus.valid), ("test", corpus.test))}
        if "summarize" in config.instructions:
            corpus = load_summarization_corpus(self.cache_dir)
            per_instruction["summarize"] = {
                split: [{"id": f"summarize:{row['id']}",
                         "source": f"{INSTRUCTIONS['summarize']}{document_title(row['id'])}: {row['document']}",
                         "target": row["summary"], "origin": f"docstring corpus {row['id']}"} for row in rows]
                for split, rows in (("train", corpus.train), ("valid", corpus.valid), ("test", corpus.test))}
        cap = config.max_train_per_instruction
        splits = {split: interleave(*(records[split][:cap] if split == "train" and cap else records[split]
                                      for records in per_instruction.values()))
                  for split in ("train", "valid", "test")}
        splits["valid"] = splits["valid"][:config.valid_size]
        splits["test"] = splits["test"][:config.test_size]
        self.corpus_info["instructions"] = {name: {split: len(rows) for split, rows in records.items()}
                                            for name, records in per_instruction.items()}
        return splits

    def records(self) -> dict[str, list[TextRecord]]:
        """The splits with every prompt in its final form (chat records and ``prompt_format: chat`` rendered)."""
        if self._records is None:
            records = super().records()
            config: LMDataConfig = self.data_config  # type: ignore[assignment]
            if config.prompt_format == "chat" or any("messages" in r for rows in records.values() for r in rows):
                render = self._chat_renderer()
                for rows in records.values():
                    for record in rows:
                        messages = record.pop("messages", None) or [{"role": "user", "content": record["source"]}]
                        record["source"] = render(messages)  # type: ignore[assignment]
            self._records = records
        return self._records

    def _chat_renderer(self) -> Any:
        """``messages -> prompt text`` with the chat template (``data.chat_template``, else the tokenizer's)."""
        config: LMDataConfig = self.data_config  # type: ignore[assignment]
        template = read_chat_template(config.chat_template) if config.chat_template else None
        if template is None and config.tokenizer != "train":
            from kd_plugins.text.models import load_tokenizer

            template = getattr(load_tokenizer(config.tokenizer, local_files_only=config.local_files_only),
                               "chat_template", None)
        if not template:
            where = ("the tokenizer kd trains on the data (data.tokenizer: train) has none"
                     if config.tokenizer == "train" else f"the tokenizer '{config.tokenizer}' has none")
            raise KDUserError(f"Task 'lm' renders chat prompts (chat records with 'messages', or data.prompt_format: "
                              f"chat) with a chat template, but {where}. Set data.chat_template to a Jinja template "
                              f"(its text or a file), use a tokenizer that ships one (data.tokenizer=DIR), or use "
                              f"plain prompts (data.prompt_format: plain, prompt/completion records).")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The sandboxed environment transformers renders chat templates with: a template cannot run code.
        compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        return lambda messages: compiled.render(messages=messages, add_generation_prompt=True, bos_token="",
                                                eos_token="")

    def _encode(self, records: Sequence[TextRecord], split: str, *, training: bool) -> list[dict[str, Any]]:
        items = super()._encode(records, split, training=training)
        limit = self.data_config.max_target_tokens
        sides = [("target_ids", "target_offsets", self.tokenizer.eos_token_id)]
        if self.data_config.separate_teacher_tokenizer:
            sides.append(("teacher_target_ids", "teacher_target_offsets", self.teacher_tokenizer.eos_token_id))
        for item in items:
            # A completion must end with the end-of-sequence token (the model learns to stop); tokenizers such as
            # GPT-2's do not append one. Both readings of a separate teacher tokenizer, offsets included.
            for ids_key, offsets_key, eos in sides:
                item[ids_key], offsets = end_with_eos(item[ids_key], item.get(offsets_key), eos, item["target"], limit)
                if offsets is not None:
                    item[offsets_key] = offsets
            item["instruction"] = str(item["id"]).split(":", 1)[0] if self.data_config.corpus == "embedded" else ""
        return items

    # ------------------------------------------------------------------ batches
    def collate(self, items: Sequence[Any]) -> Batch:
        teacher_pad = int(self.teacher_tokenizer.pad_token_id) if self.data_config.separate_teacher_tokenizer else None
        return collate_causal(items, int(self.tokenizer.pad_token_id), teacher_pad)

    def epoch_batches(self, dataset: Sequence[Any], batch_size: int,
                      generator: torch.Generator) -> list[list[int]] | None:
        from kd_tasks.sampling import length_bucketed_batches

        from .base import BUCKET_POOL_BATCHES

        lengths = [(len(item["source_ids"]) + len(item["target_ids"]), len(item["target_ids"])) for item in dataset]
        return length_bucketed_batches(lengths, batch_size, BUCKET_POOL_BATCHES, generator)

    # ------------------------------------------------------------------ evaluation
    def score(self, hypotheses: list[str], references: list[str], suffix: str) -> dict[str, float]:
        from sacrebleu.metrics import CHRF

        from .metrics import rouge_scores

        scores = {"rougeL": rouge_scores(hypotheses, references)["rougeL"],
                  "chrf": float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)}
        return {f"{name}{suffix}": value for name, value in scores.items()}

    def _reading(self, model: Model, dataset: Sequence[Any]) -> tuple[Sequence[Any], Any]:
        if self.reads_teacher_view(model):
            return self.teacher_items(dataset), self.teacher_tokenizer
        return dataset, self.tokenizer

    def evaluate(self, model: Model, dataset: Sequence[Any], device: torch.device, batch_size: int) -> dict[str, float]:
        from kd_plugins.text.models import HFTextModel

        if not dataset:
            raise KDUserError("Task 'lm': nothing to evaluate (empty dataset).")
        if not isinstance(model, HFTextModel) or model.is_encoder_decoder:
            raise KDUserError(f"Task 'lm' evaluates decoder-only text models (teacher/student 'causal-lm'); got "
                              f"{type(getattr(model, 'hf_model', model)).__name__}.")
        items, tokenizer = self._reading(model, dataset)
        metrics = self.reference_likelihood(model, items, device, batch_size)
        # The text tasks' evaluation decoding, on left-padded prompts: a decoder-only model's greedy decoding
        # continues them (decode -> generate).
        hypotheses, speed = decode_items(model, items, lambda chunk: collate_prompts(chunk, model.pad_token_id),
                                         tokenizer, self.data_config, device, batch_size, num_beams=1)
        references = [item["target"] for item in items]
        metrics.update(self.score(hypotheses, references, ""))
        self.record_test_items("greedy", items, hypotheses, references)
        groups = sorted({item.get("instruction", "") for item in items} - {""})
        for group in groups if len(groups) > 1 else []:
            chosen = [i for i, item in enumerate(items) if item.get("instruction") == group]
            metrics.update(self.score([hypotheses[i] for i in chosen], [references[i] for i in chosen], f"_{group}"))
        metrics.update({f"greedy_{key}": value for key, value in speed.items()})
        metrics["distinct_outputs"] = len(set(hypotheses)) / len(hypotheses)
        metrics["empty_outputs"] = sum(not text for text in hypotheses) / len(hypotheses)
        metrics["examples"] = float(len(items))
        return metrics

    def _chunks(self, items: Sequence[Any], batch_size: int) -> list[list[int]]:
        order = sorted(range(len(items)), key=lambda i: len(items[i]["source_ids"]) + len(items[i]["target_ids"]))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    @torch.no_grad()
    def reference_likelihood(self, model: Any, items: Sequence[Any], device: torch.device,
                             batch_size: int) -> dict[str, float]:
        """The model's mean negative log-likelihood per reference completion token and its perplexity."""
        from kdcore.signals import IGNORE_INDEX, Signal, request

        total, count = 0.0, 0
        for indices in self._chunks(items, batch_size):
            batch = move_to_device(collate_causal([items[i] for i in indices], model.pad_token_id), device)
            logits = model.forward_signals(batch, request(Signal.LOGITS)).logits.float()
            labels = model.target_labels(batch)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                             ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
        nll = total / max(1, count)
        return {"reference_nll": nll, "perplexity": math.exp(min(nll, 50.0))}

    @torch.no_grad()
    def compare_models(self, student: Model, teacher: Any, dataset: Sequence[Any], device: torch.device,
                       batch_size: int) -> dict[str, float]:
        """``teacher_token_agreement``: the share of reference completion tokens at which the student's and the
        teacher's most likely next token are the same (both read the references; one tokenizer only)."""
        from kd_plugins.text.models import HFTextModel
        from kdcore.signals import IGNORE_INDEX, Signal, request

        if not isinstance(teacher, HFTextModel) or self.data_config.separate_teacher_tokenizer or not dataset:
            return {}
        agree = count = 0
        for indices in self._chunks(dataset, batch_size):
            batch = move_to_device(self.collate([dataset[i] for i in indices]), device)
            student_choice = student.forward_signals(batch, request(Signal.LOGITS)).logits.argmax(-1)  # type: ignore[attr-defined]
            teacher_choice = teacher.forward_signals(batch, request(Signal.LOGITS)).logits.argmax(-1)
            scored = student.target_labels(batch) != IGNORE_INDEX  # type: ignore[attr-defined]
            agree += int(((student_choice == teacher_choice) & scored).sum())
            count += int(scored.sum())
        return {"teacher_token_agreement": agree / max(1, count)}


__all__ = ["INSTRUCTIONS", "LMDataConfig", "LMTask", "interleave", "read_chat_template"]
