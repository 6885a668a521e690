"""Cross-tokenizer distillation: the offset alignment (hand-made strings where the right merge is known, and real
BPE tokenizers trained on the wmt sample), the ``cross_tokenizer`` objective against a naive autograd reference, and
heads that differ only by padding rows."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdcore.errors import KDUserError
from kdcore.objectives import divergence, library
from kdcore.objectives.cross_tokenizer import DISTANCES, LIKELIHOOD_EPSILON, batch_groups, cross_tokenizer_loss
from kdcore.objectives.token_alignment import AlignedGroup, align_offsets, encode_with_offsets, token_units
from kdcore.padding import pad_rows
from kdcore.signals import IGNORE_INDEX, Signals, SparseLogits

SAMPLE = Path(__file__).resolve().parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"


def spans(text: str, *pieces: str, skip_spaces: bool = False) -> list[tuple[int, int]]:
    """Offsets of consecutive ``pieces`` of ``text`` (``skip_spaces``: a piece's leading spaces are left out of its
    span, as SentencePiece-style offsets do)."""
    out, cursor = [], 0
    for piece in pieces:
        assert text.startswith(piece, cursor), (text, piece, cursor)
        start = cursor + (len(piece) - len(piece.lstrip(" ")) if skip_spaces else 0)
        cursor += len(piece)
        out.append((start, cursor))
    return out


def pairs(groups: list[AlignedGroup]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(group.teacher, group.student) for group in groups]


# --------------------------------------------------------------------------- hand-made alignments
def test_different_splits_merge_into_the_pieces_both_cover() -> None:
    text = "unbelievable day"
    teacher = spans(text, "un", "believ", "able", " day")
    student = spans(text, "unbeli", "evable", " d", "ay")
    groups = align_offsets(teacher, student)
    assert pairs(groups) == [((0, 1, 2), (0, 1)), ((3,), (2, 3))]
    assert [(g.start, g.end) for g in groups] == [(0, 12), (12, 16)]


def test_leading_space_conventions_cut_at_the_same_place() -> None:
    text = "hello big world"
    gpt2 = spans(text, "hello", " big", " world")  # "Ġbig": the offsets include the space
    sentencepiece = spans(text, "hello", " big", " wor", "ld", skip_spaces=True)  # "▁big" without it
    groups = align_offsets(gpt2, sentencepiece)
    assert pairs(groups) == [((0,), (0,)), ((1,), (1,)), ((2,), (2, 3))]
    assert [text[g.start:g.end] for g in groups] == ["hello", " big", " world"]
    # leading white space belongs to the first token, whichever side's offsets cover it
    text = "  lead"
    assert pairs(align_offsets([(0, 1), (1, 4), (4, 6)], [(2, 6)])) == [((0, 1, 2), (0,))]


def test_whitespace_only_tokens_and_double_spaces() -> None:
    text = "refresh  all"
    teacher = spans(text, "refresh", " ", " all")  # "▁" then "▁all", as the task's BPE does
    student = spans(text, "refresh", "  all")
    assert pairs(align_offsets(teacher, student)) == [((0,), (0,)), ((1, 2), (1,))]
    # a token that keeps its trailing space ("hello " convention): a coarser group, never a wrong one
    text = "hello world"
    trailing = spans(text, "hello ", "world")
    leading = spans(text, "hello", " world")
    groups = align_offsets(trailing, leading)
    assert pairs(groups) == [((0, 1), (0, 1))] and (groups[0].start, groups[0].end) == (0, 11)


def test_unicode_offsets_are_characters() -> None:
    text = "naïve café 日本語"
    teacher = spans(text, "na", "ïve", " café", " 日本", "語")
    student = spans(text, "naï", "ve", " caf", "é", " 日", "本語", skip_spaces=True)
    groups = align_offsets(teacher, student)
    assert pairs(groups) == [((0, 1), (0, 1)), ((2,), (2, 3)), ((3, 4), (4, 5))]
    assert [text[g.start:g.end] for g in groups] == ["naïve", " café", " 日本語"]


def test_byte_fallback_tokens_stay_together() -> None:
    text = "x 日本"
    # "<0xE6>", "<0x97>", "<0xA5>" all point at "日", the next three at "本"
    teacher = [(0, 1), (1, 3), (1, 3), (1, 3), (3, 4), (3, 4), (3, 4)]
    student_words = [(0, 1), (1, 4)]
    student_chars = [(0, 1), (1, 3), (3, 4)]
    assert pairs(align_offsets(teacher, student_words)) == [((0,), (0,)), ((1, 2, 3, 4, 5, 6), (1,))]
    assert pairs(align_offsets(teacher, student_chars)) == [((0,), (0,)), ((1, 2, 3), (1,)), ((4, 5, 6), (2,))]
    # the first byte token ending where a student token ends is not a cut: its siblings follow on that character
    assert len(token_units(teacher)) == 3
    # overlapping offsets from a normaliser (NFKC "ﬁ" -> "▁f" (0, 2), "i" (1, 2)) are one unit too
    assert pairs(align_offsets([(0, 2), (1, 2), (2, 3)], [(0, 2), (2, 3)])) == [((0, 1), (0,)), ((2,), (1,))]


def test_empty_spans_join_the_next_token_and_special_tokens_are_left_out() -> None:
    text = "hello world"
    teacher = [(0, 0), (0, 5), (5, 5), (5, 11), (0, 0)]  # <s> hello <zero-width> Ġworld </s>
    student = [(0, 5), (6, 11), (0, 0), (0, 0)]
    assert pairs(align_offsets(teacher, student)) == [((1,), (0,)), ((2, 3), (1,))]
    # an end-of-sequence token given the zero-width span at the end: paired when both sides have one
    n = len(text)
    assert pairs(align_offsets([(0, 5), (5, 11), (n, n)], [(0, 11), (n, n)])) == [((0, 1), (0,)), ((2,), (1,))]
    assert pairs(align_offsets([(0, 5), (5, 11), (n, n)], [(0, 11)])) == [((0, 1), (0,))]
    assert align_offsets([(0, 0)], [(0, 5)]) == [] and align_offsets([], []) == []


def test_truncation_keeps_only_what_both_sides_cover() -> None:
    text = "the quick brown fox"
    teacher = spans(text, "the", " quick", " brown", " fox")
    student = spans(text, "the", " qu", "ick", " bro")  # truncated inside "brown"
    groups = align_offsets(teacher, student)
    assert pairs(groups) == [((0,), (0,)), ((1,), (1, 2))]
    assert pairs(align_offsets(teacher[:2], spans(text, "the", " quick", " brown"))) == [((0,), (0,)), ((1,), (1,))]


# --------------------------------------------------------------------------- real tokenizers
@pytest.fixture(scope="module")
def sample_texts() -> list[str]:
    rows = [line.rstrip("\n").split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    return [source for source, _ in rows] + [target for _, target in rows]


@pytest.fixture(scope="module")
def tokenizers(sample_texts: list[str]) -> dict[str, object]:
    """The text tasks' BPE recipe at 800 and 400 tokens, and two other conventions: a BERT-like whitespace
    pre-tokeniser (offsets without the spaces) and a SentencePiece-like BPE with byte fallback."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kd_tasks.text.tokenizer import train_bpe_tokenizer

    def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")

    whitespace = Tokenizer(models.BPE(unk_token="<unk>"))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    whitespace.train_from_iterator(sample_texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"],
                                                                     show_progress=False))
    byte_fallback = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    byte_fallback.pre_tokenizer = pre_tokenizers.Metaspace()
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    byte_fallback.train_from_iterator(sample_texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<pad>", "<unk>", *byte_tokens], show_progress=False))
    return {"bpe800": train_bpe_tokenizer(sample_texts, 800), "bpe400": train_bpe_tokenizer(sample_texts, 400),
            "whitespace": wrap(whitespace), "byte_fallback": wrap(byte_fallback)}


def unit_ends(offsets: list[tuple[int, int]]) -> set[int]:
    return {unit.end for unit in token_units(offsets)}


def check_alignment(text: str, teacher_tokenizer: object, student_tokenizer: object) -> list[AlignedGroup]:
    (_,), (teacher,) = encode_with_offsets(teacher_tokenizer, [text])
    (_,), (student,) = encode_with_offsets(student_tokenizer, [text])
    groups = align_offsets(teacher, student)
    # the groups tile the text from its start to its last character, in order
    assert groups and groups[0].start == 0 and groups[-1].end == len(text.rstrip())
    assert all(a.end == b.start for a, b in zip(groups, groups[1:]))
    # every token with text is in exactly one group, on both sides
    for side, offsets in (("teacher", teacher), ("student", student)):
        placed = sorted(p for g in groups for p in getattr(g, side))
        assert placed == [p for p, span in enumerate(offsets) if span != (0, 0)], (text, side)
    # both sides end a token at each cut, and no cut inside a group is shared (the groups are minimal)
    common = unit_ends(teacher) & unit_ends(student)
    for group in groups:
        assert group.end in common and not any(group.start < cut < group.end for cut in common)
        # both sides' tokens of a group cover exactly its characters (up to the white space before them)
        for side, offsets in (("teacher", teacher), ("student", student)):
            positions = getattr(group, side)
            assert max(offsets[p][1] for p in positions) == group.end
            assert not text[group.start:min(offsets[p][0] for p in positions)].strip()
    return groups


def test_real_bpe_tokenizers_align_on_real_sentences(sample_texts: list[str], tokenizers: dict) -> None:
    merged = 0
    for text in sample_texts:
        groups = check_alignment(text, tokenizers["bpe800"], tokenizers["bpe400"])
        merged += sum(len(g.teacher) > 1 or len(g.student) > 1 for g in groups)
        # the two tokenizers agree on each group's text: the concatenated tokens are the same string
        (teacher_ids,), (student_ids,) = (encode_with_offsets(tokenizers[name], [text])[0] for name in ("bpe800",
                                                                                                        "bpe400"))
        for group in groups:
            pieces = [tokenizers[name].convert_ids_to_tokens([ids[p] for p in getattr(group, side)])
                      for name, ids, side in (("bpe800", teacher_ids, "teacher"), ("bpe400", student_ids, "student"))]
            assert "".join(pieces[0]) == "".join(pieces[1])
    assert merged > len(sample_texts)  # the vocabularies really cut differently


def test_real_tokenizers_with_other_space_and_byte_conventions(sample_texts: list[str], tokenizers: dict) -> None:
    for text in sample_texts[:200]:
        check_alignment(text, tokenizers["bpe800"], tokenizers["whitespace"])
        check_alignment(text, tokenizers["byte_fallback"], tokenizers["bpe400"])
    text = "Die Größe naïve café 日本語 ist 10°C"
    groups = check_alignment(text, tokenizers["byte_fallback"], tokenizers["whitespace"])
    (ids,), (offsets,) = encode_with_offsets(tokenizers["byte_fallback"], [text])
    tokens = tokenizers["byte_fallback"].convert_ids_to_tokens(ids)
    assert tokens.count("<0xE6>") >= 1  # 日 and 本 really fall back to bytes
    for group in groups:
        if "日" in text[group.start:group.end]:
            bytes_of_ri = [p for p, span in enumerate(offsets) if text[span[0]:span[1]].endswith("日")]
            assert len(bytes_of_ri) == 3 and set(bytes_of_ri) <= set(group.teacher)


def test_a_tokenizer_without_offsets_is_refused() -> None:
    from transformers import ByT5Tokenizer

    class RaisingTokenizer:  # what transformers 4's Python tokenizers do with return_offsets_mapping=True
        def __call__(self, **_: object) -> dict:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers.")

    for slow, name in ((ByT5Tokenizer(), "ByT5Tokenizer"), (RaisingTokenizer(), "RaisingTokenizer")):
        with pytest.raises(KDUserError, match=f"{name} cannot return them.*return_offsets_mapping") as raised:
            encode_with_offsets(slow, ["hello world"])
        assert raised.value.exit_code == 2


# --------------------------------------------------------------------------- the objective
def reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_labels: torch.Tensor,
                   teacher_labels: torch.Tensor, groups: list[list[AlignedGroup]], distance: str,
                   temperature: float) -> torch.Tensor:
    """The loss from its definition, one group at a time, in float64 autograd."""
    s_log_probs = F.log_softmax(student_logits.double(), -1)
    t_log_probs = F.log_softmax(teacher_logits.double(), -1)
    values = []
    for row, row_groups in enumerate(groups):
        for group in row_groups:
            log_t = sum(t_log_probs[row, p, teacher_labels[row, p]] for p in group.teacher)
            log_s = sum(s_log_probs[row, p, student_labels[row, p]] for p in group.student)
            y_t = torch.exp(log_t / temperature - LIKELIHOOD_EPSILON)
            y_s = torch.exp(log_s / temperature - LIKELIHOOD_EPSILON)
            if distance == "reverse_binary_kl":
                y_t, y_s = y_s, y_t
            if distance in ("binary_kl", "reverse_binary_kl"):
                values.append(y_t * torch.log(y_t / y_s) + (1 - y_t) * torch.log((1 - y_t) / (1 - y_s)))
            elif distance == "abs_log":
                values.append((torch.log(y_t) - torch.log(y_s)).abs())
            else:
                values.append((y_t - y_s).abs())
    return torch.stack(values).mean()


