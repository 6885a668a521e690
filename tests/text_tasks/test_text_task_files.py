"""Data loaders of the text tasks: every file format, column layouts, bad input, size limits, truncation."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kdcore.errors import KDUserError
from kd_tasks.text.files import read_parallel_lines
from kd_tasks.text.summarization import SummarizationDataConfig, SummarizationTask
from kd_tasks.text.wmt import TranslationDataConfig, TranslationTask

PAIRS = [("Turn on the light.", "Schalte das Licht ein."), ("Open the cover.", "Öffne die Abdeckung."),
         ("Battery level", "Batteriestand"), ("Set the target temperature.", "Stelle die Zieltemperatur ein."),
         ("Close the valve.", "Schließe das Ventil.")]


def _wmt(tmp_path: Path, **data: object) -> TranslationTask:
    config = TranslationDataConfig.model_validate({"corpus": "files", "valid_size": 1, "test_size": 1,
                                                   "vocab_size": 200, **data})
    return TranslationTask(config, tmp_path / "cache")


def _pairs(records: list[dict]) -> set[tuple[str, str]]:
    return {(r["source"], r["target"]) for r in records}


def _all(task: TranslationTask | SummarizationTask) -> list[dict]:
    records = task.records()
    return records["train"] + records["valid"] + records["test"]


def test_plain_text_pair(tmp_path: Path) -> None:
    (tmp_path / "train.en").write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    (tmp_path / "train.de").write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    task = _wmt(tmp_path, train={"source": str(tmp_path / "train.en"), "reference": str(tmp_path / "train.de")})
    records = task.records()
    assert _pairs(_all(task)) == set(PAIRS)
    assert (len(records["train"]), len(records["valid"]), len(records["test"])) == (3, 1, 1)
    # held-out sources never appear in train
    assert not {r["source"] for r in records["train"]} & {r["source"] for r in records["test"] + records["valid"]}


def test_tsv_csv_jsonl_and_translation_dicts(tmp_path: Path) -> None:
    (tmp_path / "d.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    lines = ["source,target"] + [f'"{s}","{t}"' for s, t in PAIRS]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n"
                                              for s, t in PAIRS), encoding="utf-8")
    for name in ("d.tsv", "d.csv", "d.jsonl"):
        assert _pairs(_all(_wmt(tmp_path, train={"path": str(tmp_path / name)}))) == set(PAIRS), name


def test_explicit_fields_and_separate_splits(tmp_path: Path) -> None:
    rows = [{"english": s, "german": t, "id": i} for i, (s, t) in enumerate(PAIRS)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text(json.dumps(rows[3]) + "\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[4]) + "\n", encoding="utf-8")
    task = _wmt(tmp_path, train={"path": str(tmp_path / "train.jsonl")}, valid={"path": str(tmp_path / "valid.jsonl")},
                test={"path": str(tmp_path / "test.jsonl")}, source_field="english", target_field="german")
    records = task.records()
    assert [r["target"] for r in records["test"]] == [PAIRS[4][1]]
    assert len(records["train"]) == 3 and records["valid"][0]["id"].endswith(":3")


def test_summarization_cnn_dailymail_and_xsum_layouts(tmp_path: Path) -> None:
    documents = [(f"Document number {i} talks about the weather in some detail.", f"Summary {i}.") for i in range(6)]
    (tmp_path / "cnn.jsonl").write_text("".join(json.dumps({"article": d, "highlights": s, "id": str(i)}) + "\n"
                                                for i, (d, s) in enumerate(documents)), encoding="utf-8")
    lines = ["id,document,summary"] + [f'{i},"{d}","{s}"' for i, (d, s) in enumerate(documents)]
    (tmp_path / "xsum.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, layout in (("cnn.jsonl", "auto"), ("cnn.jsonl", "cnn_dailymail"), ("xsum.csv", "auto"),
                         ("xsum.csv", "xsum")):
        config = SummarizationDataConfig.model_validate({"corpus": "files", "train": {"path": str(tmp_path / name)},
                                                         "valid_size": 1, "test_size": 1, "layout": layout})
        task = SummarizationTask(config, tmp_path / "cache")
        assert _pairs(_all(task)) == set(documents), (name, layout)
    config = SummarizationDataConfig.model_validate({"corpus": "files", "train": {"path": str(tmp_path / "cnn.jsonl")},
                                                     "valid_size": 1, "test_size": 1, "layout": "xsum"})
    with pytest.raises(KDUserError, match="match none of the known layouts"):
        SummarizationTask(config, tmp_path / "cache").records()


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    try:
        import datasets
    except ImportError:
        task = _wmt(tmp_path, train={"path": str(tmp_path)}, format="dataset")
        with pytest.raises(KDUserError, match="'datasets' package is not installed"):
            task.records()
        return
    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"translation": [{"en": s, "de": t} for s, t in PAIRS]})})
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert _pairs(_all(_wmt(tmp_path, train={"path": str(tmp_path / "saved")}))) == set(PAIRS)


def test_sacrebleu_test_set_read_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sacrebleu.dataset import DATASETS

    dataset = DATASETS["wmt14"]
    monkeypatch.setattr(dataset, "_outdir", str(tmp_path / "sacrebleu" / "wmt14"))
    monkeypatch.setattr(dataset, "_rawdir", str(tmp_path / "sacrebleu" / "wmt14" / "raw"))
    (tmp_path / "d.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    task = _wmt(tmp_path, train={"path": str(tmp_path / "d.tsv")}, sacrebleu_test_set="wmt14")
    with pytest.raises(KDUserError, match="never downloads"):
        task.records()
    # Files where sacrebleu keeps a downloaded test set: read, never fetched.
    source = Path(dataset._get_txt_file_path("en-de", "src"))
    reference = Path(dataset._get_txt_file_path("en-de", "ref"))
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("A test sentence.\nAnother one.\n", encoding="utf-8")
    reference.write_text("Ein Testsatz.\nNoch einer.\n", encoding="utf-8")
    task = _wmt(tmp_path, train={"path": str(tmp_path / "d.tsv")}, sacrebleu_test_set="wmt14")
    assert [r["target"] for r in task.records()["test"]] == ["Ein Testsatz.", "Noch einer."]
    with pytest.raises(KDUserError, match="not a sacrebleu test set"):
        _wmt(tmp_path, train={"path": str(tmp_path / "d.tsv")}, sacrebleu_test_set="wmt99").records()


# ---------------------------------------------------------------------------------------- bad input


def test_parallel_files_of_different_lengths(tmp_path: Path) -> None:
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(KDUserError, match=r"a\.en' has 3 lines but .*a\.de' has 2"):
        read_parallel_lines(tmp_path / "a.en", tmp_path / "a.de")


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.en").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    (tmp_path / "a.de").write_text("gut\nauch gut\nschlecht\n", encoding="utf-8")
    with pytest.raises(KDUserError, match=r"a\.en:3: the file is not valid UTF-8"):
        read_parallel_lines(tmp_path / "a.en", tmp_path / "a.de")


def test_empty_lines_error_in_eval_files_and_are_skipped_counted_in_training(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.en").write_text("one\n\nthree\nfour\nfive\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("eins\nzwei\ndrei\nvier\nfünf\n", encoding="utf-8")
    with pytest.raises(KDUserError, match=r"a\.en:2: empty line"):
        read_parallel_lines(tmp_path / "a.en", tmp_path / "a.de", empty="error")
    with caplog.at_level(logging.WARNING):
        task = _wmt(tmp_path, train={"source": str(tmp_path / "a.en"), "reference": str(tmp_path / "a.de")})
        assert len(_all(task)) == 4
    assert "skipped 1 of 5 rows (empty line)" in caplog.text and "a.en:2" in caplog.text


def test_empty_file_and_malformed_jsonl(tmp_path: Path) -> None:
    (tmp_path / "empty.en").write_text("\n", encoding="utf-8")
    (tmp_path / "x.de").write_text("x\n", encoding="utf-8")
    with pytest.raises(KDUserError, match="is empty"):
        read_parallel_lines(tmp_path / "empty.en", tmp_path / "x.de")
    (tmp_path / "bad.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": \n', encoding="utf-8")
    with pytest.raises(KDUserError, match=r"bad\.jsonl:2: not valid JSON"):
        _wmt(tmp_path, train={"path": str(tmp_path / "bad.jsonl")}).records()
    with pytest.raises(KDUserError, match="extension"):
        (tmp_path / "data.txt").write_text("a\n", encoding="utf-8")
        _wmt(tmp_path, train={"path": str(tmp_path / "data.txt")}).records()


def test_size_limits_and_overlong_sequences(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    long_source = " ".join(["word"] * 60)
    rows = PAIRS + [(long_source, "Ein sehr langer Satz.")]
    (tmp_path / "d.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in rows * 3), encoding="utf-8")
    (tmp_path / "v.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS[:2]), encoding="utf-8")
    held_out = {"valid": {"path": str(tmp_path / "v.tsv")}, "test": {"path": str(tmp_path / "v.tsv")}}
    task = _wmt(tmp_path, train={"path": str(tmp_path / "d.tsv")}, max_train=2, max_source_tokens=40, **held_out)
    with caplog.at_level(logging.WARNING):
        splits = task.build_data(0)
    assert len(splits.train) == 2
    assert all(len(item["source_ids"]) <= 40 for split in (splits.train, splits.valid, splits.test) for item in split)
    assert all(item["source_ids"][-1] == task.tokenizer.eos_token_id for item in splits.train)
    truncating = _wmt(tmp_path, train={"path": str(tmp_path / "d.tsv")}, max_source_tokens=40, **held_out)
    assert long_source in {item["source"] for item in truncating.build_data(0).train}
    skipping = _wmt(tmp_path, train={"path": str(tmp_path / "d.tsv")}, max_source_tokens=40, overlong="skip",
                    **held_out)
    with caplog.at_level(logging.WARNING):
        train = skipping.build_data(0).train
    assert len(train) == 15 and long_source not in {item["source"] for item in train}
    assert "skipped" in caplog.text and "max_source_tokens=40" in caplog.text


def test_config_errors_are_typed(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs data.train"):
        TranslationDataConfig.model_validate({"corpus": "files"})
    with pytest.raises(ValidationError, match="both 'source' and 'reference'"):
        TranslationDataConfig.model_validate({"corpus": "files", "train": {"source": "a.en"}})
    with pytest.raises(ValidationError, match="must include 1"):
        TranslationDataConfig.model_validate({"eval_beams": [5]})
