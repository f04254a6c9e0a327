// BK-Core CPU kernels, compiled once per instruction set: the including file defines BK_ISA_NS
// and the target (see bk_core_cpu_avx512.cpp). No torch headers here, so the target pragma only
// touches this code.
//
// Layout. A "lane" is one (sequence, chunk) pair; a block is NL lanes (NL = 64 bytes of T: 16
// floats or 8 doubles, one AVX-512 register), processed together as one vector, so every
// arithmetic instruction advances NL independent recursions; the two pivot chains of the
// bidirectional sweeps run side by side and hide each other's latency. The public [B, N] rows are
// transposed into the block's lane-major scratch tile by tile inside the kernel, never through a
// separate pass over memory. (Blocks of 128 bytes, two registers per value, measured 1.4-1.5x
// slower on AVX-512 and 3x slower forward on AVX2: twice the scratch per block, which no longer
// fits L2 at N = 4096, twice the row streams per tile, and register spills in the sweeps.)
//
// Chunking. When the batch is too small to fill every thread with a block, each sequence is cut
// into C parallel chunks (lanes of their own; lanes are chunk-major). The pivots cross chunk
// boundaries through 2x2 Moebius transfer matrices (shared/BK_CORE_MATH.md, "Parallel form"), the
// gradient's linear recurrences through (product, local sum) pairs; a short sequential scan per
// sequence joins them. With C = 1 those phases are skipped. When the batch does fill the threads
// and a sequence is longer than the scratch allows (kMaxChunk*), it is cut into sequential
// sub-chunks that its block runs in order instead: the left-to-right recurrences carry from one
// sub-chunk into the next as in one sweep, and the right-to-left ones (two-sided) start from the
// values one boundary pass recorded, the same steps as the sweep's own, so the result equals an
// unchunked sweep's.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../bk_math.h"
#include "bk_core_cpu.h"
#ifdef BK_AVX512_TRANSPOSE
#include "bk_transpose_avx512.h"
#endif

#ifndef BK_AI
#define BK_AI inline __attribute__((always_inline))
#endif
#define BK_AI_LAMBDA __attribute__((always_inline))

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

using bk::Cx;
using bk::Mobius;

#ifndef BK_VEC_BYTES
#define BK_VEC_BYTES 16  // native vector width of the target (16: SSE/NEON, 32: AVX2, 64: AVX-512)
#endif
#ifndef BK_PACK_BYTES
#define BK_PACK_BYTES 64  // bytes of lanes per block (see above)
#endif

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
#ifdef BK_AVX512_TRANSPOSE
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
constexpr int64_t kMinChunk = 256;  // shortest chunk worth its carry phases
constexpr int64_t kTile = 16;       // positions per transpose tile
// Moebius products are rescaled every 4 (float) / 16 (double) steps: each step grows the entries
// by at most ~|alpha| + |k|, so |a| up to ~1e9 stays far inside the exponent range between rescales.
template <class T>
constexpr int64_t kRescaleMask = sizeof(T) == 4 ? 3 : 15;
constexpr int64_t kMaxChunkFwd = 4096;  // forward keeps 1 complex per position and lane
constexpr int64_t kMaxChunkBwd = 4096;  // backward keeps 2 (two-sided) or 3 (causal)
constexpr int64_t kStreamOutBytes = int64_t(1) << 20;
#ifndef BK_SKEW_GROUPS
#define BK_SKEW_GROUPS 8
#endif
#ifndef BK_SKEW_MIN_BYTES
#define BK_SKEW_MIN_BYTES 4096
#endif
constexpr int64_t kSkewGroups = BK_SKEW_GROUPS;  // distinct lane offsets of a skewed plan
constexpr int64_t kSkewMinN = BK_SKEW_MIN_BYTES;  // shortest row (bytes) worth skewing

template <class T>
struct Plan {
  typedef typename VecOf<T>::type V;
  static constexpr int NL = BK_PACK_BYTES / sizeof(T);
  int64_t B, N, C, Lc, lanes, blocks;
  // Sequential sub-chunks (S > 1 only when C == 1): each lane is a whole sequence, run by its
  // block as S sub-chunks of Ls positions (a multiple of kTile), one after the other.
  int64_t S = 1, Ls = 0;

  // max_chunk bounds a chunk so that the block's per-position scratch stays in L2. When the batch
  // fills every thread's lanes without cutting sequences, a sequence longer than max_chunk is cut
  // into sequential sub-chunks instead of parallel chunks (no carries phase).
  Plan(int64_t B_, int64_t N_, int threads, int64_t max_chunk) : B(B_), N(N_) {
    int64_t want = int64_t(NL) * std::max(1, threads);
    C = 1;
    if (B < want) {
      C = (want + B - 1) / B;
      C = std::min<int64_t>(C, std::max<int64_t>(1, N / kMinChunk));
    }
    if (C == 1 && N > max_chunk) {
      S = (N + max_chunk - 1) / max_chunk;
      Ls = ((N + S - 1) / S + kTile - 1) / kTile * kTile;
      S = (N + Ls - 1) / Ls;
    }
    if (S == 1) C = std::max<int64_t>(C, (N + max_chunk - 1) / max_chunk);
    Lc = (N + C - 1) / C;
    C = (N + Lc - 1) / Lc;  // no empty chunk
    if (S == 1) Ls = Lc;
    lanes = B * C;
    blocks = (lanes + NL - 1) / NL;
  }
  bool chunked() const { return C > 1; }
  // Skewed lanes (see skew_lanes): lane l of a block starts its sweep sk * (l % kSkewGroups)
  // positions before its row, so the rows a tile touches sit at different offsets.
  int64_t sk = 0;
  // Rows of N elements of T whose starts are (almost) a multiple of 4 KiB apart put every lane's
  // tile in the same L1 sets: a tile's 16 row loads and 32 output lines then evict each other
  // (measured 30% of the two-sided forward at B = 64, N = 4096 float32). Whole-sequence plans
  // (C = S = 1) of such rows run with skewed lanes instead: lane l is shifted by sk * (l % G)
  // positions, sk = 64 bytes of T and G = kSkewGroups, so its rows spread over G line offsets. The lanes' first
  // and last positions are padding (alpha = 1 - i Im z, k = 0: decoupled, never written), the
  // sweep is (G - 1) * sk positions longer. The forward's output is bit-for-bit that of an
  // unskewed sweep (a pivot chain entering a row through k = 0 starts at d = alpha exactly); the
  // backward's two halves meet at another position, so its gradients agree to rounding.
  void skew_lanes() {
    if (C != 1 || S != 1 || N * int64_t(sizeof(T)) < kSkewMinN) return;
    const int64_t r = (N * int64_t(sizeof(T))) % 4096, d = std::min(r, 4096 - r);
    if (d * kSkewGroups >= 2048) return;  // the rows already fall on different sets
    sk = 64 / int64_t(sizeof(T));
    Lc = N + sk * (kSkewGroups - 1);
    Ls = Lc;
  }
  int64_t shift(int l) const { return sk * (l % kSkewGroups); }
  // Lanes are chunk-major: lane (b, ch) = ch * B + b, so with B a multiple of NL every block holds
  // one chunk of NL sequences, and a shared coupling row is uniform across the block's lanes.
  int64_t lane(int64_t b, int64_t ch) const { return ch * B + b; }
};

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

template <class X>
struct Buf {
  X* p = nullptr;
  size_t n = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p(o.p), n(o.n) {
    o.p = nullptr;
    o.n = 0;
  }
  void alloc(size_t count) {
    if (count > n) {
      std::free(p);
      size_t bytes = ((count * sizeof(X) + 127) / 128) * 128;
      p = static_cast<X*>(std::aligned_alloc(128, bytes));
      n = count;
    }
  }
  ~Buf() { std::free(p); }
  X& operator[](size_t i) { return p[i]; }
};

// Lane geometry of one block.
struct LaneInfo {
  int64_t row;    // sequence index, -1 for an empty lane
  int64_t start;  // first position of the chunk
  int64_t len;    // real positions in the chunk (the rest of Lc is padding)
  int64_t chunk;
};

template <class T>
static void lane_info(const Plan<T>& pl, int64_t blk, LaneInfo* li) {
  for (int l = 0; l < Plan<T>::NL; ++l) {
    int64_t v = blk * Plan<T>::NL + l;
    if (v < pl.lanes) {
      li[l].row = v % pl.B;
      li[l].chunk = v / pl.B;
      li[l].start = li[l].chunk * pl.Lc;
      li[l].len = std::min(pl.Lc, pl.N - li[l].start);
      if (pl.sk) {  // skewed: chunk positions [shift, shift + N) hold the row
        li[l].start = -pl.shift(l);
        li[l].len = pl.N + pl.shift(l);
      }
    } else {
      li[l] = LaneInfo{-1, 0, 0, 0};
    }
  }
}

// The lanes of a sequential plan (whole sequences) restricted to sub-chunk s.
template <class T>
static int64_t sub_chunk(const Plan<T>& pl, const LaneInfo* li, int64_t s, LaneInfo* out) {
  const int64_t start = s * pl.Ls, len = std::min(pl.Ls, pl.N - start);
  for (int l = 0; l < Plan<T>::NL; ++l)
    out[l] = li[l].row >= 0 ? LaneInfo{li[l].row, start, len, s} : LaneInfo{-1, 0, 0, 0};
  return len;
}

// Bit q set for the tile positions q in [lo, hi) (q < kTile): the masks of the masked transposes.
static BK_AI uint32_t tile_bits(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(0, std::min<int64_t>(kTile, lo));
  hi = std::max<int64_t>(0, std::min<int64_t>(kTile, hi));
  return hi <= lo ? 0u : ((1u << hi) - 1u) & ~((1u << lo) - 1u);
}

// One strided source seen through a block's lanes: lane l reads element index i (position i of
// the chunk) at rows[l][(off[l] + i) * es] when 0 <= off[l] + i < hi, else `pad`.
constexpr int64_t kNoFast = INT64_MAX / 4;
template <class T>
struct LaneSrc {
  static constexpr int NL = Plan<T>::NL, G = 64 / sizeof(T), NG = NL / G;
  const T* rows[NL];
  int64_t off[NL];
  int64_t hi, es;
  T sub, mul, pad;
  // Precomputed for the transpose path: the address of chunk position 0 of each lane, and per
  // group of G lanes the tile range [glo, ghi) in which every lane of the group reads in-range.
  uintptr_t at0[NL];
  int64_t glo[NG], ghi[NG];
  int64_t ilo[NL], ihi[NL];  // lane l reads in-range at chunk positions [ilo, ihi) (empty: no row)

  // src rows of length `hi` (in elements of stride es), chunk-relative shift `shift` (-1 for k)
  void init(const LaneInfo* li, const T* base, int64_t row_stride, int64_t hi_, int64_t es_, int64_t shift, T sub_,
            T mul_, T pad_) {
    hi = hi_;
    es = es_;
    sub = sub_;
    mul = mul_;
    pad = pad_;
    for (int l = 0; l < Plan<T>::NL; ++l) {
      rows[l] = li[l].row >= 0 ? base + li[l].row * row_stride : nullptr;
      off[l] = li[l].start + shift;
      at0[l] = reinterpret_cast<uintptr_t>(rows[l]) + uintptr_t(off[l] * es * int64_t(sizeof(T)));
      ilo[l] = rows[l] ? -off[l] : kNoFast;
      ihi[l] = rows[l] ? hi - off[l] : -kNoFast;
    }
    for (int g = 0; g < NG; ++g) {
      glo[g] = -kNoFast;
      ghi[g] = kNoFast;
      for (int l = g * G; l < (g + 1) * G; ++l) {
        if (!rows[l]) {
          glo[g] = kNoFast;
          break;
        }
        glo[g] = std::max(glo[g], -off[l]);
        ghi[g] = std::min(ghi[g], hi - off[l]);
      }
    }
  }

