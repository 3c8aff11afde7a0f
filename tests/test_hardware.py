"""What ``training.precision`` resolves to on the hardware at hand: native-bf16 detection with fake CPUs and GPUs,
the one-line warning for emulated bf16, and the record a run keeps of it."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from carlrar import adversary, hardware
from carlrar.adversary import amp_dtype_for, precision_record
from carlrar.hardware import bf16_is_native, cpu_flags, cpu_has_native_bf16

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512dq avx512vl\n"  # AVX512, bf16 emulated
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_tile amx_int8 amx_bf16\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_cpu_flags_reads_x86_and_aarch64_lines() -> None:
    assert {"avx512_bf16", "avx2"} <= cpu_flags(ZEN4) and "AuthenticAMD" not in cpu_flags(ZEN4)
    assert "bf16" in cpu_flags(GRAVITON3) and "0x41" not in cpu_flags(GRAVITON3)
    assert cpu_flags(AVX2_ONLY) == {"fpu", "sse2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    ("text", "onednn", "native"),
    [
        (ZEN4, True, True),
        (SAPPHIRE_RAPIDS, True, True),
        (GRAVITON3, True, True),
        (SKYLAKE, True, False),  # torch's oneDNN check passes on AVX512 cores that only emulate bf16
        (AVX2_ONLY, False, False),
        (ZEN4, False, False),  # a torch build without oneDNN's bf16 path
    ],
)
def test_native_bf16_needs_both_the_cpu_flag_and_onednn(tmp_path: Path, text: str, onednn: bool, native: bool) -> None:
    assert cpu_has_native_bf16(cpuinfo(tmp_path, text), lambda: onednn) is native


def test_without_proc_cpuinfo_torch_s_check_decides(tmp_path: Path) -> None:
    missing = tmp_path / "no-cpuinfo"
    assert cpu_has_native_bf16(missing, lambda: True) is True
    assert cpu_has_native_bf16(missing, lambda: False) is False


@pytest.mark.parametrize(("major", "native"), [(7, False), (8, True), (9, True)])
def test_cuda_bf16_is_native_from_ampere_on(monkeypatch: pytest.MonkeyPatch, major: int, native: bool) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    assert bf16_is_native(torch.device("cuda:0")) is native


def test_cpu_devices_use_the_cpu_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert bf16_is_native(torch.device("cpu")) is True
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert bf16_is_native(torch.device("cpu")) is False


@pytest.fixture
def warnings_afresh():
    """The emulated-bf16 warning is given once per process: forget it before and after the test."""
    adversary._warn_emulated_bf16.cache_clear()
    yield
    adversary._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_it_is_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(adversary, "bf16_is_native", lambda device: native)
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert amp_dtype_for("auto", device) is (torch.bfloat16 if native else None)
        assert amp_dtype_for("fp32", device) is None
        assert amp_dtype_for("bf16", device) is torch.bfloat16


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_way_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, warnings_afresh
) -> None:
    monkeypatch.setattr(adversary, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="carlrar.adversary"):
        for _ in range(3):
            assert amp_dtype_for("bf16", torch.device("cpu")) is torch.bfloat16
        amp_dtype_for("auto", torch.device("cpu"))
    [record] = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "emulated on this CPU" in message and "several times slower than fp32" in message
    assert message.endswith("set training.precision auto or fp32")


def test_native_bf16_gives_no_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, warnings_afresh
) -> None:
    monkeypatch.setattr(adversary, "bf16_is_native", lambda device: True)
    with caplog.at_level(logging.WARNING, logger="carlrar.adversary"):
        amp_dtype_for("bf16", torch.device("cpu"))
    assert caplog.records == []


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of auto, bf16, fp32"):
        amp_dtype_for("fp16", torch.device("cpu"))


def test_precision_record_names_the_setting_the_result_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adversary, "cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(adversary, "cpu_has_native_bf16", lambda: False)
    assert precision_record("auto", None) == {
        "requested": "auto",
        "used": "fp32",
        "cpu_capability": "AVX2",
        "cpu_native_bf16": False,
    }
    assert precision_record("bf16", torch.bfloat16)["used"] == "bf16"
