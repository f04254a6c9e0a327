// Test-only stand-in for the CUDA runtime header, used by tests/kernels/test_cuda_emulated.py to compile
// the CUDA kernels as plain C++ and run them on the CPU (see emu.h). Only what the kernels and
// launchers use is declared.
#pragma once

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef struct bk_emu_stream* cudaStream_t;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#if defined(BK_EMU_TRAFFIC)
// a memset on the stream: done at once, its stores counted (emu.h)
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  bk_emu::memset_counted(p, v, n);
  return cudaSuccess;
}
#endif

// 16-byte vector types (the kernels' vector loads and stores)
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