  BK_AI void tile_lane(int l, int64_t p0, int64_t n, T* dst, int64_t dstride) const {
    const T* r = rows[l];
    int64_t i0 = off[l] + p0;
    if (r && i0 >= 0 && i0 + n <= hi) {
      const T* src = r + i0 * es;
      for (int64_t q = 0; q < n; ++q) dst[q * dstride + l] = (src[q * es] - sub) * mul;
    } else {
      for (int64_t q = 0; q < n; ++q) {
        int64_t i = i0 + q;
        dst[q * dstride + l] = (r && i >= 0 && i < hi) ? (r[i * es] - sub) * mul : pad;
      }
    }
  }
  // Software prefetch of the lines a tile at chunk position p0 will read (kTile positions): the
  // lanes' rows are far apart, so the hardware prefetchers do not cover a tile's many streams.
  BK_AI void prefetch(int64_t p0) const {
    for (int l = 0; l < NL; ++l) {
      if (!rows[l]) continue;
      const int64_t i0 = std::max<int64_t>(0, std::min(hi - 1, off[l] + p0));
      const int64_t i1 = std::max<int64_t>(0, std::min(hi - 1, off[l] + p0 + kTile - 1));
      __builtin_prefetch(rows[l] + i0 * es);
      __builtin_prefetch(rows[l] + i1 * es);
    }
  }
  // dst[l] = value of lane l at chunk position i: one position of every lane (a tile's extra
  // coupling), as masked hardware gathers instead of a scalar loop over the lanes, written with
  // one full-width store (the sweep reloads it as one vector: lane-wise stores would defeat the
  // store-to-load forwarding and stall that load).
  BK_AI void column(int64_t i, T* dst) const {
#ifdef BK_AVX512_TRANSPOSE
    const __m512i vi = _mm512_set1_epi64(i), step = _mm512_set1_epi64(i * es * int64_t(sizeof(T)));
    auto in_range = [&](int g) BK_AI_LAMBDA {
      return __mmask8(_mm512_cmp_epi64_mask(vi, _mm512_loadu_si512(ilo + g), _MM_CMPINT_NLT) &
                      _mm512_cmp_epi64_mask(vi, _mm512_loadu_si512(ihi + g), _MM_CMPINT_LT));
    };
    auto addr = [&](int g) BK_AI_LAMBDA { return _mm512_add_epi64(_mm512_loadu_si512(at0 + g), step); };
    if constexpr (sizeof(T) == 4) {
      const __mmask8 m0 = in_range(0), m1 = in_range(8);
      const __m256 x0 = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), m0, addr(0), nullptr, 1);
      const __m256 x1 = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), m1, addr(8), nullptr, 1);
      __m512 x = _mm512_insertf32x8(_mm512_castps256_ps512(x0), x1, 1);
      x = _mm512_mul_ps(_mm512_sub_ps(x, _mm512_set1_ps(sub)), _mm512_set1_ps(mul));
      _mm512_storeu_ps(dst, _mm512_mask_blend_ps(__mmask16(m0 | (unsigned(m1) << 8)), _mm512_set1_ps(pad), x));
    } else {
      const __mmask8 m = in_range(0);
      __m512d x = _mm512_mask_i64gather_pd(_mm512_setzero_pd(), m, addr(0), nullptr, 1);
      x = _mm512_mul_pd(_mm512_sub_pd(x, _mm512_set1_pd(sub)), _mm512_set1_pd(mul));
      _mm512_storeu_pd(dst, _mm512_mask_blend_pd(m, _mm512_set1_pd(pad), x));
    }
#else
    for (int l = 0; l < NL; ++l) tile_lane(l, i, 1, dst, NL);
#endif
  }
  // True when every lane of the group starting at lane g0 reads n in-range elements from p0 on.
  BK_AI bool full_group(int g0, int64_t p0, int64_t n) const { return p0 >= glo[g0 / G] && p0 + n <= ghi[g0 / G]; }
  // m[i]: the in-range positions of lane g0 + i in the tile at p0 (the masked transposes)
  BK_AI void group_masks(int g0, int64_t p0, uint32_t* m) const {
    for (int i = 0; i < G; ++i) m[i] = tile_bits(ilo[g0 + i] - p0, ihi[g0 + i] - p0);
  }
#ifdef BK_AVX512_TRANSPOSE
  // The group's row addresses at chunk position p0 (for the transposes).
  BK_AI bk_avx512::Rows<const T> group_rows(int g0, int64_t p0) const {
    return {at0 + g0, intptr_t(p0 * es * int64_t(sizeof(T)))};
  }
#endif

  // dst[q * dstride + l] = value of lane l at chunk position p0 + q, q < n
  BK_AI void tile(int64_t p0, int64_t n, T* dst, int64_t dstride) const {
    constexpr int NL = Plan<T>::NL;
#ifdef BK_AVX512_TRANSPOSE
    constexpr int G = 64 / sizeof(T);
    if (n == kTile && es == 1) {
      for (int g0 = 0; g0 < NL; g0 += G) {
        if (full_group(g0, p0, n)) {
          bk_avx512::gather16(group_rows(g0, p0), sub, mul, dst + g0, dstride);
        } else {
          uint32_t m[G];
          group_masks(g0, p0, m);
          bk_avx512::gather16(group_rows(g0, p0), sub, mul, dst + g0, dstride, m, pad);
        }
      }
      return;
    }
#endif
    for (int l = 0; l < NL; ++l) tile_lane(l, p0, n, dst, dstride);
  }
};

// Writes lane-major values src[q * sstride + l] (q < n) to rows[l][(off[l] + p0 + q) * es] for
// positions inside the lane's chunk (< len) and the row (< hi).
template <class T>
static BK_AI void scatter_lane(const LaneInfo& L, int l, T* base, int64_t row_stride, int64_t hi, int64_t es,
                                int64_t p0, int64_t n, const T* src, int64_t sstride) {
  if (L.row < 0) return;
  const int64_t qe = std::min(n, std::min(L.len, hi - L.start) - p0);
  T* o = base + L.row * row_stride + (L.start + p0) * es;
  for (int64_t q = std::max<int64_t>(0, -L.start - p0); q < qe; ++q) o[q * es] = src[q * sstride + l];
}

// One destination seen through a block's lanes: lane l writes chunk position q to
// base[row * row_stride + (start + q) * es] for q inside the chunk (< len) and the row (< hi).
// Precomputed per block for the transpose path: each lane's chunk-start address, and per group of
// G lanes the number of leading chunk positions every lane of the group writes.
template <class T>
struct LaneOut {
  static constexpr int NL = Plan<T>::NL, G = 64 / sizeof(T), NG = NL / G;
  const LaneInfo* li;
  T* base;
  int64_t row_stride, hi, es;
  uintptr_t at0[NL];
  int64_t lim[NG], first[NG];  // per group: every lane writes chunk positions [first, lim)
  int64_t qlo[NL], qhi[NL];     // per lane: the chunk positions it writes, [qlo, qhi)
  bool aligned[NG];  // every lane's chunk start 64-byte aligned (non-temporal stores need it)
  void init(const LaneInfo* li_, T* base_, int64_t row_stride_, int64_t hi_, int64_t es_) {
    li = li_;
    base = base_;
    row_stride = row_stride_;
    hi = hi_;
    es = es_;
    for (int l = 0; l < NL; ++l) {
      qlo[l] = li[l].row >= 0 ? std::max<int64_t>(0, -li[l].start) : 0;
      qhi[l] = li[l].row >= 0 ? std::min(li[l].len, hi - li[l].start) : 0;
    }
    for (int l = 0; l < NL; ++l)
      at0[l] = li[l].row >= 0 ? reinterpret_cast<uintptr_t>(base) +
                                    uintptr_t((li[l].row * row_stride + li[l].start * es) * int64_t(sizeof(T)))
                              : 0;
    for (int g = 0; g < NG; ++g) {
      lim[g] = kNoFast;
      first[g] = 0;
      uintptr_t bits = 0;
      for (int l = g * G; l < (g + 1) * G; ++l) {
        lim[g] = li[l].row < 0 ? -1 : std::min(lim[g], std::min(li[l].len, hi - li[l].start));
        first[g] = std::max(first[g], -li[l].start);  // a skewed lane's row starts later
        bits |= at0[l];
      }
      aligned[g] = (bits & 63) == 0;
    }
  }
  BK_AI bool full_group(int g0, int64_t p0, int64_t n) const { return p0 >= first[g0 / G] && p0 + n <= lim[g0 / G]; }
  BK_AI void group_masks(int g0, int64_t p0, uint32_t* m) const {
    for (int i = 0; i < G; ++i) m[i] = tile_bits(qlo[g0 + i] - p0, qhi[g0 + i] - p0);
  }
#ifdef BK_AVX512_TRANSPOSE
  BK_AI bk_avx512::Rows<T> group_rows(int g0, int64_t p0) const {
    return {at0 + g0, intptr_t(p0 * es * int64_t(sizeof(T)))};
  }
#endif
  // lane l's values src[q * sstride + l], q < n, from chunk position p0 (off: 1 for the imaginary parts)
  BK_AI void lane(int l, int64_t p0, int64_t n, const T* src, int64_t sstride, int64_t off = 0) const {
    scatter_lane(li[l], l, base + off, row_stride, hi, es, p0, n, src, sstride);
  }
};

