"""Parity of the divergence math (dense and fused) against a naive autograd reference written here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcore.errors import KDUserError
from kdcore.fused import fused_linear_divergence
from kdcore.objectives import DIVERGENCE_KINDS, divergence
from kdcore.objectives.divergence import auto_chunk_rows
from kdcore.signals import SparseLogits

MASKED_LOGIT = -1e4  # exp(-1e4) is exactly 0 in float64: the reference's stand-in for -inf


def reference(student: torch.Tensor, teacher: torch.Tensor, kind: str, *, beta: float = 0.5, skew: float = 0.1,
              temperature: float = 1.0, labels: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The definitions of the issue, written the obvious way, with autograd (in float64 by default)."""
    s = student.to(dtype).masked_fill(student.isneginf(), MASKED_LOGIT) / temperature
    t = teacher.to(dtype).masked_fill(teacher.isneginf(), MASKED_LOGIT) / temperature
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    p_s, p_t = log_s.exp(), log_t.exp()

    def log_mixture(a: float, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        # mixtures of two zero probabilities are 0: only multiplied by 0 below, keep log finite
        return torch.log((a * p + (1 - a) * q).clamp_min(torch.finfo(dtype).tiny))

    if kind == "forward_kl":
        per = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        per = (p_s * (log_s - log_t)).sum(-1)
    elif kind == "jsd":
        log_m = log_mixture(beta, p_t, p_s)
        per = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    elif kind == "skew_forward_kl":
        per = (p_t * (log_t - log_mixture(skew, p_t, p_s))).sum(-1)
    elif kind == "skew_reverse_kl":
        per = (p_s * (log_s - log_mixture(skew, p_s, p_t))).sum(-1)
    elif kind == "tvd":
        per = 0.5 * (p_t - p_s).abs().sum(-1)
    else:
        raise AssertionError(kind)
    if labels is not None:
        per = per[labels != -100]
    return per.mean()


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise within ``rtol`` of the expected tensor's scale (so near-zero entries do not dominate)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "NaN or inf in the result"
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale))


def make_logits(shape: tuple[int, ...], seed: int, spread: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * spread


def random_labels(shape: tuple[int, ...], seed: int, ignored: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignored] = -100
    return labels


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_matches_reference_with_masks_and_odd_chunks(kind: str, temperature: float) -> None:
    student = make_logits((3, 13, 101), 0).requires_grad_()
    teacher = make_logits((3, 13, 101), 1).requires_grad_()
    labels = random_labels((3, 13), 2)
    loss = divergence(student, teacher, kind, beta=0.3, skew=0.2, temperature=temperature, labels=labels, chunk_size=8)
    loss.backward()
    s_ref, t_ref = student.detach().double().requires_grad_(), teacher.detach().double().requires_grad_()
    expected = reference(s_ref, t_ref, kind, beta=0.3, skew=0.2, temperature=temperature, labels=labels)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), 1e-5)
    assert_close_relative(student.grad, s_ref.grad, 1e-5)
    assert_close_relative(teacher.grad, t_ref.grad, 1e-5)
    # ignored positions get exactly zero gradient
    assert (student.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_masked_vocabulary_gives_no_nan(kind: str) -> None:
    student = make_logits((20, 64), 3)
    teacher = make_logits((20, 64), 4)
    masked = torch.zeros(64, dtype=torch.bool)
    masked[[0, 5, 17, 63]] = True
    student[:, masked] = float("-inf")
    teacher[:, masked] = float("-inf")
    teacher[:, 30] = float("-inf")  # a token only the teacher rules out
    if kind == "reverse_kl":
        teacher[:, 30] = -50.0  # reverse KL is genuinely infinite there; keep it finite but extreme
    student.requires_grad_()
    loss = divergence(student, teacher, kind, temperature=1.5, chunk_size=7)
    loss.backward()
    s_ref = student.detach().double().requires_grad_()
    expected = reference(s_ref, teacher, kind, temperature=1.5)
    expected.backward()
    assert torch.isfinite(loss)
    assert_close_relative(loss.detach(), expected.detach(), 1e-5)
    assert_close_relative(student.grad, s_ref.grad, 1e-5)
    assert (student.grad[:, masked] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_bf16_inputs_are_computed_in_float32(kind: str) -> None:
    # Stated tolerance for bf16: the loss is exact up to float32 rounding of the bf16 inputs
    # (1e-5); the gradient is returned in bf16, so it is within bf16 precision (1e-2 of its scale).
    student = make_logits((4, 9, 300), 5).bfloat16().requires_grad_()
    teacher = make_logits((4, 9, 300), 6).bfloat16()
    labels = random_labels((4, 9), 7)
    loss = divergence(student, teacher, kind, temperature=2.0, labels=labels)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    s_ref = student.detach().double().requires_grad_()
    expected = reference(s_ref, teacher, kind, temperature=2.0, labels=labels)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), 1e-5)
    assert_close_relative(student.grad, s_ref.grad, 1e-2)


