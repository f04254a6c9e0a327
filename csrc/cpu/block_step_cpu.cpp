// The cached one-token step of a whole MoE ResNet-BK block, as one op: the decode step of
// LanguageModel's standard block (resnet_bk/models/base.py, ResNetBKBlock + MoEResNetBKLayer),
//   xn   = LayerNorm(h)
//   ffn  = top-1 MoE(xn)                       (router softmax in float32, arg-max expert, gated)
//   v    = v_w . ffn + v_b                     (the potential)
//   d    = (h0_diag[p] + v - z) - h0_super[p-1] h0_sub[p-1] / state   (no state: without the coupling)
//   y    = 1 / d                               (bk_math.h's pivot step and reciprocal)
//   h'   = h + (ffn + bk_scale * (out_w [Re y, Im y] + out_b))
// for a batch of B sequences at one position p. Returns (h', d).
//
// Why one op: at batch 1 the block's arithmetic is two GEMVs with one expert's weights (a 2d x d
// and a d x 2d matrix) and a few hundred flops around them, while its path through the modules is
// ~25 dispatched ATen ops and their Python calls; at d_model 256 that path took ~300 us a block on a
// 2-core VM, of which the GEMVs are a tenth. Here the GEMVs are plain loops over the weight rows (the
// rows are read once for all tokens routed to that expert; AVX2+FMA code where the CPU has it) and
// everything else is scalar code on a few hundred values. Groups of more than kGemmTokens tokens use
// ATen's GEMM instead.
//
// The values are those of the module path up to floating-point rounding (sums in another order: not
// bit-identical; tests hold it to the op layer's tolerance). No autograd: inference only. The Python
// op layer (resnet_bk/ops/moe/block_step.py) validates the arguments with clear errors; the checks
// here guard the raw pointer reads. Schema in csrc/schemas.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../bk_math.h"

// The packs below are passed by value only between always-inline functions: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

using at::Tensor;

// a group of more tokens than this goes to ATen's GEMM (blocked; reads the weights once per block)
constexpr int64_t kGemmTokens = 16;

// ---- rows kernel: Y[t, o] = act(bias[o] + W[o, :] . X[t, :]) for t < n, o < O ------------------
// GCC vector types: 32-byte packs, compiled to AVX2 in the target("avx2,fma") instance and to pairs
// of SSE operations in the baseline one. Four rows share each load of X.

template <class T>
struct Pack;
template <>
struct Pack<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int W = 8;
};
template <>
struct Pack<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int W = 4;
};

template <class T>
inline __attribute__((always_inline)) typename Pack<T>::type load(const T* p) {
  typename Pack<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T>
inline __attribute__((always_inline)) T hsum(typename Pack<T>::type v) {
  T s = 0;
  for (int i = 0; i < Pack<T>::W; ++i) s += v[i];
  return s;
}

template <class T>
inline __attribute__((always_inline)) void rows_impl(const T* W, const T* bias, const T* X, T* Y, int64_t n,
                                                     int64_t O, int64_t I, bool relu) {
  using V = typename Pack<T>::type;
  constexpr int64_t L = Pack<T>::W;
  const int64_t Iv = I - I % L;
  for (int64_t t = 0; t < n; ++t) {
    const T* x = X + t * I;
    T* y = Y + t * O;
    int64_t o = 0;
    for (; o + 4 <= O; o += 4) {
      const T* w0 = W + o * I;
      const T* w1 = w0 + I;
      const T* w2 = w1 + I;
      const T* w3 = w2 + I;
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t i = 0; i < Iv; i += L) {
        const V xv = load(x + i);
        a0 += load(w0 + i) * xv;
        a1 += load(w1 + i) * xv;
        a2 += load(w2 + i) * xv;
        a3 += load(w3 + i) * xv;
      }
      T s[4] = {hsum<T>(a0), hsum<T>(a1), hsum<T>(a2), hsum<T>(a3)};
      for (int64_t i = Iv; i < I; ++i) {
        s[0] += w0[i] * x[i];
        s[1] += w1[i] * x[i];
        s[2] += w2[i] * x[i];
        s[3] += w3[i] * x[i];
      }
      for (int r = 0; r < 4; ++r) {
        const T v = bias[o + r] + s[r];
        y[o + r] = relu ? std::max(v, T(0)) : v;
      }
    }
    for (; o < O; ++o) {
      const T* w = W + o * I;
      V a = {};
      for (int64_t i = 0; i < Iv; i += L) a += load(w + i) * load(x + i);
      T s = hsum<T>(a);
      for (int64_t i = Iv; i < I; ++i) s += w[i] * x[i];
      const T v = bias[o] + s;
      y[o] = relu ? std::max(v, T(0)) : v;
    }
  }
}

