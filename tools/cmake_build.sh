#!/usr/bin/env bash
# Configure and build csrc/ with CMake against the venv's libtorch, then load the library and
# run one op against its reference (so the CMake build cannot rot). Used by `make cmake` and CI.
#   D2G_CMAKE_CUDA=ON  also compile the .cu files;  BUILD_DIR (default cmake-build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUILD_DIR=${BUILD_DIR:-cmake-build}
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
# The pip cmake in the venv first: it knows CUDA 20 (Debian 12's 3.25 does not).
CMAKE=$(dirname "$PY")/cmake; [ -x "$CMAKE" ] || CMAKE=$(command -v cmake)
args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX"
      -DD2G_WITH_CUDA="${D2G_CMAKE_CUDA:-OFF}")
# A CUDA build of torch makes its CMake config look for the toolkit even for CPU-only targets.
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
if [ -d "$CUDA_ROOT" ]; then
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc"
         -DCMAKE_CUDA_ARCHITECTURES="${D2G_CMAKE_CUDA_ARCHS:-90}")
  NVRTC=$(ls "$SITE"/nvidia/cu13/lib/libnvrtc.so.* 2>/dev/null | head -n 1 || true)
  [ -n "$NVRTC" ] && args+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
fi
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$CMAKE" "${args[@]}" > "$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
"$CMAKE" --build "$BUILD_DIR" -j "$(nproc)"
D2G_NO_EXT=1 $PY - "$BUILD_DIR" <<'PYEOF'
import glob, sys, torch
lib = glob.glob(f"{sys.argv[1]}/libd2g_fast_ops.so")[0]
torch.ops.load_library(lib)
from d2g_fast.ref.lpips_distance import lpips_distance as ref
f0, f1, w = torch.randn(2, 7, 5, 3), torch.randn(2, 7, 5, 3), torch.rand(7)
out, _ = torch.ops.d2g_fast.lpips_distance(f0, f1, w, False)
assert torch.allclose(out, ref(f0, f1, w), atol=1e-5), (out, ref(f0, f1, w))
print(f"cmake build OK: {lib} loads and lpips_distance matches the reference")
PYEOF
