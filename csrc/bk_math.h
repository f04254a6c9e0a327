// BK-Core arithmetic shared by the C++ CPU kernel and the CUDA kernel.
//
// Everything is templated on V, which is either a scalar (float, double: CUDA threads, scalar
// CPU code) or a GCC vector of scalars (one SIMD lane per sequence on the CPU). Complex numbers
// are kept as (re, im) pairs so the same code serves both. The formulas are those of
// docs/BK_CORE_MATH.md; names follow it (alpha = a - z, k = b * c, d/e the Schur pivots).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline __attribute__((always_inline))
#endif

namespace bk {

template <class V>
struct Cx {
  V re, im;
};

template <class V>
BK_HD V bk_one() {
  return V{} + 1;  // a scalar 1, or a vector of ones
}

template <class V>
BK_HD Cx<V> cx(V re, V im) {
  return Cx<V>{re, im};
}
template <class V>
BK_HD Cx<V> operator+(Cx<V> x, Cx<V> y) {
  return Cx<V>{x.re + y.re, x.im + y.im};
}
template <class V>
BK_HD Cx<V> operator-(Cx<V> x, Cx<V> y) {
  return Cx<V>{x.re - y.re, x.im - y.im};
}
template <class V>
BK_HD Cx<V> operator*(Cx<V> x, Cx<V> y) {
  return Cx<V>{x.re * y.re - x.im * y.im, x.re * y.im + x.im * y.re};
}
template <class V>
BK_HD Cx<V> scale(Cx<V> x, V s) {
  return Cx<V>{x.re * s, x.im * s};
}
template <class V>
BK_HD Cx<V> conj(Cx<V> x) {
  return Cx<V>{x.re, -x.im};
}
template <class V>
BK_HD V norm2(Cx<V> x) {
  return x.re * x.re + x.im * x.im;
}
// x * s, but exactly 0 where s == 0. s is 1/|p|^2 or k/|p|^2 for a pivot p; an infinite pivot
// (an infinite potential) makes s = 0, and the limit of x * s is then 0, not inf * 0 = NaN: the
// position decouples, as the exact resolvent does. (The CPU kernel overloads this for its SIMD packs.)
template <class V>
BK_HD V mul_or_zero(V x, V s) {
  return s == V{} ? V{} : x * s;
}

// The parts of 1 / x for a complex x: u = Re(x) / |x|^2, v = Im(x) / |x|^2 (so 1 / x = u - i v),
// each exactly 0 where |x|^2 is infinite (mul_or_zero's limit). This is the recursion's one
// division; the CPU kernel's SIMD packs overload it (found by argument-dependent lookup) with a
// refined hardware reciprocal.
template <class V>
BK_HD void inv_parts(V re, V im, V& u, V& v) {
  V r = bk_one<V>() / (re * re + im * im);
  u = mul_or_zero(re, r);
  v = mul_or_zero(im, r);
}

// 1 / x: one real division.
template <class V>
BK_HD Cx<V> recip(Cx<V> x) {
  V u, v;
  inv_parts(x.re, x.im, u, v);
  return Cx<V>{u, -v};
}

// One Schur pivot step, either direction:
//   forward  d_i = alpha_i - k_{i-1} / d_{i-1}
//   backward e_i = alpha_i - k_i / e_{i+1}
// k is real, so k / prev = k * conj(prev) / |prev|^2: one real division. inv_prev (optional)
// receives 1 / prev, a by-product the gradient needs.
template <class V>
BK_HD Cx<V> pivot_step(Cx<V> alpha, V k, Cx<V> prev, Cx<V>* inv_prev = nullptr) {
  V u, v;
  inv_parts(prev.re, prev.im, u, v);
  if (inv_prev) *inv_prev = Cx<V>{u, -v};
  return Cx<V>{alpha.re - k * u, alpha.im + k * v};
}

// Two-sided combine: G_ii = 1 / (d_i + e_i - alpha_i).
template <class V>
BK_HD Cx<V> combine(Cx<V> d, Cx<V> e, Cx<V> alpha) {
  return recip(d + e - alpha);
}

// Coefficient k / x^2 of the gradient recurrences (x = d_j for R and mu, x = e_j for L).
template <class V>
BK_HD Cx<V> k_over_sq(V k, Cx<V> inv_x) {
  Cx<V> s = inv_x * inv_x;
  return scale(s, k);
}

// Linear recurrence step x = c * x_prev + p (the L, R and mu recurrences).
template <class V>
BK_HD Cx<V> lin_step(Cx<V> c, Cx<V> prev, Cx<V> p) {
  return c * prev + p;
}

// Projective 2x2 Moebius transfer (for chunked/parallel pivots). A pivot step d -> alpha - k/d
// acts on homogeneous coordinates (x, y) (d = x / y) as (x, y) -> (alpha x - k y, x).
// A transfer matrix is kept as two columns (x0, y0), (x1, y1): d_out = (x0 d_in + x1) / (y0 d_in + y1).
template <class V>
struct Mobius {
  Cx<V> x0, y0, x1, y1;
};

template <class V>
BK_HD Mobius<V> mobius_identity() {
  V z = V{}, o = bk_one<V>();
  return Mobius<V>{Cx<V>{o, z}, Cx<V>{z, z}, Cx<V>{z, z}, Cx<V>{o, z}};
}

template <class V>
BK_HD void mobius_step(Mobius<V>& m, Cx<V> alpha, V k) {
  Cx<V> nx0 = alpha * m.x0 - scale(m.y0, k);
  Cx<V> nx1 = alpha * m.x1 - scale(m.y1, k);
  m.y0 = m.x0;
  m.y1 = m.x1;
  m.x0 = nx0;
  m.x1 = nx1;
}

// The same step multiplied on the right: m <- m * [[alpha, -k], [1, 0]]. Composing the backward
// pivots e_i = alpha_i - k_i / e_{i+1} of a chunk left to right (e_start = m(e_in)), so one pass
// over a chunk yields both transfer matrices.
template <class V>
BK_HD void mobius_step_right(Mobius<V>& m, Cx<V> alpha, V k) {
  Cx<V> nx1 = scale(m.x0, -k);
  Cx<V> ny1 = scale(m.y0, -k);
  m.x0 = alpha * m.x0 + m.x1;
  m.y0 = alpha * m.y0 + m.y1;
  m.x1 = nx1;
  m.y1 = ny1;
}

template <class V>
BK_HD Cx<V> mobius_apply(const Mobius<V>& m, Cx<V> d_in) {
  Cx<V> num = m.x0 * d_in + m.x1;
  Cx<V> den = m.y0 * d_in + m.y1;
  return num * recip(den);
}

// Rescales all entries by 1/s (s: largest magnitude). Only ratios matter, so this is exact up to
// rounding and keeps the product in range.
template <class V>
BK_HD void mobius_rescale(Mobius<V>& m, V inv_s) {
  m.x0 = scale(m.x0, inv_s);
  m.y0 = scale(m.y0, inv_s);
  m.x1 = scale(m.x1, inv_s);
  m.y1 = scale(m.y1, inv_s);
}

}  // namespace bk