// stream: non-temporal stores where the rows allow (see scatter_cx_tile)
template <class T>
static BK_AI void scatter_tile(const LaneOut<T>& o, int64_t p0, int64_t n, const T* src, int64_t sstride,
                               bool stream = false) {
  constexpr int NL = Plan<T>::NL;
#ifdef BK_AVX512_TRANSPOSE
  constexpr int G = 64 / sizeof(T);
  if (n == kTile && o.es == 1) {
    for (int g0 = 0; g0 < NL; g0 += G) {
      if (o.full_group(g0, p0, n)) {
        bk_avx512::scatter16(src + g0, sstride, o.group_rows(g0, p0),
                             stream && o.aligned[g0 / G] && (p0 % G) == 0);
      } else {
        uint32_t m[G];
        o.group_masks(g0, p0, m);
        bk_avx512::scatter16(src + g0, sstride, o.group_rows(g0, p0), false, m);
      }
    }
    return;
  }
#endif
  for (int l = 0; l < NL; ++l) o.lane(l, p0, n, src, sstride);
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

// Inputs of one block: alpha's real part, the couplings (uniform across lanes when one k row is
// shared and sequences are not chunked: then no transpose at all) and the mask.
template <class T>
struct BlockIn {
  typedef typename VecOf<T>::type V;
  static constexpr int NL = Plan<T>::NL;
  LaneSrc<T> A, K, M;
  const T* kuni;            // shared k row when each half of the lanes reads it at one offset, else nullptr
  int64_t kstart, kstart2;  // with kuni: the chunk start of the real lanes of the first / second half
  // Skewed lanes (Plan::skew_lanes) read one shared k row at different offsets; when every entry
  // of that row is kc (a Laplacian's 1), the tiles in [kclo, kchi) are kc in every lane.
  bool kconst = false;
  T kc = T(0);
  int64_t kclo = 0, kchi = 0;
  int64_t N;
  bool has_mask;

  void init(const Problem<T>& pr, const LaneInfo* li) {
    N = pr.N;
    // Padding positions get alpha = 1 - i Im z (never a zero pivot) and k = 0 (decoupled).
    A.init(li, pr.a, pr.N, pr.N, 1, 0, pr.zr, T(1), T(1));
    // One shared k row read at one chunk offset by every real lane of each half of the block
    // (the chunk-major lanes of a batch of NL / 2 sequences: two chunks per block): broadcast,
    // no transpose. (Lane 0 of a block is always a real lane.)
    kuni = pr.k_row_stride == 0 ? pr.k : nullptr;
    kstart = li[0].start;
    kstart2 = li[NL / 2].row >= 0 ? li[NL / 2].start : kstart;
    for (int l = 0; l < NL; ++l)
      if (li[l].row >= 0 && li[l].start != (l < NL / 2 ? kstart : kstart2)) kuni = nullptr;
    K.init(li, pr.k, pr.k_row_stride, pr.N - 1, 1, -1, T(0), T(1), T(0));
    kconst = false;
    if (!kuni && pr.k_row_stride == 0 && pr.N > 1) {
      int64_t smin = 0, smax = 0;
      bool full = true;
      for (int l = 0; l < NL; ++l) {
        full = full && li[l].row >= 0;
        smin = std::min(smin, li[l].start);
        smax = std::max(smax, li[l].start);
      }
      if (full && smax == 0) {
        T x = pr.k[0];
        bool same = true;
        for (int64_t i = 1; i < pr.N - 1; ++i) same &= std::memcmp(pr.k + i, &x, sizeof(T)) == 0;
        // a tile [p0, p0 + n] reads k at p0 + q - 1 - shift for q <= n: in range for every lane
        if (same) {
          kconst = true;
          kc = x;
          kclo = 1 - smin;
          kchi = pr.N - 1;
        }
      }
    }
    has_mask = pr.mask != nullptr;
    if (has_mask) M.init(li, pr.mask, pr.N, pr.N, 1, 0, T(0), T(1), T(0));
  }
  // tK[q] = coupling into chunk position p0 + q (k at p0 + q - 1), q in [0, n]
  BK_AI void k_tile(int64_t p0, int64_t n, V* tK) const {
    if (kuni && kstart2 != kstart) {
      for (int64_t q = 0; q <= n; ++q) {
        const int64_t i = kstart + p0 + q - 1, i2 = kstart2 + p0 + q - 1;
        tK[q] = halves<T>((i >= 0 && i < N - 1) ? kuni[i] : T(0), (i2 >= 0 && i2 < N - 1) ? kuni[i2] : T(0));
      }
    } else if (kconst && p0 >= kclo && p0 + n <= kchi) {
      T* dst = reinterpret_cast<T*>(tK);
      for (int64_t q = 0; q <= n; ++q)
        for (int l = 0; l < NL; ++l) dst[q * NL + l] = kc;
    } else if (kuni) {
      // Broadcast element-wise through memory: a pack assigned from a scalar is
      // lowered by GCC to per-lane extracts, so write the lanes as scalars instead.
      T* dst = reinterpret_cast<T*>(tK);
      for (int64_t q = 0; q <= n; ++q) {
        int64_t i = kstart + p0 + q - 1;
        const T v = (i >= 0 && i < N - 1) ? kuni[i] : T(0);
        for (int l = 0; l < NL; ++l) dst[q * NL + l] = v;
      }
    } else {
      K.tile(p0, n, reinterpret_cast<T*>(tK), NL);  // full tiles take the transpose path
      K.column(p0 + n, reinterpret_cast<T*>(tK + n));
    }
  }
};

// Everything one block keeps across its passes (full chunk length).
template <class T>
struct Scratch {
  typedef typename VecOf<T>::type V;
  Buf<Cx<V>> D;      // two-sided forward: the pivots each chain stores on its half; causal forward: 1/d
  Buf<Cx<V>> ID;     // causal backward: 1 / d
  Buf<Cx<V>> P;      // causal backward: q_j = -w'_j / d_j^2
  Buf<Cx<V>> R;      // causal backward: the mu coefficients k_j / d_j^2
  Buf<V> SA;         // two-sided: Re alpha, lane-major (gathered once, read by both halves)
  Buf<Cx<V>> SI;     // two-sided backward: the inverse pivot each chain stores on its half
  Buf<Cx<V>> SU;     // two-sided backward: the accumulator (U or Rt) each chain stores on its half
  Buf<Cx<V>> SW;     // two-sided backward: w, lane-major (gathered once, read by both halves)
  Buf<V> SM;         // two-sided backward with a mask: the mask, lane-major
  void alloc_fwd(int64_t Lc) {
    D.alloc(Lc);
    SA.alloc(Lc);
  }
  void alloc_bwd_causal(int64_t Lc) {
    ID.alloc(Lc);
    P.alloc(Lc);
    R.alloc(Lc);
  }
  void alloc_bwd_two_sided(int64_t Lc, bool mask) {
    SA.alloc(Lc);
    D.alloc(Lc);
    SU.alloc(Lc);
    SW.alloc(Lc);
    if (mask) SM.alloc(Lc);
  }
};

// The d chains of NB blocks over the chunk, run in one loop so that they hide each other's
// latency (a block is one register, and this chain is the causal kernels' only recursion).
// Keeps ID[b][p] = 1 / d_p: the division of step p + 1 yields it, the last one costs one more.
template <class T, int NB>
static void inv_d_chains(const BlockIn<T>* in, int64_t Lc, T zi, Cx<typename VecOf<T>::type>* dprev,
                         Cx<typename VecOf<T>::type>* const* ID) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const V aim = V{} - zi;
  alignas(128) V tA[NB][kTile];
  alignas(128) V tK[NB][kTile + 1];
  for (int64_t p0 = 0; p0 < Lc; p0 += kTile) {
    const int64_t n = std::min(kTile, Lc - p0);
    for (int b = 0; b < NB; ++b) {
      in[b].A.tile(p0, n, reinterpret_cast<T*>(tA[b]), NL);
      in[b].k_tile(p0, n, tK[b]);
    }
    for (int64_t q = 0; q < n; ++q) {
      const int64_t p = p0 + q;
      for (int b = 0; b < NB; ++b) {
        Cx<V> inv;
        Cx<V> d = bk::pivot_step(Cx<V>{tA[b][q], aim}, tK[b][q], dprev[b], &inv);
        if (p > 0) ID[b][p - 1] = inv;
        dprev[b] = d;
      }
    }
  }
  for (int b = 0; b < NB; ++b) ID[b][Lc - 1] = bk::recip(dprev[b]);
}

// ---------------------------------------------------------------------------------------------
// Chunk carries: Moebius transfer matrices of the pivots, then a scan per sequence.

template <class T>
struct Carries {
  std::vector<Cx<T>> d_in, e_in;  // pivot just left / right of each lane's chunk
};

template <class T>
static void store_mobius(const Mobius<typename VecOf<T>::type>& m, const LaneInfo* li, int64_t blk, Mobius<T>* out) {
  constexpr int NL = Plan<T>::NL;
  for (int l = 0; l < NL; ++l)
    if (li[l].row >= 0) {
      Mobius<T>& o = out[blk * NL + l];
      o.x0 = {lane<T>(m.x0.re, l), lane<T>(m.x0.im, l)};
      o.y0 = {lane<T>(m.y0.re, l), lane<T>(m.y0.im, l)};
      o.x1 = {lane<T>(m.x1.re, l), lane<T>(m.x1.im, l)};
      o.y1 = {lane<T>(m.y1.re, l), lane<T>(m.y1.im, l)};
    }
}

// Rescales the product by 2^-E, E the exponent of its largest entry: a power of two, so every
// entry is scaled exactly (no rounding), and cheaper than a division. The largest exponent is the
// integer maximum of the entries' exponent fields (IEEE bit patterns order as their magnitudes).
template <class T>
static BK_AI void mobius_rescale_max(Mobius<VPack<T>>& m) {
  typedef VPack<T> P;
  typedef typename IntVec<T>::I I;
  typedef typename IntVec<T>::type IV;
  constexpr int MB = sizeof(T) == 4 ? 23 : 52;                     // mantissa bits
  constexpr I EXP = sizeof(T) == 4 ? I(0xFF) << MB : I(0x7FF) << MB;  // exponent field
  constexpr I TWO_BIAS = sizeof(T) == 4 ? I(254) << MB : I(2046) << MB;
  const P* e[8] = {&m.x0.re, &m.x0.im, &m.y0.re, &m.y0.im, &m.x1.re, &m.x1.im, &m.y1.re, &m.y1.im};
  P s;
  for (int u = 0; u < P::U; ++u) {
    // (a cast between GCC vector types of one size reinterprets the bits)
    IV mx = (IV)e[0]->v[u] & EXP;
    for (int i = 1; i < 8; ++i) {
      IV x = (IV)e[i]->v[u] & EXP;
      mx = mx > x ? mx : x;
    }
    IV sb = TWO_BIAS - mx;  // bits of 2^-E (E = exponent of the largest entry)
    s.v[u] = (typename P::N)sb;
  }
  bk::mobius_rescale(m, s);
}

template <class T>
static void mobius_block(const Problem<T>& pr, const Plan<T>& pl, int64_t blk, bool backward_too, Mobius<T>* mf,
                         Mobius<T>* mb) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  BlockIn<T> in;
  in.init(pr, li);
  const V aim = V{} - pr.zi;
  alignas(128) V tA[kTile];
  alignas(128) V tK[kTile + 1];
  // With backward_too both transfer matrices come from one pass: the forward product from the
  // left end and the backward one from the right end advance together (independent chains, so
  // each hides the other's latency), tile k from the left beside tile k from the right.
  Mobius<V> m = bk::mobius_identity<V>(), mr = bk::mobius_identity<V>();
  alignas(128) V tAB[kTile];
  alignas(128) V tKB[kTile + 1];
  const int64_t last = ((pl.Lc - 1) / kTile) * kTile;
  for (int64_t p0 = 0; p0 <= last; p0 += kTile) {
    const int64_t n = std::min(kTile, pl.Lc - p0);
    const int64_t pb = last - p0;
    const int64_t nb = std::min(kTile, pl.Lc - pb);
    in.A.tile(p0, n, reinterpret_cast<T*>(tA), NL);
    in.k_tile(p0, n, tK);
    if (backward_too) {
      in.A.tile(pb, nb, reinterpret_cast<T*>(tAB), NL);
      in.k_tile(pb, nb, tKB);
    }
    // the state is copied into locals for the tile so that it stays in registers
    Mobius<V> a = m, b = mr;
    if (backward_too && n == kTile && nb == kTile) {
      for (int64_t q = 0; q < kTile; ++q) {
        const int64_t qb = kTile - 1 - q;
        bk::mobius_step(a, Cx<V>{tA[q], aim}, tK[q]);
        bk::mobius_step(b, Cx<V>{tAB[qb], aim}, tKB[qb + 1]);
        if ((q & kRescaleMask<T>) == kRescaleMask<T>) {
          mobius_rescale_max(a);
          mobius_rescale_max(b);
        }
      }
    } else {
      for (int64_t q = 0; q < n; ++q) {
        bk::mobius_step(a, Cx<V>{tA[q], aim}, tK[q]);
        if ((q & kRescaleMask<T>) == kRescaleMask<T>) mobius_rescale_max(a);
      }
      if (backward_too)
        for (int64_t q = nb - 1; q >= 0; --q) {
          bk::mobius_step(b, Cx<V>{tAB[q], aim}, tKB[q + 1]);
          if ((q & kRescaleMask<T>) == kRescaleMask<T>) mobius_rescale_max(b);
        }
    }
    m = a;
    mr = b;
  }
  store_mobius<T>(m, li, blk, mf);
  if (backward_too) store_mobius<T>(mr, li, blk, mb);
}

template <class F>
struct Task {
  F* f;
  static void run(void* ctx, int64_t b, int64_t e) {
    F& f = *static_cast<Task*>(ctx)->f;
    for (int64_t i = b; i < e; ++i) f(i);
  }
};
template <class F>
static void parallel_blocks(const Par& par, int64_t n, F&& f) {
  Task<typename std::remove_reference<F>::type> t{&f};
  par.parallel_for(n, &t, &Task<typename std::remove_reference<F>::type>::run);
}

// Per-thread scratch, reused across calls on the same thread.
template <class T>
static Scratch<T>& thread_scratch() {
  static thread_local Scratch<T> s;
  return s;
}

