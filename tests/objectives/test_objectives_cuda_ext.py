"""The optional CUDA kernel of the fused path: build only with nvcc AND a CUDA device, clean fallback otherwise.

Parity of the kernel with the PyTorch chunk step needs a GPU and is skipped without one; the
build itself is checked on any machine with nvcc (slow: about 1.5 CPU minutes of nvcc).
"""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from kdcore.fused import cuda_ext, fused_linear_divergence
from kdcore.objectives import DIVERGENCE_KINDS
from kdcore.objectives.divergence import Workspace, divergence_chunk

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget any earlier load attempt so each test sees the decision being made."""
    monkeypatch.setattr(cuda_ext, "_state", {"tried": False, "module": None})


def _never_build(*args, **kwargs):
    raise AssertionError("the CUDA extension must not be built here")


def test_no_build_is_attempted_without_a_cuda_device(fresh_state, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda_ext, "build_extension", _never_build)
    assert not cuda_ext.extension_wanted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: not wanting the kernel is not a failure
        assert cuda_ext.load_extension() is None


def test_no_build_is_attempted_when_switched_off(fresh_state, monkeypatch) -> None:
    monkeypatch.setenv("KD_FUSED_CUDA_EXT", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext, "build_extension", _never_build)
    assert not cuda_ext.extension_wanted() and cuda_ext.load_extension() is None


def test_no_build_is_attempted_without_nvcc(fresh_state, monkeypatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not cuda_ext.extension_wanted()


def test_a_failed_build_warns_once_and_falls_back(fresh_state, monkeypatch) -> None:
    calls = []

    def failing_build(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(cuda_ext, "extension_wanted", lambda: True)
    monkeypatch.setattr(cuda_ext, "build_extension", failing_build)
    with pytest.warns(UserWarning, match="nvcc exploded"):
        assert cuda_ext.load_extension() is None
    assert cuda_ext.load_extension() is None and len(calls) == 1  # tried once per process


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_chunk_step_on_cpu_is_the_pytorch_step(kind: str, fresh_state, monkeypatch) -> None:
    monkeypatch.setattr(cuda_ext, "build_extension", _never_build)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    got = cuda_ext.student_chunk_step(student.clone(), teacher.clone(), kind, beta=0.3, skew=0.2,
                                      workspace=Workspace(6, 40, student.device))
    want = divergence_chunk(student.clone(), teacher.clone(), kind, beta=0.3, skew=0.2)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.student_grad, want.student_grad)


def test_fused_path_on_cpu_never_loads_the_kernel(fresh_state, monkeypatch) -> None:
    monkeypatch.setattr(cuda_ext, "build_extension", _never_build)
    monkeypatch.setattr(cuda_ext, "extension_wanted", lambda: True)  # even if a GPU were present
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(30, 4)
    fused_linear_divergence(hidden, weight, torch.randn(5, 4), torch.randn(30, 4), "jsd").backward()
    assert cuda_ext._state["tried"] is False and hidden.grad is not None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_the_kernel_source_compiles_and_loads(tmp_path, monkeypatch) -> None:
    # Without a GPU torch cannot pick the architecture: compile for Hopper (sm_90) explicitly.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("MAX_JOBS", "1")
    if not HAS_CUDA:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    module = cuda_ext.build_extension()
    with pytest.raises(RuntimeError, match="CUDA tensors expected"):
        module.divergence_rows(torch.zeros(2, 3), torch.zeros(2, 3), 2, 0.5, 0.1)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_kernel_matches_the_pytorch_chunk_step_on_cuda(kind: str) -> None:
    module = cuda_ext.load_extension()
    if module is None:
        pytest.skip("the CUDA extension could not be built on this machine")
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(33, 5000, generator=g) * 3).cuda()
    teacher = (torch.randn(33, 5000, generator=g) * 3).cuda()
    student[:, :7] = float("-inf")
    teacher[:, :7] = float("-inf")
    want = divergence_chunk(student.clone(), teacher.clone(), kind, beta=0.3, skew=0.2)
    gradient = student.clone()
    loss = module.divergence_rows(gradient, teacher.clone(), cuda_ext.KIND_IDS[kind], 0.3, 0.2)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient, want.student_grad, rtol=1e-5, atol=1e-7)