def tokenized_batch(texts: list[str], teacher_tokenizer: object, student_tokenizer: object) -> dict:
    """Both sides' target ids and offsets for ``texts``, padded (labels -100, offsets (0, 0))."""
    t_ids, t_offsets = encode_with_offsets(teacher_tokenizer, texts, target=True)
    s_ids, s_offsets = encode_with_offsets(student_tokenizer, texts, target=True)

    def offsets(rows: list[list[tuple[int, int]]]) -> torch.Tensor:
        width = max(len(row) for row in rows)
        return torch.tensor([row + [(0, 0)] * (width - len(row)) for row in rows], dtype=torch.long)

    return {"labels": pad_rows(s_ids, IGNORE_INDEX), "teacher_labels": pad_rows(t_ids, IGNORE_INDEX),
            "student_offsets": offsets(s_offsets), "teacher_offsets": offsets(t_offsets)}


def test_zero_loss_when_the_group_likelihoods_agree() -> None:
    # teacher: "ab" as one token with p = 0.3; student: "a" (p = 0.6) then "b" (p = 0.5): p("ab") = 0.3 on both
    def logits_for(probability: float, target: int, vocab: int = 5) -> torch.Tensor:
        rest = (1 - probability) / (vocab - 1)
        return torch.tensor([probability if token == target else rest for token in range(vocab)]).log()

    teacher = torch.stack([logits_for(0.3, 2)])[None]
    student = torch.stack([logits_for(0.6, 1), logits_for(0.5, 4)])[None].requires_grad_()
    groups = [align_offsets([(0, 2)], [(0, 1), (1, 2)])]
    labels_t, labels_s = torch.tensor([[2]]), torch.tensor([[1, 4]])
    for distance in DISTANCES:
        for temperature in (1.0, 100.0):
            loss = cross_tokenizer_loss(student, teacher, labels_s, labels_t, groups, distance=distance,
                                        temperature=temperature)
            assert abs(float(loss.detach())) < 1e-6, (distance, temperature)
    other = torch.stack([logits_for(0.6, 1), logits_for(0.2, 4)])[None]
    assert float(cross_tokenizer_loss(other, teacher, labels_s, labels_t, groups)) > 1e-3


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_loss_and_gradients_match_a_naive_reference(distance: str, temperature: float, tokenizers: dict) -> None:
    texts = ["Enable preconditioning.", "Keine Daten von der SFR-Box empfangen.", "Max temperature"]
    batch = tokenized_batch(texts, tokenizers["bpe800"], tokenizers["bpe400"])
    generator = torch.Generator().manual_seed(0)
    t_labels, s_labels = batch["teacher_labels"], batch["labels"].clone()
    s_labels[0, 1] = IGNORE_INDEX  # an unscored student position: its group is dropped
    student = torch.randn(3, s_labels.shape[1], 400, generator=generator).requires_grad_()
    teacher = torch.randn(3, t_labels.shape[1], 800, generator=generator)
    groups = batch_groups(batch["teacher_offsets"], batch["student_offsets"], t_labels, s_labels)
    full = batch_groups(batch["teacher_offsets"], batch["student_offsets"], t_labels, batch["labels"])
    assert sum(map(len, groups)) == sum(map(len, full)) - 1
    assert all(1 not in g.student for g in groups[0])
    loss = cross_tokenizer_loss(student, teacher, s_labels, t_labels, groups, distance=distance,
                                temperature=temperature)
    (grad,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().double().requires_grad_()
    expected = reference_loss(reference_student, teacher, s_labels, t_labels, groups, distance, temperature)
    (expected_grad,) = torch.autograd.grad(expected, reference_student)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert float(grad[0, 1].abs().sum()) == 0.0  # the ignored position gets no gradient
    assert float(grad[s_labels == IGNORE_INDEX].abs().sum()) == 0.0


def test_objective_reads_the_batch_and_refuses_what_it_cannot_use(tokenizers: dict) -> None:
    texts = ["Read mode", "Die Zentraleinheit von devolo Home Control funktioniert nicht."]
    batch = tokenized_batch(texts, tokenizers["bpe800"], tokenizers["bpe400"])
    generator = torch.Generator().manual_seed(1)
    student_logits = torch.randn(2, batch["labels"].shape[1], 400, generator=generator).requires_grad_()
    teacher_logits = torch.randn(2, batch["teacher_labels"].shape[1], 800, generator=generator)
    objective = library.CrossTokenizerObjective(library.CrossTokenizerConfig(distance="binary_kl", temperature=2.0))
    output = objective(Signals(logits=student_logits), Signals(logits=teacher_logits), batch)
    groups = batch_groups(batch["teacher_offsets"], batch["student_offsets"], batch["teacher_labels"],
                          batch["labels"])
    expected = reference_loss(student_logits.detach(), teacher_logits, batch["labels"], batch["teacher_labels"],
                              groups, "binary_kl", 2.0)
    assert float(output.loss) == pytest.approx(float(expected), rel=1e-5)
    assert output.parts["groups"] == sum(map(len, groups))
    assert output.parts["aligned_fraction"] < 1.0  # </s> has no text (offsets (0, 0)): it is in no group
    output.loss.backward()
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0

    without = {key: value for key, value in batch.items() if key != "teacher_offsets"}
    with pytest.raises(KDUserError, match="teacher_offsets"):
        objective(Signals(logits=student_logits), Signals(logits=teacher_logits), without)
    with pytest.raises(KDUserError, match="student_offsets.*shape"):
        objective(Signals(logits=student_logits), Signals(logits=teacher_logits),
                  {**batch, "student_offsets": batch["student_offsets"][:, :-1]})
    top = teacher_logits.topk(4, dim=-1)
    with pytest.raises(KDUserError, match="top-k"):
        objective(Signals(logits=student_logits), Signals(logits=SparseLogits(top.values, top.indices, 800)), batch)
    with pytest.raises(KDUserError, match="labels"):
        objective(Signals(logits=student_logits), Signals(logits=teacher_logits),
                  {key: value for key, value in batch.items() if key != "labels"})


# --------------------------------------------------------------------------- padding rows
def test_heads_that_differ_only_by_padding_rows_are_accepted() -> None:
    generator = torch.Generator().manual_seed(2)
    vocab, padded, hidden = 40, 64, 8
    labels = torch.tensor([[3, 5, IGNORE_INDEX], [7, 1, 2]])
    student_hidden = torch.randn(2, 3, hidden, generator=generator, requires_grad=True)
    student_weight = torch.randn(vocab, hidden, generator=generator)
    teacher_hidden = torch.randn(2, 3, hidden, generator=generator)
    teacher_weight = torch.randn(padded, hidden, generator=generator)  # rows 40..63: padding of a rounded-up head
    student_logits = student_hidden @ student_weight.T
    teacher_logits = teacher_hidden @ teacher_weight.T
    want = divergence(student_logits, teacher_logits[..., :vocab], "forward_kl", labels=labels)
    tell = {library.TOKENIZER_VOCAB_SIZE: vocab}
    for fused in (False, True):
        objective = library.ForwardKLObjective(library.KLConfig(fused=fused))
        student = Signals(logits=None if fused else student_logits, final_hidden=student_hidden,
                          output_weight=student_weight, extra=dict(tell))
        teacher = Signals(logits=None if fused else teacher_logits, final_hidden=teacher_hidden,
                          output_weight=teacher_weight, extra=dict(tell))
        output = objective(student, teacher, {"labels": labels})
        assert output.parts["fused"] == float(fused)
        torch.testing.assert_close(output.loss, want, rtol=1e-5, atol=1e-6)
    # a student that does not report its size is taken at its head's (its head has no padding)
    output = library.ForwardKLObjective(library.KLConfig(fused=False))(
        Signals(logits=student_logits), Signals(logits=teacher_logits, extra=dict(tell)), {"labels": labels})
    torch.testing.assert_close(output.loss, want, rtol=1e-5, atol=1e-6)
    # a top-k teacher from the padded head keeps its ids and takes the tokenizer's size
    top = teacher_logits[..., :vocab].topk(5, dim=-1)
    sparse = SparseLogits(top.values, top.indices, padded)
    output = library.ForwardKLObjective(library.KLConfig(fused=False))(
        Signals(logits=student_logits), Signals(logits=sparse, extra=dict(tell)), {"labels": labels})
    assert math.isfinite(float(output.loss))
    # cross-tokenizer objectives ignore padding rows as well: the ULD of the trimmed logits
    uld = library.ULDObjective()(Signals(logits=student_logits), Signals(logits=teacher_logits, extra=dict(tell)),
                                 {"labels": labels})
    from kdcore.objectives import uld_loss
    torch.testing.assert_close(uld.loss, uld_loss(student_logits, teacher_logits[..., :vocab], student_labels=labels))


def test_a_true_vocabulary_mismatch_is_refused_with_the_cross_tokenizer_objectives() -> None:
    student, teacher = torch.randn(1, 2, 40), torch.randn(1, 2, 64)
    objective = library.ForwardKLObjective(library.KLConfig(fused=False))
    with pytest.raises(KDUserError, match="different vocabularies.*cross_tokenizer.*uld") as raised:
        objective(Signals(logits=student), Signals(logits=teacher), {})
    assert raised.value.exit_code == 2
    # a reported size that differs from the other side's is a true mismatch too
    with pytest.raises(KDUserError, match="different vocabularies"):
        objective(Signals(logits=student), Signals(logits=teacher, extra={library.TOKENIZER_VOCAB_SIZE: 50}), {})
    with pytest.raises(KDUserError, match="only 40 rows"):
        objective(Signals(logits=student, extra={library.TOKENIZER_VOCAB_SIZE: 41}), Signals(logits=teacher), {})
    sparse = SparseLogits(torch.zeros(1, 2, 1), torch.full((1, 2, 1), 60), 64)
    with pytest.raises(KDUserError, match="padding rows"):
        objective(Signals(logits=student), Signals(logits=sparse, extra={library.TOKENIZER_VOCAB_SIZE: 40}), {})
