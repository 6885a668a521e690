"""More parity checks of the divergence math: random sizes (hypothesis), both CPU GEMM backends of the
fused path, -inf logits on either side, sparse (top-k / cached) teacher signals with gradients, ULD.

The naive references are written here, in float64 autograd, from the issue's definitions
(tests/objectives/test_divergence.py holds the shared `reference`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kdcore.fused import fused_linear_divergence
from kdcore.fused import linear_divergence as fused_module
from kdcore.objectives import DIVERGENCE_KINDS, divergence, uld_loss
from kdcore.signals import SparseLogits

_spec = importlib.util.spec_from_file_location("objectives_reference", Path(__file__).with_name("test_divergence.py"))
_reference_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reference_module)
reference = _reference_module.reference
assert_close_relative = _reference_module.assert_close_relative

FP32_RTOL = 1e-5


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """``||actual - exact|| / ||exact||`` (2-norm over all elements; 0/0 counts as 0)."""
    difference = float(torch.linalg.vector_norm((actual.double() - exact.double()).flatten()))
    scale = float(torch.linalg.vector_norm(exact.double().flatten()))
    return difference / scale if scale > 0 else difference


def assert_as_accurate_as_float32_autograd(actual: torch.Tensor, float32_naive: torch.Tensor,
                                           exact: torch.Tensor) -> None:
    """Within 1e-5 relative (norm-wise) of the exact float64 result or, where float32 itself cannot
    get there, no worse than 4x the naive float32 autograd computation of the same thing.

    The second case is real: for a near-deterministic row (say p = 1 - 1e-6 over two tokens) the
    gradient is ~1e-6 while it is the difference of O(1) float32 terms, in any float32 implementation.
    Norm-wise rather than elementwise: single entries that are sums with cancellation (e.g. a
    hidden-state gradient entry near 0) carry float32 rounding of the size of their terms.
    """
    assert torch.isfinite(actual).all(), "NaN or inf in the result"
    error = relative_error(actual, exact)
    allowed = max(FP32_RTOL, 4 * relative_error(float32_naive, exact))
    if actual.dim() == 0:
        # A loss value is a sum of O(1) terms over the vocabulary; for nearly equal distributions it is
        # tiny (say 2e-5) and float32 keeps an absolute error of a few epsilon of those terms in any
        # implementation: allow 2 float32 epsilons absolute.
        allowed = max(allowed, 2.4e-7 / max(abs(float(exact)), 1e-30))
    assert error <= allowed, f"relative error {error:.3g} > allowed {allowed:.3g}"


def _heads(n: int, hidden_s: int, hidden_t: int, vocab: int, seed: int, spread: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hidden_s, generator=g), torch.randn(vocab, hidden_s, generator=g) * spread / hidden_s ** 0.5,
            torch.randn(vocab, generator=g) * 0.5, torch.randn(n, hidden_t, generator=g),
            torch.randn(vocab, hidden_t, generator=g) * spread / hidden_t ** 0.5, torch.randn(vocab, generator=g) * 0.5)


def _tvd_near_tie(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  temperature: float) -> bool:
    """Whether some token has p_S and p_T equal to float32 precision while not negligible.

    TVD's gradient jumps by about p_S where p_S = p_T; near such a tie float32 and float64 may
    legitimately take different sides, so those inputs are no test of accuracy.
    """
    with torch.no_grad():
        p_s = torch.softmax(F.linear(student_hidden.double(), student_weight.double(), student_bias.double())
                            / temperature, -1)
        p_t = torch.softmax(F.linear(teacher_hidden.double(), teacher_weight.double(), teacher_bias.double())
                            / temperature, -1)
        larger = torch.maximum(p_s, p_t)
        return bool(((p_s - p_t).abs() <= 1e-5 * larger)[larger > 1e-7].any())


def _fused_against_reference(kind: str, n: int, vocab: int, chunk: int | None, temperature: float, beta: float,
                             skew: float, seed: int, ignored: float, masked_tokens: list[int],
                             in_hypothesis: bool = False) -> None:
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = _heads(
        n, 7, 9, vocab, seed)
    for token in masked_tokens:  # a masked vocabulary entry: -inf logit for both models
        student_bias[token] = teacher_bias[token] = float("-inf")
    if kind == "tvd":
        tie = _tvd_near_tie(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                            teacher_bias, temperature)
        if in_hypothesis:
            assume(not tie)
        assert not tie, "pick fixed inputs without a TVD tie"
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    params = [p.clone().requires_grad_() for p in (student_hidden, student_weight, student_bias)]
    loss = fused_linear_divergence(params[0], params[1], teacher_hidden, teacher_weight, kind, student_bias=params[2],
                                   teacher_bias=teacher_bias, labels=labels, beta=beta, skew=skew,
                                   temperature=temperature, chunk_size=chunk)
    loss.backward()
    results = {}
    for dtype in (torch.float64, torch.float32):
        refs = [p.detach().to(dtype).requires_grad_() for p in params]
        value = reference(F.linear(refs[0], refs[1], refs[2]),
                          F.linear(teacher_hidden.to(dtype), teacher_weight.to(dtype), teacher_bias.to(dtype)), kind,
                          beta=beta, skew=skew, temperature=temperature, labels=labels, dtype=dtype)
        if (labels != -100).any():
            value.backward()
        results[dtype] = (value.detach(), [r.grad for r in refs])
    if (labels != -100).any():
        (exact, exact_grads), (naive, naive_grads) = results[torch.float64], results[torch.float32]
        assert_as_accurate_as_float32_autograd(loss.detach(), naive, exact)
        for param, exact_grad, naive_grad in zip(params, exact_grads, naive_grads):
            assert_as_accurate_as_float32_autograd(param.grad, naive_grad, exact_grad)
    else:
        assert float(loss.detach()) == 0.0 and all((p.grad == 0).all() for p in params)
    for token in masked_tokens:
        assert (params[1].grad[token] == 0).all() and params[2].grad[token] == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(DIVERGENCE_KINDS), n=st.integers(1, 23), vocab=st.integers(2, 97),
       chunk=st.one_of(st.none(), st.integers(1, 9)), temperature=st.sampled_from([0.5, 1.0, 1.7]),
       beta=st.floats(0.05, 0.95), skew=st.floats(0.0, 0.9), seed=st.integers(0, 10_000),
       ignored=st.sampled_from([0.0, 0.4, 1.0]), masked=st.booleans())
# a near-deterministic 2-token row: float32 cancellation, the second branch of the accuracy check
@example(kind="reverse_kl", n=1, vocab=2, chunk=None, temperature=0.5, beta=0.5, skew=0.0, seed=1, ignored=0.0,
         masked=False)
# nearly equal distributions: a tiny loss value made of O(1e-2) terms
@example(kind="jsd", n=1, vocab=2, chunk=None, temperature=1.0, beta=0.05, skew=0.0, seed=123, ignored=0.0,
         masked=False)
def test_fused_matches_reference_for_random_sizes(kind, n, vocab, chunk, temperature, beta, skew, seed, ignored,
                                                  masked) -> None:
    masked_tokens = [0, vocab - 1] if masked and vocab > 2 else []
    _fused_against_reference(kind, n, vocab, chunk, temperature, beta, skew, seed, ignored, masked_tokens,
                             in_hypothesis=True)


@pytest.mark.parametrize("onednn", ["1", "0"])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_fused_parity_with_each_cpu_gemm(kind: str, onednn: str, monkeypatch) -> None:
    # the oneDNN product and torch.mm (MKL) must both give float32-exact results
    monkeypatch.setenv("KD_FUSED_ONEDNN", onednn)
    _fused_against_reference(kind, n=45, vocab=301, chunk=16, temperature=2.0, beta=0.3, skew=0.2, seed=3,
                             ignored=0.25, masked_tokens=[5])


def test_onednn_gemm_is_detected_and_can_be_switched_off(monkeypatch) -> None:
    if torch.backends.mkldnn.is_available():
        assert fused_module.onednn_gemm_usable()
    monkeypatch.setenv("KD_FUSED_ONEDNN", "0")
    assert not fused_module.onednn_gemm_usable()


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_fused_teacher_only_minus_inf(kind: str) -> None:
    # the teacher rules out tokens the student does not: the -inf clamp path of the fused loop
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, teacher_bias = _heads(31, 6, 6, 64, seed=8)
    teacher_bias[[3, 40]] = float("-inf")
    student_hidden.requires_grad_()
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind,
                                   teacher_bias=teacher_bias, temperature=1.3, chunk_size=10)
    loss.backward()
    ref_hidden = student_hidden.detach().double().requires_grad_()
    expected = reference(ref_hidden @ student_weight.double().T,
                         F.linear(teacher_hidden.double(), teacher_weight.double(), teacher_bias.double()), kind,
                         temperature=1.3)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), FP32_RTOL)
    assert_close_relative(student_hidden.grad, ref_hidden.grad, FP32_RTOL)


def test_fused_gradient_scales_with_the_upstream_gradient_and_refuses_a_second_backward() -> None:
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, _ = _heads(12, 5, 5, 33, seed=9)
    params = [p.requires_grad_() for p in (student_hidden, student_weight, student_bias)]
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, "jsd",
                                   student_bias=student_bias)
    (0.25 * loss + 0.75 * loss.detach()).backward()
    scaled = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, "jsd",
                                   student_bias=student_bias)
    loss.backward(retain_graph=True)
    for got, full in zip(scaled, (p.grad for p in params)):
        torch.testing.assert_close(got, 0.25 * full)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_fused_without_student_gradients_only_computes_the_value() -> None:
    student_hidden, student_weight, _, teacher_hidden, teacher_weight, _ = _heads(10, 4, 4, 20, seed=10)
    with torch.no_grad():
        value = fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, "tvd")
    expected = reference(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, "tvd")
    assert_close_relative(value, expected, FP32_RTOL)


# --------------------------------------------------------------------------- sparse teacher signals
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_sparse_teacher_values_and_gradients_match_the_renormalised_dense_teacher(kind: str) -> None:
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(3, 7, 50, generator=g) * 2).requires_grad_()
    teacher = torch.randn(3, 7, 50, generator=g) * 2
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100
    top = teacher.topk(6, dim=-1)
    loss = divergence(student, SparseLogits(top.values, top.indices, 50), kind, temperature=1.5, labels=labels,
                      chunk_size=4)
    loss.backward()
    dense_teacher = torch.full_like(teacher, float("-inf")).scatter(-1, top.indices, top.values)
    ref_student = student.detach().double().requires_grad_()
    expected = reference(ref_student, dense_teacher, kind, temperature=1.5, labels=labels)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), FP32_RTOL)
    assert_close_relative(student.grad, ref_student.grad, FP32_RTOL)


def test_a_stored_teacher_gives_the_loss_and_gradient_of_the_top_k_it_was_made_from(tmp_path) -> None:
    from kdcore.teacher_shards import AppendableStore, sparse_logits_batch

    g = torch.Generator().manual_seed(12)
    teacher = torch.randn(2, 9, 40, generator=g) * 3
    lengths = {"a": 9, "b": 6}
    store = AppendableStore(tmp_path / "cache", "test-logits", {"teacher": "teacher-a"}, what="the test logits",
                            label="test logits shard", examples_label="examples")
    made = {key: SparseLogits.from_dense(teacher[row, :lengths[key]], 5) for row, key in enumerate(lengths)}
    store.append(list(made), list(made), [{"values": top.values.half(), "indices": top.indices.int(),
                                           "tail_log_mass": top.tail_log_mass} for top in made.values()])
    found = store.lookup(list(made), list(made))
    stored = sparse_logits_batch([found[key] for key in made], 9, 40, 1.0)
    student = (torch.randn(2, 9, 40, generator=g) * 3).requires_grad_()
    labels = torch.zeros(2, 9, dtype=torch.long)
    labels[1, 6:] = -100  # positions past example b's length are padding
    loss = divergence(student, stored, "forward_kl", labels=labels)
    loss.backward()
    # the store keeps float16 values: compare with the in-memory top-k of the float16-rounded teacher, same tail
    top = SparseLogits.from_dense(teacher, 5)
    tail = top.tail_log_mass.clone()
    tail[1, 6:] = float("-inf")
    in_memory = SparseLogits(top.values.half().float(), top.indices, 40, tail_log_mass=tail)
    ref_student = student.detach().clone().requires_grad_()
    expected = divergence(ref_student, in_memory, "forward_kl", labels=labels)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(student.grad, ref_student.grad)


# --------------------------------------------------------------------------- ULD
def uld_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-aligned ULD from its definition, in float64: L1 of zero-padded descending-sorted probabilities."""
    p_s = torch.softmax(student.double() / temperature, -1).sort(-1, descending=True).values
    p_t = torch.softmax(teacher.double() / temperature, -1).sort(-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1).mean()


