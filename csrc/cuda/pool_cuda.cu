// CUDA kernels of learned_downsample / learned_upsample (schemas: csrc/cpu/pool_ops_cpu.cpp).
// No torch headers (see pool_cuda.h).
//
// Element-wise parts (the pooled sums, grad_x, the upsample itself, grad_y) use one thread per
// output element, d fastest, so a warp reads and writes contiguous memory. Reductions are
// deterministic: grad_logits' inner products S[j, k] are one block per (j, k) with a fixed-order
// tree; grad_bias is one thread per output (per-d bias: a fixed-order loop over b and m) or one
// block per output (bias shared over d); grad_scale sums a fixed number of block partials (in
// double, as on the CPU; their count depends only on the shape) in a second one-block kernel. Values are accumulated in A (float, or
// double for double activations) and rounded to the storage type once.
#include "pool_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bk_pool_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this
constexpr int kScaleBlocks = 512;        // most partials of the grad_scale reduction (fixed per shape)

template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <class A>
__device__ __forceinline__ A load_as(const float* p, int64_t i) { return A(p[i]); }
template <class A>
__device__ __forceinline__ A load_as(const double* p, int64_t i) { return A(p[i]); }
template <class A>
__device__ __forceinline__ A load_as(const __nv_bfloat16* p, int64_t i) { return A(__bfloat162float(p[i])); }
template <class A>
__device__ __forceinline__ A load_as(const __half* p, int64_t i) { return A(__half2float(p[i])); }

template <class A>
__device__ __forceinline__ void store_from(float* p, int64_t i, A v) { p[i] = float(v); }
template <class A>
__device__ __forceinline__ void store_from(double* p, int64_t i, A v) { p[i] = double(v); }
template <class A>
__device__ __forceinline__ void store_from(__nv_bfloat16* p, int64_t i, A v) { p[i] = __float2bfloat16(float(v)); }
template <class A>
__device__ __forceinline__ void store_from(__half* p, int64_t i, A v) { p[i] = __float2half(float(v)); }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

__device__ __forceinline__ int64_t gtid() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t gstride() { return int64_t(gridDim.x) * blockDim.x; }

