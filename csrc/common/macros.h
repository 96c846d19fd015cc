#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) kernels: per-element math lives in
// D2G_HOST_DEVICE inline functions so that CPU tests exercise the arithmetic the GPU runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define D2G_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define D2G_HOST_DEVICE inline
#endif

// Hot CPU loops: the extension is built for the baseline x86-64 ISA (SSE2, 4 floats a vector)
// so that it loads on any machine, while ATen and inductor pick AVX2 / AVX-512 at run time.
// GCC's target_clones compiles the marked function once per ISA level and picks the best clone
// at load time; helpers inlined into it are vectorised for that level too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define D2G_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define D2G_CPU_CLONES
#endif
