"""Paired bootstrap resampling over test items: is one group of runs better than another on *these* test items?

Welch's t-test over seeds (:mod:`kdcore.summary`) measures how much a method's score moves from seed to seed; the
paired bootstrap measures how much it would move with other test items of the same kind. Each run records, for each
test item, the sufficient statistics of every metric (``test_items.json``, written by the engine from what the task
reports through :func:`kdcore.evaluation.record_items`). A resample draws the items with replacement (the same draw
for every run, hence *paired*), recomputes each corpus metric from the summed statistics, and takes the difference
between the two groups' mean scores over their seeds. This is sacrebleu's paired bootstrap (Koehn 2004; the p-value
as sacrebleu and MultEval compute it) generalised to groups of seeds and to any metric whose corpus score is a
function of summed per-item statistics.

Aggregates a task may name for a metric:

* ``mean``: the statistics are one number per item and the corpus score is their mean (ROUGE F1, accuracy);
* ``ratio``: two numbers per item, and the corpus score is the sum of the first over the sum of the second (a
  corpus word or character error rate: errors, reference length);
* ``sacrebleu:BLEU`` / ``sacrebleu:CHRF``: sacrebleu's own sufficient statistics and score function (default
  settings, the ones :mod:`kd_tasks.text.metrics` scores with).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kdcore.errors import KDUserError

#: The file a finished run records its test items in (kd eval writes EVAL_ITEMS_FILE).
ITEMS_FILE = "test_items.json"
EVAL_ITEMS_FILE = "eval_items.json"
#: Resamples when the caller does not say (sacrebleu's default).
DEFAULT_RESAMPLES = 1000
AGGREGATES = ("mean", "ratio", "sacrebleu:BLEU", "sacrebleu:CHRF")


def corpus_scorer(aggregate: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function from summed statistics ``(R, K)`` and the item count to ``R`` corpus scores, for ``aggregate``."""
    if aggregate == "mean":
        return lambda summed_and_count: summed_and_count[:, 0] / summed_and_count[:, -1]
    if aggregate == "ratio":
        return lambda summed_and_count: summed_and_count[:, 0] / summed_and_count[:, 1]
    if aggregate in ("sacrebleu:BLEU", "sacrebleu:CHRF"):
        from sacrebleu.metrics import BLEU, CHRF

        metric = BLEU() if aggregate.endswith("BLEU") else CHRF()
        return lambda summed_and_count: np.array(
            [metric._compute_score_from_stats(list(row[:-1])).score for row in summed_and_count])
    raise ValueError(f"unknown aggregate '{aggregate}'; known: {', '.join(AGGREGATES)}")


@dataclass
class ItemStatistics:
    """One run's per-item statistics of one metric under one decoding."""

    ids: list[str]
    statistics: np.ndarray  # (items, K)
    aggregate: str

    def score(self, draws: np.ndarray | None = None) -> np.ndarray:
        """The corpus score on each resample (``draws``: ``(R, items)`` positions), or on all items once."""
        if draws is None:
            stats = self.statistics.sum(axis=0, keepdims=True)
        else:  # in chunks of resamples: (R, items, K) at once would hold R x items x K numbers
            stats = np.concatenate([self.statistics[draws[start:start + 100]].sum(axis=1)
                                    for start in range(0, draws.shape[0], 100)])
        count = np.full((stats.shape[0], 1), self.statistics.shape[0] if draws is None else draws.shape[1],
                        dtype=np.float64)
        return corpus_scorer(self.aggregate)(np.concatenate([stats, count], axis=1))


def read_items(run_dir: Path, metric: str) -> ItemStatistics | None:
    """The statistics of ``metric`` a run recorded, or None without them.

    ``NAME_beamK`` reads the items of decoding ``beamK``; any other name the first other decoding (``greedy``, or a
    speech downstream such as ``keyword``) that recorded it.
    """
    for name in (ITEMS_FILE, EVAL_ITEMS_FILE):
        path = Path(run_dir) / name
        if path.exists():
            break
    else:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    base, _, beams = metric.partition("_beam")
    decodings = data.get("decodings", {})
    if beams.isdigit():
        candidates = [decodings.get(f"beam{beams}")]
    else:
        base = metric
        candidates = [entry for name, entry in decodings.items() if not name.startswith("beam")]
    decoding = next((entry for entry in candidates if entry and base in entry.get("aggregates", {})), None)
    if decoding is None:
        return None
    items = decoding["items"]
    return ItemStatistics([str(item["id"]) for item in items],
                          np.array([item["stats"][base] for item in items], dtype=np.float64),
                          decoding["aggregates"][base])