// Fixed-order tree sum over the block (blockDim.x == kThreads); every thread gets the result.
template <class S>
__device__ __forceinline__ S block_sum(S v, S* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const S r = sh[0];
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------------
// learned_downsample

// w = softmax(logits, -1), one thread per row, max-subtracted.
template <class A>
__global__ void softmax_rows_kernel(const A* logits, int64_t M, int64_t r, A* w) {
  for (int64_t j = gtid(); j < M; j += gstride()) {
    const A* l = logits + j * r;
    A mx = l[0];
    for (int64_t k = 1; k < r; ++k) mx = l[k] > mx ? l[k] : mx;
    A s = 0;
    for (int64_t k = 0; k < r; ++k) {
      const A e = acc_exp(l[k] - mx);
      w[j * r + k] = e;
      s += e;
    }
    for (int64_t k = 0; k < r; ++k) w[j * r + k] /= s;
  }
}

// out[b, j, d] = sum_k w[j, k] x[b, j*r + k - s, d] (zero where j*r + k - s < 0).
template <class T, class A>
__global__ void down_fwd_kernel(const T* x, const A* w, T* out, int64_t B, int64_t M, int64_t r, int64_t D,
                                int64_t s) {
  const int64_t N = M * r, total = B * M * D;
  for (int64_t e = gtid(); e < total; e += gstride()) {
    const int64_t i = e / D, d = e - i * D, b = i / M, j = i - b * M;
    A acc = 0;
    for (int64_t k = 0; k < r; ++k) {
      const int64_t p = j * r + k - s;
      if (p < 0) continue;
      acc += w[j * r + k] * load_as<A>(x, (b * N + p) * D + d);
    }
    store_from<A>(out, e, acc);
  }
}

// grad_x[b, p, d] = w[j, k] grad[b, j, d] with j*r + k = p + s; 0 where no window reads p.
template <class T, class A>
__global__ void down_bwd_x_kernel(const T* grad, const A* w, T* grad_x, int64_t B, int64_t M, int64_t r, int64_t D,
                                  int64_t s) {
  const int64_t N = M * r, total = B * N * D;
  for (int64_t e = gtid(); e < total; e += gstride()) {
    const int64_t q = e / D, d = e - q * D, b = q / N, p = q - b * N;
    const int64_t t = p + s, j = t / r, k = t - j * r;
    A v = 0;
    if (j < M) v = w[j * r + k] * load_as<A>(grad, (b * M + j) * D + d);
    store_from<A>(grad_x, e, v);
  }
}

// S[j, k] = sum_{b, d} grad[b, j, d] x[b, j*r + k - s, d]: one block per (j, k).
template <class T, class A>
__global__ void __launch_bounds__(kThreads) down_S_kernel(const T* grad, const T* x, A* S, int64_t B, int64_t M,
                                                          int64_t r, int64_t D, int64_t s) {
  __shared__ A sh[kThreads];
  const int64_t N = M * r;
  for (int64_t jk = blockIdx.x; jk < M * r; jk += gridDim.x) {
    const int64_t j = jk / r, k = jk - j * r, p = j * r + k - s;
    A acc = 0;
    if (p >= 0)
      for (int64_t e = threadIdx.x; e < B * D; e += kThreads) {
        const int64_t b = e / D, d = e - b * D;
        acc += load_as<A>(grad, (b * M + j) * D + d) * load_as<A>(x, (b * N + p) * D + d);
      }
    const A tot = block_sum<A>(acc, sh);
    if (threadIdx.x == 0) S[jk] = tot;
  }
}

// grad_logits[j, k] = w[j, k] (S[j, k] - sum_k' w[j, k'] S[j, k']).
template <class A>
__global__ void down_logits_kernel(const A* w, const A* S, A* gl, int64_t M, int64_t r) {
  for (int64_t j = gtid(); j < M; j += gstride()) {
    A ws = 0;
    for (int64_t k = 0; k < r; ++k) ws += w[j * r + k] * S[j * r + k];
    for (int64_t k = 0; k < r; ++k) gl[j * r + k] = w[j * r + k] * (S[j * r + k] - ws);
  }
}

// ---------------------------------------------------------------------------------------------
// learned_upsample

template <class A>
__device__ __forceinline__ A bias_at(const A* bias, const UpDims& u, int64_t m, int64_t k, int64_t d) {
  return bias[((u.Mb == 1 ? 0 : m) * u.r + k) * u.Db + (u.Db == 1 ? 0 : d)];
}

// out[b, m*r + k, d] = residual + scale * (y[b, m, k*D + d] + bias[m, k, d]); the same flat index e.
template <class T, class A>
__global__ void up_fwd_kernel(const T* y, const A* bias, const T* res, const A* scale, T* out, UpDims u) {
  const int64_t RD = u.r * u.D, total = u.B * u.M * RD;
  const A sc = scale ? *scale : A(1);
  for (int64_t e = gtid(); e < total; e += gstride()) {
    const int64_t i = e / RD, q = e - i * RD, m = i % u.M, k = q / u.D, d = q - k * u.D;
    const A v = load_as<A>(y, e) + bias_at(bias, u, m, k, d);
    A o;
    if (res)
      o = load_as<A>(res, e) + sc * v;
    else if (scale)
      o = sc * v;
    else
      o = v;
    store_from<A>(out, e, o);
  }
}

template <class T, class A>
__global__ void up_bwd_y_kernel(const T* grad, const A* scale, T* grad_y, int64_t total) {
  const A sc = scale ? *scale : A(1);
  for (int64_t e = gtid(); e < total; e += gstride()) store_from<A>(grad_y, e, sc * load_as<A>(grad, e));
}

// Per-d bias (Db == D): one thread per output (mb, k, d), summing over b (and m when Mb == 1).
template <class T, class A>
__global__ void up_bias_perd_kernel(const T* grad, const A* scale, A* gb, UpDims u) {
  const int64_t RD = u.r * u.D, outs = u.Mb * RD;
  const A sc = scale ? *scale : A(1);
  const int64_t m0 = 0, mc = u.Mb == 1 ? u.M : 1;
  for (int64_t o = gtid(); o < outs; o += gstride()) {
    const int64_t mb = o / RD, q = o - mb * RD;
    A acc = 0;
    for (int64_t b = 0; b < u.B; ++b)
      for (int64_t mi = m0; mi < mc; ++mi) {
        const int64_t m = u.Mb == 1 ? mi : mb;
        acc += load_as<A>(grad, (b * u.M + m) * RD + q);
      }
    gb[o] = sc * acc;
  }
}

// Bias shared over d (Db == 1): one block per output (mb, k), summing over b, d (and m when Mb == 1).
template <class T, class A>
__global__ void __launch_bounds__(kThreads) up_bias_shared_d_kernel(const T* grad, const A* scale, A* gb, UpDims u) {
  __shared__ A sh[kThreads];
  const int64_t RD = u.r * u.D, outs = u.Mb * u.r;
  const int64_t mc = u.Mb == 1 ? u.M : 1, count = u.B * mc * u.D;
  const A sc = scale ? *scale : A(1);
  for (int64_t o = blockIdx.x; o < outs; o += gridDim.x) {
    const int64_t mb = o / u.r, k = o - mb * u.r;
    A acc = 0;
    for (int64_t e = threadIdx.x; e < count; e += kThreads) {
      const int64_t d = e % u.D, t = e / u.D, mi = t % mc, b = t / mc;
      const int64_t m = u.Mb == 1 ? mi : mb;
      acc += load_as<A>(grad, (b * u.M + m) * RD + k * u.D + d);
    }
    const A tot = block_sum<A>(acc, sh);
    if (threadIdx.x == 0) gb[o] = sc * tot;
  }
}

// grad_scale = sum_e grad[e] (y[e] + bias(e)): kScaleBlocks fixed partials in double, then one block.
template <class T, class A>
__global__ void __launch_bounds__(kThreads) up_scale_partial_kernel(const T* grad, const T* y, const A* bias,
                                                                    double* part, UpDims u) {
  __shared__ double sh[kThreads];
  const int64_t RD = u.r * u.D, total = u.B * u.M * RD;
  double acc = 0.0;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t i = e / RD, q = e - i * RD, m = i % u.M, k = q / u.D, d = q - k * u.D;
    acc += double(load_as<A>(grad, e) * (load_as<A>(y, e) + bias_at(bias, u, m, k, d)));
  }
  const double tot = block_sum<double>(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = tot;
}

template <class A>
__global__ void __launch_bounds__(kThreads) up_scale_final_kernel(const double* part, int nparts, A* out) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nparts; i += kThreads) acc += part[i];
  const double tot = block_sum<double>(acc, sh);
  if (threadIdx.x == 0) *out = A(tot);
}

