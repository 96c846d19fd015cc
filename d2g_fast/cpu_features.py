"""What the CPU offers for bfloat16: the one rule the trainer, the demo and the benchmarks use.

A CPU computes bf16 matrix products in hardware when it has Intel AMX-BF16 (``amx_bf16``: tile
matrix units, Sapphire Rapids and later) or AVX-512-BF16 (``avx512_bf16``: dot-product
instructions, Cooper Lake / Zen 4 and later); oneDNN then runs bf16 convolutions and matmuls
several times faster than fp32. Without either, bf16 is emulated (converted to fp32 around every
product) and is usually SLOWER than fp32 on the CPU.
"""
from __future__ import annotations

import functools

import torch

# /proc/cpuinfo flag -> what it is called in messages, best first.
BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX-512-BF16"))


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The flags of /proc/cpuinfo's first "flags" line (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())


def torch_cpu_capability() -> str:
    """The vector ISA torch's own CPU kernels were dispatched to ("AVX512", "AVX2", ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        return "unknown"


def bf16_hardware() -> str | None:
    """"AMX-BF16" or "AVX-512-BF16" when the CPU computes bf16 products in hardware and
    oneDNN can use them (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); None otherwise."""
    flags = cpu_flags()
    name = next((label for flag, label in BF16_FLAGS if flag in flags), None)
    if name is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    except (AttributeError, RuntimeError):
        return None
    return name


def describe() -> str:
    """One line for logs, e.g. "CPU bf16 hardware: AMX-BF16 (torch kernels: AVX512)"."""
    hw = bf16_hardware()
    return (f"CPU bf16 hardware: {hw or 'none (bf16 is emulated: slower than fp32 here)'} "
            f"(torch kernels: {torch_cpu_capability()})")
