from __future__ import annotations

import torch

from d2g_fast import _dispatch, _ext
from d2g_fast.bench.machine import device_name


def build_info(print_it: bool = True) -> dict:
    """What is compiled and usable here: the CPU and CUDA extensions, the CUDA architectures
    the kernels were built for, Triton and whether it runs interpreted."""
    triton_ok, triton_version = _dispatch.triton_status()
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_extension": _ext.ext_loaded(),
        "extension_error": _ext.ext_error(),
        "cuda_extension": _ext.cuda_kernels_compiled(),
        "cuda_archs": _ext.cuda_archs(),
        "cuda_device": device_name("cuda") if torch.cuda.is_available() else None,
        "triton": triton_version if triton_ok else None,
        "triton_error": None if triton_ok else triton_version,
        "triton_interpreted": _dispatch.triton_interpreted(),
    }
    if print_it:
        width = max(len(k) for k in info)
        print("d2g_fast build info")
        for k, v in info.items():
            print(f"  {k:<{width}}  {v}")
    return info
