// Test-only stand-in for the CUDA runtime header, used by tests/kernels/test_cuda_emulated.py to compile
// the CUDA kernels as plain C++ and run them on the CPU (see emu.h). Only what the kernels and
// launchers use is declared.
#pragma once

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef struct bk_emu_stream* cudaStream_t;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// 16-byte vector types (the kernels' vector loads and stores)
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
