// The SIMD pack a block's lanes live in (VPack: BK_PACK_BYTES of T as native vectors) and its
// lane-wise arithmetic: the reciprocal parts (VRCP14 + Newton under BK_ISA_AVX512), masking,
// lane access, half-and-half packs. Part of bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

using bk::Cx;
using bk::Mobius;

// A block's lanes: BK_PACK_BYTES of T held as U native vectors. GCC lowers oversized generic
// vectors badly (broadcasts become per-lane extracts), so the pack is explicit: every operator
// runs U independent native-vector instructions, which also gives the division chains the
// instruction-level parallelism they need.
template <class T>
struct VPack {
  static constexpr int W = BK_VEC_BYTES / sizeof(T);
  static constexpr int U = BK_PACK_BYTES / BK_VEC_BYTES;
  typedef T N __attribute__((vector_size(BK_VEC_BYTES)));
  // Zero-initialised by the implicit constructor: a user-written one (target-specific, defined
  // under the ISA pragma) could not be inlined into Cx's implicit constructor and became an
  // out-of-line call inside the sweeps, spilling every vector register around it.
  N v[U] = {};
  static BK_AI VPack bcast(T s) {
    VPack r;
    for (int u = 0; u < U; ++u) r.v[u] = N{} + s;
    return r;
  }
#define BK_VPACK_OP(op)                                                       \
  friend BK_AI VPack operator op(const VPack& a, const VPack& b) {           \
    VPack r;                                                                  \
    for (int u = 0; u < U; ++u) r.v[u] = a.v[u] op b.v[u];                    \
    return r;                                                                 \
  }                                                                           \
  friend BK_AI VPack operator op(const VPack& a, T s) {                      \
    VPack r;                                                                  \
    for (int u = 0; u < U; ++u) r.v[u] = a.v[u] op s;                         \
    return r;                                                                 \
  }                                                                           \
  friend BK_AI VPack operator op(T s, const VPack& b) {                      \
    VPack r;                                                                  \
    for (int u = 0; u < U; ++u) r.v[u] = s op b.v[u];                         \
    return r;                                                                 \
  }
  BK_VPACK_OP(+)
  BK_VPACK_OP(-)
  BK_VPACK_OP(*)
  BK_VPACK_OP(/)
#undef BK_VPACK_OP
  friend BK_AI VPack operator+(const VPack& a, int s) { return a + T(s); }
  friend BK_AI VPack operator-(const VPack& a) {
    VPack r;
    for (int u = 0; u < U; ++u) r.v[u] = -a.v[u];
    return r;
  }
} __attribute__((aligned(BK_PACK_BYTES)));

// The signed integer vector with the lanes of a native vector of T (for bit manipulation).
template <class T>
struct IntVec {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I type __attribute__((vector_size(BK_VEC_BYTES)));
};