template <class T>
static void compute_carries(const Problem<T>& pr, const Plan<T>& pl, const Par& par, bool two_sided, Carries<T>& c) {
  c.d_in.assign(pl.lanes, Cx<T>{T(1), T(0)});
  c.e_in.assign(pl.lanes, Cx<T>{T(1), T(0)});
  if (!pl.chunked()) return;
  std::vector<Mobius<T>> mf(pl.blocks * Plan<T>::NL), mb(two_sided ? pl.blocks * Plan<T>::NL : 0);
  parallel_blocks(par, pl.blocks, [&](int64_t blk) { mobius_block(pr, pl, blk, two_sided, mf.data(), mb.data()); });
  for (int64_t b = 0; b < pl.B; ++b) {
    for (int64_t ch = 1; ch < pl.C; ++ch) {
      const int64_t v = pl.lane(b, ch), vp = pl.lane(b, ch - 1);
      c.d_in[v] = bk::mobius_apply(mf[vp], c.d_in[vp]);
    }
    if (two_sided)
      for (int64_t ch = pl.C - 2; ch >= 0; --ch) {
        const int64_t v = pl.lane(b, ch), vn = pl.lane(b, ch + 1);
        c.e_in[v] = bk::mobius_apply(mb[vn], c.e_in[vn]);
      }
  }
}

template <class T>
static Cx<typename VecOf<T>::type> load_carry(const std::vector<Cx<T>>& src, int64_t blk, const LaneInfo* li) {
  typedef typename VecOf<T>::type V;
  Cx<V> out{V{} + 1, V{}};
  for (int l = 0; l < Plan<T>::NL; ++l)
    if (li[l].row >= 0) {
      set_lane<T>(out.re, l, src[blk * Plan<T>::NL + l].re);
      set_lane<T>(out.im, l, src[blk * Plan<T>::NL + l].im);
    }
  return out;
}

// Writes a lane-major complex tile to the interleaved [B, N, 2] output (o: es = 2).
template <class T>
static BK_AI void scatter_cx_tile(const LaneOut<T>& o, int64_t p0, int64_t n, const Cx<typename VecOf<T>::type>* src,
                                  bool stream = false) {
  constexpr int NL = Plan<T>::NL;
  const T* s = reinterpret_cast<const T*>(src);
#ifdef BK_AVX512_TRANSPOSE
  constexpr int G = 64 / sizeof(T);
  if (n == kTile) {
    for (int g0 = 0; g0 < NL; g0 += G) {
      if (o.full_group(g0, p0, n)) {
        // p0 is a multiple of 8 on the full tiles of the sweep, so the alignment of the chunk
        // starts decides the alignment of every row
        const bool nt = stream && o.aligned[g0 / G] && (p0 & 7) == 0;
        bk_avx512::scatter16_cx(s + g0, s + NL + g0, 2 * NL, o.group_rows(g0, p0), nt);
      } else {
        uint32_t m[G];
        o.group_masks(g0, p0, m);
        bk_avx512::scatter16_cx(s + g0, s + NL + g0, 2 * NL, o.group_rows(g0, p0), false, m);
      }
    }
    return;
  }
#endif
  for (int l = 0; l < NL; ++l) {
    o.lane(l, p0, n, s, 2 * NL);
    o.lane(l, p0, n, s + NL, 2 * NL, 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

// G at one position from its two pivots; with a mask, the combine (a division) is skipped for a
// position whose mask is 0 in every lane of the block and the output is exactly 0 there.
template <class T>
static BK_AI Cx<typename VecOf<T>::type> combine_out(const Cx<typename VecOf<T>::type>& d,
                                                      const Cx<typename VecOf<T>::type>& e,
                                                      const Cx<typename VecOf<T>::type>& al, const V_t<T>* m) {
  typedef typename VecOf<T>::type V;
  if (!m) return bk::combine(d, e, al);
  // all-zero test of the mask pack as 64-bit words (a -0.0 counts as "compute")
  uint64_t bits[BK_PACK_BYTES / 8];
  std::memcpy(bits, m, sizeof(bits));
  uint64_t acc = 0;
  for (int w = 0; w < BK_PACK_BYTES / 8; ++w) acc |= bits[w];
  return acc != 0 ? masked<T>(bk::combine(d, e, al), *m) : Cx<V>{V{}, V{}};
}

// Two-sided forward of one block over its chunk [0, L): the d chain (left to right) and the e
// chain (right to left) advance together, two independent division chains in flight. In the
// first half each stores its pivots in S (d on the left half, e on the right half); in the
// second half each meets the other's stored pivot and writes G there (one combine each).
// Same arithmetic, in the same order per chain, as running the two passes one after the other.
// Returns the d pivot at L - 1 (the carry into a sequential plan's next sub-chunk).
template <class T>
static Cx<typename VecOf<T>::type> two_sided_sweep(const BlockIn<T>& in, const LaneInfo* li, const Problem<T>& pr, int64_t L,
                            Cx<typename VecOf<T>::type> dprev, Cx<typename VecOf<T>::type> eprev,
                            Cx<typename VecOf<T>::type>* S, typename VecOf<T>::type* SA, T* out, bool stream) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const V aim = V{} - pr.zi;
  const int64_t h = L / 2, h2 = L - h;
  LaneOut<T> lo;
  lo.init(li, out, 2 * pr.N, pr.N, 2);
  alignas(128) V tK[kTile + 1], tKB[kTile + 1];  // couplings of the d tile / e tile
  alignas(128) V tM[kTile], tMB[kTile];
  alignas(128) Cx<V> tG[kTile], tGB[kTile];
  auto dstep = [&](V a, V k) {
    Cx<V> d = bk::pivot_step(Cx<V>{a, aim}, k, dprev);
    dprev = d;
    return d;
  };
  auto estep = [&](V a, V k) {
    Cx<V> e = bk::pivot_step(Cx<V>{a, aim}, k, eprev);
    eprev = e;
    return e;
  };
  // Phase 1: d over [0, h), e over [h2, L), pivots stored; alpha is gathered into SA once.
  for (int64_t t0 = 0; t0 < h; t0 += kTile) {
    const int64_t n = std::min(kTile, h - t0);
    const int64_t pb = L - t0 - n;  // e tile [pb, pb + n)
    in.A.tile(t0, n, reinterpret_cast<T*>(SA + t0), NL);
    in.k_tile(t0, n, tK);
    in.A.tile(pb, n, reinterpret_cast<T*>(SA + pb), NL);
    in.k_tile(pb, n, tKB);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t qb = n - 1 - q;
      S[t0 + q] = dstep(SA[t0 + q], tK[q]);
      S[pb + qb] = estep(SA[pb + qb], tKB[qb + 1]);
    }
  }
  if (L & 1) {  // the middle position: d then e, combined at once
    in.A.tile(h, 1, reinterpret_cast<T*>(SA + h), NL);
    in.k_tile(h, 1, tK);
    const V a = SA[h];
    Cx<V> d = dstep(a, tK[0]);
    Cx<V> e = estep(a, tK[1]);
    if (in.has_mask) in.M.tile(h, 1, reinterpret_cast<T*>(tMB), NL);
    tGB[0] = combine_out<T>(d, e, Cx<V>{a, aim}, in.has_mask ? &tMB[0] : nullptr);
    scatter_cx_tile<T>(lo, h, 1, tGB);
  }
  // Phase 2: d over [h2, L) meets the stored e; e over [0, h) meets the stored d.
  for (int64_t t0 = 0; t0 < h; t0 += kTile) {
    const int64_t n = std::min(kTile, h - t0);
    const int64_t pa = h2 + t0;     // d tile [pa, pa + n)
    const int64_t pb = h - t0 - n;  // e tile [pb, pb + n)
    in.k_tile(pa, n, tK);
    in.k_tile(pb, n, tKB);
    if (in.has_mask) {
      in.M.tile(pa, n, reinterpret_cast<T*>(tM), NL);
      in.M.tile(pb, n, reinterpret_cast<T*>(tMB), NL);
    }
    for (int64_t q = 0; q < n; ++q) {
      const int64_t qb = n - 1 - q;
      const V aa = SA[pa + q], ab = SA[pb + qb];
      Cx<V> ala{aa, aim}, alb{ab, aim};
      Cx<V> d = dstep(aa, tK[q]);
      Cx<V> e = estep(ab, tKB[qb + 1]);
      tG[q] = combine_out<T>(d, S[pa + q], ala, in.has_mask ? &tM[q] : nullptr);
      tGB[qb] = combine_out<T>(S[pb + qb], e, alb, in.has_mask ? &tMB[qb] : nullptr);
    }
    scatter_cx_tile<T>(lo, pa, n, tG, stream);
    scatter_cx_tile<T>(lo, pb, n, tGB, stream);
  }
#ifdef BK_AVX512_TRANSPOSE
  if (stream) _mm_sfence();  // order the non-temporal stores before the block is reported done
#endif
  return dprev;
}

template <class T>
static void two_sided_forward_block(const Problem<T>& pr, const Plan<T>& pl, int64_t blk, const Carries<T>& car, T* out,
                          bool stream) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  Scratch<T>& s = thread_scratch<T>();
  s.alloc_fwd(pl.Lc);
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  BlockIn<T> in;
  in.init(pr, li);
  const int64_t Lc = pl.Lc;
  Cx<V> dprev = load_carry(car.d_in, blk, li);
  Cx<V> eprev = load_carry(car.e_in, blk, li);
  two_sided_sweep<T>(in, li, pr, Lc, dprev, eprev, s.D.p, s.SA.p, out, stream);
}

template <class T>
struct BwdIO;

// Sequential plan: the e chain right to left over the whole sequences of NB blocks (run in one
// loop, independent chains that hide each other's latency), its value entering each sub-chunk
// from the right recorded in e_in[b][c] (e at sub-chunk c + 1's first position; 1 past the
// end); with io, also Rt, the gradient's accumulator that runs beside it (w' = m w), in
// rt_in[b][c]. The same steps as the sweeps' own e chain, so the carries are exact.
template <class T, int NB>
static void e_boundaries(const Plan<T>& pl, T zi, const BlockIn<T>* const* in, const BwdIO<T>* const* io,
                         Cx<typename VecOf<T>::type>* const* e_in, Cx<typename VecOf<T>::type>* const* rt_in) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const V aim = V{} - zi;
  alignas(128) V tA[NB][kTile], tK[NB][kTile + 1], tM[kTile];
  alignas(128) Cx<V> tW[kTile], tWm[NB][kTile];
  Cx<V> e[NB], Rt[NB];
  for (int b = 0; b < NB; ++b) {
    e[b] = e_in[b][pl.S - 1] = Cx<V>{V{} + 1, V{}};
    Rt[b] = Cx<V>{V{}, V{}};
    if (io) rt_in[b][pl.S - 1] = Rt[b];
  }
  for (int64_t t0 = ((pl.N - 1) / kTile) * kTile; t0 > 0; t0 -= kTile) {
    const int64_t n = std::min(kTile, pl.N - t0);
    for (int b = 0; b < NB; ++b) {
      in[b]->A.tile(t0, n, reinterpret_cast<T*>(tA[b]), NL);
      in[b]->k_tile(t0, n, tK[b]);
      if (io) io[b]->w_tiles(t0, n, tW, tWm[b], tM);
    }
    for (int64_t q = n - 1; q >= 0; --q)
      for (int b = 0; b < NB; ++b) {
        Cx<V> inv;
        e[b] = bk::pivot_step(Cx<V>{tA[b][q], aim}, tK[b][q + 1], e[b], &inv);
        if (io) Rt[b] = bk::lin_step(bk::k_over_sq(tK[b][q + 1], inv), Rt[b], tWm[b][q]);
      }
    if (t0 % pl.Ls == 0)  // t0 starts sub-chunk t0 / Ls
      for (int b = 0; b < NB; ++b) {
        e_in[b][t0 / pl.Ls - 1] = e[b];
        if (io) rt_in[b][t0 / pl.Ls - 1] = Rt[b];
      }
  }
}

