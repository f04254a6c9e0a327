// Test-only C entry points over the BK-Core CUDA launchers, compiled after the (rewritten)
// bk_core_cuda.cu in the emulation build of tests/kernels/test_cuda_emulated.py and called through ctypes.
// Workspace is filled with 0xFF bytes (NaN) so that reading a scratch cell that was never written
// poisons the result. Every run registers its buffers with the traffic counter of emu.h (tags
// below), so the bytes each kernel moves to and from each buffer can be read back afterwards
// (bk_emu_traffic), and an access outside every buffer is counted (tag kUnknownTag).
#include <cstdlib>
#include <cstring>

namespace {

// Buffer tags of the traffic counter (tests/kernels/test_cuda_traffic.py names them).
enum Tag { kA = 0, kK, kZri, kMask, kOut, kGrad, kGradA, kGradK, kGradZ, kGradMask, kWs, kDin, kKin, kMu0 };

void* nan_workspace(size_t bytes) {
  const size_t n = (bytes + 256) / 256 * 256;
  void* p = std::aligned_alloc(256, n);
  std::memset(p, 0xFF, n);
  return p;
}

// Plans made from here on get Plan::deterministic (bk_emu_set_deterministic).
bool g_deterministic = false;

bk_cuda::Plan plan_of(int64_t B, int64_t N, int strategy, int64_t chunk, int sms, int threads) {
  bk_cuda::Plan pl = bk_cuda::make_plan(B, N, bk_cuda::Strategy(strategy), chunk, sms, threads);
  pl.deterministic = g_deterministic;
  return pl;
}

// plan_out: S, T, segs, rpb, cb, blocks
void plan_fields(const bk_cuda::Plan& pl, int64_t* o) {
  const int64_t v[6] = {pl.S, pl.T, pl.segs, pl.rpb, pl.cb, pl.blocks};
  for (int i = 0; i < 6; ++i) o[i] = v[i];
}

// d_in ((B, 2) interleaved complex) and k_in ((B,)): a carried state, or both null.
template <class T>
void register_inputs(const T* a, const T* k, int64_t ks, const T* zri, const T* mask, int64_t B, int64_t N,
                     const T* d_in, const T* k_in) {
  auto& tr = bk_emu::traffic;
  tr.reset();
  tr.add_range(a, sizeof(T) * B * N, kA);
  tr.add_range(k, sizeof(T) * (ks ? B : 1) * (N - 1), kK);
  tr.add_range(zri, sizeof(T) * 2, kZri);
  tr.add_range(mask, sizeof(T) * B * N, kMask);
  tr.add_range(d_in, sizeof(T) * 2 * B, kDin);
  tr.add_range(k_in, sizeof(T) * B, kKin);
}

template <class T>
int run_forward(const T* a, const T* k, int64_t k_row_stride, const T* zri, const T* mask, int64_t B, int64_t N,
                int causal, const T* d_in, const T* k_in, T* out, int strategy, int64_t chunk, int sms, int threads,
                int64_t* plan_out) {
  const bk_cuda::Plan pl = plan_of(B, N, strategy, chunk, sms, threads);
  plan_fields(pl, plan_out);
  const size_t wsb = bk_cuda::workspace_bytes(pl, causal, false, sizeof(T) == 8);
  void* ws = nan_workspace(wsb);
  register_inputs(a, k, k_row_stride, zri, mask, B, N, d_in, k_in);
  bk_emu::traffic.add_range(out, sizeof(T) * 2 * B * N, kOut);
  bk_emu::traffic.add_range(ws, wsb, kWs);
  const bk_cuda::Problem<T> p{a, k, k_row_stride, zri, mask, B, N, causal != 0, d_in, k_in};
  const bk_cuda::Status s = bk_cuda::forward(p, out, pl, ws, nullptr);
  bk_emu::traffic.on = false;
  std::free(ws);
  return s.ok() ? 0 : 1;
}

template <class T>
int run_backward(const T* a, const T* k, int64_t k_row_stride, const T* zri, const T* mask, int64_t B, int64_t N,
                 int causal, const T* d_in, const T* k_in, const T* grad, T* grad_a, T* grad_k, T* grad_zri,
                 T* grad_mask, T* mu0, int strategy, int64_t chunk, int sms, int threads, int64_t* plan_out) {
  const bk_cuda::Plan pl = plan_of(B, N, strategy, chunk, sms, threads);
  plan_fields(pl, plan_out);
  const size_t wsb = bk_cuda::workspace_bytes(pl, causal, true, sizeof(T) == 8);
  void* ws = nan_workspace(wsb);
  register_inputs(a, k, k_row_stride, zri, mask, B, N, d_in, k_in);
  auto& tr = bk_emu::traffic;
  tr.add_range(grad, sizeof(T) * 2 * B * N, kGrad);
  tr.add_range(grad_a, sizeof(T) * B * N, kGradA);
  tr.add_range(grad_k, sizeof(T) * B * (N - 1), kGradK);
  tr.add_range(grad_zri, sizeof(T) * 2, kGradZ);
  tr.add_range(grad_mask, sizeof(T) * B * N, kGradMask);
  tr.add_range(mu0, sizeof(T) * 2 * B, kMu0);
  tr.add_range(ws, wsb, kWs);
  const bk_cuda::Problem<T> p{a, k, k_row_stride, zri, mask, B, N, causal != 0, d_in, k_in};
  const bk_cuda::Grads<T> g{grad, grad_a, grad_k, grad_zri, grad_mask, mu0};
  const bk_cuda::Status s = bk_cuda::backward(p, g, pl, ws, nullptr);
  tr.on = false;
  std::free(ws);
  return s.ok() ? 0 : 1;
}

}  // namespace

