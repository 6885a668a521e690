"""Text teachers and students wrapping Hugging Face transformers models.

Any ``AutoModelForSeq2SeqLM`` (Marian, BART, T5, ...) or ``AutoModelForCausalLM``
becomes a :class:`~kdcore.interfaces.Teacher` or :class:`~kdcore.interfaces.Student`
that answers :class:`~kdcore.signals.SignalRequest`s:

* ``Signal.LOGITS``: ``logits`` of shape ``(B, T, V)``; position ``t`` predicts
  ``target_labels(batch)[:, t]``.
* ``Signal.HIDDEN_STATES``: the decoder's hidden states (embeddings first).
* ``Signal.FINAL_HIDDEN``: ``final_hidden`` ``(B, T, H)`` (the decoder output that
  the LM head reads), ``output_weight`` ``(V, H)`` and ``output_bias`` ``(V,)`` or
  None, such that ``final_hidden @ output_weight.T + output_bias`` equals the
  logits. T5's tied-embedding rescaling (``d_model ** -0.5``) is folded into
  ``output_weight``; Marian/BART's ``final_logits_bias`` into ``output_bias``.
  When only ``FINAL_HIDDEN`` is requested the LM head is not run at all, so a
  fused objective never materialises the ``(B, T, V)`` logits.

Batch keys (seq2seq): ``input_ids``, ``attention_mask``, ``labels`` (padded with
-100) and optionally ``decoder_input_ids`` (otherwise derived from ``labels`` by
the model's own right shift, as Hugging Face does) and ``decoder_attention_mask``.
Batch keys (causal LM): ``input_ids``, ``attention_mask``, ``labels`` aligned with
``input_ids`` (Hugging Face convention, -100 on the prompt and padding); the
model's :meth:`HFTextModel.target_labels` shifts them to align with the logits.
A teacher with a tokenizer of its own reads ``teacher_input_ids``,
``teacher_attention_mask`` and ``teacher_labels`` instead (:func:`teacher_reading`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, BuildContext, Model, ModelFactory, Student, Teacher
from kdcore.objectives.library import TOKENIZER_VOCAB_SIZE
from kdcore.provenance import weights_sha256
from kdcore.signals import IGNORE_INDEX, Signal, SignalRequest, Signals, next_token_aligned
from kd_plugins.text.lora import LoraSettings, prepare_student
from kd_plugins.text.teacher_init import init_student_from_teacher

log = logging.getLogger(__name__)


class HFTextModel:
    """Shared behaviour of the text teacher and student (mixed in before Teacher/Student).

    ``hf_model`` is the wrapped transformers model, ``tokenizer`` an optional
    Hugging Face tokenizer (kept for decoding and vocabulary checks; not a module).
    """

    hf_model: Any
    tokenizer: Any

    def _init_text_model(self, hf_model: Any, tokenizer: Any = None) -> None:
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        config = hf_model.config
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        generation = getattr(hf_model, "generation_config", None)

        def pick(name: str) -> int | None:
            value = getattr(config, name, None)
            if value is None and generation is not None:
                value = getattr(generation, name, None)
            if value is None and tokenizer is not None:
                value = getattr(tokenizer, name, None)
            if isinstance(value, (list, tuple)):  # some configs list several eos ids; the first ends a sequence
                value = value[0] if value else None
            return None if value is None else int(value)

        self.eos_token_id = pick("eos_token_id")
        self.pad_token_id = pick("pad_token_id")
        if self.pad_token_id is None:
            # GPT-style models have no pad token; any id works as padding because padded
            # positions are masked everywhere (attention mask, -100 labels).
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0
        start = pick("decoder_start_token_id")
        self.decoder_start_token_id = start if start is not None else self.pad_token_id

    # ------------------------------------------------------------------ shapes and labels
    @property
    def vocab_size(self) -> int:
        """Size of the output distribution (rows of the LM head)."""
        return int(self.hf_model.get_output_embeddings().weight.shape[0])

    def decoder_inputs_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``labels`` (-100 padded): the model's own right shift (seq2seq only)."""
        prepare = getattr(self.hf_model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None:
            return prepare(labels=labels)
        shifted = labels.new_full(labels.shape, self.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.pad_token_id)

    def target_labels(self, batch: Batch) -> torch.Tensor:
        """Labels aligned with the logits this model returns (``-100`` = no target)."""
        return self.align_with_logits(batch["labels"], IGNORE_INDEX)

    def align_with_logits(self, per_label: torch.Tensor, fill: int) -> torch.Tensor:
        """``per_label`` ``(B, T, ...)``, given per position of ``batch["labels"]``, moved to the logit position that
        predicts that label; ``fill`` where no label is predicted.

        Causal LM: logits at position t predict token t+1 (the shift Hugging Face does inside its loss).
        """
        return next_token_aligned(per_label, fill, self.is_encoder_decoder)

    # ------------------------------------------------------------------ output projection
    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight (V, H), bias (V,) or None)`` with ``logits = final_hidden @ weight.T + bias``."""
        config = self.hf_model.config
        if getattr(config, "final_logit_softcapping", None) is not None:
            raise KDUserError(
                f"The {type(self.hf_model).__name__} model caps its logits with tanh (final_logit_softcapping = "
                f"{config.final_logit_softcapping}), so they are not a linear function of the final hidden state and "
                f"the fused objective path cannot be used. Set the method's 'fused' option to false.")
        head = self.hf_model.get_output_embeddings()
        weight = head.weight
        if getattr(config, "scale_decoder_outputs", False):
            # T5 with tied embeddings multiplies the decoder output by d_model**-0.5 before the
            # LM head; (h * s) @ W.T == h @ (s * W).T, so the scale is folded into the weight.
            weight = weight * (config.d_model ** -0.5)
        bias = getattr(head, "bias", None)
        final_logits_bias = getattr(self.hf_model, "final_logits_bias", None)  # Marian, BART, Pegasus, ...
        if final_logits_bias is not None:
            final_logits_bias = final_logits_bias.reshape(-1)
            bias = final_logits_bias if bias is None else bias + final_logits_bias
        return weight, bias

    def logits_from_hidden(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The LM head applied to ``final_hidden`` (what the wrapped model's forward returns as logits)."""
        weight, bias = self.output_projection()
        return F.linear(final_hidden, weight.to(final_hidden.dtype), None if bias is None else bias.to(final_hidden.dtype))

    # ------------------------------------------------------------------ forward
    def _decoder_pass(self, batch: Batch, want_hidden: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Final hidden state (before the LM head) and, if asked, all decoder hidden states."""
        model = self.hf_model
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if self.is_encoder_decoder:
            decoder_input_ids = batch.get("decoder_input_ids")
            if decoder_input_ids is None:
                if batch.get("labels") is None:
                    raise ValueError("a seq2seq batch needs 'labels' or 'decoder_input_ids'")
                decoder_input_ids = self.decoder_inputs_from_labels(batch["labels"])
            encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            # The decoder stack alone (not the full model) so the LM head runs only when logits are wanted.
            decoder_outputs = model.get_decoder()(
                input_ids=decoder_input_ids,
                attention_mask=batch.get("decoder_attention_mask"),
                encoder_hidden_states=encoder_outputs.last_hidden_state,
                encoder_attention_mask=attention_mask,
                output_hidden_states=want_hidden,
                use_cache=False,
                return_dict=True,
            )
            return decoder_outputs.last_hidden_state, decoder_outputs.hidden_states
        outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want_hidden,
                                   use_cache=False, return_dict=True)
        return outputs.last_hidden_state, outputs.hidden_states

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        """Logits / decoder hidden states / final hidden + output projection, as requested."""
        want_hidden = request.wants(Signal.HIDDEN_STATES)
        final_hidden, hidden_states = self._decoder_pass(batch, want_hidden)
        signals = Signals()
        if request.wants(Signal.LOGITS):
            signals.logits = self.logits_from_hidden(final_hidden)
        if want_hidden and hidden_states is not None:
            layers = request.hidden_layers
            signals.hidden_states = tuple(hidden_states) if layers is None else tuple(hidden_states[i] for i in layers)
        if request.wants(Signal.FINAL_HIDDEN):
            signals.final_hidden = final_hidden
            signals.output_weight, signals.output_bias = self.output_projection()
        tokens = self.tokenizer_size
        if tokens is not None and tokens < self.vocab_size:
            # The head's rows beyond the tokenizer are padding (Qwen-style heads): the objectives leave them out.
            signals.extra[TOKENIZER_VOCAB_SIZE] = tokens
        return signals

    @property
    def tokenizer_size(self) -> int | None:
        """How many tokens the model's tokenizer has (None without one)."""
        return None if self.tokenizer is None else len(self.tokenizer)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """The weights' sha256 (cache keys): :func:`kdcore.provenance.weights_sha256`, the digest provenance.json and
        a teacher store record for the same teacher, so a stored teacher and the live one share seq-kd's cache."""
        return weights_sha256(self)  # type: ignore[arg-type]  # the concrete text models are nn.Modules

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the transformers model (and tokenizer, when there is one) in Hugging Face layout."""
        self.hf_model.save_pretrained(str(directory))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(directory))


def teacher_reading(batch: Batch) -> Batch:
    """The batch as the teacher reads it: its own token ids where the task tokenised for it with a tokenizer of its
    own (``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``), else the batch itself."""
    if batch.get("teacher_input_ids") is None:
        return batch
    return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch.get("teacher_attention_mask"),
            "labels": batch["teacher_labels"], "ids": batch.get("ids")}


class TextTeacher(HFTextModel, Teacher):
    """A frozen transformers seq2seq or causal LM.

    Given a batch that carries the teacher's own reading of the text (:func:`teacher_reading`), it reads that one:
    the student's token ids mean other tokens to it.
    """

    def __init__(self, hf_model: Any, tokenizer: Any = None) -> None:
        super().__init__()
        self._init_text_model(hf_model, tokenizer)

    def forward_signals(self, batch: Batch, request: SignalRequest) -> Signals:
        return super().forward_signals(teacher_reading(batch), request)


class TextStudent(HFTextModel, Student):
    """A trainable transformers seq2seq or causal LM.

    With ``student.args.lora``, ``hf_model`` holds peft's LoRA layers in place and ``peft_model`` is the
    :class:`peft.PeftModel` around it (None otherwise); see :mod:`kd_plugins.text.lora`.
    """

    peft_model: Any = None

    def __init__(self, hf_model: Any, tokenizer: Any = None) -> None:
        super().__init__()
        self._init_text_model(hf_model, tokenizer)


# ---------------------------------------------------------------------- vocabulary checks


def _vocab_of(model: Any) -> dict[str, int] | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    return dict(tokenizer.get_vocab())


#: What to do when token-level distillation meets two tokenizers (the end of the refusals below).
CROSS_TOKENIZER_HINT = ("Build the student with the teacher's tokenizer (student.args.tokenizer = the teacher's "
                        "directory), or, on a text task, give the teacher a tokenizer of its own with "
                        "data.teacher_vocab_size and compare across tokenizers with plugin word-kd and --set "
                        "objectives.kd.name=cross_tokenizer (docs/objectives.md, 'Across tokenizers').")


def check_vocab_compatible(teacher: Model, student: Model, *, cross_tokenizer: bool = False, where: str = "") -> None:
    """Raise :class:`KDUserError` when teacher and student do not share a vocabulary.

    Token-level objectives compare distributions id by id, so both models need the same token -> id map (when both
    carry a tokenizer) and the same output size, except for padding rows: heads larger than one shared tokenizer
    are accepted (the models report the tokenizer's size and the objectives leave those rows out).
    ``cross_tokenizer=True`` (every objective that reads the teacher aligns different vocabularies, and each model
    reads the text through its own tokenizer) skips the check. ``where`` names the config key for the message.
    """
    if cross_tokenizer or not all(hasattr(model, "vocab_size") for model in (teacher, student)):
        return
    context = f" ({where})" if where else ""
    teacher_vocab, student_vocab = _vocab_of(teacher), _vocab_of(student)
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise KDUserError(
            f"Teacher and student tokenizers differ{context}: the teacher's has {len(teacher_vocab)} tokens, the "
            f"student's {len(student_vocab)}, with different token ids, e.g. {differing}. Token-level distillation "
            f"compares the two distributions id by id. {CROSS_TOKENIZER_HINT}")
    if teacher.vocab_size == student.vocab_size:
        return
    shared = getattr(teacher, "tokenizer_size", None)
    if teacher_vocab is not None and student_vocab is not None and shared is not None and \
            shared <= min(teacher.vocab_size, student.vocab_size):
        return  # one tokenizer, heads that differ only by padding rows
    raise KDUserError(
        f"Teacher and student vocabularies differ{context}: the teacher predicts {teacher.vocab_size} tokens, the "
        f"student {student.vocab_size}. Token-level distillation compares the two distributions id by id. "
        f"{CROSS_TOKENIZER_HINT}")


# ---------------------------------------------------------------------- factories


class TextModelConfig(BaseModel):
    """Where a text model comes from: pretrained weights (``source``) or an architecture (``config``)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="local directory or hub id of pretrained weights")
    config: dict[str, Any] | None = Field(
        None, description="transformers config dict with 'model_type' (e.g. marian, bart, t5, gpt2): random init")
    tokenizer: str | None = Field(
        None, description="tokenizer directory, tokenizer.json file or hub id; default: the source's, else the task's")
    local_files_only: bool = Field(True, description="never download (set false to allow hub downloads)")
    trust_remote_code: bool = Field(False, description="run model code shipped with the checkpoint")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraSettings | None = Field(
        None, description="students only: train peft LoRA adapters {r, alpha, dropout, target_modules} on the frozen "
                          "model; checkpoints hold the adapters only (docs/lora.md)")
    freeze: list[str] = Field(
        default_factory=list, description="students only: fnmatch patterns of parameter names to freeze (e.g. "
                                          "'model.encoder.*'); checkpoints hold the trainable part only")
    init: Literal["random", "teacher", "auto"] = Field(
        "random", description="students only: 'teacher' starts the student (built from 'config') as a copy of "
                              "chosen teacher layers, embeddings and output layer (shrink and fine-tune; "
                              "docs/text.md, 'Initialising the student from the teacher'); 'auto' does so where "
                              "the teacher allows it (a transformers model of the student's type, head counts and "
                              "vocabulary) and starts from random weights otherwise, logging why")
    init_layers: dict[str, list[NonNegativeInt]] | None = Field(
        None, description="with init: teacher, the teacher layer each student layer copies, per stack "
                          "({encoder: [0, 2], decoder: [0]}); null: spread evenly from the first to the last")
    init_width: Literal["match", "select"] = Field(
        "match", description="with init: teacher, 'match' refuses shapes that differ from the teacher's; 'select' "
                             "narrows the teacher's tensors to a narrower student by evenly spaced rows and columns "
                             "(weight selection)")

    @model_validator(mode="after")
    def _one_origin(self) -> "TextModelConfig":
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of 'source' (pretrained weights) or 'config' (an architecture to "
                             "initialise randomly)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' needs a 'model_type' key (e.g. 'marian', 'bart', 't5', 'gpt2')")
        if self.init == "random" and (self.init_layers is not None or self.init_width != "match"):
            raise ValueError("init_layers and init_width say how to copy the teacher's weights and need "
                             "init: teacher or auto (init is 'random'; with init: random set init_width: match "
                             "and init_layers: null)")
        if self.init != "random" and self.source is not None:
            raise ValueError(f"init: {self.init} builds the student from 'config' and fills it with the teacher's "
                             f"weights; 'source' loads pretrained weights instead. Give one of the two (init: "
                             f"random with 'source')")
        return self


def load_tokenizer(spec: str, *, local_files_only: bool = True, trust_remote_code: bool = False,
                   revision: str | None = None) -> Any:
    """A Hugging Face tokenizer from a directory, a ``tokenizer.json`` file or a hub id."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return AutoTokenizer.from_pretrained(spec, local_files_only=local_files_only,
                                             trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as error:
        raise KDUserError(
            f"Could not load the tokenizer '{spec}': {error}. Give a directory with tokenizer files, a "
            f"tokenizer.json file, or (with local_files_only: false) a hub id.") from error


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _special_ids_from_tokenizer(tokenizer: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids[name] = int(value)
    return ids


def _build_hf_model(config: TextModelConfig, context: BuildContext, causal: bool, key: str) -> tuple[Any, Any]:
    """The transformers model and its tokenizer (or None) for ``config``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM
    role = key.split(".")[0]
    # A text task with data.teacher_vocab_size tokenises for the teacher with a tokenizer of its own.
    def task_tokenizer() -> Any:
        return getattr(context.task, "teacher_tokenizer" if role == "teacher" else "tokenizer", None)

    other = (f" If it is an encoder-decoder model, use the 'seq2seq' {role} instead." if causal
             else f" If it is a decoder-only model, use the 'causal-lm' {role} instead.")
    tokenizer = None
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer, local_files_only=config.local_files_only,
                                   trust_remote_code=config.trust_remote_code, revision=config.revision)
    if config.source is not None:
        try:
            model = auto.from_pretrained(config.source, local_files_only=config.local_files_only,
                                         trust_remote_code=config.trust_remote_code, revision=config.revision,
                                         dtype=_DTYPES[config.dtype])
        except (OSError, ValueError) as error:
            hint = (" It is not in the local Hugging Face cache; set local_files_only: false to download it, or give a "
                    "local directory." if config.local_files_only else "")
            raise KDUserError(f"Could not load the model {key}.source = '{config.source}' with {auto.__name__}: "
                              f"{error}.{hint}{other}") from error
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(config.source, local_files_only=config.local_files_only,
                                           trust_remote_code=config.trust_remote_code, revision=config.revision)
            except KDUserError:
                log.info("No tokenizer found with %s; the task's tokenizer is used.", config.source)
        return model, tokenizer or task_tokenizer()

    tokenizer = tokenizer or task_tokenizer()
    values = dict(config.config or {})
    model_type = values.pop("model_type")
    if tokenizer is not None:
        # The architecture follows the tokenizer unless the config says otherwise.
        values.setdefault("vocab_size", len(tokenizer))
        for name, value in _special_ids_from_tokenizer(tokenizer).items():
            values.setdefault(name, value)
        if not causal:
            values.setdefault("decoder_start_token_id", values.get("pad_token_id", values.get("bos_token_id")))
    if "vocab_size" not in values:
        raise KDUserError(f"{key}.config has no 'vocab_size' and no tokenizer is known (set {key}.tokenizer, or use a "
                          f"task that provides one).")
    try:
        hf_config = AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError, TypeError) as error:
        raise KDUserError(f"Invalid {key}.config for model_type '{model_type}': {error}") from error
    if bool(getattr(hf_config, "is_encoder_decoder", False)) == causal:
        raise KDUserError(f"{key}.config: model_type '{model_type}' is "
                          f"{'an encoder-decoder' if causal else 'a decoder-only'} architecture.{other}")
    # Seeded initialisation: the same run seed gives the same student.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(context.seed)
        try:
            model = auto.from_config(hf_config, trust_remote_code=config.trust_remote_code, dtype=_DTYPES[config.dtype])
        except ValueError as error:
            raise KDUserError(f"{key}.config: model_type '{model_type}' cannot be built with {auto.__name__}: "
                              f"{error}{other}") from error
    if not causal:
        _align_decoder_start_with_label_shift(model)
    return model, tokenizer