@dataclass
class BootstrapResult:
    """A paired bootstrap of group ``label`` against ``baseline`` on ``metric``."""

    label: str
    metric: str
    difference: float  # mean score of the group minus the baseline's, on all items
    low: float  # 2.5th and 97.5th percentiles of the resampled difference
    high: float
    p_value: float
    items: int
    resamples: int


def paired_bootstrap(group: Sequence[ItemStatistics], baseline: Sequence[ItemStatistics], *, label: str = "",
                     metric: str = "", resamples: int = DEFAULT_RESAMPLES, seed: int = 12345) -> BootstrapResult:
    """Resample the test items (one draw shared by every run) and compare the groups' mean corpus scores.

    The p-value is sacrebleu's: the share of resamples whose centred difference is at least the observed one, with
    the observed sample counted (so it is never 0).
    """
    runs = [*group, *baseline]
    ids = runs[0].ids
    for run in runs[1:]:
        if run.ids != ids:
            raise KDUserError(f"The paired bootstrap on {metric or 'this metric'} needs every run scored on the same "
                              f"test items in the same order; the runs of '{label}' and its baseline differ "
                              f"({len(run.ids)} vs {len(ids)} items, or another order). Compare runs of the same "
                              f"task and test split.")
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))

    def mean_score(runs: Sequence[ItemStatistics], resampled: np.ndarray | None) -> np.ndarray:
        return np.mean([run.score(resampled) for run in runs], axis=0)

    observed = float(mean_score(group, None)[0] - mean_score(baseline, None)[0])
    sampled = mean_score(group, draws) - mean_score(baseline, draws)
    centred = np.abs(sampled - sampled.mean())
    p_value = float((1 + np.sum(centred >= abs(observed))) / (resamples + 1))
    low, high = np.percentile(sampled, [2.5, 97.5])
    return BootstrapResult(label, metric, observed, float(low), float(high), p_value, len(ids), resamples)


def bootstrap_groups(groups: Mapping[str, Sequence[Path]], baseline: str, metrics: Sequence[str],
                     resamples: int = DEFAULT_RESAMPLES) -> tuple[list[BootstrapResult], list[str]]:
    """Every group against ``baseline`` on each metric whose item statistics all their runs recorded; also the
    metrics left out, with why."""
    if baseline not in groups:
        raise KDUserError(f"kd summarize --baseline {baseline!r}: no group has that label; the groups are "
                          f"{sorted(groups)} (label a group with LABEL=GLOB).")
    results, skipped = [], []
    for metric in metrics:
        recorded = {label: [read_items(run, metric) for run in runs] for label, runs in groups.items()}
        missing = sorted(label for label, items in recorded.items() if any(item is None for item in items))
        if missing:
            skipped.append(f"{metric} (no per-item statistics in runs of {', '.join(missing)})")
            continue
        for label, items in recorded.items():
            if label != baseline:
                results.append(paired_bootstrap(items, recorded[baseline], label=label, metric=metric,  # type: ignore[arg-type]
                                                resamples=resamples))
    return results, skipped


def markdown_bootstrap(results: Sequence[BootstrapResult], baseline: str, skipped: Sequence[str],
                       decimals: int = 3) -> str:
    """The bootstrap results as a Markdown table (plus the metrics that could not be tested)."""
    lines = [f"Paired bootstrap over test items against `{baseline}` (the groups' mean scores over their seeds; "
             f"p < 0.05 is a difference beyond the test set's sampling noise):", "",
             "| | metric | difference | 95% interval | p | items | resamples |", "|---|---|---|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result.label} | {result.metric} | {result.difference:+.{decimals}f} | "
                     f"[{result.low:+.{decimals}f}, {result.high:+.{decimals}f}] | {result.p_value:.3f} | "
                     f"{result.items} | {result.resamples} |")
    if skipped:
        lines += ["", "Not tested: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def results_json(results: Sequence[BootstrapResult]) -> list[dict[str, Any]]:
    """The results as JSON-ready dicts."""
    return [vars(result).copy() for result in results]


__all__ = ["AGGREGATES", "BootstrapResult", "DEFAULT_RESAMPLES", "EVAL_ITEMS_FILE", "ITEMS_FILE", "ItemStatistics",
           "bootstrap_groups", "corpus_scorer", "markdown_bootstrap", "paired_bootstrap", "read_items",
           "results_json"]
