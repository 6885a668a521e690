"""Task ``summarization``: abstractive summarization scored with rouge-score ROUGE-1/2/L F1 (stemmed).

Data: the embedded docstring corpus (``summarization_data``: a docstring's body is
the document, its first sentence the summary; split by package), or local files
(``data.corpus: files``): JSONL/CSV/datasets saved to disk in the CNN/DailyMail
(``article``/``highlights``) or XSum (``document``/``summary``) layout, TSV, or
plain-text document/summary pairs. Metrics: ROUGE for greedy decoding and beam
search (``data.eval_beams``, default 4), plus decoding speed.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from .base import TextTask
from .data_config import TextDataConfig
from .files import Layout, TextRecord
from .presets import text_presets
from .summarization_data import DEFAULT_PACKAGES

LAYOUTS: dict[str, Layout] = {
    "cnn_dailymail": Layout("cnn_dailymail", "article", "highlights", "id"),
    "xsum": Layout("xsum", "document", "summary", "id"),
    "source_target": Layout("source/target", "source", "target", "id"),
    "text_summary": Layout("text/summary", "text", "summary", "id"),
}


def document_title(record_id: str) -> str:
    """The name a docstring documents, from an embedded record id ``path.py:line:qualified.name``.

    A module's docstring (``<module>``) is titled by its dotted module path
    (``torch/utils/tensorboard/writer.py`` -> ``torch.utils.tensorboard.writer``;
    a package's ``__init__.py`` by the package).
    """
    path, _line, qualified_name = record_id.rsplit(":", 2)
    if qualified_name != "<module>":
        return qualified_name
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


class SummarizationDataConfig(TextDataConfig):
    """``data.*`` of ``summarization``."""

    layout: Literal["auto", "cnn_dailymail", "xsum", "source_target", "text_summary"] = Field(
        "auto", description="column layout of data files; auto: detected from the first row")
    packages: list[str] = Field(default_factory=lambda: list(DEFAULT_PACKAGES),
                                description="embedded corpus: packages whose docstrings are read ('stdlib' too)")
    valid_size: int = Field(300, gt=0, description="held-out valid examples when no valid files are given")
    # 128 source tokens keep 82% of the embedded documents whole, 48 target tokens 98% of the summaries;
    # attention cost grows with the square of the length.
    max_source_tokens: int = Field(128, gt=0, description="longer documents are truncated (counted, logged)")
    max_target_tokens: int = Field(48, gt=0, description="longer summaries are truncated (counted, logged)")
    eval_beams: list[int] = Field(default_factory=lambda: [1, 4], description="beam sizes of the final evaluation")
    max_length_ratio: float = Field(0.5, gt=0, description="decode at most ratio x longest document + offset tokens")
    max_length_offset: int = Field(32, ge=0)
    # A docstring's body alone rarely names what it documents, and a teacher trained on body -> first sentence
    # learnt to write one fixed sentence for every unseen document (docs/text.md, "Summarization"). The name
    # is what a reader of the docstring sees first, so the embedded documents start with it by default.
    document_title: Literal["name", "none"] = Field(
        "name", description="embedded corpus: 'name' starts each document with the documented object's name "
                            "('StreamWriter.reset: ...', a module's dotted path); 'none': the docstring body only")


class SummarizationTask(TextTask):
    """Summarization with ROUGE-1/2/L F1 (rouge-score, stemming) and decoding speed."""

    name: ClassVar[str] = "summarization"
    description: ClassVar[str] = ("Summarization (embedded docstring corpus, CNN/DailyMail or XSum files): ROUGE-1/2/L "
                                  "F1 with stemming, greedy and beam search")
    DataConfig = SummarizationDataConfig
    metric: ClassVar[str] = "rougeL"
    item_metrics: ClassVar[tuple[str, ...]] = ("rouge1", "rouge2", "rougeL")
    greater_is_better: ClassVar[bool] = True
    imitation_beta_base: ClassVar[float] = 10.0  # the authors' base for CNN/DailyMail
    #: Teacher stage defaults: the translation recipe (no dropout; docs/text.md, "Teacher stage") with batches of
    #: 32, since documents are up to 128 tokens. lr 5e-4 after
    #: 300 warm-up steps, not translation's 1e-3 after 100: at 1e-3 the encoder collapsed to one output for every
    #: document (relative spread 0.27 after 300 steps, 1e-4 to 1.5e-3 after 2000; 1.1 at 5e-4 after 300 steps).
    #: native-bf16: on CPUs with AVX512-BF16 the stage runs about 1.4x faster under bf16 autocast (0.42 vs 0.57 s
    #: per step on 2 cores), which the 30-minute cold run needs; fp32 elsewhere. 1,400 steps: 2,000 took 980-1,025 s
    #: of a 34.6-minute cold run (docs/text.md, "Timed default run").
    teacher_defaults: ClassVar[dict[str, Any]] = {"encoder_layers": 3, "decoder_layers": 3, "d_model": 256,
                                                  "heads": 4, "ffn_dim": 1024, "dropout": 0.0, "train_steps": 1400,
                                                  "batch_size": 32, "lr": 5e-4, "warmup_steps": 300,
                                                  "precision": "native-bf16", "time_budget_minutes": 12}
    presets: ClassVar[dict[str, dict[str, Any]]] = text_presets("summarization")

    @property
    def layouts(self) -> tuple[Layout, ...]:  # type: ignore[override]
        layout = self.data_config.layout  # type: ignore[attr-defined]
        return tuple(LAYOUTS.values()) if layout == "auto" else (LAYOUTS[layout],)

    def embedded_records(self) -> dict[str, list[TextRecord]]:
        from .summarization_data import load_summarization_corpus

        config: SummarizationDataConfig = self.data_config  # type: ignore[assignment]
        corpus = load_summarization_corpus(self.cache_dir, packages=config.packages, valid_size=config.valid_size,
                                           test_size=config.test_size)
        self.note_embedded_corpus(corpus)

        def source(row: dict[str, Any]) -> str:
            if config.document_title == "none":
                return row["document"]
            return f"{document_title(row['id'])}: {row['document']}"

        def as_records(rows: list[dict[str, Any]]) -> list[TextRecord]:
            return [{"id": row["id"], "source": source(row), "target": row["summary"], "origin": row["id"]}
                    for row in rows]

        return {"train": as_records(corpus.train), "valid": as_records(corpus.valid), "test": as_records(corpus.test)}

    def score(self, hypotheses: list[str], references: list[str], suffix: str) -> dict[str, float]:
        from .metrics import rouge_scores

        return {f"{name}{suffix}": value for name, value in rouge_scores(hypotheses, references).items()}


__all__ = ["LAYOUTS", "SummarizationDataConfig", "SummarizationTask", "document_title"]
