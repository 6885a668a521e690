"""Corpus metrics for the text tasks, computed by the reference libraries (never re-implemented).

* Translation: sacrebleu's corpus BLEU and chrF on detokenised text (sacrebleu
  applies its own standard tokenisation, ``13a`` for BLEU), with the metric
  signatures that make the numbers comparable across papers.
* Summarization: rouge-score's ROUGE-1, ROUGE-2 and ROUGE-L F1 with the Porter
  stemmer, averaged over documents (the convention of the ImitKD and BART papers).

Scores are on a 0-100 scale.
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


__all__ = ["ROUGE_TYPES", "rouge_scores", "sacrebleu_scores"]