// d_in, k_in: a carried state or null; gk (grad k) and mu0 may be null (not asked for).
#define BK_EMU_API(T, SUF)                                                                                    \
  extern "C" int bk_emu_forward_##SUF(const T* a, const T* k, int64_t ks, const T* zri, const T* mask,        \
                                      int64_t B, int64_t N, int causal, const T* d_in, const T* k_in, T* out, \
                                      int strategy, int64_t chunk, int sms, int threads, int64_t* plan_out) { \
    return run_forward<T>(a, k, ks, zri, mask, B, N, causal, d_in, k_in, out, strategy, chunk, sms, threads,  \
                          plan_out);                                                                          \
  }                                                                                                           \
  extern "C" int bk_emu_backward_##SUF(const T* a, const T* k, int64_t ks, const T* zri, const T* mask,       \
                                       int64_t B, int64_t N, int causal, const T* d_in, const T* k_in,        \
                                       const T* grad, T* ga, T* gk, T* gz, T* gm, T* mu0, int strategy,      \
                                       int64_t chunk, int sms, int threads, int64_t* plan_out) {             \
    return run_backward<T>(a, k, ks, zri, mask, B, N, causal, d_in, k_in, grad, ga, gk, gz, gm, mu0,         \
                           strategy, chunk, sms, threads, plan_out);                                          \
  }

BK_EMU_API(float, f32)
BK_EMU_API(double, f64)

// Traffic of the last run: for kernel slot i (name, or null past the last), bytes[tag][0 load, 1 store]
// and the number of accesses, as uint64 arrays of kMaxTags * 2.
extern "C" const char* bk_emu_traffic(int i, uint64_t* bytes, uint64_t* accesses) {
  if (i < 0 || i >= bk_emu::kMaxKernels || bk_emu::traffic.names[i] == nullptr) return nullptr;
  for (int t = 0; t < bk_emu::kMaxTags; ++t)
    for (int s = 0; s < 2; ++s) {
      bytes[2 * t + s] = bk_emu::traffic.bytes[i][t][s];
      accesses[2 * t + s] = bk_emu::traffic.accesses[i][t][s];
    }
  return bk_emu::traffic.names[i];
}

// How the following launches run their blocks (emu.h Sched), and the look-back's acquire loads so
// far by value (0 empty, 1 aggregate, 2 inclusive) since the last reset.
extern "C" void bk_emu_set_deterministic(int on) { g_deterministic = on != 0; }
extern "C" void bk_emu_set_sched(int resident, unsigned seed) {
  bk_emu::sched.resident = resident;
  bk_emu::sched.seed = seed;
}
extern "C" uint64_t bk_emu_acquired(int v, int reset) {
  const uint64_t n = bk_emu::acquired[v];
  if (reset) bk_emu::acquired[v] = 0;
  return n;
}

// The plan of a shape (fields as plan_fields) and its forward carry depth (backward: its backward
// carry depth), without running anything.
extern "C" int64_t bk_emu_plan(int64_t B, int64_t N, int strategy, int64_t chunk, int sms, int threads,
                               int64_t* plan_out) {
  const bk_cuda::Plan pl = plan_of(B, N, strategy, chunk, sms, threads);
  plan_fields(pl, plan_out);
  return bk_cuda::forward_carry_depth(pl);
}
extern "C" int64_t bk_emu_backward_depth(int64_t B, int64_t N, int strategy, int64_t chunk, int sms, int threads) {
  return bk_cuda::backward_carry_depth(bk_cuda::make_plan(B, N, bk_cuda::Strategy(strategy), chunk, sms, threads));
}
