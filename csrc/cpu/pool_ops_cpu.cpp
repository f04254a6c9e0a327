// Learned down/upsampling of a multi-scale sequence model: the CPU kernels of learned_downsample_fwd/bwd
// and learned_upsample_fwd/bwd, whose schemas and semantics are in csrc/schemas.cpp.
//
// Autograd: csrc/autograd.cpp; fake (meta) kernels: registered from Python (resnet_bk/ops).
// Parallelism: at::parallel_for over the B*M output rows (forward, downsample backward); the
// upsample backward reduces over b into per-tile partial sums (deterministic, no atomics), then
// sums the tiles. Inner loops run over contiguous D (r*D for the upsample) and vectorise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "huge_pages.h"

namespace {

template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_act(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-dim tensor, got shape ", t.sizes());
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              ": expected float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

void check_acc(const at::Tensor& t, const char* name, at::ScalarType act) {
  TORCH_CHECK(t.scalar_type() == acc_type_of(act), name, ": expected dtype ", acc_type_of(act),
              " (the accumulation dtype of ", act, " activations), got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item)); }

// sum_e a[e] * (b[e] + c[e]) (c may be null: 0), accumulated in A over 16 independent lanes, then
// the lanes in a fixed order. A single running sum is a serial dependency chain the compiler may
// not reorder (no -ffast-math), i.e. one scalar add per element at the add latency; the lanes let
// it vectorise. Deterministic: the order depends on n only.
template <class A, class T>
inline A dot_lanes(const T* __restrict__ a, const T* __restrict__ b, const A* __restrict__ c, int64_t n) {
  constexpr int L = 16;
  A acc[L];
  for (int l = 0; l < L; ++l) acc[l] = A(0);
  int64_t e = 0;
  if (c) {
    for (; e + L <= n; e += L)
      for (int l = 0; l < L; ++l) acc[l] += static_cast<A>(a[e + l]) * (static_cast<A>(b[e + l]) + c[e + l]);
  } else {
    for (; e + L <= n; e += L)
      for (int l = 0; l < L; ++l) acc[l] += static_cast<A>(a[e + l]) * static_cast<A>(b[e + l]);
  }
  for (int l = 0; e < n; ++e, ++l) acc[l] += static_cast<A>(a[e]) * (static_cast<A>(b[e]) + (c ? c[e] : A(0)));
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// Row-wise softmax of logits (M, r), max-subtracted.
template <class A>
void softmax_rows(const A* logits, int64_t M, int64_t r, A* w) {
  for (int64_t j = 0; j < M; ++j) {
    const A* l = logits + j * r;
    A mx = l[0];
    for (int64_t k = 1; k < r; ++k) mx = std::max(mx, l[k]);
    A s = 0;
    for (int64_t k = 0; k < r; ++k) {
      w[j * r + k] = std::exp(l[k] - mx);
      s += w[j * r + k];
    }
    for (int64_t k = 0; k < r; ++k) w[j * r + k] /= s;
  }
}

// ---------------------------------------------------------------------------------------------
// learned_downsample

void check_down(const at::Tensor& x, const at::Tensor& logits) {
  check_act(x, "x", 3);
  check_acc(logits, "logits", x.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) >= 1 && logits.size(1) >= 1,
              "logits: expected shape (M, r) with M, r >= 1, got ", logits.sizes());
  TORCH_CHECK(x.size(1) == logits.size(0) * logits.size(1), "x: expected N = M * r = ", logits.size(0), " * ",
              logits.size(1), " positions (logits of shape ", logits.sizes(), "), got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 1, "x: expected D >= 1, got shape ", x.sizes());
}

template <class T>
void down_fwd_kernel(const T* x, const typename Acc<T>::type* w, T* out, int64_t B, int64_t M, int64_t r,
                     int64_t D, int64_t s) {
  using A = typename Acc<T>::type;
  const int64_t N = M * r;
  at::parallel_for(0, B * M, grain_for(r * D), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same<T, A>::value) {
      // float32 / float64: accumulate straight into the output row (no scratch row and copy); the
      // first term in the window initialises it. Same operations in the same order as below.
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / M, j = i % M;
        T* __restrict__ op = out + i * D;
        bool first = true;
        for (int64_t k = 0; k < r; ++k) {
          const int64_t p = j * r + k - s;
          if (p < 0) continue;  // causal window reaching before position 0: zero padding
          const A wk = w[j * r + k];
          const T* __restrict__ xp = x + (b * N + p) * D;
          if (first) {
            for (int64_t d = 0; d < D; ++d) op[d] = A(0) + wk * xp[d];
            first = false;
          } else {
            for (int64_t d = 0; d < D; ++d) op[d] += wk * xp[d];
          }
        }
        if (first) std::fill(op, op + D, T(0));
      }
      return;
    }
    std::vector<A> acc(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / M, j = i % M;
      std::fill(acc.begin(), acc.end(), A(0));
      A* __restrict__ ap = acc.data();
      for (int64_t k = 0; k < r; ++k) {
        const int64_t p = j * r + k - s;
        if (p < 0) continue;  // causal window reaching before position 0: zero padding
        const A wk = w[j * r + k];
        const T* __restrict__ xp = x + (b * N + p) * D;
        for (int64_t d = 0; d < D; ++d) ap[d] += wk * static_cast<A>(xp[d]);
      }
      T* __restrict__ op = out + i * D;
      for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(ap[d]);
    }
  });
}

at::Tensor learned_downsample_fwd_cpu(const at::Tensor& x_, const at::Tensor& logits_, bool causal) {
  check_down(x_, logits_);
  at::Tensor x = x_.contiguous(), logits = logits_.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), M = logits.size(0), r = logits.size(1);
  (void)N;
  at::Tensor out = at::empty({B, M, D}, x.options());
  if (B == 0) return out;
  resnet_bk::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "learned_downsample_fwd_cpu", [&] {
    using A = typename Acc<scalar_t>::type;
    std::vector<A> w(M * r);
    softmax_rows<A>(logits.data_ptr<A>(), M, r, w.data());
    down_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data(), out.data_ptr<scalar_t>(), B, M, r, D,
                              causal ? r - 1 : 0);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> learned_downsample_bwd_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                              const at::Tensor& logits_, bool causal,
                                                              bool need_x_grad, bool need_logits_grad) {
  check_down(x_, logits_);
  check_act(grad_, "grad", 3);
  const int64_t B = x_.size(0), N = x_.size(1), D = x_.size(2), M = logits_.size(0), r = logits_.size(1);
  TORCH_CHECK(grad_.size(0) == B && grad_.size(1) == M && grad_.size(2) == D &&
                  grad_.scalar_type() == x_.scalar_type(),
              "grad: expected a ", x_.scalar_type(), " tensor of shape (", B, ", ", M, ", ", D, "), got ",
              grad_.scalar_type(), " ", grad_.sizes());
  at::Tensor x = x_.contiguous(), logits = logits_.contiguous(), grad = grad_.contiguous();
  const auto adt = acc_type_of(x.scalar_type());
  at::Tensor grad_x = need_x_grad ? at::empty({B, N, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_logits = need_logits_grad ? at::empty({M, r}, logits.options()) : at::empty({0}, logits.options());
  if (!need_x_grad && !need_logits_grad) return {grad_x, grad_logits};
  if (need_x_grad) resnet_bk::advise_huge_pages(grad_x);
  if (B == 0) {
    if (need_logits_grad) grad_logits.zero_();
    return {grad_x, grad_logits};
  }
  const int64_t s = causal ? r - 1 : 0;
  // S_b[b, j, k] = <grad[b, j, :], x[b, j*r + k - s, :]>; summed over b afterwards (deterministic).
  at::Tensor Sb = need_logits_grad ? at::empty({B, M, r}, x.options().dtype(adt)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "learned_downsample_bwd_cpu", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    std::vector<A> w(M * r);
    softmax_rows<A>(logits.data_ptr<A>(), M, r, w.data());
    const T* xd = x.data_ptr<T>();
    const T* gd = grad.data_ptr<T>();
    T* gx = need_x_grad ? grad_x.data_ptr<T>() : nullptr;
    A* sb = need_logits_grad ? Sb.data_ptr<A>() : nullptr;
    at::parallel_for(0, B * M, grain_for(r * D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / M, j = i % M;
        const T* __restrict__ gp = gd + i * D;
        for (int64_t k = 0; k < r; ++k) {
          const int64_t p = j * r + k - s;
          if (p < 0) {
            if (sb) sb[i * r + k] = A(0);
            continue;
          }
          if (gx) {
            const A wk = w[j * r + k];
            T* __restrict__ gxp = gx + (b * N + p) * D;
            for (int64_t d = 0; d < D; ++d) gxp[d] = static_cast<T>(wk * static_cast<A>(gp[d]));
          }
          if (sb) {
            const T* __restrict__ xp = xd + (b * N + p) * D;
            sb[i * r + k] = dot_lanes<A, T>(gp, xp, nullptr, D);
          }
        }
        if (gx && s > 0 && j == M - 1) {
          // the last s positions are read by no causal window: their gradient is exactly 0
          std::fill(gx + (b * N + N - s) * D, gx + (b * N + N) * D, T(0));
        }
      }
    });
    if (need_logits_grad) {
      at::Tensor S = Sb.sum(0);  // (M, r)
      const A* Sd = S.data_ptr<A>();
      A* gl = grad_logits.data_ptr<A>();
      for (int64_t j = 0; j < M; ++j) {
        A ws = 0;
        for (int64_t k = 0; k < r; ++k) ws += w[j * r + k] * Sd[j * r + k];
        for (int64_t k = 0; k < r; ++k) gl[j * r + k] = w[j * r + k] * (Sd[j * r + k] - ws);
      }
    }
  });
  return {grad_x, grad_logits};
}

// ---------------------------------------------------------------------------------------------
// learned_upsample

struct UpDims {
  int64_t B, M, r, D, Mb, Db;
};

UpDims check_up(const at::Tensor& y, const at::Tensor& bias, const c10::optional<at::Tensor>& scale) {
  check_act(y, "y", 3);
  check_acc(bias, "bias", y.scalar_type());
  TORCH_CHECK(bias.dim() == 3 && bias.size(1) >= 1, "bias: expected shape (Mb, r, Db), got ", bias.sizes());
  UpDims u;
  u.B = y.size(0);
  u.M = y.size(1);
  u.r = bias.size(1);
  TORCH_CHECK(u.M >= 1, "y: expected M >= 1, got shape ", y.sizes());
  TORCH_CHECK(y.size(2) >= u.r && y.size(2) % u.r == 0, "y: expected a last dimension r * D with r = ", u.r,
              " (bias.size(1)) and D >= 1, got shape ", y.sizes());
  u.D = y.size(2) / u.r;
  u.Mb = bias.size(0);
  u.Db = bias.size(2);
  TORCH_CHECK((u.Mb == 1 || u.Mb == u.M) && (u.Db == 1 || u.Db == u.D), "bias: expected shape (1 or ", u.M,
              ", ", u.r, ", 1 or ", u.D, "), got ", bias.sizes());
  if (scale.has_value()) {
    check_acc(*scale, "scale", y.scalar_type());
    TORCH_CHECK(scale->dim() == 0, "scale: expected a 0-dim tensor, got shape ", scale->sizes());
  }
  return u;
}

template <class T>
void up_fwd_kernel(const T* y, const typename Acc<T>::type* bias, const T* res, typename Acc<T>::type sc,
                   bool has_scale, T* out, const UpDims& u) {
  using A = typename Acc<T>::type;
  const int64_t RD = u.r * u.D;
  at::parallel_for(0, u.B * u.M, grain_for(RD), [&](int64_t begin, int64_t end) {
    std::vector<A> row(u.Db == 1 ? RD : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i % u.M;
      const A* __restrict__ bp = bias + (u.Mb == 1 ? 0 : m) * u.r * u.Db;
      if (u.Db == 1) {  // expand the per-(m, k) scalar once per row so the inner loop is uniform
        for (int64_t k = 0; k < u.r; ++k) std::fill(row.begin() + k * u.D, row.begin() + (k + 1) * u.D, bp[k]);
        bp = row.data();
      }
      const T* __restrict__ yp = y + i * RD;  // y[b, m, :] is out[b, m*r : m*r + r, :] in memory order
      T* __restrict__ op = out + i * RD;
      if (res) {
        const T* __restrict__ rp = res + i * RD;
        for (int64_t e = 0; e < RD; ++e)
          op[e] = static_cast<T>(static_cast<A>(rp[e]) + sc * (static_cast<A>(yp[e]) + bp[e]));
      } else if (has_scale) {
        for (int64_t e = 0; e < RD; ++e) op[e] = static_cast<T>(sc * (static_cast<A>(yp[e]) + bp[e]));
      } else {
        for (int64_t e = 0; e < RD; ++e) op[e] = static_cast<T>(static_cast<A>(yp[e]) + bp[e]);
      }
    }
  });
}

at::Tensor learned_upsample_fwd_cpu(const at::Tensor& y_, const at::Tensor& bias_,
                                    const c10::optional<at::Tensor>& residual_,
                                    const c10::optional<at::Tensor>& scale_) {
  UpDims u = check_up(y_, bias_, scale_);
  if (residual_.has_value()) {
    const auto& rs = *residual_;
    TORCH_CHECK(rs.dim() == 3 && rs.size(0) == u.B && rs.size(1) == u.M * u.r && rs.size(2) == u.D &&
                    rs.scalar_type() == y_.scalar_type() && rs.device().is_cpu(),
                "residual: expected a CPU ", y_.scalar_type(), " tensor of shape (", u.B, ", ", u.M * u.r, ", ",
                u.D, "), got ", rs.scalar_type(), " ", rs.sizes(), " on ", rs.device());
  }
  at::Tensor y = y_.contiguous(), bias = bias_.contiguous();
  at::Tensor res = residual_.has_value() ? residual_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({u.B, u.M * u.r, u.D}, y.options());
  if (u.B == 0) return out;
  resnet_bk::advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "learned_upsample_fwd_cpu", [&] {
    using A = typename Acc<scalar_t>::type;
    const A sc = scale_.has_value() ? scale_->item<A>() : A(1);
    up_fwd_kernel<scalar_t>(y.data_ptr<scalar_t>(), bias.data_ptr<A>(),
                            res.defined() ? res.data_ptr<scalar_t>() : nullptr, sc, scale_.has_value(),
                            out.data_ptr<scalar_t>(), u);
  });
  return out;
}