// Runs f(blk0, nb) over the blocks in groups of nb = 2 when there are enough to give every thread
// at least one group (the sequential plans' boundary chains run two blocks at once), else singly.
template <class T, class F>
static void parallel_block_groups(const Par& par, const Plan<T>& pl, F&& f) {
  if (pl.blocks >= 2 * int64_t(std::max(1, par.num_threads)))
    parallel_blocks(par, (pl.blocks + 1) / 2, [&](int64_t i) { f(2 * i, std::min<int64_t>(2, pl.blocks - 2 * i)); });
  else
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { f(blk, 1); });
}

// Two-sided forward of NB blocks of a sequential plan: the boundary chains of all NB at once,
// then each block's sub-chunks in order, the d pivot carried from each into the next.
template <class T, int NB>
static void two_sided_forward_seq(const Problem<T>& pr, const Plan<T>& pl, int64_t blk0, T* out, bool stream) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  Scratch<T>& s = thread_scratch<T>();
  s.alloc_fwd(pl.Ls);
  LaneInfo li[NB][NL], ls[NL];
  BlockIn<T> in[NB];
  std::vector<Cx<V>> eb(NB * pl.S);
  Cx<V>* e_in[NB];
  const BlockIn<T>* inp[NB];
  for (int b = 0; b < NB; ++b) {
    lane_info(pl, blk0 + b, li[b]);
    in[b].init(pr, li[b]);
    inp[b] = &in[b];
    e_in[b] = eb.data() + b * pl.S;
  }
  e_boundaries<T, NB>(pl, pr.zi, inp, nullptr, e_in, nullptr);
  for (int b = 0; b < NB; ++b) {
    Cx<V> dprev{V{} + 1, V{}};
    for (int64_t c = 0; c < pl.S; ++c) {
      const int64_t len = sub_chunk(pl, li[b], c, ls);
      in[b].init(pr, ls);
      dprev = two_sided_sweep<T>(in[b], ls, pr, len, dprev, e_in[b][c], s.D.p, s.SA.p, out, stream);
    }
  }
}

// Causal forward (y = 1 / d) of NB blocks at once over a chunk of length L (see inv_d_chains);
// dprev: the pivots entering the chunk, left at the chunk's last pivot.
template <class T, int NB>
static void causal_forward_run(const Problem<T>& pr, const LaneInfo (*li)[Plan<T>::NL], const BlockIn<T>* in,
                               int64_t L, Cx<typename VecOf<T>::type>* dprev, T* out, bool stream) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  Scratch<T>& s = thread_scratch<T>();
  s.D.alloc(NB * L);
  Cx<V>* Y[NB];
  for (int b = 0; b < NB; ++b) Y[b] = s.D.p + b * L;
  inv_d_chains<T, NB>(in, L, pr.zi, dprev, Y);
  alignas(128) V tM[kTile];
  for (int b = 0; b < NB; ++b) {
    LaneOut<T> lo;
    lo.init(li[b], out, 2 * pr.N, pr.N, 2);
    for (int64_t p0 = 0; p0 < L; p0 += kTile) {
      const int64_t n = std::min(kTile, L - p0);
      Cx<V>* y = Y[b] + p0;
      if (in[b].has_mask) {
        in[b].M.tile(p0, n, reinterpret_cast<T*>(tM), NL);
        for (int64_t q = 0; q < n; ++q) y[q] = masked<T>(y[q], tM[q]);
      }
      scatter_cx_tile<T>(lo, p0, n, y, stream);
    }
  }
#ifdef BK_AVX512_TRANSPOSE
  if (stream) _mm_sfence();
#endif
}

// Causal forward of NB blocks: of a parallel plan (one chunk each, pivots entering it from the
// carries), or of a sequential plan (the sub-chunks in order, the d pivot carried: nothing to
// compute beforehand).
template <class T, int NB>
static void causal_forward_blocks(const Problem<T>& pr, const Plan<T>& pl, int64_t blk0, const Carries<T>& car,
                                  T* out, bool stream) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  LaneInfo li[NB][NL], ls[NB][NL];
  BlockIn<T> in[NB];
  Cx<V> dprev[NB];
  for (int b = 0; b < NB; ++b) {
    lane_info(pl, blk0 + b, li[b]);
    dprev[b] = pl.S > 1 ? Cx<V>{V{} + 1, V{}} : load_carry(car.d_in, blk0 + b, li[b]);
  }
  for (int64_t c = 0; c < pl.S; ++c) {
    int64_t len = pl.Lc;
    for (int b = 0; b < NB; ++b) {
      if (pl.S > 1) len = sub_chunk(pl, li[b], c, ls[b]);
      in[b].init(pr, pl.S > 1 ? ls[b] : li[b]);
    }
    causal_forward_run<T, NB>(pr, pl.S > 1 ? ls : li, in, len, dprev, out, stream);
  }
}

