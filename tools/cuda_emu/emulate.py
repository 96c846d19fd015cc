"""Run a CUDA kernel file of this project on the CPU, to check its logic where no GPU exists.

``load_emulated(cu_path, name, extra_sources, build_dir)`` rewrites ``cu_path`` into plain C++
(emu_runtime.h: one std::thread per CUDA thread, blocks one after another, __syncthreads as a
barrier, __shfl_xor_sync through memory, __shared__ as static), registers its ops under
``torch.ops.<name>`` instead of the CUDA dispatch key, compiles it with
torch.utils.cpp_extension and loads it. The ops then take CPU tensors and run the kernels'
own index arithmetic, shared-memory reductions and host launch code. What it cannot show:
speed; every race (threads run concurrently but not in lock step, so a missing barrier shows
only sometimes); device math (expf etc. are the host versions: __CUDA_ARCH__ is not defined);
anything the CUDA runtime would report (bad launch configurations, too much shared memory).

Conventions the rewrite relies on (those of csrc/*/cuda/*_kernel.cu): launches written
``kernel[<T...>]<<<grid, block, 0, stream>>>(args);``, ``auto stream = c10::cuda::getCurrentCUDAStream();``,
``[const] c10::cuda::CUDAGuard guard(...)``, ``C10_CUDA_KERNEL_LAUNCH_CHECK();`` and one
``TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) { m.impl("op", &fn); ... }`` block.
"""
from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside (), <> and {} (launch configurations like
    ``blocks_for(n, k), kThreads, 0, stream``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "(<{[":
            depth += 1
        elif ch in ")>}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _rewrite_launches(src: str) -> str:
    """``kernel[<T...>]<<<grid, block, 0, stream>>>(args);`` -> ``emu::launch(grid, block, [&] {
    kernel[<T...>](args); });``"""
    out, pos = [], 0
    head = re.compile(r'(\w+(?:<[\w,\s]*>)?)\s*<<<')
    while True:
        m = head.search(src, pos)
        if not m:
            out.append(src[pos:])
            return "".join(out)
        end_cfg = src.index(">>>", m.end())
        cfg = _split_top_level(src[m.end():end_cfg])
        if len(cfg) != 4 or cfg[2] != "0" or cfg[3] != "stream":
            raise ValueError(f"a kernel launch is not written as kernel<...><<<grid, block, 0, stream>>>(...): "
                             f"{src[m.start():end_cfg + 3]}")
        if src[end_cfg + 3] != "(":
            raise ValueError(f"expected '(' after the launch configuration of {m.group(1)}")
        depth, i = 0, end_cfg + 3
        while True:  # the matching ')' of the argument list
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            if depth == 0:
                break
            i += 1
        args = src[end_cfg + 4:i]
        if src[i + 1] != ";":
            raise ValueError(f"expected ';' after the launch of {m.group(1)}")
        out.append(src[pos:m.start()])
        out.append(f"emu::launch({cfg[0]}, {cfg[1]}, [&] {{ {m.group(1)}({args}); }});")
        pos = i + 2


def emulated_source(cu_text: str, name: str, replacements=(), prelude: str = "") -> str:
    """``replacements``: extra (regex, replacement) pairs applied first, for CUDA-only host code
    the emulation cannot link (e.g. the CUDA generator); ``prelude``: code put after the runtime."""
    for pattern, repl in replacements:
        cu_text, count = re.subn(pattern, repl, cu_text, flags=re.S)
        if count == 0:
            raise ValueError(f"replacement pattern {pattern!r} matched nothing")
    src = re.sub(r'#include <c10/cuda/[^>]*>\n', '', cu_text)
    src = re.sub(r'(const )?c10::cuda::CUDAGuard \w+\([^;]*\);', '', src)
    src = src.replace('auto stream = c10::cuda::getCurrentCUDAStream();', 'int stream = 0; (void)stream;')
    src = src.replace('C10_CUDA_KERNEL_LAUNCH_CHECK();', '')
    src = _rewrite_launches(src)
    i = src.index('TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m) {')
    j = src.index('\n}', i)
    block = src[i:j].replace('TORCH_LIBRARY_IMPL(d2g_fast, CUDA, m)', f'TORCH_LIBRARY({name}, m)')
    block = block.replace('m.impl(', 'm.def(')
    return '#include "emu_runtime.h"\n' + prelude + "\n" + src[:i] + block + src[j:]


def load_emulated(cu_path: str, name: str, extra_sources: list[str], build_dir: str,
                  replacements=(), prelude: str = "") -> None:
    from torch.utils.cpp_extension import load
    # torch runs `ninja` from PATH: prefer the one installed next to this Python (the venv's).
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")) and bindir not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]
    os.makedirs(build_dir, exist_ok=True)
    out = os.path.join(build_dir, f"{name}.cpp")
    with open(cu_path) as f:
        text = emulated_source(f.read(), name, replacements, prelude)
    with open(out, "w") as f:
        f.write(text)
    load(name=name, sources=[out] + list(extra_sources),
         extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
         extra_cflags=["-std=c++20", "-O1", "-pthread"], extra_ldflags=["-pthread"],
         build_directory=build_dir, is_python_module=False, verbose=False)
