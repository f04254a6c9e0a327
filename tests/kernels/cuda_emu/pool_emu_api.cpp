// Test-only C entry points over the pooling CUDA launchers (pool_cuda.cu), for the CPU emulation
// build of tests/kernels/test_cuda_emulated.py. Workspace is NaN-filled (0xFF bytes).
#include <cstdlib>
#include <cstring>

namespace {
void* pool_nan_workspace(size_t bytes) {
  const size_t n = (bytes + 256) / 256 * 256;
  void* p = std::aligned_alloc(256, n);
  std::memset(p, 0xFF, n);
  return p;
}
}  // namespace

using bk_pool_cuda::DType;
using bk_pool_cuda::UpDims;

extern "C" int pool_emu_down_fwd(int t, const void* x, const void* logits, void* out, int64_t B, int64_t M, int64_t r,
                                 int64_t D, int causal) {
  void* ws = pool_nan_workspace(bk_pool_cuda::down_workspace_bytes(M, r, DType(t)));
  const auto s = bk_pool_cuda::down_fwd(DType(t), x, logits, out, B, M, r, D, causal != 0, ws, nullptr);
  std::free(ws);
  return s.ok() ? 0 : 1;
}

extern "C" int pool_emu_down_bwd(int t, const void* grad, const void* x, const void* logits, void* gx, void* gl,
                                 int64_t B, int64_t M, int64_t r, int64_t D, int causal) {
  void* ws = pool_nan_workspace(bk_pool_cuda::down_workspace_bytes(M, r, DType(t)));
  const auto s = bk_pool_cuda::down_bwd(DType(t), grad, x, logits, gx, gl, B, M, r, D, causal != 0, ws, nullptr);
  std::free(ws);
  return s.ok() ? 0 : 1;
}

extern "C" int pool_emu_up_fwd(int t, const void* y, const void* bias, const void* res, const void* scale, void* out,
                               int64_t B, int64_t M, int64_t r, int64_t D, int64_t Mb, int64_t Db) {
  const UpDims u{B, M, r, D, Mb, Db};
  return bk_pool_cuda::up_fwd(DType(t), y, bias, res, scale, out, u, nullptr).ok() ? 0 : 1;
}

extern "C" int pool_emu_up_bwd(int t, const void* grad, const void* y, const void* bias, const void* scale, void* gy,
                               void* gb, void* gs, int64_t B, int64_t M, int64_t r, int64_t D, int64_t Mb,
                               int64_t Db) {
  const UpDims u{B, M, r, D, Mb, Db};
  void* ws = pool_nan_workspace(bk_pool_cuda::up_workspace_bytes(u));
  const auto s = bk_pool_cuda::up_bwd(DType(t), grad, y, bias, scale, gy, gb, gs, u, ws, nullptr);
  std::free(ws);
  return s.ok() ? 0 : 1;
}
