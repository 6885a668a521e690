"""Metrics against sacrebleu / rouge-score on known strings; tokenizer, batches and evaluation of the text tasks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_tasks.text.metrics import rouge_scores, sacrebleu_scores
from kd_tasks.text.tokenizer import cached_trained_tokenizer, train_bpe_tokenizer
from kd_tasks.text.wmt import TranslationDataConfig, TranslationTask

SAMPLE = Path(__file__).parent / "data" / "ha-en-de-sample.tsv"


def test_bleu_and_chrf_match_sacrebleu_with_signature() -> None:
    import sacrebleu

    hypotheses = ["Das Licht ist an.", "Öffne die Tür bitte", "Temperatur einstellen"]
    references = ["Das Licht ist an.", "Bitte öffne die Tür.", "Zieltemperatur einstellen"]
    scores, signatures = sacrebleu_scores(hypotheses, references)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert 0 < scores["bleu"] < 100
    assert sacrebleu_scores(references, references)[0]["bleu"] == pytest.approx(100.0)
    assert "tok:13a" in signatures["bleu"] and f"version:{sacrebleu.__version__}" in signatures["bleu"]
    assert signatures["chrf"].startswith("nrefs:1")


def test_rouge_matches_rouge_score_with_stemming() -> None:
    from rouge_score import rouge_scorer

    hypotheses = ["the cats are running in the garden", "returns the value of the key"]
    references = ["a cat runs in the garden", "return the key's value"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {name: 100 * sum(scorer.score(r, h)[name].fmeasure for h, r in zip(hypotheses, references)) / 2
                for name in ("rouge1", "rouge2", "rougeL")}
    assert rouge_scores(hypotheses, references) == pytest.approx(expected)
    # Stemming: "cats"/"cat" and "running"/"runs" match, so ROUGE-1 is higher than without it.
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(references[0], hypotheses[0])["rouge1"]
    assert rouge_scores(hypotheses[:1], references[:1])["rouge1"] > 100 * plain.fmeasure
    assert rouge_scores(["same words here"], ["same words here"])["rougeL"] == pytest.approx(100.0)


def test_trained_tokenizer_round_trips_appends_eos_and_is_cached(tmp_path: Path) -> None:
    texts = [line.split("\t")[0] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_bpe_tokenizer(texts, 500)
    ids = tokenizer("Turn on the light, please (now)!")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.pad_token_id == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Turn on the light, please (now)!"
    first, directory = cached_trained_tokenizer(tmp_path, texts, 500)
    second, same_directory = cached_trained_tokenizer(tmp_path, texts, 500)
    assert directory == same_directory and (directory / "kd-cache.json").is_file()
    assert first.get_vocab() == second.get_vocab()
    _, other = cached_trained_tokenizer(tmp_path, texts[:-1], 500)
    assert other != directory


def _sample_task(tmp_path: Path, **data: object) -> TranslationTask:
    config = TranslationDataConfig.model_validate({"corpus": "files", "train": {"path": str(SAMPLE)},
                                                   "valid_size": 16, "test_size": 24, "vocab_size": 600, **data})
    return TranslationTask(config, tmp_path / "cache")


def test_collate_gives_the_documented_batch_keys(tmp_path: Path) -> None:
    task = _sample_task(tmp_path)
    items = task.build_data(0).train[:5]
    batch = task.collate(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "ids"}
    for row, item in enumerate(items):
        length = len(item["source_ids"])
        assert batch["input_ids"][row, :length].tolist() == item["source_ids"]
        assert batch["attention_mask"][row].sum() == length
        labels = batch["labels"][row]
        assert labels[labels != -100].tolist() == item["target_ids"]
        assert item["target_ids"][-1] == task.tokenizer.eos_token_id
    assert batch["ids"] == [item["id"] for item in items]


def test_epoch_batches_cover_the_data_once_and_bucket_by_length(tmp_path: Path) -> None:
    task = _sample_task(tmp_path)
    train = task.build_data(0).train
    batches = task.epoch_batches(train, 8, torch.Generator().manual_seed(1))
    flat = [i for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) and len(flat) >= len(train) - 8
    assert all(len(batch) == 8 for batch in batches)
    spread = sum(max(len(train[i]["target_ids"]) for i in b) - min(len(train[i]["target_ids"]) for i in b)
                 for b in batches) / len(batches)
    shuffled = torch.randperm(len(train), generator=torch.Generator().manual_seed(1)).tolist()
    random_batches = [shuffled[i:i + 8] for i in range(0, len(train) - 7, 8)]
    random_spread = sum(max(len(train[i]["target_ids"]) for i in b) - min(len(train[i]["target_ids"]) for i in b)
                        for b in random_batches) / len(random_batches)
    assert spread < random_spread / 2
    again = task.epoch_batches(train, 8, torch.Generator().manual_seed(1))
    assert again == batches  # reproducible from the generator alone (resumable)


def test_evaluate_reports_bleu_chrf_and_speed_for_greedy_and_beam(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import TextStudent, marian_config

    task = _sample_task(tmp_path, eval_beams=[1, 3])
    test = task.build_data(0).test
    values = marian_config(len(task.tokenizer), layers=(1, 1), d_model=32, heads=2, pad_token_id=0, eos_token_id=1,
                           decoder_start_token_id=0)
    values.pop("model_type")
    torch.manual_seed(0)
    model = TextStudent(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values)).eval(),
                        task.tokenizer)
    metrics = task.evaluate(model, test, torch.device("cpu"), 8)
    for key in ("bleu", "chrf", "bleu_beam3", "chrf_beam3", "greedy_sentences_per_second",
                "greedy_tokens_per_second", "beam3_sentences_per_second", "beam3_tokens_per_second"):
        assert key in metrics and metrics[key] >= 0, key
    assert metrics["examples"] == len(test) and metrics["greedy_tokens_per_second"] > 0
    for key in ("greedy_distinct_outputs", "beam3_distinct_outputs"):
        assert 1 / len(test) <= metrics[key] <= 1.0, key
    assert "tok:13a" in task.metric_metadata()["bleu_signature"]
    # A randomly initialised encoder tells inputs apart: its spread is of order 1, far from a collapse.
    assert metrics["encoder_spread"] > 0.1
    # In-training validation decodes greedily only (data.valid_beams).
    valid_metrics = task.evaluate(model, task.build_data(0).valid, torch.device("cpu"), 8)
    assert "bleu" in valid_metrics and "bleu_beam3" not in valid_metrics


def test_references_scored_are_the_untruncated_text(tmp_path: Path) -> None:
    task = _sample_task(tmp_path, max_target_tokens=3)
    item = max(task.build_data(0).test, key=lambda i: len(i["target"]))
    assert len(item["target_ids"]) == 3 and item["target_ids"][-1] == task.tokenizer.eos_token_id
    assert task.tokenizer.decode(item["target_ids"], skip_special_tokens=True) != item["target"]


def test_a_model_giving_one_output_for_every_input_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    # The summarization defaults produced exactly this: one sentence for all 1000 test documents.
    from kd_tasks.text.diagnostics import distinct_fraction, warn_if_input_ignored

    constant = ["Return the given graph."] * 999 + ["Return a list."]
    assert distinct_fraction(constant) == pytest.approx(2 / 1000)
    with caplog.at_level("WARNING"):
        assert warn_if_input_ignored(constant, "summarization test (greedy)")
    assert "only 2 distinct outputs for 1000 inputs" in caplog.text and "Return the given graph." in caplog.text
    varied = [f"sentence {index}" for index in range(100)]
    assert distinct_fraction(varied) == 1.0 and not warn_if_input_ignored(varied, "wmt test")
    assert not warn_if_input_ignored(["same"] * 10, "tiny test")  # too few items to judge


def test_the_warning_says_whether_the_encoder_collapsed(caplog: pytest.LogCaptureFixture) -> None:
    # The remedies differ: a collapsed encoder needs a gentler lr; a working one a decoder trained longer.
    from kd_tasks.text.diagnostics import warn_if_input_ignored

    constant = ["Kalibrieren"] * 100
    with caplog.at_level("WARNING"):
        assert warn_if_input_ignored(constant, "wmt test (greedy)", encoder_spread=1.2e-4)
    assert "encoder has collapsed (encoder spread 0.00012" in caplog.text and "trainer.lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert warn_if_input_ignored(constant, "wmt test (greedy)", encoder_spread=0.6)
    assert "still tells inputs apart (encoder spread 0.6)" in caplog.text and "collapsed" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert warn_if_input_ignored(constant, "causal-lm test (greedy)", encoder_spread=None)
    assert "encoder" not in caplog.text
