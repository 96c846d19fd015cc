#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) kernels: per-element math lives in
// D2G_HOST_DEVICE inline functions so that CPU tests exercise the arithmetic the GPU runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define D2G_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define D2G_HOST_DEVICE inline
#endif