template <class T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* W, const T* b, const T* X, T* Y, int64_t n, int64_t O,
                                                   int64_t I, bool relu) {
  rows_impl<T>(W, b, X, Y, n, O, I, relu);
}

template <class T>
void rows_base(const T* W, const T* b, const T* X, T* Y, int64_t n, int64_t O, int64_t I, bool relu) {
  rows_impl<T>(W, b, X, Y, n, O, I, relu);
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

template <class T>
void rows(const T* W, const T* b, const T* X, T* Y, int64_t n, int64_t O, int64_t I, bool relu) {
  if (have_avx2())
    rows_avx2<T>(W, b, X, Y, n, O, I, relu);
  else
    rows_base<T>(W, b, X, Y, n, O, I, relu);
}

// Y (n, O) = act(X (n, I) W^T + b) with ATen's GEMM, for a larger group of tokens.
template <class T>
void rows_gemm(const Tensor& W, const Tensor& b, const T* X, T* Y, int64_t n, int64_t O, int64_t I, bool relu) {
  const auto opts = W.options();
  Tensor x = at::from_blob(const_cast<T*>(X), {n, I}, opts);
  Tensor y = at::from_blob(Y, {n, O}, opts);
  at::addmm_out(y, b, x, W.t());
  if (relu) y.relu_();
}

void check_vec(const char* name, const Tensor& t, at::IntArrayRef shape, const Tensor& h) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == h.scalar_type() && t.device().is_cpu(), name, ": expected a CPU ", h.scalar_type(),
              " tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_list(const char* name, at::TensorList l, int64_t E, at::IntArrayRef shape, const Tensor& h) {
  TORCH_CHECK(static_cast<int64_t>(l.size()) == E, name, ": expected ", E, " tensors (one per expert), got ",
              l.size());
  for (const auto& t : l) check_vec(name, t, shape, h);
}

// the value of a float32/float64 buffer entry (positions of H0) in T
template <class T>
T entry(const Tensor& t, int64_t i) {
  return t.scalar_type() == at::kDouble ? static_cast<T>(t.data_ptr<double>()[i])
                                        : static_cast<T>(t.data_ptr<float>()[i]);
}