template <class T>
static void forward_impl(const Problem<T>& pr, T* out, const Par& par) {
  if (pr.B == 0) return;
  Plan<T> pl(pr.B, pr.N, par.num_threads, kMaxChunkFwd);
  pl.skew_lanes();
  // An output much larger than the cores' L2 goes out with non-temporal stores (see scatter16_cx).
  const bool stream = pr.B * pr.N * 2 * int64_t(sizeof(T)) >= kStreamOutBytes;
  if (pl.S > 1 && !pr.causal) {
    parallel_block_groups(par, pl, [&](int64_t blk0, int64_t nb) {
      if (nb == 2)
        two_sided_forward_seq<T, 2>(pr, pl, blk0, out, stream);
      else
        two_sided_forward_seq<T, 1>(pr, pl, blk0, out, stream);
    });
    return;
  }
  Carries<T> car;
  compute_carries(pr, pl, par, !pr.causal, car);
  if (pr.causal) {
    parallel_blocks(par, (pl.blocks + 1) / 2, [&](int64_t i) {
      if (2 * i + 1 < pl.blocks)
        causal_forward_blocks<T, 2>(pr, pl, 2 * i, car, out, stream);
      else
        causal_forward_blocks<T, 1>(pr, pl, 2 * i, car, out, stream);
    });
    return;
  }
  parallel_blocks(par, pl.blocks, [&](int64_t blk) { two_sided_forward_block(pr, pl, blk, car, out, stream); });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <class T>
struct BwdShared {
  const Problem<T>& pr;
  const Plan<T>& pl;
  Grads<T>& g;
  Carries<T> car;
  // Chunked only, per lane: (local value, product) summaries of the linear recurrences and the
  // true carries from the scan. Two-sided: U (left to right) in r_*, Rt (right to left) in l_*;
  // causal: mu in r_*.
  std::vector<Cx<T>> r_start, r_prod, r_in;
  std::vector<Cx<T>> l_end, l_prod, l_in;
  // Two-sided chunked: the two halves of grad_k at the coupling between a chunk and the next,
  // each computed by one of the two blocks (joined after both ran).
  std::vector<T> gk_left, gk_right;
  std::vector<double> zsum;  // per lane [re, im]
};

template <class T>
static Cx<T> lane_cx(const Cx<typename VecOf<T>::type>& v, int l) {
  return Cx<T>{lane<T>(v.re, l), lane<T>(v.im, l)};
}

// conj(upstream gradient) of the block for positions [p0, p0 + n)
template <class T>
static BK_AI void w_tile(const LaneSrc<T>& Wre, const LaneSrc<T>& Wim, int64_t p0, int64_t n,
                          Cx<typename VecOf<T>::type>* tW) {
  constexpr int NL = Plan<T>::NL;
  T* dre = reinterpret_cast<T*>(tW);
  T* dim = dre + NL;
#ifdef BK_AVX512_TRANSPOSE
  constexpr int G = 64 / sizeof(T);
  if (n == kTile) {
    for (int g0 = 0; g0 < NL; g0 += G) {
      if (Wre.full_group(g0, p0, n)) {
        bk_avx512::gather16_cx(Wre.group_rows(g0, p0), Wim.mul, dre + g0, dim + g0, 2 * NL);
      } else if (Wre.pad == T(0) && Wim.pad == T(0) && Wre.sub == T(0) && Wim.sub == T(0) && Wre.mul == T(1)) {
        uint32_t m[G];  // out-of-range positions read as 0, the pad
        Wre.group_masks(g0, p0, m);
        bk_avx512::gather16_cx(Wre.group_rows(g0, p0), Wim.mul, dre + g0, dim + g0, 2 * NL, m);
      } else {
        for (int l = g0; l < g0 + G; ++l) {
          Wre.tile_lane(l, p0, n, dre, 2 * NL);
          Wim.tile_lane(l, p0, n, dim, 2 * NL);
        }
      }
    }
    return;
  }
#endif
  Wre.tile(p0, n, dre, 2 * NL);
  Wim.tile(p0, n, dim, 2 * NL);
}

// Re(x y)
template <class V>
static BK_AI V re_prod(const Cx<V>& x, const Cx<V>& y) {
  return x.re * y.re - x.im * y.im;
}

// -Re(G^2 S) in 6 operations (the lean sweep's grad alpha): Re(G^2) Re S - 2 Re G Im G Im S.
template <class V>
static BK_AI V neg_re_g2s(const Cx<V>& G, const Cx<V>& S) {
  const V g2r = G.re * G.re - G.im * G.im;
  const V g2i2 = (G.re + G.re) * G.im;
  return g2i2 * S.im - g2r * S.re;
}

// Block-level view of the backward's inputs and outputs.
template <class T>
struct BwdIO {
  typedef typename VecOf<T>::type V;
  BlockIn<T> in;
  LaneSrc<T> Wre, Wim;  // w = conj(upstream gradient)
  LaneOut<T> oga, ogk, ogm;
  bool has_gk, has_gm;
  // lean: neither grad k nor grad z is wanted, so the sweep forms only Re A_j (see bwd_sweep)
  bool lean;
  // grad a with non-temporal stores (a large output written once; see scatter16_cx)
  bool stream;
  void init(const BwdShared<T>& sh, const LaneInfo* li) {
    const Problem<T>& pr = sh.pr;
    in.init(pr, li);
    Wre.init(li, sh.g.grad, 2 * pr.N, pr.N, 2, 0, T(0), T(1), T(0));
    Wim.init(li, sh.g.grad + 1, 2 * pr.N, pr.N, 2, 0, T(0), T(-1), T(0));
    oga.init(li, sh.g.grad_a, pr.N, pr.N, 1);
    has_gk = pr.N > 1 && sh.g.grad_k != nullptr;
    if (has_gk) ogk.init(li, sh.g.grad_k, pr.N - 1, pr.N - 1, 1);
    lean = !has_gk && !sh.g.need_z;
    stream = pr.B * pr.N * int64_t(sizeof(T)) >= kStreamOutBytes;
    has_gm = sh.g.grad_mask != nullptr;
    if (has_gm) ogm.init(li, sh.g.grad_mask, pr.N, pr.N, 1);
  }
  // w and, with a mask, the masked w' = m w of a tile (tM receives the mask)
  BK_AI void w_tiles(int64_t p0, int64_t n, Cx<V>* tW, Cx<V>* tWm, V* tM) const {
    w_tile<T>(Wre, Wim, p0, n, tW);
    if (in.has_mask) {
      in.M.tile(p0, n, reinterpret_cast<T*>(tM), Plan<T>::NL);
      for (int64_t q = 0; q < n; ++q) tWm[q] = masked<T>(tW[q], tM[q]);
    } else {
      for (int64_t q = 0; q < n; ++q) tWm[q] = tW[q];
    }
  }
};

template <class T>
static void flush_zsum(Cx<typename VecOf<T>::type>& t, double* zacc) {
  for (int l = 0; l < Plan<T>::NL; ++l) {
    zacc[2 * l] += lane<T>(t.re, l);
    zacc[2 * l + 1] += lane<T>(t.im, l);
  }
  t = Cx<typename VecOf<T>::type>{};
}

template <class T>
static void store_zsum(BwdShared<T>& sh, int64_t blk, const LaneInfo* li, const double* zacc) {
  for (int l = 0; l < Plan<T>::NL; ++l) {
    if (li[l].row < 0) continue;
    int64_t v = blk * Plan<T>::NL + l;
    sh.zsum[2 * v] = zacc[2 * l];
    sh.zsum[2 * v + 1] = zacc[2 * l + 1];
  }
}

// ---------------------------------------------------------------------------------------------
// Two-sided backward: one bidirectional sweep (shared/BK_CORE_MATH.md's gradient, anchored the
// other way round). With w' = m w (w = conj(upstream gradient), m the mask or 1), the
// contributions sum_i w'_i G_ij G_ji that make grad alpha_j are G_jj^2 (U_j + Rt_j - w'_j) with
//   U_j  = w'_j + (k_{j-1} / d_{j-1}^2) U_{j-1}   (left to right, the d pivots' direction)
//   Rt_j = w'_j + (k_j / e_{j+1}^2) Rt_{j+1}      (right to left, the e pivots' direction)
// (G_ij G_ji = G_jj^2 prod k_m / d_m^2 over m in [i, j) for i < j, and the e-form for i > j), so
// each accumulator runs beside its own pivot chain. With X_j = G_jj^2 U_j, Y_j = G_jj^2 Rt_j:
//   A_j = X_j + Y_j - G_jj^2 w'_j,  grad alpha_j = -Re A_j,  grad z = conj(sum_j A_j),
//   grad k_j = Re(X_j / e_{j+1}) + Re(Y_{j+1} / d_j)   (= Re(L_j / e_{j+1} + R_{j+1} / d_j)).
// As in the forward sweep, the d chain (with U) and the e chain (with Rt) advance together; in
// the first half each stores its inverse pivot and accumulator on its half (left: 1/d_{j-1}, U_j;
// right: 1/e_{j+1}, Rt_j); in the second half each meets the other's and finishes the gradients
// there: d_j + e_j - alpha_j = d_j - k_j / e_{j+1} = e_j - k_{j-1} / d_{j-1}, one division.
// Nothing else is kept: 2 complex values per position instead of the 5 of three separate passes.
// The carries (chunked): the pivots d, e entering the chunk, U at the position before it and Rt
// at the position after it. gk_left / gk_right receive the halves of grad k at the couplings
// leaving the chunk on the right (Re(X_{L-1} / e_L)) and entering it on the left (Re(Y_0 / d_-1)).
// kLean (no grad k and no grad z wanted, the usual case of a fixed Laplacian and shift): only
// Re A_j = Re(G_jj^2 S_j) with S_j = U_j + Rt_j - w'_j is formed (10 vector ops instead of 27:
// no X, Y, their grad k products, or the z sum), and no grad k tile is transposed out.
template <class T, bool kLean>
static void bwd_sweep(const BwdIO<T>& io, const Problem<T>& pr, int64_t L, Cx<typename VecOf<T>::type> dprev,
                      Cx<typename VecOf<T>::type> eprev, Cx<typename VecOf<T>::type> U,
                      Cx<typename VecOf<T>::type> Rt, Scratch<T>& s, double* zacc,
                      typename VecOf<T>::type* gk_left, typename VecOf<T>::type* gk_right,
                      Cx<typename VecOf<T>::type>* carry_out = nullptr) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const BlockIn<T>& in = io.in;
  const V aim = V{} - pr.zi;
  const int64_t h = L / 2, h2 = L - h;
  Cx<V>* SI = s.D.p;
  Cx<V>* SU = s.SU.p;
  V* SA = s.SA.p;
  Cx<V>* SW = s.SW.p;
  V* SM = s.SM.p;
  const bool has_mask = in.has_mask;
  alignas(128) V tK[kTile + 1], tKB[kTile + 1];
  alignas(128) V tGA[kTile], tGAB[kTile], tGK[kTile], tGKB[kTile], tGM[kTile], tGMB[kTile];
  Cx<V> zs{V{}, V{}};
  // Pending halves of grad k: gk_pend = Re(X_{j-1} / e_j) for the left chain's next output,
  // gkb_pend = Re(Y_{j+1} / d_j) for the right chain's next output.
  V gk_pend{}, gkb_pend{};
  // w and the masked w' = m w at position j (gathered into SW / SM by the chain that passes j first)
  // (with a software prefetch of the chain's next tile: the lanes' rows are far apart, and the
  // hardware prefetchers do not follow that many streams)
  auto gather = [&](int64_t p0, int64_t n) BK_AI_LAMBDA {
    io.Wre.prefetch(p0 < h ? p0 + kTile : p0 - kTile);
    w_tile<T>(io.Wre, io.Wim, p0, n, SW + p0);
    if (has_mask) in.M.tile(p0, n, reinterpret_cast<T*>(SM + p0), NL);
  };
  auto wm = [&](int64_t j) BK_AI_LAMBDA { return has_mask ? masked<T>(SW[j], SM[j]) : SW[j]; };
  auto lstep = [&](V a, V k, const Cx<V>& wm, Cx<V>& inv) BK_AI_LAMBDA {
    Cx<V> d = bk::pivot_step(Cx<V>{a, aim}, k, dprev, &inv);
    dprev = d;
    U = bk::lin_step(bk::k_over_sq(k, inv), U, wm);
    return d;
  };
  auto rstep = [&](V a, V k, const Cx<V>& wm, Cx<V>& inv) BK_AI_LAMBDA {
    Cx<V> e = bk::pivot_step(Cx<V>{a, aim}, k, eprev, &inv);
    eprev = e;
    Rt = bk::lin_step(bk::k_over_sq(k, inv), Rt, wm);
    return e;
  };
  // Phase 1: the d chain over [0, h), the e chain over [h2, L); alpha gathered into SA once.
  for (int64_t t0 = 0; t0 < h; t0 += kTile) {
    const int64_t n = std::min(kTile, h - t0);
    const int64_t pb = L - t0 - n;
    in.A.tile(t0, n, reinterpret_cast<T*>(SA + t0), NL);
    in.k_tile(t0, n, tK);
    gather(t0, n);
    in.A.tile(pb, n, reinterpret_cast<T*>(SA + pb), NL);
    in.k_tile(pb, n, tKB);
    gather(pb, n);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t qb = n - 1 - q;
      lstep(SA[t0 + q], tK[q], wm(t0 + q), SI[t0 + q]);
      SU[t0 + q] = U;
      rstep(SA[pb + qb], tKB[qb + 1], wm(pb + qb), SI[pb + qb]);
      SU[pb + qb] = Rt;
    }
  }
  if (L & 1) {  // the middle position: both chains pass it, its gradients at once
    in.A.tile(h, 1, reinterpret_cast<T*>(SA + h), NL);
    in.k_tile(h, 1, tK);
    gather(h, 1);
    const V a = SA[h];
    const Cx<V> w1 = wm(h);
    Cx<V> idm, iep;
    Cx<V> d = lstep(a, tK[0], w1, idm);
    Cx<V> e = rstep(a, tK[1], w1, iep);
    Cx<V> G = bk::combine(d, e, Cx<V>{a, aim});
    if constexpr (kLean) {
      tGA[0] = neg_re_g2s(G, U + Rt - w1);
    } else {
      Cx<V> G2 = G * G;
      Cx<V> X = G2 * U, Y = G2 * Rt;
      Cx<V> A = X + Y - G2 * w1;
      tGA[0] = -A.re;
      zs = zs + A;
      gk_pend = re_prod(X, iep);
      gkb_pend = re_prod(Y, idm);
    }
    scatter_tile<T>(io.oga, h, 1, reinterpret_cast<T*>(tGA), NL);
    if (io.has_gm) {
      tGM[0] = re_prod(G, SW[h]);
      scatter_tile<T>(io.ogm, h, 1, reinterpret_cast<T*>(tGM), NL);
    }
  }
  // Phase 2: the d chain over [h2, L) meets the stored (1/e_{j+1}, Rt_j); the e chain over
  // [0, h) meets the stored (1/d_{j-1}, U_j). The left chain emits grad k one position behind.
  for (int64_t t0 = 0; t0 < h; t0 += kTile) {
    const int64_t n = std::min(kTile, h - t0);
    const int64_t pa = h2 + t0;
    const int64_t pb = h - t0 - n;
    in.k_tile(pa, n, tK);
    in.k_tile(pb, n, tKB);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t qb = n - 1 - q;
      {  // d chain at j = pa + q
        const int64_t j = pa + q;
        Cx<V> idp;
        const Cx<V> w1 = wm(j);
        Cx<V> d = lstep(SA[j], tK[q], w1, idp);
        const Cx<V> ie = SI[j];
        const V k = tK[q + 1];
        Cx<V> G = bk::recip(Cx<V>{d.re - k * ie.re, d.im - k * ie.im});
        if (io.has_gm) tGM[q] = re_prod(G, SW[j]);
        if constexpr (kLean) {
          tGA[q] = neg_re_g2s(G, U + SU[j] - w1);
        } else {
          Cx<V> G2 = G * G;
          Cx<V> X = G2 * U, Y = G2 * SU[j];
          Cx<V> A = X + Y - G2 * w1;
          tGA[q] = -A.re;
          zs = zs + A;
          const V gb = re_prod(Y, idp);
          if (j - 1 >= h)
            tGK[q] = gk_pend + gb;
          else
            gkb_pend = gb;  // even L: grad k at h - 1 is the e chain's first output
          gk_pend = re_prod(X, ie);
        }
      }
      {  // e chain at j = pb + qb
        const int64_t j = pb + qb;
        Cx<V> iep;
        const Cx<V> w1 = wm(j);
        Cx<V> e = rstep(SA[j], tKB[qb + 1], w1, iep);
        const Cx<V> id = SI[j];
        const V k = tKB[qb];
        Cx<V> G = bk::recip(Cx<V>{e.re - k * id.re, e.im - k * id.im});
        if (io.has_gm) tGMB[qb] = re_prod(G, SW[j]);
        if constexpr (kLean) {
          tGAB[qb] = neg_re_g2s(G, SU[j] + Rt - w1);
        } else {
          Cx<V> G2 = G * G;
          Cx<V> X = G2 * SU[j], Y = G2 * Rt;
          Cx<V> A = X + Y - G2 * w1;
          tGAB[qb] = -A.re;
          zs = zs + A;
          tGKB[qb] = re_prod(X, iep) + gkb_pend;
          gkb_pend = re_prod(Y, id);
        }
      }
    }
    scatter_tile<T>(io.oga, pa, n, reinterpret_cast<T*>(tGA), NL, io.stream);
    scatter_tile<T>(io.oga, pb, n, reinterpret_cast<T*>(tGAB), NL, io.stream);
    if (io.has_gm) {
      scatter_tile<T>(io.ogm, pa, n, reinterpret_cast<T*>(tGM), NL);
      scatter_tile<T>(io.ogm, pb, n, reinterpret_cast<T*>(tGMB), NL);
    }
    if (!kLean && io.has_gk) {
      // the left tile's grad k covers positions [pa - 1, pa - 1 + n), minus h - 1 (see above)
      if (pa - 1 >= h)
        scatter_tile<T>(io.ogk, pa - 1, n, reinterpret_cast<T*>(tGK), NL);
      else if (n > 1)
        scatter_tile<T>(io.ogk, pa, n - 1, reinterpret_cast<T*>(tGK + 1), NL);
      scatter_tile<T>(io.ogk, pb, n, reinterpret_cast<T*>(tGKB), NL);
    }
    if (!kLean) flush_zsum<T>(zs, zacc);
  }
  if (!kLean) flush_zsum<T>(zs, zacc);
