"""kdcore.hardware: native bf16 from the CPU's flags (not from oneDNN's "bf16 can be emulated"), with an override."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import kdcore.hardware as hardware
from kdcore.errors import KDUserError
from kdcore.hardware import bf16_support, cpu_flags, cpu_native_bf16
from kdcore.precision import autocast_dtype, native_bf16

CPUINFO = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"


def _text(name: str) -> str:
    return (CPUINFO / f"{name}.txt").read_text()


@pytest.mark.parametrize(("name", "native", "named"), [
    ("amd-epyc-genoa-avx512-bf16", True, "avx512_bf16"),
    ("intel-xeon-sapphire-rapids-amx", True, "avx512_bf16 amx_bf16"),
    ("intel-xeon-cascade-lake-avx512-no-bf16", False, "avx512f"),
    ("amd-epyc-milan-avx2-only", False, "avx2"),
    ("arm-graviton3-bf16", True, "bf16"),
    ("arm-graviton2-no-bf16", False, "asimd"),
])
def test_native_bf16_from_the_cpu_description(name: str, native: bool, named: str) -> None:
    support = bf16_support(_text(name), "Linux")
    assert support.native is native
    assert named in support.reason
    if not native:
        assert "no AVX512-BF16/AMX-BF16" in support.reason


def test_avx512_without_bf16_lists_its_vector_flags_and_nothing_else() -> None:
    reason = bf16_support(_text("intel-xeon-cascade-lake-avx512-no-bf16"), "Linux").reason
    assert "vector flags: avx avx2 avx512_vnni avx512bw avx512cd avx512dq avx512f avx512vl)" in reason


def test_a_flag_counts_only_when_every_processor_has_it() -> None:
    genoa = _text("amd-epyc-genoa-avx512-bf16")
    first, second = genoa.split("\n\n", 1)
    mixed = first + "\n\n" + second.replace(" avx512_bf16", "")
    assert "avx512_bf16" in cpu_flags(genoa)
    assert "avx512_bf16" not in cpu_flags(mixed)
    assert not bf16_support(mixed, "Linux").native
    assert cpu_flags("") == frozenset()


def test_other_systems_and_the_override() -> None:
    genoa = _text("amd-epyc-genoa-avx512-bf16")
    assert not bf16_support(None, "Darwin").native
    assert not bf16_support(None, "Windows").native
    assert "KD_NATIVE_BF16=1" in bf16_support(None, "Windows").reason
    assert not bf16_support(genoa, "Linux", "0").native
    assert bf16_support(_text("amd-epyc-milan-avx2-only"), "Linux", "1").native
    assert bf16_support(None, "Windows", " 1 ").reason == "set by KD_NATIVE_BF16=1"
    assert bf16_support(genoa, "Linux", "").native  # an empty variable is unset
    with pytest.raises(KDUserError, match="KD_NATIVE_BF16='yes'"):
        bf16_support(genoa, "Linux", "yes")


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """``machine(name)``: this process runs on the CPU of fixture ``name`` (Linux), answer not yet computed."""
    def use(name: str) -> None:
        monkeypatch.setattr(hardware, "CPUINFO", CPUINFO / f"{name}.txt")
        monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
        cpu_native_bf16.cache_clear()
    monkeypatch.delenv("KD_NATIVE_BF16", raising=False)
    yield use
    cpu_native_bf16.cache_clear()


def test_answer_computed_once_and_logged_once(machine: Callable[[str], None], caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="kdcore.hardware")
    machine("intel-xeon-cascade-lake-avx512-no-bf16")
    assert cpu_native_bf16() is False
    monkeypatch.setenv("KD_NATIVE_BF16", "1")  # read once: a later change does not flip a running process
    assert cpu_native_bf16() is False
    messages = [record.getMessage() for record in caplog.records if record.name == "kdcore.hardware"]
    assert len(messages) == 1
    assert messages[0].startswith("precision native-bf16 -> fp32: this CPU has no AVX512-BF16/AMX-BF16")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="CPU autocast goes through oneDNN")
def test_native_bf16_precision_follows_the_cpu(machine: Callable[[str], None]) -> None:
    cpu = torch.device("cpu")
    machine("intel-xeon-cascade-lake-avx512-no-bf16")
    assert not native_bf16(cpu)
    assert autocast_dtype("native-bf16", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16  # asked for explicitly: kept
    machine("amd-epyc-genoa-avx512-bf16")
    assert native_bf16(cpu)
    assert autocast_dtype("native-bf16", cpu) is torch.bfloat16


def test_fp32_teacher_on_a_cpu_without_bf16_keeps_its_cache_key(machine: Callable[[str], None]) -> None:
    from kd_tasks.text.teacher import TaskTeacherConfig, effective_settings
    from kd_tasks.text.wmt import TranslationTask

    machine("intel-xeon-cascade-lake-avx512-no-bf16")
    assert TranslationTask.teacher_defaults["precision"] == "native-bf16"
    settings = effective_settings(TaskTeacherConfig(), TranslationTask)
    assert "precision" not in settings  # the fp32 teacher's key, as before the setting existed
    assert settings == effective_settings(TaskTeacherConfig(precision="fp32"), TranslationTask)
