"""Telling a text model that ignores its input from a weak one: the share of distinct outputs, the encoder's spread,
and the warning that names which failure it is (docs/text.md, "Encoder collapse")."""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdcore.interfaces import Batch

log = logging.getLogger(__name__)

#: Below this share of distinct outputs (on >= 20 items) a model is taken to ignore its input.
MIN_DISTINCT_FRACTION = 0.05


def distinct_fraction(hypotheses: Sequence[str]) -> float:
    """Share of distinct outputs among ``hypotheses`` (1.0: all different; 1/n: one output for everything)."""
    return len(set(hypotheses)) / max(1, len(hypotheses))


def first_batch_encoder_spread(model: Any, items: Sequence[Any], collate: Callable[[Sequence[Any]], Batch],
                               device: torch.device, batch_size: int) -> float | None:
    """:func:`~kd_plugins.text.models.encoder_spread` on the first batch of ``items`` (None for decoder-only models).

    Reported with every evaluation because it separates the two ways a model can ignore its source: an
    encoder that maps every input to one vector (spread near 0) and a decoder that has not yet learned to
    attend to a working encoder (spread of order 1).
    """
    from kd_plugins.text.models import encoder_spread

    if not getattr(model, "is_encoder_decoder", False):
        return None
    batch = collate([items[i] for i in range(min(len(items), batch_size))])
    with torch.no_grad():
        return encoder_spread(model.hf_model, batch["input_ids"].to(device), batch["attention_mask"].to(device))


def warn_if_input_ignored(hypotheses: Sequence[str], where: str, encoder_spread: float | None = None) -> bool:
    """Log a warning when a model gives (nearly) the same output for every input, and say so.

    A seq2seq model that has not learned to read its source decodes its target language model's
    favourite sentence for every input; its BLEU/ROUGE then measures that one sentence, which is easy
    to mistake for a weak but working model (docs/text.md, summarization results). With the model's
    ``encoder_spread`` the message also says which failure it is, because the remedies differ.
    """
    from kd_plugins.text.models import COLLAPSED_ENCODER_SPREAD

    if len(hypotheses) < 20 or distinct_fraction(hypotheses) >= MIN_DISTINCT_FRACTION:
        return False
    counts = Counter(hypotheses)  # only on the (rare) warning path
    most_common, count = counts.most_common(1)[0]
    if encoder_spread is None or math.isnan(encoder_spread):
        cause = ""
    elif encoder_spread < COLLAPSED_ENCODER_SPREAD:
        cause = (f" Its encoder has collapsed (encoder spread {encoder_spread:.2g}: one vector for every input); "
                 f"train it at a lower learning rate or with more warm-up steps (trainer.lr / trainer.warmup_steps "
                 f"for the student, teacher.args.lr / teacher.args.warmup_steps for a task-trained teacher).")
    else:
        cause = (f" Its encoder still tells inputs apart (encoder spread {encoder_spread:.2g}), so the decoder has "
                 f"not learned to attend to it yet; more training steps usually fix this.")
    log.warning("%s: only %d distinct outputs for %d inputs (the most common, %d times: %r); the model ignores "
                "its input, so its scores measure a fixed sentence.%s", where, len(counts), len(hypotheses), count,
                most_common[:80], cause)
    return True


__all__ = ["MIN_DISTINCT_FRACTION", "distinct_fraction", "first_batch_encoder_spread", "warn_if_input_ignored"]