#ifdef BK_AVX512_TRANSPOSE
  if (io.stream) _mm_sfence();  // order the non-temporal stores before the block is reported done
#endif
  *gk_left = gk_pend;
  *gk_right = gkb_pend;
  if (carry_out) {  // d and U at L - 1: the carries into a sequential plan's next sub-chunk
    carry_out[0] = dprev;
    carry_out[1] = U;
  }
}

// Two-sided chunked: (local value, product) summaries of U and Rt over the chunk, from the true
// pivot carries: U_end = u + pu U_before, Rt_start = r + pr Rt_after. Both chains, nothing stored.
template <class T>
static void bwd_summary_block(BwdShared<T>& sh, int64_t blk) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Problem<T>& pr = sh.pr;
  const int64_t L = sh.pl.Lc;
  LaneInfo li[NL];
  lane_info(sh.pl, blk, li);
  BwdIO<T> io;
  io.init(sh, li);
  const V aim = V{} - pr.zi;
  Cx<V> dprev = load_carry(sh.car.d_in, blk, li), eprev = load_carry(sh.car.e_in, blk, li);
  Cx<V> U{V{}, V{}}, PU{V{} + 1, V{}}, Rt{V{}, V{}}, PR{V{} + 1, V{}};
  alignas(128) V tA[kTile], tAB[kTile], tK[kTile + 1], tKB[kTile + 1], tM[kTile];
  alignas(128) Cx<V> tW[kTile], tWm[kTile], tWmB[kTile];
  for (int64_t t0 = 0; t0 < L; t0 += kTile) {
    const int64_t n = std::min(kTile, L - t0);
    const int64_t pb = L - t0 - n;
    io.in.A.tile(t0, n, reinterpret_cast<T*>(tA), NL);
    io.in.k_tile(t0, n, tK);
    io.w_tiles(t0, n, tW, tWm, tM);
    io.in.A.tile(pb, n, reinterpret_cast<T*>(tAB), NL);
    io.in.k_tile(pb, n, tKB);
    io.w_tiles(pb, n, tW, tWmB, tM);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t qb = n - 1 - q;
      Cx<V> inv;
      dprev = bk::pivot_step(Cx<V>{tA[q], aim}, tK[q], dprev, &inv);
      Cx<V> c = bk::k_over_sq(tK[q], inv);
      U = bk::lin_step(c, U, tWm[q]);
      PU = c * PU;
      eprev = bk::pivot_step(Cx<V>{tAB[qb], aim}, tKB[qb + 1], eprev, &inv);
      c = bk::k_over_sq(tKB[qb + 1], inv);
      Rt = bk::lin_step(c, Rt, tWmB[qb]);
      PR = c * PR;
    }
  }
  for (int l = 0; l < NL; ++l)
    if (li[l].row >= 0) {
      const int64_t v = blk * NL + l;
      sh.r_start[v] = lane_cx<T>(U, l);
      sh.r_prod[v] = lane_cx<T>(PU, l);
      sh.l_end[v] = lane_cx<T>(Rt, l);
      sh.l_prod[v] = lane_cx<T>(PR, l);
    }
}

template <class T>
static void bwd_two_sided_block(BwdShared<T>& sh, int64_t blk) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Plan<T>& pl = sh.pl;
  Scratch<T>& s = thread_scratch<T>();
  s.alloc_bwd_two_sided(pl.Lc, sh.pr.mask != nullptr);
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  BwdIO<T> io;
  io.init(sh, li);
  Cx<V> U{V{}, V{}}, Rt{V{}, V{}};
  if (pl.chunked()) {
    U = load_carry(sh.r_in, blk, li);
    Rt = load_carry(sh.l_in, blk, li);
  }
  double zacc[2 * NL];
  std::memset(zacc, 0, sizeof(zacc));
  V gkl, gkr;
  (io.lean ? bwd_sweep<T, true> : bwd_sweep<T, false>)(io, sh.pr, pl.Lc, load_carry(sh.car.d_in, blk, li),
                                                       load_carry(sh.car.e_in, blk, li), U, Rt, s, zacc, &gkl,
                                                       &gkr, nullptr);
  store_zsum<T>(sh, blk, li, zacc);
  if (pl.chunked())
    for (int l = 0; l < NL; ++l)
      if (li[l].row >= 0) {
        sh.gk_left[blk * NL + l] = lane<T>(gkl, l);
        sh.gk_right[blk * NL + l] = lane<T>(gkr, l);
      }
}

// Two-sided backward of NB blocks of a sequential plan: the boundary chains (e with Rt) of all
// NB at once, then each block's sub-chunks in order, d and U carried from each into the next;
// grad k at a boundary joins the halves of the two sub-chunks beside it.
template <class T, int NB>
static void bwd_two_sided_seq(BwdShared<T>& sh, int64_t blk0) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Plan<T>& pl = sh.pl;
  const Problem<T>& pr = sh.pr;
  Scratch<T>& s = thread_scratch<T>();
  s.alloc_bwd_two_sided(pl.Ls, pr.mask != nullptr);
  LaneInfo li[NB][NL], ls[NL];
  BwdIO<T> io[NB];
  std::vector<Cx<V>> eb(NB * pl.S), rb(NB * pl.S);
  Cx<V>*e_in[NB], *rt_in[NB];
  const BlockIn<T>* inp[NB];
  const BwdIO<T>* iop[NB];
  for (int b = 0; b < NB; ++b) {
    lane_info(pl, blk0 + b, li[b]);
    io[b].init(sh, li[b]);
    inp[b] = &io[b].in;
    iop[b] = &io[b];
    e_in[b] = eb.data() + b * pl.S;
    rt_in[b] = rb.data() + b * pl.S;
  }
  e_boundaries<T, NB>(pl, pr.zi, inp, iop, e_in, rt_in);
  for (int b = 0; b < NB; ++b) {
    double zacc[2 * NL];
    std::memset(zacc, 0, sizeof(zacc));
    Cx<V> carry[2] = {{V{} + 1, V{}}, {V{}, V{}}};  // d, U
    V gkl_prev{};
    for (int64_t c = 0; c < pl.S; ++c) {
      const int64_t len = sub_chunk(pl, li[b], c, ls);
      io[b].init(sh, ls);
      V gkl, gkr;
      (io[b].lean ? bwd_sweep<T, true> : bwd_sweep<T, false>)(io[b], pr, len, carry[0], e_in[b][c], carry[1],
                                                             rt_in[b][c], s, zacc, &gkl, &gkr, carry);
      if (c > 0 && io[b].has_gk)  // the coupling (c * Ls - 1, c * Ls)
        for (int l = 0; l < NL; ++l)
          if (li[b][l].row >= 0)
            sh.g.grad_k[li[b][l].row * (pr.N - 1) + c * pl.Ls - 1] = lane<T>(gkl_prev, l) + lane<T>(gkr, l);
      gkl_prev = gkl;
    }
    store_zsum<T>(sh, blk0 + b, li[b], zacc);
  }
}

// ---------------------------------------------------------------------------------------------
// Causal backward. y = 1/d. mu_j = c_j mu_{j+1} + q_j with c_j = k_j / d_j^2, q_j = -w'_j / d_j^2,
// right to left against the d chain, so two passes: the d chain keeps 1/d (ID), then the phase
// below keeps q in P and c in R and, when chunked, the (product, local sum) summary of mu; phase 2
// runs mu with its true carry.
// Phase 1 over a chunk of length Lc: dprev enters as the pivot before the chunk and leaves as its
// last; with summary_lane >= 0 (parallel chunks) the chunk's mu summary goes to the lanes from there.
template <class T>
static void causal_bwd_phase1(BwdShared<T>& sh, const LaneInfo* li, int64_t Lc, Cx<typename VecOf<T>::type>& dprev,
                              Scratch<T>& s, int64_t summary_lane) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Problem<T>& pr = sh.pr;
  const bool chunked = summary_lane >= 0;
  s.alloc_bwd_causal(Lc);
  BwdIO<T> io;
  io.init(sh, li);
  const BlockIn<T>& in = io.in;
  Cx<V>* ID = s.ID.p;
  inv_d_chains<T, 1>(&in, Lc, pr.zi, &dprev, &ID);
  alignas(128) V tK[kTile + 1];
  alignas(128) V tM[kTile];
  alignas(128) V tGM[kTile];
  alignas(128) Cx<V> tW[kTile], tWm[kTile];
  Cx<V> S{V{}, V{}}, Pi{V{} + 1, V{}};
  for (int64_t p0 = 0; p0 < Lc; p0 += kTile) {
    const int64_t n = std::min(kTile, Lc - p0);
    in.k_tile(p0, n, tK);
    io.w_tiles(p0, n, tW, tWm, tM);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t p = p0 + q;
      Cx<V> y = s.ID[p];
      Cx<V> y2 = y * y;
      if (io.has_gm) tGM[q] = re_prod(y, tW[q]);  // Re(conj(y) g) = Re(y conj(g))
      Cx<V> qq = tWm[q] * y2;
      qq = Cx<V>{-qq.re, -qq.im};
      Cx<V> c = bk::scale(y2, tK[q + 1]);
      s.P[p] = qq;
      s.R[p] = c;
      if (chunked) {
        S = S + Pi * qq;
        Pi = Pi * c;
      }
    }
    if (io.has_gm) scatter_tile<T>(io.ogm, p0, n, reinterpret_cast<T*>(tGM), NL);
  }
  if (chunked)
    for (int l = 0; l < NL; ++l)
      if (li[l].row >= 0) {
        sh.r_start[summary_lane + l] = lane_cx<T>(S, l);
        sh.r_prod[summary_lane + l] = lane_cx<T>(Pi, l);
      }
}

// Phase 2 over a chunk of length Lc: mu enters as its value after the chunk and leaves as its
// value at the chunk's first position.
template <class T>
static void causal_bwd_phase2(BwdShared<T>& sh, const LaneInfo* li, int64_t Lc, Scratch<T>& s,
                              Cx<typename VecOf<T>::type>& mu, double* zacc) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  BwdIO<T> io;
  io.init(sh, li);
  alignas(128) V tGA[kTile];
  alignas(128) V tGK[kTile];
  for (int64_t p0 = ((Lc - 1) / kTile) * kTile; p0 >= 0; p0 -= kTile) {
    const int64_t n = std::min(kTile, Lc - p0);
    Cx<V> tile{V{}, V{}};
    for (int64_t q = n - 1; q >= 0; --q) {
      const int64_t p = p0 + q;
      tGK[q] = -re_prod(mu, s.ID[p]);
      mu = s.R[p] * mu + s.P[p];
      tGA[q] = mu.re;
      tile = tile + mu;
    }
    flush_zsum<T>(tile, zacc);
    scatter_tile<T>(io.oga, p0, n, reinterpret_cast<T*>(tGA), NL);
    if (io.has_gk) scatter_tile<T>(io.ogk, p0, n, reinterpret_cast<T*>(tGK), NL);
  }
}

// Causal backward of one block of a parallel plan: phase 1 (summaries when chunked) and, given
// keep, phase 2 later; without keep, both at once with the thread's scratch.
template <class T>
static void causal_bwd_block(BwdShared<T>& sh, int64_t blk, int phase, Scratch<T>& s) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Plan<T>& pl = sh.pl;
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  if (phase & 1) {
    Cx<V> dprev = load_carry(sh.car.d_in, blk, li);
    causal_bwd_phase1(sh, li, pl.Lc, dprev, s, pl.chunked() ? blk * NL : -1);
  }
  if (phase & 2) {
    Cx<V> mu{V{}, V{}};
    if (pl.chunked()) mu = load_carry(sh.r_in, blk, li);
    double zacc[2 * NL];
    std::memset(zacc, 0, sizeof(zacc));
    causal_bwd_phase2(sh, li, pl.Lc, s, mu, zacc);
    store_zsum<T>(sh, blk, li, zacc);
  }
}

