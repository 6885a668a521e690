"""What the machine's CPU computes natively, read from its feature flags.

bf16 autocast pays off on a CPU only where it has bf16 dot-product instructions; elsewhere oneDNN emulates
bf16 and is slower than fp32 (docs/performance.md, "Precision on CPUs"). PyTorch's own probe
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``) answers yes wherever bf16 can be emulated, and
``torch.backends.cpu.get_cpu_capability()`` names the same ISA (``AVX512``) with and without AVX512-BF16, so kd
reads the flags itself:

* Linux: ``/proc/cpuinfo``. x86 needs ``avx512_bf16`` or ``amx_bf16``; ARM needs ``bf16`` (BFDOT/BFMMLA,
  which oneDNN's ARM kernels use).
* macOS: never (Intel Macs have no AVX512-BF16; PyTorch's oneDNN has no bf16 matmul for Apple silicon).
* Other systems (Windows): not detected, so fp32.

``KD_NATIVE_BF16=1`` or ``=0`` overrides the answer (a CPU kd reads wrongly, or a test). The answer is
computed once per process and logged once, with the reason and the CPU's vector flags.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from kdcore.errors import KDUserError

OVERRIDE_VARIABLE = "KD_NATIVE_BF16"
#: flags of an x86 CPU with bf16 dot products (AVX512-BF16: Cooper Lake, Zen 4 and later; AMX: Sapphire Rapids on)
X86_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
#: the flag of an ARM CPU with bf16 dot products (Armv8.6 BF16: Graviton3, Neoverse V1/N2 and later)
ARM_BF16_FLAGS: tuple[str, ...] = ("bf16",)
CPUINFO = Path("/proc/cpuinfo")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bf16Support:
    """Whether the CPU computes bf16 natively, and why kd thinks so (for the log)."""

    native: bool
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags every processor in a ``/proc/cpuinfo`` text shares (x86 ``flags``, ARM ``Features``)."""
    shared: frozenset[str] | None = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = frozenset(value.split())
            shared = flags if shared is None else shared & flags
    return shared or frozenset()


def _vector_flags(flags: frozenset[str]) -> str:
    shown = sorted(flag for flag in flags if flag.startswith(("avx", "amx", "sve", "asimd")) or flag == "bf16")
    return " ".join(shown) or "none"


def bf16_support(cpuinfo: str | None, system: str, override: str | None = None) -> Bf16Support:
    """Decide native bf16 from a ``/proc/cpuinfo`` text (None where there is none), ``platform.system()`` and
    the value of ``$KD_NATIVE_BF16`` (None when unset)."""
    if override is not None and override.strip():
        value = override.strip()
        if value not in ("0", "1"):
            raise KDUserError(f"The environment variable {OVERRIDE_VARIABLE}={override!r} must be 1 (the CPU computes "
                              f"bf16 natively: precision native-bf16 runs bf16 autocast) or 0 (it does not: fp32); "
                              f"unset it to read the CPU's flags.")
        return Bf16Support(value == "1", f"set by {OVERRIDE_VARIABLE}={value}")
    if system == "Darwin":
        return Bf16Support(False, "macOS: PyTorch's oneDNN has no native bf16 matmul there")
    if cpuinfo is None:
        return Bf16Support(False, f"{system or 'this system'}: CPU features not detected "
                                  f"(set {OVERRIDE_VARIABLE}=1 if the CPU has AVX512-BF16 or AMX)")
    flags = cpu_flags(cpuinfo)
    found = [flag for flag in (*X86_BF16_FLAGS, *ARM_BF16_FLAGS) if flag in flags]
    if found:
        return Bf16Support(True, f"the CPU has {' '.join(found)}")
    return Bf16Support(False, f"this CPU has no AVX512-BF16/AMX-BF16 (vector flags: {_vector_flags(flags)})")


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively (see the module docstring); logged once per process."""
    system = platform.system()
    cpuinfo = None
    if system == "Linux":
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            cpuinfo = None
    support = bf16_support(cpuinfo, system, os.environ.get(OVERRIDE_VARIABLE))
    log.info("precision native-bf16 -> %s: %s", "bf16" if support.native else "fp32", support.reason)
    return support.native