// ---------------------------------------------------------------------------------------------
// Launchers

#define POOL_CHECK(name)                             \
  do {                                               \
    cudaError_t e_ = cudaGetLastError();             \
    if (e_ != cudaSuccess) return Status{e_, name};  \
  } while (0)

inline unsigned grid_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  return unsigned(b < kMaxBlocks ? b : kMaxBlocks);
}
inline unsigned grid_blocks(int64_t n) { return unsigned(n < kMaxBlocks ? (n < 1 ? 1 : n) : kMaxBlocks); }

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

const Status kOk{cudaSuccess, nullptr};

template <class T>
Status down_fwd_t(const T* x, const void* logits_, T* out, int64_t B, int64_t M, int64_t r, int64_t D, bool causal,
                  void* ws, cudaStream_t st) {
  using A = typename Acc<T>::type;
  const A* logits = static_cast<const A*>(logits_);
  A* w = static_cast<A*>(ws);
  softmax_rows_kernel<A><<<grid_for(M), kThreads, 0, st>>>(logits, M, r, w);
  POOL_CHECK("learned_downsample_fwd softmax_rows_kernel");
  if (B * M * D == 0) return kOk;
  down_fwd_kernel<T, A><<<grid_for(B * M * D), kThreads, 0, st>>>(x, w, out, B, M, r, D, causal ? r - 1 : 0);
  POOL_CHECK("learned_downsample_fwd down_fwd_kernel");
  return kOk;
}

template <class T>
Status down_bwd_t(const T* grad, const T* x, const void* logits_, T* grad_x, void* grad_logits_, int64_t B, int64_t M,
                  int64_t r, int64_t D, bool causal, void* ws, cudaStream_t st) {
  using A = typename Acc<T>::type;
  const A* logits = static_cast<const A*>(logits_);
  A* w = static_cast<A*>(ws);
  A* S = reinterpret_cast<A*>(static_cast<char*>(ws) + align256(size_t(M * r) * sizeof(A)));
  const int64_t s = causal ? r - 1 : 0;
  softmax_rows_kernel<A><<<grid_for(M), kThreads, 0, st>>>(logits, M, r, w);
  POOL_CHECK("learned_downsample_bwd softmax_rows_kernel");
  if (grad_x && B * M * r * D > 0) {
    down_bwd_x_kernel<T, A><<<grid_for(B * M * r * D), kThreads, 0, st>>>(grad, w, grad_x, B, M, r, D, s);
    POOL_CHECK("learned_downsample_bwd down_bwd_x_kernel");
  }
  if (grad_logits_) {
    down_S_kernel<T, A><<<grid_blocks(M * r), kThreads, 0, st>>>(grad, x, S, B, M, r, D, s);
    POOL_CHECK("learned_downsample_bwd down_S_kernel");
    down_logits_kernel<A><<<grid_for(M), kThreads, 0, st>>>(w, S, static_cast<A*>(grad_logits_), M, r);
    POOL_CHECK("learned_downsample_bwd down_logits_kernel");
  }
  return kOk;
}

template <class T>
Status up_fwd_t(const T* y, const void* bias, const T* res, const void* scale, T* out, const UpDims& u,
                cudaStream_t st) {
  using A = typename Acc<T>::type;
  const int64_t total = u.B * u.M * u.r * u.D;
  if (total == 0) return kOk;
  up_fwd_kernel<T, A><<<grid_for(total), kThreads, 0, st>>>(y, static_cast<const A*>(bias), res,
                                                            static_cast<const A*>(scale), out, u);
  POOL_CHECK("learned_upsample_fwd up_fwd_kernel");
  return kOk;
}