@settings(max_examples=25, deadline=None)
@given(v_student=st.integers(2, 40), v_teacher=st.integers(2, 40), length=st.integers(1, 6),
       temperature=st.sampled_from([1.0, 2.0]), seed=st.integers(0, 10_000))
@example(v_student=2, v_teacher=8, length=1, temperature=2.0, seed=5)
@example(v_student=2, v_teacher=7, length=1, temperature=2.0, seed=10)
def test_uld_matches_its_definition_for_any_pair_of_vocabularies(v_student, v_teacher, length, temperature,
                                                                 seed) -> None:
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, length, v_student, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, length, v_teacher, generator=g) * 2
    loss = uld_loss(student, teacher, temperature=temperature)
    loss.backward()
    ref_student = student.detach().double().requires_grad_()
    expected = uld_reference(ref_student, teacher, temperature)
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), FP32_RTOL)
    # norm-wise; where the exact gradient is 0 (e.g. V_S=2: the two signs cancel through the softmax)
    # float32 leaves rounding noise of float32 epsilon times the O(1) terms: the 1e-7 floor
    assert float(torch.linalg.vector_norm(student.grad.double() - ref_student.grad)) <= \
        FP32_RTOL * float(torch.linalg.vector_norm(ref_student.grad)) + 1e-7
    # the distance of a distribution to itself (any tokenizer permutation) is 0
    permuted = teacher[..., torch.randperm(v_teacher, generator=g)]
    assert float(uld_loss(teacher, permuted, temperature=temperature)) < 1e-6


