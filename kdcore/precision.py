"""Which floating-point precision training runs in: the bf16 capability probe and the autocast dtype."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kdcore.errors import KDUserError
from kdcore.hardware import cpu_native_bf16


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware (CUDA with bf16, or a CPU with AVX512-BF16/AMX).

    On such CPUs oneDNN runs bf16 autocast faster than fp32 for a d=256 transformer (docs/text.md, "Teacher
    stage"); on the others it emulates bf16 and is slower than fp32, hence the check of the CPU's flags
    (:func:`kdcore.hardware.cpu_native_bf16`, which logs its answer once).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and cpu_native_bf16()
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for full fp32.

    ``native-bf16`` is bf16 where :func:`native_bf16` holds and fp32 elsewhere (the text teacher stage's default).
    """
    if precision == "fp32":
        return None
    if precision == "native-bf16":
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # CPU autocast is slower than fp32 for most small models; opt in with bf16
    if precision == "fp16":
        if device.type != "cuda":
            raise KDUserError("trainer.precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU.")
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """What a forward pass under :func:`autocast_dtype`'s answer computes in: ``fp32``, ``bf16`` or ``fp16``."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``; nothing at all for ``None`` (full fp32)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
