"""Task ``wmt``: translation (English->German by default), scored with sacrebleu BLEU and chrF.

Data: the embedded Home Assistant en->de corpus (``translation_data``), local files
(``data.corpus: files``: plain-text source/reference pairs, TSV, CSV, JSONL, a
dataset saved to disk) and, for the test split, a sacrebleu test set found in
sacrebleu's local cache (``data.sacrebleu_test_set``). Metrics: corpus BLEU and chrF
(detokenised) for greedy decoding and each beam of ``data.eval_beams`` (default 5),
plus decoding speed; the sacrebleu signatures are in :meth:`metric_metadata`.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from .base import TextTask
from .data_config import TextDataConfig
from .files import Layout, TextRecord, sacrebleu_test_set
from .presets import text_presets


class TranslationDataConfig(TextDataConfig):
    """``data.*`` of ``wmt``."""

    source_lang: str = Field("en", description="source language (embedded corpus, translation dicts, sacrebleu)")
    target_lang: str = Field("de", description="target language (any Home Assistant catalog language: de, fr, ...)")
    sacrebleu_test_set: str | None = Field(
        None, description="test split from sacrebleu's local cache, e.g. wmt14 (never downloaded)")
    wheel: str | None = Field(None, description="path of the Home Assistant wheel (default: cache or pip download)")


class TranslationTask(TextTask):
    """Translation with BLEU/chrF (sacrebleu) and decoding speed."""

    name: ClassVar[str] = "wmt"
    description: ClassVar[str] = ("Translation (embedded en->de Home Assistant corpus or your files): sacrebleu "
                                  "BLEU/chrF, greedy and beam 5, decoding speed")
    DataConfig = TranslationDataConfig
    metric: ClassVar[str] = "bleu"
    item_metrics: ClassVar[tuple[str, ...]] = ("bleu", "chrf")
    greater_is_better: ClassVar[bool] = True
    imitation_beta_base: ClassVar[float] = 200.0  # the authors' base for translation
    #: Teacher stage defaults, chosen by measurement (docs/text.md, "Teacher stage"): a 4+4 teacher with dropout
    #: 0.1 at lr 7e-4 spent its whole 1,000-step budget as a target-side language model (BLEU 0.3); without dropout,
    #: at lr 1e-3, models of this size start reading their source within a few hundred steps. What they reach is
    #: set by the number of sentences seen: 3,000 steps of 32 left a 2+2 teacher (valid BLEU 10.9) *below* the
    #: 2+1 d=128 student trained from scratch on 3,000 steps of 64 (16.8), so the teacher sees 4,000 x 64.
    #: 2,000 steps in native-bf16 (bf16 autocast where the CPU computes it natively, fp32 elsewhere): 4,000 fp32 steps
    #: took 970 s of a 26-minute cold run on one 2-core machine but ~0.42 s per step (~28 minutes) on a slower one,
    #: where bf16 takes 0.34 s; the 30-minute cold run needs both the halving and bf16 (docs/text.md, "Timed default run").
    teacher_defaults: ClassVar[dict[str, Any]] = {"encoder_layers": 3, "decoder_layers": 3, "d_model": 256,
                                                  "heads": 4, "ffn_dim": 1024, "dropout": 0.0, "train_steps": 2000,
                                                  "batch_size": 64, "lr": 1e-3, "warmup_steps": 400,
                                                  "precision": "native-bf16", "time_budget_minutes": 13}
    presets: ClassVar[dict[str, dict[str, Any]]] = text_presets("wmt")

    @property
    def layouts(self) -> tuple[Layout, ...]:  # type: ignore[override]
        config = self.data_config
        source, target = config.source_lang, config.target_lang  # type: ignore[attr-defined]
        return (Layout("source/target", "source", "target", "id"),
                Layout("src/tgt", "src", "tgt", "id"),
                Layout(f"translation.{source}/{target} (Hugging Face translation datasets)",
                       f"translation.{source}", f"translation.{target}", "id"),
                Layout(f"{source}/{target} columns", source, target, "id"))

    def embedded_records(self) -> dict[str, list[TextRecord]]:
        from .translation_data import load_translation_corpus

        config: TranslationDataConfig = self.data_config  # type: ignore[assignment]
        corpus = load_translation_corpus(self.cache_dir, wheel=config.wheel, source_lang=config.source_lang,
                                         target_lang=config.target_lang, valid_size=config.valid_size,
                                         test_size=config.test_size)
        self.note_embedded_corpus(corpus)
        return {"train": corpus.train, "valid": corpus.valid, "test": corpus.test}

    def records(self) -> dict[str, list[TextRecord]]:
        records = super().records()
        config: TranslationDataConfig = self.data_config  # type: ignore[assignment]
        if config.sacrebleu_test_set and not records["test"][0].get("origin", "").startswith("sacrebleu:"):
            test = sacrebleu_test_set(config.sacrebleu_test_set, f"{config.source_lang}-{config.target_lang}")
            for record in test:
                record["origin"] = f"sacrebleu:{config.sacrebleu_test_set}:{record['origin']}"
            records["test"] = test[:config.max_test] if config.max_test else test
        return records

    def score(self, hypotheses: list[str], references: list[str], suffix: str) -> dict[str, float]:
        from .metrics import sacrebleu_scores

        scores, signatures = sacrebleu_scores(hypotheses, references)
        for name, signature in signatures.items():
            self.last_metadata[f"{name}_signature"] = signature
        return {f"{name}{suffix}": value for name, value in scores.items()}


__all__ = ["TranslationDataConfig", "TranslationTask"]
