"""Embedded summarization documents start with the name of what the docstring documents."""
from __future__ import annotations

from pathlib import Path

import pytest

from kd_tasks.text import summarization
from kd_tasks.text.summarization import SummarizationDataConfig, SummarizationTask, document_title
from kd_tasks.text.corpus import Corpus


@pytest.mark.parametrize(("record_id", "title"), [
    ("codecs.py:312:StreamWriter.reset", "StreamWriter.reset"),
    ("torch/utils/tensorboard/writer.py:964:SummaryWriter.add_pr_curve", "SummaryWriter.add_pr_curve"),
    ("sndhdr.py:0:<module>", "sndhdr"),
    ("torch/utils/tensorboard/writer.py:0:<module>", "torch.utils.tensorboard.writer"),
    ("importlib/__init__.py:0:<module>", "importlib"),
    ("C:/odd/path.py:7:f", "f"),  # only the last two colons separate line and name
])
def test_document_title(record_id: str, title: str) -> None:
    assert document_title(record_id) == title


def _task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **data: object) -> SummarizationTask:
    row = {"id": "codecs.py:312:StreamWriter.reset", "package": "stdlib", "unit": "stdlib/codecs",
           "summary": "Resets the codec buffers.", "document": "Calling this method should ensure that the data "
                                                                   "on the output is put into a clean state."}
    corpus = Corpus([row], [row], [row], {"content_sha256": "x"}, tmp_path)
    monkeypatch.setattr("kd_tasks.text.summarization_data.load_summarization_corpus", lambda *a, **k: corpus)
    return SummarizationTask(SummarizationDataConfig(**data), tmp_path)


def test_embedded_documents_are_titled_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _task(tmp_path, monkeypatch).embedded_records()
    assert records["test"][0]["source"] == ("StreamWriter.reset: Calling this method should ensure that the data on "
                                            "the output is put into a clean state.")
    assert records["test"][0]["target"] == "Resets the codec buffers."


def test_document_title_none_keeps_the_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _task(tmp_path, monkeypatch, document_title="none").embedded_records()
    assert records["train"][0]["source"].startswith("Calling this method")
    assert summarization.SummarizationDataConfig.model_fields["document_title"].default == "name"