// Causal backward from the forward's output y = 1 / d (no mask; Grads::out): the pivots are read,
// not recomputed, so the whole gradient is the one right-to-left recurrence
//   mu_j = y_j^2 (k_j mu_{j+1} - w_j),  grad a_j = Re mu_j,  grad k_j = -Re(mu_{j+1} y_j)
// over each lane's chunk in a single pass with nothing stored. summary: the chunk's (local value,
// product) summary of mu for the carries' scan (parallel chunks), no outputs.
template <class T>
static void causal_bwd_saved_block(BwdShared<T>& sh, int64_t blk, bool summary) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Problem<T>& pr = sh.pr;
  const Plan<T>& pl = sh.pl;
  const int64_t Lc = pl.Lc;
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  BwdIO<T> io;
  io.init(sh, li);
  LaneSrc<T> Yre, Yim;
  Yre.init(li, sh.g.out, 2 * pr.N, pr.N, 2, 0, T(0), T(1), T(0));
  Yim.init(li, sh.g.out + 1, 2 * pr.N, pr.N, 2, 0, T(0), T(1), T(0));
  alignas(128) V tK[kTile + 1], tGA[kTile], tGK[kTile];
  alignas(128) Cx<V> tY[kTile], tW[kTile];
  Cx<V> mu{V{}, V{}}, prod{V{} + 1, V{}}, zs{V{}, V{}};
  if (!summary && pl.chunked()) mu = load_carry(sh.r_in, blk, li);
  double zacc[2 * NL];
  std::memset(zacc, 0, sizeof(zacc));
  for (int64_t p0 = ((Lc - 1) / kTile) * kTile; p0 >= 0; p0 -= kTile) {
    const int64_t n = std::min(kTile, Lc - p0);
    io.Wre.prefetch(p0 - kTile);
    Yre.prefetch(p0 - kTile);
    io.in.k_tile(p0, n, tK);
    w_tile<T>(io.Wre, io.Wim, p0, n, tW);
    w_tile<T>(Yre, Yim, p0, n, tY);
    for (int64_t q = n - 1; q >= 0; --q) {
      const Cx<V> y = tY[q];
      const Cx<V> y2 = y * y;
      const V k = tK[q + 1];
      if (summary) {
        prod = bk::scale(y2, k) * prod;
      } else if (io.has_gk) {
        tGK[q] = -re_prod(mu, y);
      }
      mu = y2 * Cx<V>{k * mu.re - tW[q].re, k * mu.im - tW[q].im};
      if (!summary) {
        tGA[q] = mu.re;
        zs = zs + mu;
      }
    }
    if (!summary) {
      flush_zsum<T>(zs, zacc);
      scatter_tile<T>(io.oga, p0, n, reinterpret_cast<T*>(tGA), NL, io.stream);
      if (io.has_gk) scatter_tile<T>(io.ogk, p0, n, reinterpret_cast<T*>(tGK), NL);
    }
  }
#ifdef BK_AVX512_TRANSPOSE
  if (!summary && io.stream) _mm_sfence();
#endif
  if (summary) {
    for (int l = 0; l < NL; ++l)
      if (li[l].row >= 0) {
        sh.r_start[blk * NL + l] = lane_cx<T>(mu, l);
        sh.r_prod[blk * NL + l] = lane_cx<T>(prod, l);
      }
  } else {
    store_zsum<T>(sh, blk, li, zacc);
  }
}

// Causal backward from the saved output: whole sequences per lane (no sub-chunks: nothing is
// stored), or parallel chunks joined by the scan of their mu summaries.
template <class T>
static void backward_causal_saved(BwdShared<T>& sh, const Par& par) {
  const Plan<T>& pl = sh.pl;
  if (pl.chunked()) {
    const int64_t nl = pl.blocks * Plan<T>::NL;
    Cx<T> zero{T(0), T(0)};
    sh.r_start.assign(nl, zero);
    sh.r_prod.assign(nl, zero);
    sh.r_in.assign(nl, zero);
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { causal_bwd_saved_block(sh, blk, true); });
    for (int64_t b = 0; b < pl.B; ++b)
      for (int64_t ch = pl.C - 2; ch >= 0; --ch) {  // mu at the next chunk's start
        const int64_t v = pl.lane(b, ch), vn = pl.lane(b, ch + 1);
        sh.r_in[v] = sh.r_start[vn] + sh.r_prod[vn] * sh.r_in[vn];
      }
  }
  parallel_blocks(par, pl.blocks, [&](int64_t blk) { causal_bwd_saved_block(sh, blk, false); });
}

// Causal backward of one block of a sequential plan: phase 1 over the sub-chunks in order (d
// carried), then phase 2 over them in reverse (mu carried), each sub-chunk's scratch kept
// between the two (the worker thread's own, reused across blocks and calls).
template <class T>
static void causal_bwd_seq(BwdShared<T>& sh, int64_t blk) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Plan<T>& pl = sh.pl;
  static thread_local std::vector<Scratch<T>> keep;
  if (int64_t(keep.size()) < pl.S) keep.resize(pl.S);
  LaneInfo li[NL], ls[NL];
  lane_info(pl, blk, li);
  Cx<V> dprev{V{} + 1, V{}};
  for (int64_t c = 0; c < pl.S; ++c) {
    const int64_t len = sub_chunk(pl, li, c, ls);
    causal_bwd_phase1(sh, ls, len, dprev, keep[c], -1);
  }
  Cx<V> mu{V{}, V{}};
  double zacc[2 * NL];
  std::memset(zacc, 0, sizeof(zacc));
  for (int64_t c = pl.S - 1; c >= 0; --c) {
    const int64_t len = sub_chunk(pl, li, c, ls);
    causal_bwd_phase2(sh, ls, len, keep[c], mu, zacc);
  }
  store_zsum<T>(sh, blk, li, zacc);
}

// Backward of a sequential plan: each block runs its sub-chunks in order (see bwd_two_sided_seq,
// causal_bwd_seq); no carries phase.
template <class T>
static void backward_sequential(BwdShared<T>& sh, const Par& par) {
  const Plan<T>& pl = sh.pl;
  if (sh.pr.causal) {
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { causal_bwd_seq(sh, blk); });
    return;
  }
  parallel_block_groups(par, pl, [&](int64_t blk0, int64_t nb) {
    if (nb == 2)
      bwd_two_sided_seq<T, 2>(sh, blk0);
    else
      bwd_two_sided_seq<T, 1>(sh, blk0);
  });
}

// Backward of a parallel plan: the pivot carries and, when chunked, the accumulators' summaries and
// their scan, then the blocks.
template <class T>
static void backward_parallel(BwdShared<T>& sh, const Par& par) {
  const Problem<T>& pr = sh.pr;
  const Plan<T>& pl = sh.pl;
  compute_carries(pr, pl, par, !pr.causal, sh.car);
  const int64_t nl = pl.blocks * Plan<T>::NL;
  const bool chunked = pl.chunked();
  if (chunked) {
    Cx<T> zero{T(0), T(0)};
    sh.r_start.assign(nl, zero);
    sh.r_prod.assign(nl, zero);
    sh.r_in.assign(nl, zero);
    if (!pr.causal) {
      sh.l_end.assign(nl, zero);
      sh.l_prod.assign(nl, zero);
      sh.l_in.assign(nl, zero);
      sh.gk_left.assign(nl, T(0));
      sh.gk_right.assign(nl, T(0));
    }
  }
  if (!pr.causal) {
    if (chunked) {
      parallel_blocks(par, pl.blocks, [&](int64_t blk) { bwd_summary_block(sh, blk); });
      for (int64_t b = 0; b < pl.B; ++b) {
        for (int64_t ch = 1; ch < pl.C; ++ch) {  // U at the position before the chunk
          const int64_t v = pl.lane(b, ch), vp = pl.lane(b, ch - 1);
          sh.r_in[v] = sh.r_start[vp] + sh.r_prod[vp] * sh.r_in[vp];
        }
        for (int64_t ch = pl.C - 2; ch >= 0; --ch) {  // Rt at the position after the chunk
          const int64_t v = pl.lane(b, ch), vn = pl.lane(b, ch + 1);
          sh.l_in[v] = sh.l_end[vn] + sh.l_prod[vn] * sh.l_in[vn];
        }
      }
    }
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { bwd_two_sided_block(sh, blk); });
    if (chunked && pr.N > 1 && sh.g.grad_k)
      for (int64_t b = 0; b < pl.B; ++b)
        for (int64_t ch = 0; ch + 1 < pl.C; ++ch)
          sh.g.grad_k[b * (pr.N - 1) + (ch + 1) * pl.Lc - 1] =
              sh.gk_left[pl.lane(b, ch)] + sh.gk_right[pl.lane(b, ch + 1)];
  } else if (!chunked) {
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { causal_bwd_block(sh, blk, 3, thread_scratch<T>()); });
  } else {
    // Per-block scratch lives across the two phases; it is cached per calling thread so repeated
    // calls do not pay fresh page faults.
    // (A thread_local named inside the worker lambda would be the *worker's* own, empty vector:
    // bind the calling thread's vector to a reference the lambdas capture.)
    static thread_local std::vector<Scratch<T>> keep_tls;
    std::vector<Scratch<T>>& keep = keep_tls;
    if (int64_t(keep.size()) < pl.blocks) keep.resize(pl.blocks);
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { causal_bwd_block(sh, blk, 1, keep[blk]); });
    for (int64_t b = 0; b < pl.B; ++b) {
      for (int64_t ch = pl.C - 2; ch >= 0; --ch) {  // carry from the right: value at the next chunk's start
        const int64_t v = pl.lane(b, ch), vn = pl.lane(b, ch + 1);
        sh.r_in[v] = sh.r_start[vn] + sh.r_prod[vn] * sh.r_in[vn];
      }
    }
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { causal_bwd_block(sh, blk, 2, keep[blk]); });
  }
}

template <class T>
static void backward_impl(const Problem<T>& pr, Grads<T>& g, const Par& par) {
  g.grad_z[0] = g.grad_z[1] = 0.0;
  if (pr.B == 0) return;
  // causal from the saved output: one pass that keeps nothing per position, so no chunk limit
  const bool saved = pr.causal && g.out != nullptr && pr.mask == nullptr;
  Plan<T> pl(pr.B, pr.N, par.num_threads, saved ? pr.N : kMaxChunkBwd);
  pl.skew_lanes();
  BwdShared<T> sh{pr, pl, g, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const int64_t nl = pl.blocks * Plan<T>::NL;
  sh.zsum.assign(2 * nl, 0.0);
  if (saved)
    backward_causal_saved(sh, par);
  else if (pl.S > 1)
    backward_sequential(sh, par);
  else
    backward_parallel(sh, par);
  double zr = 0, zi = 0;
  for (int64_t v = 0; v < nl; ++v) {
    zr += sh.zsum[2 * v];
    zi += sh.zsum[2 * v + 1];
  }
  // two-sided: grad_z = conj(sum A); causal: grad_z = -conj(sum mu)
  if (pr.causal) {
    g.grad_z[0] = -zr;
    g.grad_z[1] = zi;
  } else {
    g.grad_z[0] = zr;
    g.grad_z[1] = -zi;
  }
}

}  // namespace

void forward(const Problem<float>& p, float* out, const Par& par) { forward_impl(p, out, par); }
void forward(const Problem<double>& p, double* out, const Par& par) { forward_impl(p, out, par); }
void backward(const Problem<float>& p, Grads<float>& g, const Par& par) { backward_impl(p, g, par); }
void backward(const Problem<double>& p, Grads<double>& g, const Par& par) { backward_impl(p, g, par); }

}  // namespace BK_ISA_NS
}  // namespace bk_cpu
