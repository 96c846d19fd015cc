"""d2g_fast.cpu_features: the CPU's bf16 hardware, the one rule the trainer and demo use."""
from __future__ import annotations

import torch

from d2g_fast import cpu_features


def _with_flags(monkeypatch, flags):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))


def test_no_bf16_flag_means_no_bf16_hardware(monkeypatch):
    _with_flags(monkeypatch, {"avx512f", "avx2", "fma"})
    assert cpu_features.bf16_hardware() is None
    assert "none (bf16 is emulated" in cpu_features.describe()


def test_amx_is_named_before_avx512_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    _with_flags(monkeypatch, {"avx512_bf16", "amx_bf16"})
    assert cpu_features.bf16_hardware() == "AMX-BF16"
    _with_flags(monkeypatch, {"avx512_bf16"})
    assert cpu_features.bf16_hardware() == "AVX-512-BF16"
    assert cpu_features.describe().startswith("CPU bf16 hardware: AVX-512-BF16 (torch kernels: ")


def test_oneDNN_without_bf16_support_means_none(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    _with_flags(monkeypatch, {"amx_bf16"})
    assert cpu_features.bf16_hardware() is None


def test_this_machine_reads_its_own_flags():
    flags = cpu_features.cpu_flags()
    hw = cpu_features.bf16_hardware()
    if hw == "AMX-BF16":
        assert "amx_bf16" in flags
    elif hw == "AVX-512-BF16":
        assert "avx512_bf16" in flags and "amx_bf16" not in flags