def test_no_counted_position_gives_zero_not_nan() -> None:
    student = make_logits((2, 3, 10), 8).requires_grad_()
    labels = torch.full((2, 3), -100)
    loss = divergence(student, make_logits((2, 3, 10), 9), "jsd", labels=labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (student.grad == 0).all()


def test_sparse_teacher_is_renormalised_over_its_top_k() -> None:
    student = make_logits((5, 40), 10).requires_grad_()
    teacher = make_logits((5, 40), 11)
    top = teacher.topk(8, dim=-1)
    sparse = SparseLogits(top.values, top.indices, 40)
    dense = torch.full_like(teacher, float("-inf")).scatter(-1, top.indices, top.values)
    for kind in ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        got = divergence(student, sparse, kind, temperature=2.0)
        want = reference(student.detach(), dense, kind, temperature=2.0)
        assert_close_relative(got.detach(), want, 1e-5)
    with pytest.raises(KDUserError, match="reverse_kl"):
        divergence(student, sparse, "reverse_kl")


def test_bad_arguments_are_refused() -> None:
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        divergence(logits, logits, "kl")
    with pytest.raises(ValueError, match="temperature"):
        divergence(logits, logits, "jsd", temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        divergence(logits, torch.zeros(2, 5), "jsd")
    with pytest.raises(ValueError, match="labels"):
        divergence(logits, logits, "jsd", labels=torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- fused path
def naive_linear_reference(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           kind, **kwargs):
    """Materialised logits in float64, then the reference divergence."""
    student_logits = F.linear(student_hidden.double(), student_weight.double(),
                              None if student_bias is None else student_bias.double())
    teacher_logits = F.linear(teacher_hidden.double(), teacher_weight.double(),
                              None if teacher_bias is None else teacher_bias.double())
    return reference(student_logits, teacher_logits, kind, **kwargs)


def make_heads(n_leading: tuple[int, ...], hidden_s: int, hidden_t: int, vocab: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(*n_leading, hidden_s, generator=g).to(dtype)
    student_weight = (torch.randn(vocab, hidden_s, generator=g) / hidden_s ** 0.5 * 3).to(dtype)
    student_bias = (torch.randn(vocab, generator=g) * 0.5).to(dtype)
    teacher_hidden = torch.randn(*n_leading, hidden_t, generator=g).to(dtype)
    teacher_weight = (torch.randn(vocab, hidden_t, generator=g) / hidden_t ** 0.5 * 3).to(dtype)
    teacher_bias = (torch.randn(vocab, generator=g) * 0.5).to(dtype)
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_fused_matches_reference(kind: str) -> None:
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = make_heads(
        (3, 11), 16, 24, 257, seed=12)
    labels = random_labels((3, 11), 13)
    params = [p.requires_grad_() for p in (student_hidden, student_weight, student_bias)]
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind,
                                   student_bias=student_bias, teacher_bias=teacher_bias, labels=labels, beta=0.7,
                                   skew=0.3, temperature=1.7, chunk_size=5)
    loss.backward()
    refs = [p.detach().double().requires_grad_() for p in params]
    expected = naive_linear_reference(*refs, teacher_hidden, teacher_weight, teacher_bias, kind, beta=0.7, skew=0.3,
                                      temperature=1.7, labels=labels)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), 1e-5)
    for param, ref in zip(params, refs):
        assert_close_relative(param.grad, ref.grad, 1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fused_equals_dense_divergence_on_flat_inputs_without_bias(kind: str) -> None:
    # (N, H) inputs, no bias, no labels, automatic chunk size, masked vocabulary via -inf-free weights
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _ = make_heads((37,), 8, 8, 50, seed=14)
    student_hidden.requires_grad_()
    fused = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind)
    (fused_grad,) = torch.autograd.grad(fused, student_hidden)
    hidden_copy = student_hidden.detach().clone().requires_grad_()
    dense = divergence(hidden_copy @ student_weight.T, teacher_hidden @ teacher_weight.T, kind)
    (dense_grad,) = torch.autograd.grad(dense, hidden_copy)
    assert_close_relative(fused.detach(), dense.detach(), 1e-5)
    assert_close_relative(fused_grad, dense_grad, 1e-5)


def test_fused_masked_vocabulary_through_bias_has_no_nan() -> None:
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = make_heads(
        (19,), 8, 8, 40, seed=15)
    student_bias[[1, 7]] = float("-inf")
    teacher_bias[[1, 7]] = float("-inf")
    student_hidden.requires_grad_()
    student_weight.requires_grad_()
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, "jsd",
                                   student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student_hidden.grad).all()
    assert (student_weight.grad[[1, 7]] == 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_fused_bf16_within_stated_tolerance(kind: str) -> None:
    # Stated bf16 tolerance: 2e-2 of scale for loss and grads, against the naive computation whose
    # logits are produced by the same bf16 matmul (both upcast to float32 for the divergence).
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = make_heads(
        (2, 13), 32, 32, 203, seed=16, dtype=torch.bfloat16)
    params = [p.requires_grad_() for p in (student_hidden, student_weight, student_bias)]
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind,
                                   student_bias=student_bias, teacher_bias=teacher_bias, temperature=2.0, chunk_size=6)
    loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in params)
    refs = [p.detach().clone().requires_grad_() for p in params]
    expected = reference(F.linear(refs[0], refs[1], refs[2]), F.linear(teacher_hidden, teacher_weight, teacher_bias),
                         kind, temperature=2.0)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), 2e-2)
    for param, ref in zip(params, refs):
        assert_close_relative(param.grad, ref.grad, 2e-2)