// The upsample backward's work split: tiles of Mt consecutive m by Bt consecutive b. Each tile sums
// grad over its b (and over its m when the bias is shared over m) into its own slot of `part`; the
// slots are summed afterwards, so the result does not depend on thread timing.
struct UpBwdTiles {
  int64_t Mt, Bt, nM, nB, slotsM;
  UpBwdTiles(const UpDims& u, int threads) {
    const int64_t target = 4 * static_cast<int64_t>(threads);
    if (u.M >= target) {
      Mt = (u.M + target - 1) / target;
      Bt = u.B;
    } else {
      Mt = 1;
      Bt = std::max<int64_t>(1, u.B / std::max<int64_t>(1, target / u.M));
    }
    nM = (u.M + Mt - 1) / Mt;
    nB = (u.B + Bt - 1) / Bt;
    slotsM = u.Mb == 1 ? nM : u.M;
  }
};

// The upsample backward's tensors (contiguous) and what it computes.
template <class T>
struct UpBwdArgs {
  using A = typename Acc<T>::type;
  const T* gd;  // grad
  const T* yd;  // y
  const A* bd;  // bias
  T* gy;        // grad y, or nullptr
  A* pd;        // the bias gradient's partial sums (nB, slotsM, r, Db), or nullptr
  A sc;         // scale (1 without one)
  bool need_bias_grad, need_scale_grad;
};

