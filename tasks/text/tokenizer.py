"""Tokenizers for the text tasks: the model's own, or one trained offline on the task's training text.

Training uses the Hugging Face ``tokenizers`` library (BPE with SentencePiece-style
``Metaspace`` pre-tokenisation, so decoding restores the spacing exactly) and wraps the
result in a ``transformers.PreTrainedTokenizerFast`` so models and tasks use one API.
The trained tokenizer appends ``</s>`` to every sequence (the end-of-sequence token a
Marian decoder must learn to emit) and is cached under
``<cache>/text/tokenizers/<sha256 of the training text and settings>/`` so every run on
the same data gets the same token ids (the task-trained teacher and the student must
agree id by id).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kdcore.errors import KDUserError
from kdcore.cache import ensure_entry

from .data_config import TextDataConfig
from .files import TextRecord

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Bump when the tokenizer recipe changes: cached tokenizers (and the teachers keyed by them) are rebuilt.
TOKENIZER_RECIPE = "bpe-metaspace-nfkc/1"
#: The kind of its cache entries (kdcore.cache).
TOKENIZER_KIND = "tokenizer"


def training_text_hash(texts: Iterable[str], vocab_size: int) -> str:
    """sha256 over the recipe, the vocabulary size and every training text (order matters)."""
    digest = hashlib.sha256(f"{TOKENIZER_RECIPE}\0{vocab_size}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A ``PreTrainedTokenizerFast`` (BPE, ``<pad>``=0, ``</s>``=1, ``<unk>``=2) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise KDUserError("Cannot train a tokenizer: the task's training text is empty. Check the data config.")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFKC()
    # Punctuation is split off words ("program." -> "▁program", "."), so one vocabulary entry serves a word
    # wherever it stands; the Metaspace decoder still restores the original spacing.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                                       pre_tokenizers.Punctuation(behavior="isolated")])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], min_frequency=2,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos_id = tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                             special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def cached_trained_tokenizer(cache_dir: Path, texts: Sequence[str], vocab_size: int) -> tuple[Any, Path]:
    """The tokenizer trained on ``texts`` (loaded from the cache when it was trained before) and its directory.

    The directory is a verified cache entry (:mod:`kdcore.cache`): a damaged one is moved aside and trained again.
    """
    from transformers import PreTrainedTokenizerFast

    key = training_text_hash(texts, vocab_size)
    directory = Path(cache_dir) / "text" / "tokenizers" / key[:20]

    def build(staging: Path) -> dict[str, Any]:
        log.info("Training a %d-token BPE tokenizer on %d texts (cached in %s).", vocab_size, len(texts), directory)
        tokenizer = train_bpe_tokenizer(texts, vocab_size)
        tokenizer.save_pretrained(str(staging))
        return {"actual_vocab_size": len(tokenizer)}

    built_from = {"recipe": TOKENIZER_RECIPE, "vocab_size": vocab_size, "texts": len(texts),
                  "training_text_sha256": key}
    tokenizer = ensure_entry(directory, TOKENIZER_KIND, built_from, build, what="the trained tokenizer",
                             load=lambda _: PreTrainedTokenizerFast.from_pretrained(str(directory)))
    return tokenizer, directory


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's token -> id map (identifies it in teacher cache keys)."""
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def training_texts(train: Sequence[TextRecord]) -> list[str]:
    """What a task's tokenizer is trained on: every training source, then every training target."""
    return [r["source"] for r in train] + [r["target"] for r in train]


def task_tokenizer(config: TextDataConfig, cache_dir: Path, train: Sequence[TextRecord]) -> tuple[Any, Path | None]:
    """The tokenizer ``data.tokenizer`` names and its directory (None for a hub id).

    ``train``: a BPE tokenizer trained on the ``train`` records' sources and targets (cached); else a model's
    tokenizer directory, ``tokenizer.json`` or hub id. A tokenizer without a padding token is refused.
    """
    if config.tokenizer == "train":
        tokenizer, directory = cached_trained_tokenizer(cache_dir, training_texts(train), config.vocab_size)
    else:
        from kd_plugins.text.models import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer, local_files_only=config.local_files_only)
        path = Path(config.tokenizer).expanduser()
        directory = path if path.exists() else None
    if tokenizer.pad_token_id is None:
        raise KDUserError(f"The tokenizer '{config.tokenizer}' has no padding token; seq2seq batches need one.")
    return tokenizer, directory


def task_teacher_tokenizer(config: TextDataConfig, cache_dir: Path, train: Sequence[TextRecord]) -> tuple[Any, Path]:
    """The teacher's own tokenizer (``data.teacher_vocab_size``) and its directory: trained by the recipe and on the
    texts of the task's tokenizer, so at the task's default size it is the very tokenizer (the same cache entry) that
    the task trains there, and a teacher trained with that one is reused."""
    if not config.separate_teacher_tokenizer:
        raise ValueError("data.teacher_vocab_size names no tokenizer of its own")
    assert config.teacher_vocab_size is not None
    return cached_trained_tokenizer(cache_dir, training_texts(train), config.teacher_vocab_size)


__all__ = ["EOS", "PAD", "TOKENIZER_KIND", "TOKENIZER_RECIPE", "UNK", "cached_trained_tokenizer",
           "task_teacher_tokenizer", "task_tokenizer", "tokenizer_fingerprint", "train_bpe_tokenizer",
           "training_text_hash", "training_texts"]
