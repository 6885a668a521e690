"""Top-k teachers with their tail mass: every divergence kind on the (k+1)-atom "bucket" distributions.

Checked against a naive float64 autograd implementation of the bucket divergences (values and
gradients, as Liger-Kernel's chunked-loss tests check their kernels against plain torch), against
the full-vocabulary divergence (equal when the teacher's tail is shaped like the student's, a lower
bound otherwise that tightens as k grows and is exact at k = V), and the fused path against the dense one.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcore import signals as signals_module
from kdcore.errors import KDUserError
from kdcore.fused import fused_linear_sparse_divergence
from kdcore.objectives import library
from kdcore.objectives.divergence import DIVERGENCE_KINDS, divergence
from kdcore.signals import Signals, SparseLogits

RTOL = 1e-5


def randn(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    """Norm-wise relative closeness (a float32 result against a float64 reference)."""
    error = float(torch.linalg.vector_norm(got.double() - want.double()))
    assert error <= rtol * float(torch.linalg.vector_norm(want.double())) + 1e-7, (error, got, want)


def kind_value(kind: str, log_s: torch.Tensor, log_t: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    """A divergence per row from its definition, on log-probabilities over the last dim."""
    p_s, p_t = log_s.exp(), log_t.exp()

    def kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)

    if kind == "forward_kl":
        return kl(p_t, log_t, log_s)
    if kind == "reverse_kl":
        return kl(p_s, log_s, log_t)
    if kind == "jsd":
        log_m = (beta * p_t + (1 - beta) * p_s).log()
        return beta * kl(p_t, log_t, log_m) + (1 - beta) * kl(p_s, log_s, log_m)
    if kind == "skew_forward_kl":
        return kl(p_t, log_t, (skew * p_t + (1 - skew) * p_s).log())
    if kind == "skew_reverse_kl":
        return kl(p_s, log_s, (skew * p_s + (1 - skew) * p_t).log())
    return 0.5 * (p_t - p_s).abs().sum(-1)


def naive_bucket(student: torch.Tensor, teacher: SparseLogits, kind: str, *, temperature: float = 1.0,
                 labels: torch.Tensor | None = None, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """The bucket divergence with plain torch ops (log_softmax, gather, logsumexp), float64 autograd."""
    log_s = torch.log_softmax(student.double() / temperature, -1)
    ids = teacher.indices.long()
    student_top = log_s.gather(-1, ids)
    student_rest = log_s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    assert teacher.tail_log_mass is not None
    tail = teacher.tail_log_mass.double().unsqueeze(-1)
    teacher_top = torch.log_softmax(teacher.values.double() / temperature, -1) + torch.log1p(-tail.exp())
    per_row = kind_value(kind, torch.cat([student_top, student_rest], -1), torch.cat([teacher_top, tail], -1),
                         beta, skew)
    if labels is not None:
        per_row = per_row[labels != -100]
    return per_row.mean()


# --------------------------------------------------------------------------- from_dense
def test_from_dense_keeps_the_top_k_and_the_exact_tail_mass(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = randn(3, 4, 20, seed=1)
    original = logits.clone()
    monkeypatch.setattr(signals_module, "_FROM_DENSE_BLOCK_BYTES", 3 * 20 * 4)  # three rows a block: 4 blocks
    for temperature in (1.0, 2.5):
        sparse = SparseLogits.from_dense(logits, 5, temperature=temperature)
        top = logits.topk(5, dim=-1)
        assert torch.equal(sparse.values, top.values) and torch.equal(sparse.indices, top.indices)
        assert sparse.vocab_size == 20 and sparse.tail_temperature == temperature
        covered = torch.softmax(logits.double() / temperature, -1).gather(-1, top.indices).sum(-1)
        close(sparse.tail_log_mass, torch.log(1 - covered), 1e-6)
    assert torch.equal(logits, original)  # the input is not used as scratch
    assert bool((SparseLogits.from_dense(logits, 20).tail_log_mass == float("-inf")).all())
    # a confident row: the tail (about e^-60) is far below float32's 1 - sum(top-k) resolution, and still exact
    confident = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    tail = SparseLogits.from_dense(confident, 1).tail_log_mass
    close(tail, torch.tensor([math.log(3.0) - 60.0]), 1e-6)
    with pytest.raises(ValueError, match="k must be"):
        SparseLogits.from_dense(logits, 21)
    with pytest.raises(ValueError, match="tail_log_mass"):
        SparseLogits(top.values, top.indices, 20, tail_log_mass=torch.zeros(3))


# --------------------------------------------------------------------------- against the naive reference
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_values_and_gradients_match_the_naive_bucket_reference(kind: str) -> None:
    student = randn(3, 5, 24, seed=2).requires_grad_()
    teacher = SparseLogits.from_dense(randn(3, 5, 24, seed=3), 4, temperature=1.5)
    labels = torch.randint(0, 24, (3, 5), generator=torch.Generator().manual_seed(4))
    labels[1, :2] = -100
    loss = divergence(student, teacher, kind, temperature=1.5, labels=labels, beta=0.3, skew=0.2, chunk_size=4)
    loss.backward()
    reference_student = student.detach().double().requires_grad_()
    expected = naive_bucket(reference_student, teacher, kind, temperature=1.5, labels=labels, beta=0.3, skew=0.2)
    expected.backward()
    close(loss.detach(), expected.detach())
    close(student.grad, reference_student.grad)


# --------------------------------------------------------------------------- against the dense divergence
def proportional_tail_teacher(student: torch.Tensor, k: int, tail_mass: float, temperature: float,
                              seed: int) -> tuple[torch.Tensor, SparseLogits]:
    """Dense teacher logits whose mass outside k chosen ids is ``tail_mass`` spread like the student's
    (at ``temperature``), and the same teacher as top-k + tail."""
    rows, vocab = student.shape
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(rows)])
    in_top = torch.zeros(rows, vocab, dtype=torch.bool).scatter(-1, ids, True)
    log_s = torch.log_softmax(student.double() / temperature, -1)
    student_tail = log_s.masked_fill(in_top, float("-inf")).logsumexp(-1, keepdim=True)
    log_t = (log_s - student_tail + math.log(tail_mass)).masked_fill(in_top, 0.0)
    top = torch.log_softmax(torch.randn(rows, k, generator=generator, dtype=torch.float64) * 2, -1)
    log_t = log_t.scatter(-1, ids, top + math.log(1 - tail_mass))
    dense = (log_t * temperature).float()
    sparse = SparseLogits(dense.gather(-1, ids), ids, vocab, torch.full((rows,), math.log(tail_mass)), temperature)
    return dense, sparse


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_exact_when_the_teacher_tail_is_shaped_like_the_student_tail(kind: str) -> None:
    student = randn(6, 30, seed=5)
    dense, sparse = proportional_tail_teacher(student, 5, 0.3, 2.0, seed=6)
    got_student = student.clone().requires_grad_()
    got = divergence(got_student, sparse, kind, temperature=2.0)
    got.backward()
    want_student = student.clone().requires_grad_()
    want = divergence(want_student, dense, kind, temperature=2.0)
    want.backward()
    close(got.detach(), want.detach())
    # the dense value is >= the bucket value for every student and equal at this one: the gradients agree
    close(got_student.grad, want_student.grad, 1e-4)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_a_lower_bound_that_tightens_with_k_and_is_exact_at_k_equal_v(kind: str) -> None:
    vocab = 32
    student, teacher = randn(8, vocab, seed=7), randn(8, vocab, seed=8)
    dense = float(divergence(student, teacher, kind, temperature=1.5))
    values = [float(divergence(student, SparseLogits.from_dense(teacher, k, 1.5), kind, temperature=1.5))
              for k in (1, 2, 4, 8, 16, vocab)]
    # a larger k refines the partition (top-k ids are nested), so the value never decreases
    assert all(a <= b * (1 + 1e-5) + 1e-7 for a, b in zip(values, values[1:])), values
    assert values[-2] <= dense * (1 + 1e-5) and values[0] < values[-1]
    assert math.isclose(values[-1], dense, rel_tol=1e-5)
    got_student = student.clone().requires_grad_()
    divergence(got_student, SparseLogits.from_dense(teacher, vocab, 1.5), kind, temperature=1.5).backward()
    want_student = student.clone().requires_grad_()
    divergence(want_student, teacher, kind, temperature=1.5).backward()
    close(got_student.grad, want_student.grad)


# --------------------------------------------------------------------------- fused path
# reverse_kl without a tail is refused (tested below)
@pytest.mark.parametrize(("kind", "with_tail"), [(kind, with_tail) for kind in DIVERGENCE_KINDS
                                                 for with_tail in (True, False) if with_tail or kind != "reverse_kl"])
def test_fused_sparse_path_equals_the_dense_sparse_path(kind: str, with_tail: bool) -> None:
    vocab, width = 40, 8
    hidden, weight, bias = randn(3, 5, width, seed=9), randn(vocab, width, seed=10, scale=0.5), randn(vocab, seed=11)
    teacher = SparseLogits.from_dense(randn(3, 5, vocab, seed=12), 6, temperature=2.0)
    if not with_tail:
        teacher = SparseLogits(teacher.values, teacher.indices, vocab)
    labels = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(13))
    labels[0, :2] = -100
    fused_inputs = [tensor.clone().requires_grad_() for tensor in (hidden, weight, bias)]
    fused = fused_linear_sparse_divergence(fused_inputs[0], fused_inputs[1], teacher, kind,
                                           student_bias=fused_inputs[2], labels=labels, temperature=2.0, chunk_size=4)
    fused.backward()
    dense_inputs = [tensor.clone().requires_grad_() for tensor in (hidden, weight, bias)]
    dense = divergence(F.linear(*dense_inputs), teacher, kind, labels=labels, temperature=2.0)
    dense.backward()
    close(fused.detach(), dense.detach())
    for got, want in zip(fused_inputs, dense_inputs):
        close(got.grad, want.grad)


def test_the_objectives_take_the_fused_path_with_a_top_k_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = 40
    monkeypatch.setattr(library, "FUSED_AUTO_MIN_VOCAB", vocab)  # fused: auto takes the fused path from here
    hidden, weight = randn(2, 3, 8, seed=14).requires_grad_(), randn(vocab, 8, seed=15, scale=0.3)
    teacher = SparseLogits.from_dense(randn(2, 3, vocab, seed=16), 16)
    student = Signals(final_hidden=hidden, output_weight=weight)
    labels = torch.tensor([[1, -100, 2], [3, 4, 5]])
    output = library.ReverseKLObjective()(student, Signals(logits=teacher), {"labels": labels})
    assert output.parts["fused"] == 1.0 and output.parts["positions"] == 5.0
    torch.testing.assert_close(output.loss, divergence(F.linear(hidden, weight), teacher, "reverse_kl", labels=labels))


# --------------------------------------------------------------------------- refusals and odd rows
def test_a_temperature_other_than_the_tail_s_is_refused_in_both_paths() -> None:
    teacher = SparseLogits.from_dense(randn(4, 12, seed=17), 3, temperature=1.0)
    student = randn(4, 12, seed=18)
    with pytest.raises(KDUserError, match=r"temperature 2\b.*temperature 1\b.*capture"):
        divergence(student, teacher, "forward_kl", temperature=2.0)
    with pytest.raises(KDUserError, match="temperature 2"):
        fused_linear_sparse_divergence(randn(4, 5, seed=19), randn(12, 5, seed=20), teacher, "jsd", temperature=2.0)
    untailed = SparseLogits(teacher.values, teacher.indices, 12)
    with pytest.raises(KDUserError, match="reverse_kl.*tail mass"):
        divergence(student, untailed, "reverse_kl")
    with pytest.raises(KDUserError, match="reverse_kl.*tail mass"):
        fused_linear_sparse_divergence(randn(4, 5, seed=19), randn(12, 5, seed=20), untailed, "reverse_kl")
    # without a tail the temperature is free: the teacher is renormalised over its top k
    assert torch.isfinite(divergence(student, untailed, "forward_kl", temperature=3.0))


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_ignored_positions_do_not_count_and_padding_or_repeated_ids_break_nothing(kind: str) -> None:
    student = randn(4, 16, seed=21)
    student[3, 5] = float("-inf")  # a masked vocabulary entry of the student
    teacher = SparseLogits.from_dense(randn(4, 16, seed=22), 3)
    labels = torch.tensor([0, -100, 2, 3])
    # position 1 is ignored: whatever its teacher row holds changes nothing
    garbage = teacher.values.clone()
    garbage[1] = float("nan")
    reference = divergence(student, teacher, kind, labels=labels)
    changed = divergence(student, SparseLogits(garbage, teacher.indices, 16, teacher.tail_log_mass), kind,
                         labels=labels)
    assert torch.equal(reference, changed)
    # a stored padding row (ids 0..k-1, values -inf, all mass in the tail) and a repeated id (the repeat is
    # not a second atom) still give finite values and gradients
    values, indices, tail = teacher.values.clone(), teacher.indices.clone(), teacher.tail_log_mass.clone()
    values[0], indices[0], tail[0] = float("-inf"), torch.arange(3), 0.0
    indices[2, 2] = indices[2, 0]
    odd = SparseLogits(values, indices, 16, tail)
    weighted = student.clone().requires_grad_()
    loss = divergence(weighted, odd, kind)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(weighted.grad).all())
    # the padding row compares "everything" with "everything": it adds 0
    close(divergence(student[:1], SparseLogits(values[:1], indices[:1], 16, tail[:1]), kind), torch.zeros(()))
    # the repeated id equals the row without it
    without = SparseLogits(values[2:3, :2], indices[2:3, :2], 16, tail[2:3])
    close(divergence(student[2:3], SparseLogits(values[2:3], indices[2:3], 16, tail[2:3]), kind),
          divergence(student[2:3], without, kind))
