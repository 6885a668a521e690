"""Optional hand-written CUDA kernel for the fused path's per-chunk step (no Triton).

The kernel (``csrc/divergence_rows.cu``) does the softmaxes, the divergence and the student
gradient of a chunk in one launch instead of ~20 elementwise PyTorch kernels. It is compiled
with :func:`torch.utils.cpp_extension.load` the first time the fused path runs on a CUDA
tensor, and only when CUDA is available and ``nvcc`` is found; the build is cached by torch
(``TORCH_EXTENSIONS_DIR``). If anything fails, a warning is issued once and the PyTorch
implementation (:func:`kdcore.objectives.divergence.divergence_chunk`) is used: results are
the same either way (tests/objectives/test_objectives_cuda_ext.py checks parity when CUDA is present).

Set ``KD_FUSED_CUDA_EXT=0`` to never build or use it.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from kdcore.objectives.divergence import ChunkResult, Workspace, divergence_chunk

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4, "tvd": 5}
SOURCE = Path(__file__).with_name("csrc") / "divergence_rows.cu"
_state: dict[str, ModuleType | None | bool] = {"tried": False, "module": None}


def extension_wanted() -> bool:
    """False when disabled by ``KD_FUSED_CUDA_EXT=0`` or when CUDA / nvcc is missing."""
    if os.environ.get("KD_FUSED_CUDA_EXT", "1") == "0" or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def _pip_cuda_include_dirs() -> list[str]:
    """Header folders of pip-installed CUDA libraries (``nvidia/*/include``).

    torch's headers include cusparse.h and cublas headers; with a CUDA toolkit that has only
    nvcc (e.g. the pip nvcc wheel) these come from the ``nvidia-*`` wheels torch depends on.
    """
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    folders = []
    for root in getattr(nvidia, "__path__", []):
        folders.extend(str(path) for path in sorted(Path(root).glob("*/include")) if path.is_dir())
    return folders


def _toolkit_library_dirs() -> list[str]:
    """Library folders of the CUDA toolkit that owns ``nvcc`` (for ``-lcudart``).

    torch derives CUDA_HOME from nvcc's folder; with ``/usr/local/bin/nvcc`` a symbolic link into
    ``/usr/local/cuda-X/bin`` that gives ``/usr/local`` and the link step cannot find libcudart.
    Following the link finds the real toolkit.
    """
    nvcc = shutil.which("nvcc")
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    roots.append(Path("/usr/local/cuda"))
    folders: list[str] = []
    for root in roots:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            folder = root / sub
            if (folder / "libcudart.so").exists() and str(folder) not in folders:
                folders.append(str(folder))
    return folders


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernel; raises on failure.

    Without a GPU, torch cannot pick the target architecture: set ``TORCH_CUDA_ARCH_LIST``
    (e.g. ``9.0``) to compile anyway (tests/objectives/test_objectives_cuda_ext.py does).
    """
    from torch.utils.cpp_extension import load

    return load(name="kd_fused_divergence_rows", sources=[str(SOURCE)], extra_cuda_cflags=["-O3"],
                extra_include_paths=_pip_cuda_include_dirs(),
                extra_ldflags=[f"-L{folder}" for folder in _toolkit_library_dirs()], verbose=verbose)


def load_extension() -> ModuleType | None:
    """The compiled module, or None (not wanted, or the build failed: warned once)."""
    if not _state["tried"]:
        _state["tried"] = True
        if extension_wanted():
            try:
                _state["module"] = build_extension()
            except Exception as error:  # any build problem means: use the PyTorch path
                warnings.warn(f"kd: the optional CUDA kernel for the fused path could not be built ({error}); "
                              f"using the PyTorch implementation", stacklevel=2)
    module = _state["module"]
    return module if isinstance(module, ModuleType) else None


def student_chunk_step(student: Tensor, teacher: Tensor, kind: str, *, beta: float, skew: float,
                       workspace: Workspace) -> ChunkResult:
    """Per-position loss and student-logit gradient of a chunk: CUDA kernel when available, else PyTorch."""
    if student.is_cuda and student.is_contiguous() and teacher.is_contiguous():
        module = load_extension()
        if module is not None:
            loss = module.divergence_rows(student, teacher, KIND_IDS[kind], float(beta), float(skew))
            return ChunkResult(loss, student, None)
    return divergence_chunk(student, teacher, kind, beta=beta, skew=skew, workspace=workspace)
