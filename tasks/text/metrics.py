"""Corpus metrics for the text tasks, computed by the reference libraries (never re-implemented).

* Translation: sacrebleu's corpus BLEU and chrF on detokenised text (sacrebleu
  applies its own standard tokenisation, ``13a`` for BLEU), with the metric
  signatures that make the numbers comparable across papers.
* Summarization: rouge-score's ROUGE-1, ROUGE-2 and ROUGE-L F1 with the Porter
  stemmer, averaged over documents (the convention of the ImitKD and BART papers).

Scores are on a 0-100 scale. :func:`item_statistics` gives the same scores' per-item sufficient statistics for the
paired bootstrap over test items (:mod:`kdcore.significance`): sacrebleu's own for BLEU and chrF, each document's F1
for ROUGE.
"""
from __future__ import annotations

from collections.abc import Sequence


def sacrebleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each, and the sacrebleu signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    scores = {"bleu": float(bleu_score.score), "chrf": float(chrf_score.score)}
    signatures = {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
    return scores, signatures


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) with stemming, from Google's rouge-score package."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        for name, score in scorer.score(reference, hypothesis).items():  # score(target, prediction)
            totals[name] += score.fmeasure
    count = max(1, len(hypotheses))
    return {name: 100.0 * total / count for name, total in totals.items()}


#: How each metric's corpus score follows from the summed per-item statistics (kdcore.significance.AGGREGATES).
AGGREGATES = {"bleu": "sacrebleu:BLEU", "chrf": "sacrebleu:CHRF", **dict.fromkeys(ROUGE_TYPES, "mean")}


def item_statistics(hypotheses: Sequence[str], references: Sequence[str],
                    metrics: Sequence[str]) -> list[dict[str, list[float]]]:
    """Per test item, the sufficient statistics of each of ``metrics`` (bleu, chrf, rouge1/2/L): summed over the
    items and aggregated as :data:`AGGREGATES` says, they give :func:`sacrebleu_scores`' and :func:`rouge_scores`'
    corpus scores."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    unknown = sorted(set(metrics) - set(AGGREGATES))
    if unknown:
        raise ValueError(f"no per-item statistics for {unknown}; known: {', '.join(AGGREGATES)}")
    rows: list[dict[str, list[float]]] = [{} for _ in hypotheses]
    for name in metrics:
        if name in ("bleu", "chrf"):
            from sacrebleu.metrics import BLEU, CHRF

            metric = BLEU() if name == "bleu" else CHRF()
            for row, stats in zip(rows, metric._extract_corpus_statistics(list(hypotheses), [list(references)])):
                row[name] = [float(value) for value in stats]
    rouge = [name for name in metrics if name in ROUGE_TYPES]
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge, use_stemmer=True)
        for row, hypothesis, reference in zip(rows, hypotheses, references):
            for name, score in scorer.score(reference, hypothesis).items():
                row[name] = [100.0 * score.fmeasure]
    return rows


__all__ = ["AGGREGATES", "ROUGE_TYPES", "item_statistics", "rouge_scores", "sacrebleu_scores"]