def _align_decoder_start_with_label_shift(hf_model: Any) -> None:
    """Make ``decoder_start_token_id`` the first decoder input the model's own label shift produces.

    mBART's shift moves each label row's last token (its eos) to the front and ignores
    ``decoder_start_token_id``; a model built from a config and trained with that shift but decoded from
    the config's start token sees a prefix it never saw (a d=96 mBART student scored ROUGE 0).
    Only for models built here from a config: a pretrained model's start token matches its own tokenizer's
    label layout (e.g. mBART's language code), which a probe row cannot know.
    """
    prepare = getattr(hf_model, "prepare_decoder_input_ids_from_labels", None)
    config = hf_model.config
    pad, eos = config.pad_token_id, config.eos_token_id
    if prepare is None or eos is None or isinstance(eos, (list, tuple)):
        return
    token = next(t for t in range(3) if t not in (pad, eos))
    with torch.no_grad():
        trained_start = int(prepare(labels=torch.tensor([[token, eos]]))[0, 0])
    if trained_start != config.decoder_start_token_id:
        log.info("%s: its label shift starts the decoder with token id %d, not decoder_start_token_id %s; "
                 "decoding starts with %d too.", type(hf_model).__name__, trained_start,
                 config.decoder_start_token_id, trained_start)
        config.decoder_start_token_id = trained_start
        if getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.decoder_start_token_id = trained_start


