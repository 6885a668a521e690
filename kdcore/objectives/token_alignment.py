"""Aligning two tokenizations of one text: which teacher tokens and which student tokens cover the same characters.

Two tokenizers cut a text at different places ("▁Tempera|ture" against "▁Temp|er|ature"). A teacher token and a
student token can only be compared where both cover the same text, so the tokens are merged into *aligned groups*:
the text is cut wherever **both** tokenizations have a token boundary at the same character, and each piece between
two such cuts is one group (teacher tokens i..j, student tokens k..l). These are the minimal pieces on which both
sides predict the same event, the approach of GOLD's byte-offset alignment (TRL, ``_align_by_byte_offsets`` in
``trl/experimental/gold/gold_trainer.py``: walk both offset lists and close a group where the two token ends meet)
and of the chunks of Approximate Likelihood Matching (Minixhofer, Vulić and Ponti, 2025, "Universal
Cross-Tokenizer Distillation via Approximate Likelihood Matching").

Input: each side's tokens as character offsets ``(start, end)`` into the same Python ``str`` (characters, not bytes:
"日本語" is 3 characters), as Hugging Face fast tokenizers return them with ``return_offsets_mapping=True``
(:func:`encode_with_offsets`). The rules, which make the groups independent of each tokenizer's conventions:

* **Special tokens** (offsets ``(0, 0)``: ``</s>``, ``<pad>``, ``<s>``, ...) cover no text and are left out.
* **Whitespace between tokens belongs to the following token.** Only token *ends* are cuts: a token covers the
  text from the previous token's end to its own end. So SentencePiece "▁world" whose offsets skip the space and
  GPT-2 "Ġworld" whose offsets include it cut the text at the same place (after "hello"), and whatever precedes a
  side's first token (leading spaces) belongs to that token. A token whose own span ends in whitespace (a
  ``"hello "`` convention) keeps it; the groups around it are then coarser, never wrong: a cut is only made where
  both sides end a token at the very same character, so the two sides of a group always cover identical text.
* **Tokens that share characters are never separated.** Byte-fallback tokens (``<0xE6>``, ``<0x97>``, ``<0xA5>``
  for "日") and byte-level pieces of one character all carry that character's offsets; a normaliser can also give
  overlapping offsets (NFKC "ﬁ" -> ``(14, 16)``, ``(15, 16)``). No cut is made after a token that the next one
  overlaps, so all of them land in the same group.
* **Empty spans** (``start == end``, e.g. a zero-width token inside the text) add no characters: they join the
  token after them. Empty tokens after the last character form a zero-width group at the end of the text, which is
  kept only when both sides have one (e.g. an end-of-sequence token given the offsets ``(len, len)`` on both sides,
  as GOLD does); otherwise it is dropped, since the other side predicts no such event.
* **Truncation**: a group exists only where both sides cover it entirely; text that one side does not reach (its
  sequence was cut off) belongs to no group.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdcore.errors import KDUserError

#: A token's characters ``[start, end)`` in the text.
Span = tuple[int, int]


@dataclass(frozen=True)
class AlignedGroup:
    """Teacher and student tokens that cover the same characters ``[start, end)`` of the text.

    ``teacher`` and ``student`` are indices into the offset lists given to :func:`align_offsets` (in a batch: the
    logit positions whose target tokens these are), in sequence order, never empty.
    """

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class _Unit:
    """Tokens of one side that no cut can separate, covering ``[start, end)``."""

    positions: tuple[int, ...]
    start: int
    end: int


def is_special(span: Sequence[int]) -> bool:
    """Whether a token's offsets mark it as covering no text (special tokens and padding: ``(0, 0)``)."""
    return int(span[0]) == 0 and int(span[1]) == 0


def token_units(offsets: Sequence[Span]) -> list[_Unit]:
    """One side's tokens as the runs that a cut may separate: a run closes after a token that adds characters (its
    end is beyond the previous cut) and that the next token does not overlap; trailing empty tokens form a
    zero-width last run."""
    tokens = [(position, int(span[0]), int(span[1])) for position, span in enumerate(offsets) if not is_special(span)]
    units: list[_Unit] = []
    pending: list[int] = []
    cut = 0
    for index, (position, _, end) in enumerate(tokens):
        pending.append(position)
        next_start = tokens[index + 1][1] if index + 1 < len(tokens) else None
        if end > cut and (next_start is None or next_start >= end):
            units.append(_Unit(tuple(pending), cut, end))
            pending, cut = [], end
    if pending:
        units.append(_Unit(tuple(pending), cut, cut))
    return units


def align_offsets(teacher_offsets: Sequence[Span], student_offsets: Sequence[Span]) -> list[AlignedGroup]:
    """The aligned groups of two tokenizations of one text, in text order (rules: the module docstring).

    Each group is minimal: no character inside it is a token boundary of both sides. Groups cover the text that
    both sides cover, from its start; a side's tokens beyond the other side's last cut (truncation) are in none.
    """
    teacher, student = token_units(teacher_offsets), token_units(student_offsets)
    groups: list[AlignedGroup] = []
    t_index = s_index = 0
    # Both sides' units tile the text from character 0 without gaps, so after each group both start at one cut.
    while t_index < len(teacher) and s_index < len(student):
        start = teacher[t_index].start
        t_end, s_end = t_index, s_index
        while teacher[t_end].end != student[s_end].end:
            if teacher[t_end].end < student[s_end].end:
                t_end += 1
                if t_end == len(teacher):
                    return groups
            else:
                s_end += 1
                if s_end == len(student):
                    return groups
        groups.append(AlignedGroup(
            teacher=tuple(p for unit in teacher[t_index:t_end + 1] for p in unit.positions),
            student=tuple(p for unit in student[s_index:s_end + 1] for p in unit.positions),
            start=start, end=teacher[t_end].end))
        t_index, s_index = t_end + 1, s_end + 1
    return groups


def encode_with_offsets(tokenizer: Any, texts: Sequence[str], *, target: bool = False,
                        add_special_tokens: bool = True) -> tuple[list[list[int]], list[list[Span]]]:
    """Token ids and character offsets of ``texts`` from a Hugging Face tokenizer (``target``: tokenised as
    targets, ``text_target=``), the offsets :func:`align_offsets` reads.

    Only fast tokenizers (``PreTrainedTokenizerFast``, Rust ``tokenizers``) know where their tokens come from; a
    tokenizer that cannot return an offset mapping is refused with :class:`KDUserError` naming its class.
    """
    keyword = "text_target" if target else "text"
    try:
        encoded = tokenizer(**{keyword: list(texts)}, add_special_tokens=add_special_tokens,
                            return_offsets_mapping=True)
    except NotImplementedError:  # transformers 4's Python tokenizers
        encoded = {}
    offsets = encoded.get("offset_mapping") if hasattr(encoded, "get") else None
    if offsets is None:  # transformers 5's Python tokenizers ignore the option
        raise KDUserError(
            f"Cross-tokenizer alignment needs each token's character offsets, but the tokenizer "
            f"{type(tokenizer).__name__} cannot return them (return_offsets_mapping=True gives no 'offset_mapping': "
            f"it is a slow, Python tokenizer). Use a fast one (PreTrainedTokenizerFast: a tokenizer.json, or "
            f"AutoTokenizer.from_pretrained(..., use_fast=True)); transformers' convert_slow_tokenizer converts many.")
    return ([list(ids) for ids in encoded["input_ids"]],
            [[(int(start), int(end)) for start, end in row] for row in offsets])


__all__ = ["AlignedGroup", "Span", "align_offsets", "encode_with_offsets", "is_special", "token_units"]
