// Torch-free interface of the CUDA kernels of learned_downsample / learned_upsample
// (pool_cuda.cu). Shapes and semantics are the schemas in csrc/cpu/pool_ops_cpu.cpp; the torch
// binding is pool_ops_cuda.cpp. Tensors are passed as contiguous device pointers with their
// element type; the accumulation type A (logits, bias, scale, grad_logits, grad_bias, grad_scale)
// is double for double activations and float otherwise. `scale` is a device pointer (nullptr
// means 1): never read on the host, so calls are capturable in CUDA graphs.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "bk_core_cuda.h"  // bk_cuda::Status

namespace bk_pool_cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

using bk_cuda::Status;

// learned_downsample. x (B, M*r, D), logits (M, r), out (B, M, D).
size_t down_workspace_bytes(int64_t M, int64_t r, DType t);
Status down_fwd(DType t, const void* x, const void* logits, void* out, int64_t B, int64_t M, int64_t r, int64_t D,
                bool causal, void* workspace, cudaStream_t stream);
// grad (B, M, D); grad_x (B, M*r, D) or nullptr; grad_logits (M, r) or nullptr.
Status down_bwd(DType t, const void* grad, const void* x, const void* logits, void* grad_x, void* grad_logits,
                int64_t B, int64_t M, int64_t r, int64_t D, bool causal, void* workspace, cudaStream_t stream);

// learned_upsample. y (B, M, r*D), bias (Mb, r, Db), residual (B, M*r, D) or nullptr, scale () or
// nullptr; out (B, M*r, D).
struct UpDims {
  int64_t B, M, r, D, Mb, Db;
};
size_t up_workspace_bytes(const UpDims& u);
Status up_fwd(DType t, const void* y, const void* bias, const void* residual, const void* scale, void* out,
              const UpDims& u, cudaStream_t stream);
// grad (B, M*r, D); grad_y (B, M, r*D), grad_bias (Mb, r, Db), grad_scale (): each may be nullptr.
Status up_bwd(DType t, const void* grad, const void* y, const void* bias, const void* scale, void* grad_y,
              void* grad_bias, void* grad_scale, const UpDims& u, void* workspace, cudaStream_t stream);

}  // namespace bk_pool_cuda
