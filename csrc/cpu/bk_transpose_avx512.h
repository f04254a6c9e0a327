// AVX-512 tile transposes between the public row layout ([B, N] rows, complex interleaved
// [B, N, 2]) and the kernel's lane-major tiles. Only included by the AVX-512 build of the CPU
// kernels (under its target pragma). A group is 16 float lanes or 8 double lanes; a tile covers
// 16 positions, so float moves one 16x16 block and double two 8x8 blocks per group.
#pragma once
#include <immintrin.h>

#include <cstdint>

#define BK_TR_INLINE static inline __attribute__((always_inline))

namespace bk_avx512 {

// Row addresses of a group: either an array of pointers, or per-row base addresses plus one byte
// offset shared by the group (precomputed once per block, so a tile costs one add per row).
template <class T>
struct Rows {
  const uintptr_t* base;
  intptr_t off;
  inline __attribute__((always_inline)) T* operator[](int i) const { return reinterpret_cast<T*>(base[i] + off); }
};

// Masked forms (m != nullptr): bit q of m[i] says whether position q of row i is inside its row.
// Loads read only those elements (the others are neither touched nor able to fault) and give
// `pad` elsewhere; stores write only those. They serve the tiles where a group's lanes run past
// their row's ends (chunk edges, skewed lanes), which would otherwise go element by element.

// the 8 mask bits of 4 complex doubles (two 64-bit elements each) from 4 position bits
BK_TR_INLINE __mmask8 pairs(uint32_t b4) {
  uint32_t r = 0;
  for (int j = 0; j < 4; ++j) r |= ((b4 >> j) & 1u) * (3u << (2 * j));
  return __mmask8(r);
}

// out[j] = column j of the 16x16 matrix whose rows are r[0..15]
BK_TR_INLINE void tr16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 x[16];
  for (int g = 0; g < 4; ++g) {
    __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    x[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    x[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    x[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    x[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // x[4g + j], 128-bit lane k: column 4k + j of rows 4g..4g+3
  for (int j = 0; j < 4; ++j) {
    __m512 p01l = _mm512_shuffle_f32x4(x[j], x[4 + j], 0x44), p01h = _mm512_shuffle_f32x4(x[j], x[4 + j], 0xEE);
    __m512 p23l = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0x44), p23h = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(p01l, p23l, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(p01l, p23l, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(p01h, p23h, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(p01h, p23h, 0xDD);
  }
}

// out[j] = column j of the 8x8 matrix whose rows are r[0..7]
BK_TR_INLINE void tr8(__m512d* r) {
  __m512d x[8];
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
    x[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
  }
  // x[2g + j], 128-bit lane k: column 2k + j of rows 2g, 2g+1
  for (int j = 0; j < 2; ++j) {
    __m512d p01l = _mm512_shuffle_f64x2(x[j], x[2 + j], 0x44), p01h = _mm512_shuffle_f64x2(x[j], x[2 + j], 0xEE);
    __m512d p23l = _mm512_shuffle_f64x2(x[4 + j], x[6 + j], 0x44), p23h = _mm512_shuffle_f64x2(x[4 + j], x[6 + j], 0xEE);
    r[j] = _mm512_shuffle_f64x2(p01l, p23l, 0x88);
    r[2 + j] = _mm512_shuffle_f64x2(p01l, p23l, 0xDD);
    r[4 + j] = _mm512_shuffle_f64x2(p01h, p23h, 0x88);
    r[6 + j] = _mm512_shuffle_f64x2(p01h, p23h, 0xDD);
  }
}

// ---- rows -> lane-major: src[i] points at 16 consecutive positions of lane i's row ----

template <class P>
BK_TR_INLINE void gather16(const P& src, float sub, float mul, float* dst, int64_t dstride,
                           const uint32_t* m = nullptr, float pad = 0.0f) {
  __m512 r[16];
  const __m512 vs = _mm512_set1_ps(sub), vm = _mm512_set1_ps(mul);
  if (m) {
    const __m512 vp = _mm512_set1_ps(pad);
    for (int i = 0; i < 16; ++i) {
      const __mmask16 k = __mmask16(m[i]);
      r[i] = _mm512_mask_blend_ps(k, vp, _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, src[i]), vs), vm));
    }
  } else {
    for (int i = 0; i < 16; ++i) r[i] = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(src[i]), vs), vm);
  }
  tr16(r);
  for (int q = 0; q < 16; ++q) _mm512_store_ps(dst + q * dstride, r[q]);
}

template <class P>
BK_TR_INLINE void gather16(const P& src, double sub, double mul, double* dst, int64_t dstride,
                           const uint32_t* m = nullptr, double pad = 0.0) {
  const __m512d vs = _mm512_set1_pd(sub), vm = _mm512_set1_pd(mul), vp = _mm512_set1_pd(pad);
  for (int h = 0; h < 2; ++h) {
    __m512d r[8];
    for (int i = 0; i < 8; ++i) {
      if (m) {
        const __mmask8 k = __mmask8(m[i] >> (8 * h));
        r[i] = _mm512_mask_blend_pd(
            k, vp, _mm512_mul_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(k, src[i] + 8 * h), vs), vm));
      } else {
        r[i] = _mm512_mul_pd(_mm512_sub_pd(_mm512_loadu_pd(src[i] + 8 * h), vs), vm);
      }
    }
    tr8(r);
    for (int q = 0; q < 8; ++q) _mm512_store_pd(dst + (8 * h + q) * dstride, r[q]);
  }
}