def test_fused_with_frozen_head_and_no_counted_positions() -> None:
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _ = make_heads((2, 4), 8, 8, 30, seed=17)
    student_hidden.requires_grad_()
    labels = torch.full((2, 4), -100)
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, "jsd", labels=labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (student_hidden.grad == 0).all()
    with pytest.raises(ValueError, match="ULD"):
        fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight[:20], "jsd")


def test_auto_chunk_rows_bounds_the_workspace() -> None:
    rows = auto_chunk_rows(128256, 8192, torch.device("cpu"))
    assert 16 <= rows < 8192 and rows % 16 == 0
    assert rows * 128256 * 4 * 6 <= 256 << 20 or rows == 16
    assert auto_chunk_rows(100, 7, torch.device("cpu")) == 7


# --------------------------------------------------------------------------- properties
logit_rows = st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=30, deadline=None)
@given(seed=logit_rows, kind=st.sampled_from(DIVERGENCE_KINDS), temperature=st.floats(0.3, 4.0))
def test_divergences_are_nonnegative_and_zero_on_equal_inputs(seed: int, kind: str, temperature: float) -> None:
    student = make_logits((4, 23), seed, spread=5.0)
    teacher = make_logits((4, 23), seed + 1, spread=5.0)
    assert float(divergence(student, teacher, kind, temperature=temperature)) >= -1e-6
    assert abs(float(divergence(student, student.clone(), kind, temperature=temperature))) < 1e-6


@settings(max_examples=20, deadline=None)
@given(seed=logit_rows)
def test_jsd_limits_are_scaled_forward_and_reverse_kl(seed: int) -> None:
    student = make_logits((3, 17), seed, spread=1.0)
    teacher = make_logits((3, 17), seed + 1, spread=1.0)
    epsilon = 1e-4
    # JSD_beta = beta*KL(p_T||p_S) + O(beta^2) as beta -> 0, and (1-beta)*KL(p_S||p_T) + O((1-beta)^2) as beta -> 1
    forward = float(divergence(student, teacher, "forward_kl"))
    reverse = float(divergence(student, teacher, "reverse_kl"))
    near_zero = float(divergence(student, teacher, "jsd", beta=epsilon)) / epsilon
    near_one = float(divergence(student, teacher, "jsd", beta=1 - epsilon)) / epsilon
    assert near_zero == pytest.approx(forward, rel=0.01, abs=1e-4)
    assert near_one == pytest.approx(reverse, rel=0.01, abs=1e-4)
    # and skew with alpha = 0 is the plain KL
    assert float(divergence(student, teacher, "skew_forward_kl", skew=0.0)) == pytest.approx(forward, rel=1e-5)


def test_auto_chunk_rows_keeps_cpu_chunks_on_the_heap_and_grows_with_a_big_head() -> None:
    cpu = torch.device("cpu")
    rows = auto_chunk_rows(32000, 4096, cpu, head_bytes=32000 * 512 * 4)
    assert 128 <= rows and rows * 32000 * 4 <= 32 << 20  # below glibc's largest mmap threshold
    small_head = auto_chunk_rows(128256, 4096, cpu, head_bytes=128256 * 512 * 4)
    big_head = auto_chunk_rows(128256, 4096, cpu, head_bytes=128256 * 2048 * 4)
    assert big_head > small_head and big_head * 128256 * 4 * 6 <= 128256 * 2048 * 4 // 2
