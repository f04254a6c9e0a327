// Tile I/O between the public row-major [B, N] tensors and a block's lane-major scratch: strided
// sources seen through the lanes (LaneSrc: loads, gathers, the AVX-512 transposes), destinations
// (LaneOut: scatters, non-temporal stores), a block's inputs (BlockIn: alpha, couplings, mask) and
// the complex and upstream-gradient tiles. Part of bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

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
#ifdef BK_ISA_AVX512
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
#ifdef BK_ISA_AVX512
  // The group's row addresses at chunk position p0 (for the transposes).
  BK_AI bk_avx512::Rows<const T> group_rows(int g0, int64_t p0) const {
    return {at0 + g0, intptr_t(p0 * es * int64_t(sizeof(T)))};
  }
#endif

  // dst[q * dstride + l] = value of lane l at chunk position p0 + q, q < n
  BK_AI void tile(int64_t p0, int64_t n, T* dst, int64_t dstride) const {
    constexpr int NL = Plan<T>::NL;
#ifdef BK_ISA_AVX512
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
#ifdef BK_ISA_AVX512
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
#ifdef BK_ISA_AVX512
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
  // a carried state's coupling into position 0 of the lanes that start their row (Problem::k_in)
  bool kin_any = false;
  bool kin_on[NL];
  T kin_v[NL];

  void init(const Problem<T>& pr, const LaneInfo* li) {
    N = pr.N;
    kin_any = false;
    for (int l = 0; l < NL; ++l) {
      kin_on[l] = pr.k_in != nullptr && li[l].row >= 0 && li[l].start == 0;
      kin_v[l] = kin_on[l] ? pr.k_in[li[l].row] : T(0);
      kin_any = kin_any || kin_on[l];
    }
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
    k_tile_rows(p0, n, tK);
    if (kin_any && p0 == 0) {  // the coupling from the carried state's position into position 0
      T* dst = reinterpret_cast<T*>(tK);
      for (int l = 0; l < NL; ++l)
        if (kin_on[l]) dst[l] = kin_v[l];
    }
  }
  BK_AI void k_tile_rows(int64_t p0, int64_t n, V* tK) const {
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

// Writes a lane-major complex tile to the interleaved [B, N, 2] output (o: es = 2).
template <class T>
static BK_AI void scatter_cx_tile(const LaneOut<T>& o, int64_t p0, int64_t n, const Cx<typename VecOf<T>::type>* src,
                                  bool stream = false) {
  constexpr int NL = Plan<T>::NL;
  const T* s = reinterpret_cast<const T*>(src);
#ifdef BK_ISA_AVX512
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

// conj(upstream gradient) of the block for positions [p0, p0 + n)
template <class T>
static BK_AI void w_tile(const LaneSrc<T>& Wre, const LaneSrc<T>& Wim, int64_t p0, int64_t n,
                          Cx<typename VecOf<T>::type>* tW) {
  constexpr int NL = Plan<T>::NL;
  T* dre = reinterpret_cast<T*>(tW);
  T* dim = dre + NL;
#ifdef BK_ISA_AVX512
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

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