// 1 / x of a pack of complex values, in parts (bk::inv_parts, found by argument-dependent lookup).
// With AVX-512 the reciprocal of |x|^2 comes from VRCP14 (relative error < 2^-14) refined by
// Newton steps y <- y + y (1 - |x|^2 y) (one for float, two for double; each squares the error, so
// the result is within about an ulp), at a fraction of the cost of VDIVPS/PD, whose throughput
// otherwise bounds this kernel. Special values match the division: |x|^2 = inf gives VRCP14 = 0
// and the parts are exactly 0 (the decoupling limit); |x|^2 = 0 or NaN gives NaN.
template <class T>
static BK_AI void inv_parts(const VPack<T>& re, const VPack<T>& im, VPack<T>& u, VPack<T>& v) {
  const VPack<T> n2 = re * re + im * im;
#ifdef BK_ISA_AVX512
  static_assert(BK_VEC_BYTES == 64, "AVX-512 packs");
  for (int w = 0; w < VPack<T>::U; ++w) {
    if constexpr (sizeof(T) == 4) {
      const __m512 x = reinterpret_cast<const __m512&>(n2.v[w]), one = _mm512_set1_ps(1.0f);
      const __m512 y0 = _mm512_rcp14_ps(x);
      const __mmask16 nz = _mm512_cmp_ps_mask(y0, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      const __m512 y = _mm512_fmadd_ps(y0, _mm512_fnmadd_ps(x, y0, one), y0);
      reinterpret_cast<__m512&>(u.v[w]) = _mm512_maskz_mul_ps(nz, reinterpret_cast<const __m512&>(re.v[w]), y);
      reinterpret_cast<__m512&>(v.v[w]) = _mm512_maskz_mul_ps(nz, reinterpret_cast<const __m512&>(im.v[w]), y);
    } else {
      const __m512d x = reinterpret_cast<const __m512d&>(n2.v[w]), one = _mm512_set1_pd(1.0);
      const __m512d y0 = _mm512_rcp14_pd(x);
      const __mmask8 nz = _mm512_cmp_pd_mask(y0, _mm512_setzero_pd(), _CMP_NEQ_UQ);
      __m512d y = _mm512_fmadd_pd(y0, _mm512_fnmadd_pd(x, y0, one), y0);
      y = _mm512_fmadd_pd(y, _mm512_fnmadd_pd(x, y, one), y);
      reinterpret_cast<__m512d&>(u.v[w]) = _mm512_maskz_mul_pd(nz, reinterpret_cast<const __m512d&>(re.v[w]), y);
      reinterpret_cast<__m512d&>(v.v[w]) = _mm512_maskz_mul_pd(nz, reinterpret_cast<const __m512d&>(im.v[w]), y);
    }
  }
#else
  const VPack<T> r = bk::bk_one<VPack<T>>() / n2;
  u = mul_or_zero(re, r);
  v = mul_or_zero(im, r);
#endif
}

template <class T>
struct VecOf {
  typedef VPack<T> type;
};
template <class T>
using V_t = typename VecOf<T>::type;

// mask * x where mask != 0, exactly 0 where mask == 0 (a masked-out position is not computed,
// so it is 0 even if the resolvent there is not finite)
template <class T>
static BK_AI Cx<VPack<T>> masked(const Cx<VPack<T>>& x, const VPack<T>& m) {
  Cx<VPack<T>> r;
  for (int u = 0; u < VPack<T>::U; ++u) {
    r.re.v[u] = m.v[u] != 0 ? x.re.v[u] * m.v[u] : m.v[u] * 0;
    r.im.v[u] = m.v[u] != 0 ? x.im.v[u] * m.v[u] : m.v[u] * 0;
  }
  return r;
}
template <class T>
static BK_AI VPack<T> mul_or_zero(const VPack<T>& x, const VPack<T>& s) {
  VPack<T> r;
  for (int u = 0; u < VPack<T>::U; ++u) r.v[u] = s.v[u] == 0 ? s.v[u] * 0 : x.v[u] * s.v[u];
  return r;
}

template <class T>
static BK_AI T lane(const typename VecOf<T>::type& v, int l) {
  return reinterpret_cast<const T*>(&v)[l];
}
template <class T>
static BK_AI void set_lane(typename VecOf<T>::type& v, int l, T x) {
  reinterpret_cast<T*>(&v)[l] = x;
}

// A pack whose first half of lanes is a and second half b, built in registers (one full-width
// store then feeds the full-width load that reads it back).
template <class T>
static BK_AI VPack<T> halves(T a, T b) {
  typedef VPack<T> P;
  P r;
  if constexpr (P::U >= 2) {
    for (int u = 0; u < P::U; ++u) r.v[u] = typename P::N{} + (u < P::U / 2 ? a : b);
  } else {
    typename IntVec<T>::type idx;
    for (int i = 0; i < P::W; ++i) idx[i] = i;
    r.v[0] = idx < P::W / 2 ? typename P::N{} + a : typename P::N{} + b;
  }
  return r;
}

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