class _TextModelFactory(ModelFactory):
    """Builds a :class:`TextTeacher` or :class:`TextStudent` (the role follows the registry kind)."""

    Config: ClassVar[type[BaseModel]] = TextModelConfig
    causal: ClassVar[bool] = False
    role: ClassVar[Literal["teacher", "student"] | None] = None  # None: student iff context.teacher is set

    def build(self, config: BaseModel, context: BuildContext) -> Model:
        assert isinstance(config, TextModelConfig)
        role = self.role or ("student" if context.teacher is not None else "teacher")
        if role == "teacher" and (config.lora is not None or config.freeze):
            option = "lora" if config.lora is not None else "freeze"
            raise KDUserError(f"teacher.args.{option} is set, but the teacher never trains: LoRA adapters and frozen "
                              f"parts are for the student (student.args.{option}). Remove teacher.args.{option}.")
        model, tokenizer = _build_hf_model(config, context, self.causal, f"{role}.args")
        if bool(getattr(model.config, "is_encoder_decoder", False)) == self.causal:
            kind = "an encoder-decoder" if self.causal else "a decoder-only"
            raise KDUserError(f"{role}.args describes {kind} model ({type(model).__name__}); use the "
                              f"'{'seq2seq' if self.causal else 'causal-lm'}' {role} instead of '{self.name}'.")
        if role == "teacher" and config.init != "random":
            raise KDUserError(f"teacher.args.init is '{config.init}', but a teacher is not initialised from another "
                              f"model: init is for the student (student.args.init). Remove teacher.args.init.")
        wrapper: Model = TextTeacher(model, tokenizer) if role == "teacher" else TextStudent(model, tokenizer)
        if role == "student":
            if config.init != "random":
                try:
                    check_vocab_compatible(context.teacher, wrapper, where=f"student.args.init: {config.init}")
                    init_student_from_teacher(model, context.teacher, config.init_layers, config.init_width,
                                              "student.args")
                except KDUserError as why_not:
                    if config.init == "teacher":
                        raise
                    # A refused copy leaves the student as built (the copy is staged), i.e. randomly initialised.
                    log.info("student.args.init is 'auto': the student starts from random weights, because the "
                             "teacher's cannot be copied into it: %s", why_not)
            prepare_student(wrapper, config.lora, config.freeze, context.seed, f"{role}.args")
        return wrapper