// Tile t of the upsample backward: grad y of its rows, its slots of the bias gradient's partial
// sums, and its partial sum of the scale gradient (returned; the scale gradient sums B*M*r*D
// terms, so a tile carries its total in double). gsum, brow: the calling thread's buffers.
template <class T>
double up_bwd_tile(int64_t t, const UpDims& u, const UpBwdTiles& tl, const UpBwdArgs<T>& a,
                   std::vector<typename Acc<T>::type>& gsum, std::vector<typename Acc<T>::type>& brow) {
  using A = typename Acc<T>::type;
  const int64_t RD = u.r * u.D, RDb = u.r * u.Db;
  const int64_t Mt = tl.Mt, Bt = tl.Bt, nM = tl.nM, slotsM = tl.slotsM;
  const bool need_bias_grad = a.need_bias_grad, need_scale_grad = a.need_scale_grad;
  const A sc = a.sc;
  const T* gd = a.gd;
  const T* yd = a.yd;
  const A* bd = a.bd;
  T* gy = a.gy;
  A* pd = a.pd;
  const int64_t bi = t / nM, mi = t % nM;
  const int64_t m0 = mi * Mt, m1 = std::min(u.M, m0 + Mt), b0 = bi * Bt, b1 = std::min(u.B, b0 + Bt);
  double sacc = 0;
  A* __restrict__ gs = gsum.data();
  if (need_bias_grad && u.Mb == 1) std::fill(gsum.begin(), gsum.end(), A(0));
  for (int64_t m = m0; m < m1; ++m) {
    if (need_bias_grad && u.Mb != 1) std::fill(gsum.begin(), gsum.end(), A(0));
    const A* __restrict__ bp = bd + (u.Mb == 1 ? 0 : m) * RDb;
    if (need_scale_grad && u.Db == 1) {
      for (int64_t k = 0; k < u.r; ++k) std::fill(brow.begin() + k * u.D, brow.begin() + (k + 1) * u.D, bp[k]);
      bp = brow.data();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b * u.M + m;
      const T* __restrict__ gp = gd + i * RD;
      if (gy) {
        T* __restrict__ gyp = gy + i * RD;
        for (int64_t e = 0; e < RD; ++e) gyp[e] = static_cast<T>(sc * static_cast<A>(gp[e]));
      }
      if (need_bias_grad)
        for (int64_t e = 0; e < RD; ++e) gs[e] += static_cast<A>(gp[e]);
      if (need_scale_grad) {
        const T* __restrict__ yp = yd + i * RD;
        sacc += dot_lanes<A, T>(gp, yp, bp, RD);
      }
    }
    const bool flush = need_bias_grad && (u.Mb != 1 || m == m1 - 1);
    if (flush) {
      A* __restrict__ dst = pd + (bi * slotsM + (u.Mb == 1 ? mi : m)) * RDb;
      if (u.Db == 1) {
        for (int64_t k = 0; k < u.r; ++k) {
          A s = 0;
          for (int64_t d = 0; d < u.D; ++d) s += gs[k * u.D + d];
          dst[k] = s;
        }
      } else {
        std::copy(gs, gs + RD, dst);
      }
    }
  }
  return sacc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> learned_upsample_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& y_, const at::Tensor& bias_, const c10::optional<at::Tensor>& scale_,
    bool need_y_grad, bool need_bias_grad, bool need_scale_grad) {
  UpDims u = check_up(y_, bias_, scale_);
  check_act(grad_, "grad", 3);
  TORCH_CHECK(grad_.size(0) == u.B && grad_.size(1) == u.M * u.r && grad_.size(2) == u.D &&
                  grad_.scalar_type() == y_.scalar_type(),
              "grad: expected a ", y_.scalar_type(), " tensor of shape (", u.B, ", ", u.M * u.r, ", ", u.D,
              "), got ", grad_.scalar_type(), " ", grad_.sizes());
  at::Tensor y = y_.contiguous(), bias = bias_.contiguous(), grad = grad_.contiguous();
  const auto aopt = y.options().dtype(acc_type_of(y.scalar_type()));
  at::Tensor grad_y = need_y_grad ? at::empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  at::Tensor grad_bias = need_bias_grad ? at::empty(bias.sizes(), aopt) : at::empty({0}, aopt);
  at::Tensor grad_scale = need_scale_grad ? at::empty({}, aopt) : at::empty({0}, aopt);
  if (!need_y_grad && !need_bias_grad && !need_scale_grad) return {grad_y, grad_bias, grad_scale};
  if (need_y_grad) resnet_bk::advise_huge_pages(grad_y);
  if (u.B == 0) {
    if (need_bias_grad) grad_bias.zero_();
    if (need_scale_grad) grad_scale.zero_();
    return {grad_y, grad_bias, grad_scale};
  }
  const UpBwdTiles tl(u, at::get_num_threads());
  at::Tensor part = need_bias_grad ? at::empty({tl.nB, tl.slotsM, u.r, u.Db}, aopt) : at::Tensor();
  at::Tensor part_scale = need_scale_grad ? at::empty({tl.nB * tl.nM}, y.options().dtype(at::kDouble)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "learned_upsample_bwd_cpu", [&] {
    using T = scalar_t;
    using A = typename Acc<T>::type;
    const A sc = scale_.has_value() ? scale_->item<A>() : A(1);
    UpBwdArgs<T> a;
    a.gd = grad.data_ptr<T>();
    a.yd = y.data_ptr<T>();
    a.bd = bias.data_ptr<A>();
    a.gy = need_y_grad ? grad_y.data_ptr<T>() : nullptr;
    a.pd = need_bias_grad ? part.data_ptr<A>() : nullptr;
    a.sc = sc;
    a.need_bias_grad = need_bias_grad;
    a.need_scale_grad = need_scale_grad;
    double* ps = need_scale_grad ? part_scale.data_ptr<double>() : nullptr;
    const int64_t RD = u.r * u.D;
    at::parallel_for(0, tl.nB * tl.nM, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> gsum(need_bias_grad ? RD : 0);  // sum over b of grad[b, m*r : m*r + r, :]
      std::vector<A> brow(need_scale_grad && u.Db == 1 ? RD : 0);
      for (int64_t t = begin; t < end; ++t) {
        const double sacc = up_bwd_tile<T>(t, u, tl, a, gsum, brow);
        if (ps) ps[t] = sacc;
      }
    });
    if (need_bias_grad) {
      at::Tensor tot = u.Mb == 1 ? part.sum(at::IntArrayRef{0, 1}, /*keepdim=*/false).unsqueeze(0) : part.sum(0);
      grad_bias.copy_(tot.mul_(sc));
    }
    if (need_scale_grad) grad_scale.copy_(part_scale.sum());  // rounded to A once
  });
  return {grad_y, grad_bias, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CPU, m) {
  m.impl("learned_downsample_fwd", &learned_downsample_fwd_cpu);
  m.impl("learned_downsample_bwd", &learned_downsample_bwd_cpu);
  m.impl("learned_upsample_fwd", &learned_upsample_fwd_cpu);
  m.impl("learned_upsample_bwd", &learned_upsample_bwd_cpu);
}