// interleaved complex rows (src[i] -> 16 complex values): re -> dre, mul_im * im -> dim.
// A complex value is one 64-bit element: two 8x8 64-bit transposes per half tile, then one
// de-interleave per position (fewer live registers than transposing re and im separately).
// (masked: the positions outside a row give 0)
template <class P>
BK_TR_INLINE void gather16_cx(const P& src, float mul_im, float* dre, float* dim, int64_t dstride,
                              const uint32_t* m = nullptr) {
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 vm = _mm512_set1_ps(mul_im);
  for (int pb = 0; pb < 16; pb += 8) {
    __m512d lo[8], hi[8];  // lanes 0-7 / 8-15, positions pb..pb+7
    for (int i = 0; i < 8; ++i) {
      if (m) {
        lo[i] = _mm512_maskz_loadu_pd(__mmask8(m[i] >> pb), reinterpret_cast<const double*>(src[i] + 2 * pb));
        hi[i] = _mm512_maskz_loadu_pd(__mmask8(m[8 + i] >> pb), reinterpret_cast<const double*>(src[8 + i] + 2 * pb));
      } else {
        lo[i] = _mm512_loadu_pd(reinterpret_cast<const double*>(src[i] + 2 * pb));
        hi[i] = _mm512_loadu_pd(reinterpret_cast<const double*>(src[8 + i] + 2 * pb));
      }
    }
    tr8(lo);
    tr8(hi);
    for (int q = 0; q < 8; ++q) {
      __m512 a = _mm512_castpd_ps(lo[q]), b = _mm512_castpd_ps(hi[q]);
      _mm512_store_ps(dre + (pb + q) * dstride, _mm512_permutex2var_ps(a, ie, b));
      _mm512_store_ps(dim + (pb + q) * dstride, _mm512_mul_ps(_mm512_permutex2var_ps(a, io, b), vm));
    }
  }
}

template <class P>
BK_TR_INLINE void gather16_cx(const P& src, double mul_im, double* dre, double* dim, int64_t dstride,
                              const uint32_t* m = nullptr) {
  const __m512i ie = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i io = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  const __m512d vm = _mm512_set1_pd(mul_im);
  for (int h = 0; h < 2; ++h) {
    __m512d re[8], im[8];
    for (int i = 0; i < 8; ++i) {
      __m512d a, b;
      if (m) {
        a = _mm512_maskz_loadu_pd(pairs(m[i] >> (8 * h)), src[i] + 16 * h);
        b = _mm512_maskz_loadu_pd(pairs(m[i] >> (8 * h + 4)), src[i] + 16 * h + 8);
      } else {
        a = _mm512_loadu_pd(src[i] + 16 * h);
        b = _mm512_loadu_pd(src[i] + 16 * h + 8);
      }
      re[i] = _mm512_permutex2var_pd(a, ie, b);
      im[i] = _mm512_mul_pd(_mm512_permutex2var_pd(a, io, b), vm);
    }
    tr8(re);
    tr8(im);
    for (int q = 0; q < 8; ++q) {
      _mm512_store_pd(dre + (8 * h + q) * dstride, re[q]);
      _mm512_store_pd(dim + (8 * h + q) * dstride, im[q]);
    }
  }
}

// ---- lane-major -> rows: dst[i] points at 16 consecutive positions of lane i's row ----

// stream: non-temporal stores (every dst[i] 64-byte aligned), as in scatter16_cx below
template <class P>
BK_TR_INLINE void scatter16(const float* src, int64_t sstride, const P& dst, bool stream = false,
                            const uint32_t* m = nullptr) {
  __m512 r[16];
  for (int q = 0; q < 16; ++q) r[q] = _mm512_load_ps(src + q * sstride);
  tr16(r);
  if (m) {
    for (int i = 0; i < 16; ++i) _mm512_mask_storeu_ps(dst[i], __mmask16(m[i]), r[i]);
  } else if (stream) {
    for (int i = 0; i < 16; ++i) _mm512_stream_ps(dst[i], r[i]);
  } else {
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst[i], r[i]);
  }
}