class Seq2SeqFactory(_TextModelFactory):
    """Any ``AutoModelForSeq2SeqLM`` (Marian, BART, T5, ...) from weights or a config."""

    name: ClassVar[str] = "seq2seq"
    description: ClassVar[str] = "Encoder-decoder transformers model (Marian, BART, T5): local dir, hub id or config"


class CausalLMFactory(_TextModelFactory):
    """Any ``AutoModelForCausalLM`` from weights or a config."""

    name: ClassVar[str] = "causal-lm"
    description: ClassVar[str] = "Decoder-only transformers model (GPT-2, Llama, ...): local dir, hub id or config"
    causal: ClassVar[bool] = True


class Seq2SeqTeacherFactory(Seq2SeqFactory):
    role: ClassVar[Literal["teacher", "student"] | None] = "teacher"


class Seq2SeqStudentFactory(Seq2SeqFactory):
    role: ClassVar[Literal["teacher", "student"] | None] = "student"


class CausalLMTeacherFactory(CausalLMFactory):
    role: ClassVar[Literal["teacher", "student"] | None] = "teacher"


class CausalLMStudentFactory(CausalLMFactory):
    role: ClassVar[Literal["teacher", "student"] | None] = "student"


#: Below this relative spread an encoder's output is (nearly) the same vector at every position of every input.
#: Measured on the embedded summarization data: collapsed teachers 1.5e-3 and 1.2e-4, a student at lr 1e-3
#: 0.010-0.013 (one output for all 300 valid documents, 1,000 steps); reading teachers ~1.2 and wmt students
#: 0.6-1.2. Students at lower lr passed through 0.03-0.09 on their way to ~0.8 (docs/text.md).
COLLAPSED_ENCODER_SPREAD = 0.05


