"""The paired bootstrap over test items (kdcore.significance) and the per-item statistics of the text metrics."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from kd_tasks.text.metrics import AGGREGATES, item_statistics, rouge_scores, sacrebleu_scores
from kdcore.errors import KDUserError
from kdcore.evaluation import is_recording_items, record_items, recording_items
from kdcore.significance import ItemStatistics, paired_bootstrap, read_items

SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"


def pairs(count: int = 200) -> tuple[list[str], list[str]]:
    rows = [line.split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:count]]
    return [row[0] for row in rows], [row[1] for row in rows]


def degraded(references: list[str], keep: float, seed: int) -> list[str]:
    """Outputs that copy each reference with probability ``keep`` and otherwise drop half its words."""
    rng = random.Random(seed)
    return [text if rng.random() < keep else " ".join(text.split()[::2]) for text in references]


def statistics(hypotheses: list[str], references: list[str], metric: str) -> ItemStatistics:
    rows = item_statistics(hypotheses, references, [metric])
    return ItemStatistics([str(i) for i in range(len(rows))], np.array([row[metric] for row in rows]),
                          AGGREGATES[metric])


@pytest.mark.parametrize("metric", ["bleu", "chrf", "rougeL", "rouge1"])
def test_summed_item_statistics_give_the_corpus_scores(metric: str) -> None:
    sources, references = pairs()
    hypotheses = degraded(references, 0.5, seed=0)
    corpus = {**sacrebleu_scores(hypotheses, references)[0], **rouge_scores(hypotheses, references)}
    assert statistics(hypotheses, references, metric).score()[0] == pytest.approx(corpus[metric], abs=1e-6)


def test_the_bootstrap_separates_a_better_system_and_not_an_equal_one() -> None:
    _, references = pairs()
    weak = [statistics(degraded(references, 0.3, seed), references, "bleu") for seed in (1, 2)]
    strong = [statistics(degraded(references, 0.8, seed), references, "bleu") for seed in (3, 4)]
    better = paired_bootstrap(strong, weak, label="strong", metric="bleu", resamples=300)
    assert better.difference > 10 and better.p_value < 0.01 and better.low > 0
    same = paired_bootstrap(weak, weak, resamples=300)
    assert same.difference == 0 and same.p_value == 1.0
    # two equally good systems that differ item by item: no difference beyond the items' noise
    close = paired_bootstrap([statistics(degraded(references, 0.5, 5), references, "rougeL")],
                             [statistics(degraded(references, 0.5, 6), references, "rougeL")], resamples=300)
    assert close.p_value > 0.05 and close.low < 0 < close.high
    # the resamples are seeded: the same call gives the same answer
    assert paired_bootstrap(strong, weak, resamples=300).p_value == better.p_value


def test_runs_scored_on_other_items_are_refused() -> None:
    _, references = pairs(20)
    one = statistics(references, references, "chrf")
    other = ItemStatistics(one.ids[::-1], one.statistics, one.aggregate)
    with pytest.raises(KDUserError, match="same test items"):
        paired_bootstrap([one], [other], label="x", metric="chrf")


def test_items_are_recorded_only_inside_the_recording_block(tmp_path: Path) -> None:
    rows = [{"id": "a", "stats": {"rougeL": [50.0]}}, {"id": "b", "stats": {"rougeL": [100.0]}}]
    record_items("greedy", rows, {"rougeL": "mean"})  # nobody records: nothing happens
    assert not is_recording_items()
    with recording_items() as sink:
        assert is_recording_items()
        record_items("greedy", rows, {"rougeL": "mean"})
        record_items("greedy", [{"id": "a", "stats": {"chrf": [1.0]}}, {"id": "b", "stats": {"chrf": [2.0]}}],
                     {"chrf": "mean"})
        with pytest.raises(ValueError, match="unknown aggregates"):
            record_items("greedy", rows, {"x": "median"})
    assert sink["greedy"]["aggregates"] == {"rougeL": "mean", "chrf": "mean"}
    assert sink["greedy"]["items"][1]["stats"] == {"rougeL": [100.0], "chrf": [2.0]}
    (tmp_path / "test_items.json").write_text(json.dumps({"decodings": sink}), encoding="utf-8")
    read = read_items(tmp_path, "rougeL")
    assert read is not None and read.ids == ["a", "b"] and read.score()[0] == 75.0
    assert read_items(tmp_path, "rougeL_beam5") is None and read_items(tmp_path / "none", "rougeL") is None


@pytest.mark.parametrize(("options", "message"), [
    (["--bootstrap"], "--baseline LABEL"),
    (["--baseline", "a", "--resamples", "50"], "add --bootstrap"),
    (["--baseline", "a", "--bootstrap", "--resamples", "0"], "positive number of resamples"),
    (["--baseline", "nobody", "--bootstrap"], "no group has that label"),
])
def test_bad_bootstrap_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str],
                                      message: str) -> None:
    from kdcore.cli import main

    for name in ("a1", "a2", "b1", "b2"):  # finished runs as kd summarize reads them (metrics.json only)
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"task": "toy", "plugin": "vanilla", "metric": "accuracy", "student": {"accuracy": 0.5 + len(name) / 100},
             "teacher": {}, "params": {"student": 1, "teacher": 2}}), encoding="utf-8")
    code = main(["summarize", f"a={tmp_path}/a*", f"b={tmp_path}/b*", *options])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "Traceback" not in error