template <class T>
Status up_bwd_t(const T* grad, const T* y, const void* bias_, const void* scale_, T* grad_y, void* grad_bias,
                void* grad_scale, const UpDims& u, void* ws, cudaStream_t st) {
  using A = typename Acc<T>::type;
  const A* bias = static_cast<const A*>(bias_);
  const A* scale = static_cast<const A*>(scale_);
  const int64_t total = u.B * u.M * u.r * u.D;
  if (grad_y && total > 0) {
    up_bwd_y_kernel<T, A><<<grid_for(total), kThreads, 0, st>>>(grad, scale, grad_y, total);
    POOL_CHECK("learned_upsample_bwd up_bwd_y_kernel");
  }
  if (grad_bias) {
    if (u.Db == 1) {
      up_bias_shared_d_kernel<T, A><<<grid_blocks(u.Mb * u.r), kThreads, 0, st>>>(grad, scale,
                                                                                  static_cast<A*>(grad_bias), u);
    } else {
      up_bias_perd_kernel<T, A><<<grid_for(u.Mb * u.r * u.D), kThreads, 0, st>>>(grad, scale,
                                                                                static_cast<A*>(grad_bias), u);
    }
    POOL_CHECK("learned_upsample_bwd bias gradient kernel");
  }
  if (grad_scale) {
    double* part = static_cast<double*>(ws);
    // the partial count depends only on the shape, so the sum's order (and value) is reproducible
    const int nparts = int(grid_for(total) < unsigned(kScaleBlocks) ? grid_for(total) : kScaleBlocks);
    up_scale_partial_kernel<T, A><<<nparts, kThreads, 0, st>>>(grad, y, bias, part, u);
    POOL_CHECK("learned_upsample_bwd up_scale_partial_kernel");
    up_scale_final_kernel<A><<<1, kThreads, 0, st>>>(part, nparts, static_cast<A*>(grad_scale));
    POOL_CHECK("learned_upsample_bwd up_scale_final_kernel");
  }
  return kOk;
}

}  // namespace

size_t down_workspace_bytes(int64_t M, int64_t r, DType t) {
  const size_t a = t == DType::kDouble ? sizeof(double) : sizeof(float);
  return 2 * align256(size_t(M * r) * a);
}

size_t up_workspace_bytes(const UpDims&) { return kScaleBlocks * sizeof(double); }

#define POOL_DISPATCH(t, CALL)                                  \
  switch (t) {                                                  \
    case DType::kFloat: {                                       \
      using T = float;                                          \
      return CALL;                                              \
    }                                                           \
    case DType::kDouble: {                                      \
      using T = double;                                         \
      return CALL;                                              \
    }                                                           \
    case DType::kBFloat16: {                                    \
      using T = __nv_bfloat16;                                  \
      return CALL;                                              \
    }                                                           \
    case DType::kHalf: {                                        \
      using T = __half;                                         \
      return CALL;                                              \
    }                                                           \
  }                                                             \
  return Status{cudaErrorInvalidValue, "resnet_bk pooling: unknown dtype"}

Status down_fwd(DType t, const void* x, const void* logits, void* out, int64_t B, int64_t M, int64_t r, int64_t D,
                bool causal, void* ws, cudaStream_t st) {
  POOL_DISPATCH(t, down_fwd_t<T>(static_cast<const T*>(x), logits, static_cast<T*>(out), B, M, r, D, causal, ws, st));
}

Status down_bwd(DType t, const void* grad, const void* x, const void* logits, void* grad_x, void* grad_logits,
                int64_t B, int64_t M, int64_t r, int64_t D, bool causal, void* ws, cudaStream_t st) {
  POOL_DISPATCH(t, down_bwd_t<T>(static_cast<const T*>(grad), static_cast<const T*>(x), logits,
                                 static_cast<T*>(grad_x), grad_logits, B, M, r, D, causal, ws, st));
}

Status up_fwd(DType t, const void* y, const void* bias, const void* residual, const void* scale, void* out,
              const UpDims& u, cudaStream_t st) {
  POOL_DISPATCH(t, up_fwd_t<T>(static_cast<const T*>(y), bias, static_cast<const T*>(residual), scale,
                               static_cast<T*>(out), u, st));
}

Status up_bwd(DType t, const void* grad, const void* y, const void* bias, const void* scale, void* grad_y,
              void* grad_bias, void* grad_scale, const UpDims& u, void* ws, cudaStream_t st) {
  POOL_DISPATCH(t, up_bwd_t<T>(static_cast<const T*>(grad), static_cast<const T*>(y), bias, scale,
                               static_cast<T*>(grad_y), grad_bias, grad_scale, u, ws, st));
}

}  // namespace bk_pool_cuda