template <class P>
BK_TR_INLINE void scatter16(const double* src, int64_t sstride, const P& dst, bool stream = false,
                            const uint32_t* m = nullptr) {
  for (int h = 0; h < 2; ++h) {
    __m512d r[8];
    for (int q = 0; q < 8; ++q) r[q] = _mm512_load_pd(src + (8 * h + q) * sstride);
    tr8(r);
    if (m) {
      for (int i = 0; i < 8; ++i) _mm512_mask_storeu_pd(dst[i] + 8 * h, __mmask8(m[i] >> (8 * h)), r[i]);
    } else if (stream) {
      for (int i = 0; i < 8; ++i) _mm512_stream_pd(dst[i] + 8 * h, r[i]);
    } else {
      for (int i = 0; i < 8; ++i) _mm512_storeu_pd(dst[i] + 8 * h, r[i]);
    }
  }
}

// lane-major (re, im) tiles -> interleaved complex rows
// stream: non-temporal stores (every dst[i] 64-byte aligned): a large output written once skips
// the read-for-ownership of each line and does not evict the kernel's working set.
template <class P>
BK_TR_INLINE void scatter16_cx(const float* sre, const float* sim, int64_t sstride, const P& dst, bool stream,
                               const uint32_t* m = nullptr) {
  const __m512i lo_i = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_i = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int pb = 0; pb < 16; pb += 8) {
    __m512d lo[8], hi[8];  // position pb + q: complex of lanes 0-7 / 8-15 (64-bit elements)
    for (int q = 0; q < 8; ++q) {
      __m512 re = _mm512_load_ps(sre + (pb + q) * sstride), im = _mm512_load_ps(sim + (pb + q) * sstride);
      lo[q] = _mm512_castps_pd(_mm512_permutex2var_ps(re, lo_i, im));
      hi[q] = _mm512_castps_pd(_mm512_permutex2var_ps(re, hi_i, im));
    }
    tr8(lo);
    tr8(hi);
    if (m) {
      for (int i = 0; i < 8; ++i) {
        _mm512_mask_storeu_pd(reinterpret_cast<double*>(dst[i] + 2 * pb), __mmask8(m[i] >> pb), lo[i]);
        _mm512_mask_storeu_pd(reinterpret_cast<double*>(dst[8 + i] + 2 * pb), __mmask8(m[8 + i] >> pb), hi[i]);
      }
    } else if (stream) {
      for (int i = 0; i < 8; ++i) {
        _mm512_stream_pd(reinterpret_cast<double*>(dst[i] + 2 * pb), lo[i]);
        _mm512_stream_pd(reinterpret_cast<double*>(dst[8 + i] + 2 * pb), hi[i]);
      }
    } else {
      for (int i = 0; i < 8; ++i) {
      _mm512_storeu_pd(reinterpret_cast<double*>(dst[i] + 2 * pb), lo[i]);
        _mm512_storeu_pd(reinterpret_cast<double*>(dst[8 + i] + 2 * pb), hi[i]);
      }
    }
  }
}

template <class P>
BK_TR_INLINE void scatter16_cx(const double* sre, const double* sim, int64_t sstride, const P& dst, bool stream,
                               const uint32_t* m = nullptr) {
  const __m512i lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int h = 0; h < 2; ++h) {
    __m512d re[8], im[8];
    for (int q = 0; q < 8; ++q) {
      re[q] = _mm512_load_pd(sre + (8 * h + q) * sstride);
      im[q] = _mm512_load_pd(sim + (8 * h + q) * sstride);
    }
    tr8(re);
    tr8(im);
    for (int i = 0; i < 8; ++i) {
      __m512d x = _mm512_permutex2var_pd(re[i], lo, im[i]), y = _mm512_permutex2var_pd(re[i], hi, im[i]);
      if (m) {
        _mm512_mask_storeu_pd(dst[i] + 16 * h, pairs(m[i] >> (8 * h)), x);
        _mm512_mask_storeu_pd(dst[i] + 16 * h + 8, pairs(m[i] >> (8 * h + 4)), y);
      } else if (stream) {
        _mm512_stream_pd(dst[i] + 16 * h, x);
        _mm512_stream_pd(dst[i] + 16 * h + 8, y);
      } else {
        _mm512_storeu_pd(dst[i] + 16 * h, x);
        _mm512_storeu_pd(dst[i] + 16 * h + 8, y);
      }
    }
  }
}

}  // namespace bk_avx512