@torch.no_grad()
def encoder_spread(hf_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """How much an encoder-decoder's encoder output varies over the real tokens of a batch.

    The standard deviation over all non-padding positions (of all rows), averaged over the hidden
    dimensions, relative to the mean absolute value. Near 0 (< ``COLLAPSED_ENCODER_SPREAD``) the encoder
    has collapsed: it maps every input to one vector, and the decoder can only act as a language model
    of the targets (seen with post-LN Marian models trained from scratch at lr 1e-3; docs/text.md).
    """
    was_training = hf_model.training
    hf_model.eval()
    try:
        hidden = hf_model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    finally:
        hf_model.train(was_training)
    real = hidden[attention_mask.bool()].float()
    if real.shape[0] < 2:
        return float("nan")
    return float(real.std(dim=0).mean() / real.abs().mean().clamp_min(1e-12))


def marian_config(vocab_size: int | None = None, *, layers: tuple[int, int] = (2, 2), d_model: int = 256,
                  heads: int = 4, ffn_dim: int | None = None, max_positions: int = 512, **extra: Any) -> dict[str, Any]:
    """A ``config`` dict for a Marian model with ``layers = (encoder, decoder)`` (e.g. a 2+2 student, 6+6 teacher)."""
    values: dict[str, Any] = {
        "model_type": "marian", "d_model": d_model, "encoder_layers": layers[0], "decoder_layers": layers[1],
        "encoder_attention_heads": heads, "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn_dim or 4 * d_model, "decoder_ffn_dim": ffn_dim or 4 * d_model,
        "max_position_embeddings": max_positions, "scale_embedding": True, "share_encoder_decoder_embeddings": True,
    }
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    values.update(extra)
    return values


__all__ = [
    "CausalLMFactory", "CausalLMStudentFactory", "CausalLMTeacherFactory", "HFTextModel", "IGNORE_INDEX",
    "Seq2SeqFactory", "Seq2SeqStudentFactory", "Seq2SeqTeacherFactory", "TextModelConfig", "TextStudent",
    "TextTeacher", "CROSS_TOKENIZER_HINT", "check_vocab_compatible", "teacher_reading", "load_tokenizer",
    "marian_config", "encoder_spread", "COLLAPSED_ENCODER_SPREAD",
]