def test_uld_with_a_sparse_teacher_equals_the_dense_top_k() -> None:
    g = torch.Generator().manual_seed(13)
    student = torch.randn(2, 5, 30, generator=g)
    teacher = torch.randn(2, 5, 70, generator=g) * 2
    top = teacher.topk(8, dim=-1)
    dense = torch.full_like(teacher, float("-inf")).scatter(-1, top.indices, top.values)
    sparse = SparseLogits(top.values, top.indices, 70)
    assert_close_relative(uld_loss(student, sparse), uld_reference(student, dense, 1.0), FP32_RTOL)


def test_fused_bf16_hidden_states_with_a_float32_head_and_bias() -> None:
    # Stated bf16 tolerance (as test_divergence.py): 2e-2 of the scale, against the same computation
    # with the head cast to bf16 by hand, which is what the fused path does.
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = _heads(9, 8, 8, 50, 14)
    hidden = student_hidden.bfloat16().requires_grad_()
    bias = student_bias.clone().requires_grad_()
    loss = fused_linear_divergence(hidden, student_weight, teacher_hidden.bfloat16(), teacher_weight, "jsd",
                                   student_bias=bias, teacher_bias=teacher_bias, chunk_size=4)
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.float32
    ref_hidden = hidden.detach().double().requires_grad_()
    ref_bias = student_bias.double().requires_grad_()
    expected = reference(F.linear(ref_hidden, student_weight.bfloat16().double(), ref_bias),
                         F.linear(teacher_hidden.bfloat16().double(), teacher_weight.bfloat16().double(),
                                  teacher_bias.double()), "jsd")
    expected.backward()
    assert_close_relative(loss.detach(), expected.detach(), 2e-2)
    assert_close_relative(hidden.grad, ref_hidden.grad, 2e-2)
    assert_close_relative(bias.grad, ref_bias.grad, 2e-2)
