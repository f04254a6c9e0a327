// Test-only C entry points over the BK-Core CUDA launchers, compiled after the (rewritten)
// bk_core_cuda.cu in the emulation build of tests/kernels/test_cuda_emulated.py and called through ctypes.
// Workspace is filled with 0xFF bytes (NaN) so that reading a scratch cell that was never written
// poisons the result.
#include <cstdlib>
#include <cstring>

namespace {

void* nan_workspace(size_t bytes) {
  const size_t n = (bytes + 256) / 256 * 256;
  void* p = std::aligned_alloc(256, n);
  std::memset(p, 0xFF, n);
  return p;
}

template <class T>
int run_forward(const T* a, const T* k, int64_t k_row_stride, const T* zri, const T* mask, int64_t B, int64_t N,
                int causal, T* out, int strategy, int64_t chunk, int sms, int64_t* plan_out) {
  const bk_cuda::Plan pl = bk_cuda::make_plan(B, N, bk_cuda::Strategy(strategy), chunk, sms);
  plan_out[0] = pl.C;
  plan_out[1] = pl.Lc;
  void* ws = nan_workspace(bk_cuda::workspace_bytes(pl, causal, false, sizeof(T) == 8));
  const bk_cuda::Problem<T> p{a, k, k_row_stride, zri, mask, B, N, causal != 0};
  const bk_cuda::Status s = bk_cuda::forward(p, out, pl, ws, nullptr);
  std::free(ws);
  return s.ok() ? 0 : 1;
}

template <class T>
int run_backward(const T* a, const T* k, int64_t k_row_stride, const T* zri, const T* mask, int64_t B, int64_t N,
                 int causal, const T* grad, T* grad_a, T* grad_k, T* grad_zri, T* grad_mask, int strategy,
                 int64_t chunk, int sms, int64_t* plan_out) {
  const bk_cuda::Plan pl = bk_cuda::make_plan(B, N, bk_cuda::Strategy(strategy), chunk, sms);
  plan_out[0] = pl.C;
  plan_out[1] = pl.Lc;
  void* ws = nan_workspace(bk_cuda::workspace_bytes(pl, causal, true, sizeof(T) == 8));
  const bk_cuda::Problem<T> p{a, k, k_row_stride, zri, mask, B, N, causal != 0};
  const bk_cuda::Grads<T> g{grad, grad_a, grad_k, grad_zri, grad_mask};
  const bk_cuda::Status s = bk_cuda::backward(p, g, pl, ws, nullptr);
  std::free(ws);
  return s.ok() ? 0 : 1;
}

}  // namespace

#define BK_EMU_API(T, SUF)                                                                                    \
  extern "C" int bk_emu_forward_##SUF(const T* a, const T* k, int64_t ks, const T* zri, const T* mask,        \
                                      int64_t B, int64_t N, int causal, T* out, int strategy, int64_t chunk,  \
                                      int sms, int64_t* plan_out) {                                            \
    return run_forward<T>(a, k, ks, zri, mask, B, N, causal, out, strategy, chunk, sms, plan_out);            \
  }                                                                                                           \
  extern "C" int bk_emu_backward_##SUF(const T* a, const T* k, int64_t ks, const T* zri, const T* mask,       \
                                       int64_t B, int64_t N, int causal, const T* grad, T* ga, T* gk, T* gz,  \
                                       T* gm, int strategy, int64_t chunk, int sms, int64_t* plan_out) {      \
    return run_backward<T>(a, k, ks, zri, mask, B, N, causal, grad, ga, gk, gz, gm, strategy, chunk, sms,    \
                           plan_out);                                                                         \
  }

BK_EMU_API(float, f32)
BK_EMU_API(double, f64)
