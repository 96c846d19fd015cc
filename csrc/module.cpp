// The Python module d2g_fast._C. Importing it runs the static initialisers that register
// every op's schema (registration.cpp) and kernels (cpu/, cuda/) with the dispatcher; the
// functions below only report how the extension was built.
#include <torch/extension.h>

#include "lpips_distance/lpips_distance_math.h"
#include "multiscale_heads/multiscale_heads_math.h"

#ifndef D2G_CUDA_ARCHS
#define D2G_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "d2g_fast compiled kernels (ops are under torch.ops.d2g_fast)";
  m.def("compiled_with_cuda", []() {
#ifdef D2G_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() { return std::string(D2G_CUDA_ARCHS); });
  // Constants that the Python side needs too (fake kernels, dispatch): defined once, in the
  // C++ headers, and read in Python through d2g_fast._ext.constant(name).
  m.def("constants", []() {
    return std::map<std::string, int64_t>{
        {"lpips_distance_stat_rows", d2g::lpips::kStatRows},
        {"multiscale_heads_stat_rows", d2g::multiscale_heads::kStatRows},
        {"multiscale_heads_max_channels", d2g::multiscale_heads::kMaxChannelsCpu},
    };
  });
  m.def("compiler", []() {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return std::string("gcc ") + __VERSION__;
#else
    return std::string("unknown");
#endif
  });
}