std::tuple<Tensor, Tensor> moe_bk_block_step_cpu(const Tensor& h, const Tensor& ln_w, const Tensor& ln_b,
                                                  double eps, const Tensor& router_w, const Tensor& router_b,
                                                  at::TensorList w1, at::TensorList b1, at::TensorList w2,
                                                  at::TensorList b2, const Tensor& v_w, const Tensor& v_b,
                                                  const Tensor& h0_diag, const Tensor& h0_super,
                                                  const Tensor& h0_sub, int64_t pos, const Tensor& z,
                                                  const std::optional<Tensor>& state, const Tensor& bk_scale,
                                                  const Tensor& out_w, const Tensor& out_b) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.device().is_cpu(),
              "h: expected a contiguous CPU tensor of shape (B, D), got ", h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, "h: expected float32 or float64, got ",
              h.scalar_type());
  const int64_t B = h.size(0), D = h.size(1), E = router_w.size(0);
  TORCH_CHECK(E >= 1 && !w1.empty() && w1[0].dim() == 2, "router_w, w1: expected E >= 1 experts");
  const int64_t H = w1[0].size(0);
  check_vec("ln_w", ln_w, {D}, h);
  check_vec("ln_b", ln_b, {D}, h);
  check_vec("router_w", router_w, {E, D}, h);
  check_vec("router_b", router_b, {E}, h);
  check_list("w1", w1, E, {H, D}, h);
  check_list("b1", b1, E, {H}, h);
  check_list("w2", w2, E, {D, H}, h);
  check_list("b2", b2, E, {D}, h);
  check_vec("v_w", v_w, {1, D}, h);
  check_vec("v_b", v_b, {1}, h);
  check_vec("out_w", out_w, {D, 2}, h);
  check_vec("out_b", out_b, {D}, h);
  TORCH_CHECK(bk_scale.numel() == 1 && bk_scale.scalar_type() == h.scalar_type(), "bk_scale: expected one ",
              h.scalar_type(), " value, got ", bk_scale.sizes(), " ", bk_scale.scalar_type());
  const bool dbl = h.scalar_type() == at::kDouble;
  for (const Tensor* t : {&h0_diag, &h0_super, &h0_sub}) {
    const char* name = t == &h0_diag ? "h0_diag" : (t == &h0_super ? "h0_super" : "h0_sub");
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() &&
                    (t->scalar_type() == h.scalar_type() || t->scalar_type() == at::kFloat),
                name, ": expected a contiguous CPU float32 or ", h.scalar_type(), " tensor, got ", t->scalar_type());
  }
  TORCH_CHECK(pos >= 0 && pos < h0_diag.numel(), "pos: expected 0 <= pos < ", h0_diag.numel(), ", got ", pos);
  TORCH_CHECK(z.numel() == 1 && (z.scalar_type() == at::kComplexFloat || (dbl && z.scalar_type() == at::kComplexDouble)),
              "z: expected one complex64 value (or complex128 for float64 h), got ", z.scalar_type());
  const auto cplx = dbl ? at::kComplexDouble : at::kComplexFloat;
  if (state.has_value()) {
    TORCH_CHECK(pos >= 1 && pos - 1 < h0_super.numel() && pos - 1 < h0_sub.numel(),
                "pos: a state couples position pos - 1 to pos: expected 1 <= pos <= ", h0_super.numel(), ", got ",
                pos);
    TORCH_CHECK(state->sizes() == at::IntArrayRef({B}) && state->scalar_type() == cplx && state->is_contiguous() &&
                    !state->is_conj() && !state->is_neg(),
                "state: expected a contiguous ", cplx, " tensor of shape (", B, "), got ", state->scalar_type(), " ",
                state->sizes());
  }
  Tensor out = at::empty({B, D}, h.options());
  Tensor d_out = at::empty({B}, h.options().dtype(cplx));
  if (B == 0) return {out, d_out};

  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "moe_bk_block_step", [&] {
    using T = scalar_t;
    const T* hp = h.data_ptr<T>();
    const T* lw = ln_w.data_ptr<T>();
    const T* lb = ln_b.data_ptr<T>();
    const T* rw = router_w.data_ptr<T>();
    const T* rb = router_b.data_ptr<T>();
    // LayerNorm of every token (moments in double: float32's rounding stays below the tolerance)
    std::vector<T> xn(B * D), ffn(B * D), gate(B);
    std::vector<int64_t> expert(B);
    std::vector<float> logit(E);
    for (int64_t b = 0; b < B; ++b) {
      const T* x = hp + b * D;
      double mean = 0, var = 0;
      for (int64_t i = 0; i < D; ++i) mean += x[i];
      mean /= D;
      for (int64_t i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
      var /= D;
      const double inv = 1.0 / std::sqrt(var + eps);
      T* y = xn.data() + b * D;
      for (int64_t i = 0; i < D; ++i) y[i] = static_cast<T>((x[i] - mean) * inv) * lw[i] + lb[i];
    }
    // router: logits (E per token), the softmax over the experts in float32, the first arg-max
    // (torch.max's tie rule) and its probability as the gate
    std::vector<T> rl(B * E);
    if (std::is_same<T, double>::value) {
      // float64: the module's own ops (GEMM, then ATen's float32 softmax). The softmax's float32
      // rounding (its vectorised exp against std::exp: one ulp, 6e-8) would otherwise show at
      // float64's tolerance; float32 is held to 1e-5, where one ulp of the gate does not show.
      Tensor x = at::from_blob(xn.data(), {B, D}, h.options());
      Tensor logits = at::addmm(router_b.unsqueeze(1), router_w, x.t()).to(at::kFloat);
      Tensor ex = (logits - logits.amax(0, true)).exp_();
      auto top = (ex / ex.sum(0, true)).max(0);
      Tensor g = std::get<0>(top).contiguous(), ix = std::get<1>(top).contiguous();
      for (int64_t b = 0; b < B; ++b) {
        gate[b] = static_cast<T>(g.data_ptr<float>()[b]);
        expert[b] = ix.data_ptr<int64_t>()[b];
      }
    } else {
      rows<T>(rw, rb, xn.data(), rl.data(), B, E, D, false);
      for (int64_t b = 0; b < B; ++b) {
        float m = -INFINITY;
        for (int64_t e = 0; e < E; ++e) m = std::max(m, logit[e] = static_cast<float>(rl[b * E + e]));
        float s = 0;
        for (int64_t e = 0; e < E; ++e) s += (logit[e] = std::exp(logit[e] - m));
        int64_t best = 0;
        float pbest = logit[0] / s;
        for (int64_t e = 1; e < E; ++e) {
          const float p = logit[e] / s;
          if (p > pbest || std::isnan(p)) {
            pbest = p;
            best = e;
            if (std::isnan(p)) break;
          }
        }
        expert[b] = best;
        gate[b] = static_cast<T>(pbest);
      }
    }
    // the experts, each on its tokens (gathered), gated into ffn
    std::vector<int64_t> idx;
    std::vector<T> xg, hid, yg;
    for (int64_t e = 0; e < E; ++e) {
      idx.clear();
      for (int64_t b = 0; b < B; ++b)
        if (expert[b] == e) idx.push_back(b);
      const int64_t n = static_cast<int64_t>(idx.size());
      if (n == 0) continue;
      xg.resize(n * D);
      hid.resize(n * H);
      yg.resize(n * D);
      for (int64_t j = 0; j < n; ++j) std::copy(xn.data() + idx[j] * D, xn.data() + (idx[j] + 1) * D, xg.data() + j * D);
      if (n > kGemmTokens) {
        rows_gemm<T>(w1[e], b1[e], xg.data(), hid.data(), n, H, D, true);
        rows_gemm<T>(w2[e], b2[e], hid.data(), yg.data(), n, D, H, false);
      } else {
        rows<T>(w1[e].data_ptr<T>(), b1[e].data_ptr<T>(), xg.data(), hid.data(), n, H, D, true);
        rows<T>(w2[e].data_ptr<T>(), b2[e].data_ptr<T>(), hid.data(), yg.data(), n, D, H, false);
      }
      for (int64_t j = 0; j < n; ++j) {
        const T g = gate[idx[j]];
        T* f = ffn.data() + idx[j] * D;
        for (int64_t i = 0; i < D; ++i) f[i] = yg[j * D + i] * g;
      }
    }
    // potential, BK-Core step, features, output projection and residual
    const T* vw = v_w.data_ptr<T>();
    const T vb = v_b.data_ptr<T>()[0];
    const T* ow = out_w.data_ptr<T>();
    const T* ob = out_b.data_ptr<T>();
    const T sc = bk_scale.data_ptr<T>()[0];
    T zr, zi;
    if (z.scalar_type() == at::kComplexDouble) {
      const auto zz = z.data_ptr<c10::complex<double>>()[0];
      zr = static_cast<T>(zz.real()), zi = static_cast<T>(zz.imag());
    } else {
      const auto zz = z.data_ptr<c10::complex<float>>()[0];
      zr = static_cast<T>(zz.real()), zi = static_cast<T>(zz.imag());
    }
    const T a0 = entry<T>(h0_diag, pos);
    const T k = state.has_value() ? entry<T>(h0_super, pos - 1) * entry<T>(h0_sub, pos - 1) : T(0);
    const T* st = state.has_value() ? reinterpret_cast<const T*>(state->data_ptr()) : nullptr;
    T* dp = reinterpret_cast<T*>(d_out.data_ptr());
    T* op = out.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      const T* f = ffn.data() + b * D;
      T v = 0;
      for (int64_t i = 0; i < D; ++i) v += vw[i] * f[i];
      const T a = a0 + (v + vb);
      const bk::Cx<T> alpha{a - zr, -zi};
      bk::Cx<T> d = alpha;
      if (st != nullptr) d = bk::pivot_step(alpha, k, bk::Cx<T>{st[2 * b], st[2 * b + 1]});
      const bk::Cx<T> y = bk::recip(d);
      dp[2 * b] = d.re;
      dp[2 * b + 1] = d.im;
      const T* x = hp + b * D;
      T* o = op + b * D;
      for (int64_t i = 0; i < D; ++i) o[i] = x[i] + (f[i] + sc * ((ow[2 * i] * y.re + ow[2 * i + 1] * y.im) + ob[i]));
    }
  });
  return {out, d_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CPU, m) {
  m.impl("moe_bk_block_step", &moe_bk_block_step_cpu);
}
