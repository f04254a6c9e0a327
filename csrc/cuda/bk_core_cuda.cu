// BK-Core CUDA kernels: forward and exact backward, two-sided and causal, optional mask.
// No torch headers here (see bk_core_cuda.h); the arithmetic is csrc/bk_math.h, shared with the
// CPU kernels, so the CPU tests exercise the same formulas.
//
// Layout. One thread per lane (sequence, chunk), NT lanes per block. The public (B, N) rows are
// read and written through shared-memory tiles of TP positions x NT lanes: the block loads a tile
// cooperatively (consecutive threads read consecutive positions of one row, 64-byte runs), then
// every thread walks its own column. Per-position scratch (pivots, gradient terms) is lane-major,
// scratch[p * lanes + v], so a warp's accesses are contiguous.
//
// Chunked strategy. Phase 0 (mobius_kernel) composes each chunk's pivot steps into 2x2 transfer
// matrices (forward and, by right multiplication in the same pass, backward); pivot_carry_kernel
// walks the chunks of each sequence and gives every chunk the pivots just outside it. The backward
// pass adds (product, local sum) summaries of its linear recurrences and grad_carry_kernel joins
// them. With one chunk per sequence these phases are skipped.
//
// grad_z: every lane writes its partial sum (in double) and zsum_kernel adds them in a fixed
// order, so the result is deterministic.
#include "bk_core_cuda.h"

#include <algorithm>
#include <type_traits>

#include "../bk_math.h"

namespace bk_cuda {
namespace {

using bk::Cx;
using bk::Mobius;

constexpr int NT = 64;      // lanes (threads) per block
constexpr int RS = NT + 1;  // shared tile row stride: conflict-free column and row accesses
constexpr int kCarryThreads = 128;
constexpr int kSumThreads = 256;
constexpr int64_t kMinChunk = 64;        // shortest chunk the automatic strategy uses
constexpr int64_t kMinChunkForced = 4;   // shortest chunk when "chunked" is forced (tests)
constexpr int64_t kLanesPerSm = 1024;    // lanes the automatic strategy aims for per SM

template <class T>
struct Cfg {
  static constexpr int TP = 64 / int(sizeof(T));  // positions per tile: 64-byte runs
};

// Per-block lane geometry, in shared memory (used by the cooperative tile loads and stores).
struct Lanes {
  int64_t base[NT];    // row * N + start: first position of the lane's chunk in (B, N) arrays
  int64_t len[NT];     // real positions in the chunk (0 for an inactive lane)
  int64_t kbase[NT];   // row * k_row_stride + start
  int64_t gkbase[NT];  // row * (N - 1) + start (grad_k rows)
  int64_t klen[NT];    // k entries in the chunk: min(len, N - 1 - start)
};

struct Geo {
  int64_t v, row, start, len;
  bool act;  // a real lane (the last block may have idle threads; they still join the tile work)
};

template <class T>
__device__ __forceinline__ Geo setup_lanes(const Problem<T>& pr, const Plan& pl, Lanes& L) {
  Geo g;
  g.v = int64_t(blockIdx.x) * NT + threadIdx.x;
  g.act = g.v < pl.lanes;
  g.row = g.act ? g.v / pl.C : 0;
  const int64_t ch = g.act ? g.v - g.row * pl.C : 0;
  g.start = ch * pl.Lc;
  g.len = g.act ? (pl.Lc < pr.N - g.start ? pl.Lc : pr.N - g.start) : 0;
  int64_t kl = pr.N - 1 - g.start;
  kl = kl < g.len ? kl : g.len;
  L.base[threadIdx.x] = g.row * pr.N + g.start;
  L.len[threadIdx.x] = g.len;
  L.kbase[threadIdx.x] = g.row * pr.k_row_stride + g.start;
  L.gkbase[threadIdx.x] = g.row * (pr.N - 1) + g.start;
  L.klen[threadIdx.x] = (g.act && kl > 0) ? kl : 0;
  __syncthreads();
  return g;
}

// k coupling the chunk to the position just left of it (0 for the first chunk).
template <class T>
__device__ __forceinline__ T k_into_chunk(const Problem<T>& pr, const Geo& g) {
  return (g.act && g.start > 0) ? pr.k[g.row * pr.k_row_stride + g.start - 1] : T(0);
}

// Cooperative load of W values per position for positions [p0, p0 + TP) of every lane of the
// block: tile[(r * W + c) * RS + lane] = src[(base + p0 + r) * W + c] - sub, or pad past the lane's
// length.
template <class T, int W, class P>
__device__ __forceinline__ void tile_load(T* tile, P src, const int64_t* base, const int64_t* len,
                                          int64_t p0, T sub, T pad) {
  constexpr int E = Cfg<T>::TP * W;
  for (int i = threadIdx.x; i < E * NT; i += NT) {
    const int l = i / E, r = i - l * E;
    const int64_t q = p0 * W + r;
    T x = pad;
    if (q < len[l] * W) x = src[base[l] * W + q] - sub;
    tile[r * RS + l] = x;
  }
}

template <class T, int W, class P>
__device__ __forceinline__ void tile_store(const T* tile, P dst, const int64_t* base, const int64_t* len,
                                           int64_t p0) {
  constexpr int E = Cfg<T>::TP * W;
  for (int i = threadIdx.x; i < E * NT; i += NT) {
    const int l = i / E, r = i - l * E;
    const int64_t q = p0 * W + r;
    if (q < len[l] * W) dst[base[l] * W + q] = tile[r * RS + l];
  }
}

template <class T>
__device__ __forceinline__ int tile_count(int64_t Lc, int64_t p0) {
  const int64_t left = Lc - p0;
  return left < Cfg<T>::TP ? int(left) : Cfg<T>::TP;
}

template <class T>
__device__ __forceinline__ T max_abs(const Mobius<T>& m) {
  T a = fmax(fmax(fabs(m.x0.re), fabs(m.x0.im)), fmax(fabs(m.y0.re), fabs(m.y0.im)));
  T b = fmax(fmax(fabs(m.x1.re), fabs(m.x1.im)), fmax(fabs(m.y1.re), fabs(m.y1.im)));
  return fmax(a, b);
}

// Device workspace, carved from one buffer in a fixed order (the same for the size query).
template <class T>
struct Ws {
  gptr<Cx<T>> S0;  // forward: d; backward: d, then 1/d
  gptr<Cx<T>> IE;  // backward two-sided: 1/e, (Lc + 1) rows
  gptr<Cx<T>> P;   // backward: w G^2 (two-sided) or -w / d^2 (causal)
  gptr<Cx<T>> R;   // backward two-sided: R with zero carry
  gptr<Cx<T>> TS;  // backward two-sided chunked: suffix products of the R coefficients
  gptr<Mobius<T>> mf, mb;
  gptr<Cx<T>> din, ein;                 // pivot carries
  gptr<Cx<T>> r_start, r_prod, r_in;    // R / mu summaries and carries
  gptr<Cx<T>> l_end, l_prod, l_in;      // L summaries and carries
  gptr<double> zpart;                       // per-lane partial sums of A (two-sided) or mu (causal)
};

struct Carver {
  char* base;
  size_t off = 0;
  template <class X>
  gptr<X> take(int64_t n) {
    off = (off + 255) / 256 * 256;
    X* p = base ? reinterpret_cast<X*>(base + off) : nullptr;
    off += size_t(n) * sizeof(X);
    return p;
  }
};

template <class T>
Ws<T> carve(const Plan& pl, bool causal, bool backward, void* base, size_t* bytes) {
  Ws<T> w{};
  Carver c{static_cast<char*>(base)};
  const int64_t cells = pl.Lc * pl.lanes;
  const bool ch = pl.chunked();
  if (!backward) {
    if (!causal) w.S0 = c.take<Cx<T>>(cells);
  } else {
    w.S0 = c.take<Cx<T>>(cells);
    w.P = c.take<Cx<T>>(cells);
    if (!causal) {
      w.IE = c.take<Cx<T>>(cells + pl.lanes);
      w.R = c.take<Cx<T>>(cells);
      if (ch) w.TS = c.take<Cx<T>>(cells);
    }
    w.zpart = c.take<double>(2 * pl.lanes);
  }
  if (ch) {
    w.mf = c.take<Mobius<T>>(pl.lanes);
    w.din = c.take<Cx<T>>(pl.lanes);
    if (!causal) {
      w.mb = c.take<Mobius<T>>(pl.lanes);
      w.ein = c.take<Cx<T>>(pl.lanes);
    }
    if (backward) {
      w.r_start = c.take<Cx<T>>(pl.lanes);
      w.r_prod = c.take<Cx<T>>(pl.lanes);
      w.r_in = c.take<Cx<T>>(pl.lanes);
      if (!causal) {
        w.l_end = c.take<Cx<T>>(pl.lanes);
        w.l_prod = c.take<Cx<T>>(pl.lanes);
        w.l_in = c.take<Cx<T>>(pl.lanes);
      }
    }
  }
  if (bytes) *bytes = c.off;
  return w;
}

// ---------------------------------------------------------------------------------------------
// Chunk carries of the pivots

// Transfer matrices of every chunk: mf maps d just left of the chunk to d at its last position,
// mb maps e just right of the chunk to e at its first position. Rescaled every other step (only
// ratios matter), as on the CPU.
template <class T>
__global__ void __launch_bounds__(NT) mobius_kernel(Problem<T> pr, Plan pl, gptr<Mobius<T>> mf, gptr<Mobius<T>> mb) {
  constexpr int TP = Cfg<T>::TP;
  __shared__ Lanes L;
  __shared__ T sA[TP * RS], sK[TP * RS];
  const Geo g = setup_lanes(pr, pl, L);
  const int t = threadIdx.x;
  const T zr = pr.zri[0], zi = pr.zri[1];
  T kprev = k_into_chunk(pr, g);
  Mobius<T> f = bk::mobius_identity<T>(), b = bk::mobius_identity<T>();
  for (int64_t p0 = 0; p0 < pl.Lc; p0 += TP) {
    tile_load<T, 1>(sA, pr.a, L.base, L.len, p0, zr, T(1));
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    __syncthreads();
    const int rn = tile_count<T>(pl.Lc, p0);
    for (int r = 0; r < rn; ++r) {
      const Cx<T> al{sA[r * RS + t], -zi};
      const T kk = sK[r * RS + t];
      bk::mobius_step(f, al, kprev);
      if (mb) bk::mobius_step_right(b, al, kk);
      kprev = kk;
      if ((p0 + r) & 1) {
        bk::mobius_rescale(f, T(1) / max_abs(f));
        if (mb) bk::mobius_rescale(b, T(1) / max_abs(b));
      }
    }
    __syncthreads();
  }
  if (g.act) {
    mf[g.v] = f;
    if (mb) mb[g.v] = b;
  }
}

// One thread per sequence: din[v] = d just left of chunk v, ein[v] = e just right of it
// (1 where there is none; the coupling k there is 0, so the value does not matter).
template <class T>
__global__ void pivot_carry_kernel(Plan pl, gptr<Mobius<T>> mf, gptr<Mobius<T>> mb, gptr<Cx<T>> din, gptr<Cx<T>> ein) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= pl.B) return;
  const int64_t v0 = b * pl.C;
  Cx<T> d{T(1), T(0)};
  din[v0] = d;
  for (int64_t ch = 1; ch < pl.C; ++ch) {
    d = bk::mobius_apply(Mobius<T>(mf[v0 + ch - 1]), d);
    din[v0 + ch] = d;
  }
  if (mb) {
    Cx<T> e{T(1), T(0)};
    ein[v0 + pl.C - 1] = e;
    for (int64_t ch = pl.C - 2; ch >= 0; --ch) {
      e = bk::mobius_apply(Mobius<T>(mb[v0 + ch + 1]), e);
      ein[v0 + ch] = e;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

template <class T>
__global__ void __launch_bounds__(NT) fwd_kernel(Problem<T> pr, Plan pl, Ws<T> w, gptr<T> out) {
  constexpr int TP = Cfg<T>::TP;
  __shared__ Lanes L;
  __shared__ T sA[TP * RS], sK[TP * RS], sM[TP * RS], sO[2 * TP * RS];
  const Geo g = setup_lanes(pr, pl, L);
  const int t = threadIdx.x;
  const T zr = pr.zri[0], zi = pr.zri[1];
  const int64_t LP = pl.lanes, Lc = pl.Lc;
  const bool chunked = pl.chunked();
  T kprev = k_into_chunk(pr, g);
  Cx<T> dprev = (chunked && g.act) ? w.din[g.v] : Cx<T>{T(1), T(0)};
  // d pass, left to right. Causal: y = 1 / d is the output.
  for (int64_t p0 = 0; p0 < Lc; p0 += TP) {
    tile_load<T, 1>(sA, pr.a, L.base, L.len, p0, zr, T(1));
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    if (pr.causal && pr.mask) tile_load<T, 1>(sM, pr.mask, L.base, L.len, p0, T(0), T(0));
    __syncthreads();
    const int rn = tile_count<T>(Lc, p0);
    for (int r = 0; r < rn; ++r) {
      const Cx<T> al{sA[r * RS + t], -zi};
      const Cx<T> d = bk::pivot_step(al, kprev, dprev);
      kprev = sK[r * RS + t];
      dprev = d;
      if (pr.causal) {
        Cx<T> y = bk::recip(d);
        if (pr.mask) y = bk::scale(y, sM[r * RS + t]);
        sO[(2 * r) * RS + t] = y.re;
        sO[(2 * r + 1) * RS + t] = y.im;
      } else if (g.act) {
        w.S0[(p0 + r) * LP + g.v] = d;
      }
    }
    __syncthreads();
    if (pr.causal) {
      tile_store<T, 2>(sO, out, L.base, L.len, p0);
      __syncthreads();
    }
  }
  if (pr.causal) return;
  // e pass, right to left, and the combine G = 1 / (d + e - alpha).
  Cx<T> eprev = (chunked && g.act) ? w.ein[g.v] : Cx<T>{T(1), T(0)};
  for (int64_t p0 = (Lc - 1) / TP * TP; p0 >= 0; p0 -= TP) {
    tile_load<T, 1>(sA, pr.a, L.base, L.len, p0, zr, T(1));
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    if (pr.mask) tile_load<T, 1>(sM, pr.mask, L.base, L.len, p0, T(0), T(0));
    __syncthreads();
    for (int r = tile_count<T>(Lc, p0) - 1; r >= 0; --r) {
      const Cx<T> al{sA[r * RS + t], -zi};
      const Cx<T> e = bk::pivot_step(al, sK[r * RS + t], eprev);
      const Cx<T> d = g.act ? w.S0[(p0 + r) * LP + g.v] : al;
      Cx<T> G = bk::combine(d, e, al);
      if (pr.mask) G = bk::scale(G, sM[r * RS + t]);
      sO[(2 * r) * RS + t] = G.re;
      sO[(2 * r + 1) * RS + t] = G.im;
      eprev = e;
    }
    __syncthreads();
    tile_store<T, 2>(sO, out, L.base, L.len, p0);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, two-sided.
//   w = conj(g) (times mask), G = 1 / (d + e - alpha), p = w G^2,
//   L_j = (k_{j-1} / e_j^2) L_{j-1} + p_j,  R_j = p_j + (k_j / d_j^2) R_{j+1},  A = L + R - p,
//   grad_a = -Re A, grad_k_j = Re(L_j / e_{j+1} + R_{j+1} / d_j), grad_z = conj(sum A).
// Phase 1: d pass (stores d), then e pass right to left (stores 1/d, 1/e, p, R with zero carry;
// chunked: suffix products of the R coefficients and the L summary). Phase 2: L pass left to
// right with the true carries, grad_a, grad_k and the partial sums of A.

template <class T>
__global__ void __launch_bounds__(NT) bwd1_two_sided(Problem<T> pr, Grads<T> gr, Plan pl, Ws<T> w) {
  constexpr int TP = Cfg<T>::TP;
  __shared__ Lanes L;
  __shared__ T sA[TP * RS], sK[TP * RS], sG[2 * TP * RS], sM[TP * RS];
  const Geo g = setup_lanes(pr, pl, L);
  const int t = threadIdx.x;
  const T zr = pr.zri[0], zi = pr.zri[1];
  const int64_t LP = pl.lanes, Lc = pl.Lc;
  const bool chunked = pl.chunked();
  const T kin = k_into_chunk(pr, g);
  T kprev = kin;
  Cx<T> dprev = (chunked && g.act) ? w.din[g.v] : Cx<T>{T(1), T(0)};
  for (int64_t p0 = 0; p0 < Lc; p0 += TP) {
    tile_load<T, 1>(sA, pr.a, L.base, L.len, p0, zr, T(1));
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    __syncthreads();
    const int rn = tile_count<T>(Lc, p0);
    for (int r = 0; r < rn; ++r) {
      const Cx<T> al{sA[r * RS + t], -zi};
      const Cx<T> d = bk::pivot_step(al, kprev, dprev);
      kprev = sK[r * RS + t];
      dprev = d;
      if (g.act) w.S0[(p0 + r) * LP + g.v] = d;
    }
    __syncthreads();
  }
  Cx<T> eprev = (chunked && g.act) ? w.ein[g.v] : Cx<T>{T(1), T(0)};
  const Cx<T> zero{T(0), T(0)}, one{T(1), T(0)};
  Cx<T> R = zero, Pi = one, Lend = zero, S = one;
  const bool gmask = gr.grad_mask != nullptr;
  for (int64_t p0 = (Lc - 1) / TP * TP; p0 >= 0; p0 -= TP) {
    tile_load<T, 1>(sA, pr.a, L.base, L.len, p0, zr, T(1));
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    tile_load<T, 2>(sG, gr.grad, L.base, L.len, p0, T(0), T(0));
    if (pr.mask) tile_load<T, 1>(sM, pr.mask, L.base, L.len, p0, T(0), T(0));
    __syncthreads();
    for (int r = tile_count<T>(Lc, p0) - 1; r >= 0; --r) {
      const int64_t p = p0 + r, idx = p * LP + g.v;
      const Cx<T> al{sA[r * RS + t], -zi};
      const T kk = sK[r * RS + t];
      // e_p = alpha_p - k_p / e_{p+1}; the division also gives 1 / e_{p+1}.
      const T inv = T(1) / bk::norm2(eprev);
      const Cx<T> ie_next{bk::mul_or_zero(eprev.re, inv), -bk::mul_or_zero(eprev.im, inv)};
      const T q = kk * inv;
      const Cx<T> e{al.re - bk::mul_or_zero(eprev.re, q), al.im + bk::mul_or_zero(eprev.im, q)};
      const Cx<T> d = g.act ? w.S0[idx] : al;
      const Cx<T> id = bk::recip(d);
      const Cx<T> G = bk::combine(d, e, al);
      Cx<T> wv{sG[(2 * r) * RS + t], -sG[(2 * r + 1) * RS + t]};
      if (pr.mask) {
        const T m = sM[r * RS + t];
        if (gmask) sM[r * RS + t] = G.re * wv.re - G.im * wv.im;  // Re(conj(G) g)
        wv = bk::scale(wv, m);
      }
      const Cx<T> P = wv * (G * G);
      const Cx<T> cr = bk::k_over_sq(kk, id);
      R = bk::lin_step(cr, R, P);
      if (chunked) {
        Pi = Pi * cr;
        if (p < Lc - 1) S = S * bk::k_over_sq(kk, ie_next);  // S = prod_{j > p} (k_{j-1} / e_j^2)
        Lend = Lend + S * P;
        if (g.act) w.TS[idx] = Pi;
      }
      if (g.act) {
        w.S0[idx] = id;
        w.IE[idx + LP] = ie_next;
        w.P[idx] = P;
        w.R[idx] = R;
      }
      eprev = e;
    }
    __syncthreads();
    if (gmask) {
      tile_store<T, 1>(sM, gr.grad_mask, L.base, L.len, p0);
      __syncthreads();
    }
  }
  const Cx<T> ie0 = bk::recip(eprev);
  if (g.act) {
    w.IE[g.v] = ie0;
    if (chunked) {
      S = S * bk::k_over_sq(kin, ie0);
      w.r_start[g.v] = R;
      w.r_prod[g.v] = Pi;
      w.l_end[g.v] = Lend;
      w.l_prod[g.v] = S;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(NT) bwd2_two_sided(Problem<T> pr, Grads<T> gr, Plan pl, Ws<T> w) {
  constexpr int TP = Cfg<T>::TP;
  __shared__ Lanes L;
  __shared__ T sK[TP * RS], sGA[TP * RS], sGK[TP * RS];
  const Geo g = setup_lanes(pr, pl, L);
  const int t = threadIdx.x;
  const int64_t LP = pl.lanes, Lc = pl.Lc;
  const bool chunked = pl.chunked();
  const Cx<T> zero{T(0), T(0)};
  T kprev = k_into_chunk(pr, g);
  const Cx<T> rin = (chunked && g.act) ? w.r_in[g.v] : zero;
  Cx<T> Lr = (chunked && g.act) ? w.l_in[g.v] : zero;
  auto R_at = [&](int64_t p) -> Cx<T> {  // R with the true carry from the right
    if (p >= Lc) return rin;
    const int64_t idx = p * LP + g.v;
    return chunked ? Cx<T>(w.R[idx]) + Cx<T>(w.TS[idx]) * rin : Cx<T>(w.R[idx]);
  };
  Cx<T> Rcur = g.act ? R_at(0) : zero;
  double zs_re = 0.0, zs_im = 0.0;
  for (int64_t p0 = 0; p0 < Lc; p0 += TP) {
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    __syncthreads();
    const int rn = tile_count<T>(Lc, p0);
    for (int r = 0; r < rn; ++r) {
      const int64_t p = p0 + r, idx = p * LP + g.v;
      Cx<T> A = zero, gk = zero;
      if (g.act) {
        const Cx<T> P = w.P[idx];
        Lr = bk::lin_step(bk::k_over_sq(kprev, Cx<T>(w.IE[idx])), Lr, P);
        A = Lr + Rcur - P;
        const Cx<T> Rnext = R_at(p + 1);
        gk = Lr * Cx<T>(w.IE[idx + LP]) + Rnext * Cx<T>(w.S0[idx]);
        Rcur = Rnext;
        if (p < g.len) {
          zs_re += double(A.re);
          zs_im += double(A.im);
        }
      }
      sGA[r * RS + t] = -A.re;
      sGK[r * RS + t] = gk.re;
      kprev = sK[r * RS + t];
    }
    __syncthreads();
    tile_store<T, 1>(sGA, gr.grad_a, L.base, L.len, p0);
    tile_store<T, 1>(sGK, gr.grad_k, L.gkbase, L.klen, p0);
    __syncthreads();
  }
  if (g.act) {
    w.zpart[2 * g.v] = zs_re;
    w.zpart[2 * g.v + 1] = zs_im;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, causal: y = 1/d, mu_j = (k_j / d_j^2) mu_{j+1} - w_j / d_j^2,
//   grad_a = Re mu, grad_k_j = Re(-mu_{j+1} / d_j), grad_z = -conj(sum mu).
// Phase 1 (left to right) stores y and q = -w y^2 (and the mu summary when chunked); phase 2 runs
// mu right to left with the true carry.

template <class T>
__global__ void __launch_bounds__(NT) bwd1_causal(Problem<T> pr, Grads<T> gr, Plan pl, Ws<T> w) {
  constexpr int TP = Cfg<T>::TP;
  __shared__ Lanes L;
  __shared__ T sA[TP * RS], sK[TP * RS], sG[2 * TP * RS], sM[TP * RS];
  const Geo g = setup_lanes(pr, pl, L);
  const int t = threadIdx.x;
  const T zr = pr.zri[0], zi = pr.zri[1];
  const int64_t LP = pl.lanes, Lc = pl.Lc;
  const bool chunked = pl.chunked();
  const bool gmask = gr.grad_mask != nullptr;
  T kprev = k_into_chunk(pr, g);
  Cx<T> dprev = (chunked && g.act) ? w.din[g.v] : Cx<T>{T(1), T(0)};
  Cx<T> S{T(0), T(0)}, Pi{T(1), T(0)};
  for (int64_t p0 = 0; p0 < Lc; p0 += TP) {
    tile_load<T, 1>(sA, pr.a, L.base, L.len, p0, zr, T(1));
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    tile_load<T, 2>(sG, gr.grad, L.base, L.len, p0, T(0), T(0));
    if (pr.mask) tile_load<T, 1>(sM, pr.mask, L.base, L.len, p0, T(0), T(0));
    __syncthreads();
    const int rn = tile_count<T>(Lc, p0);
    for (int r = 0; r < rn; ++r) {
      const int64_t idx = (p0 + r) * LP + g.v;
      const Cx<T> al{sA[r * RS + t], -zi};
      const Cx<T> d = bk::pivot_step(al, kprev, dprev);
      const T kk = sK[r * RS + t];
      kprev = kk;
      dprev = d;
      const Cx<T> y = bk::recip(d);
      const Cx<T> y2 = y * y;
      Cx<T> wv{sG[(2 * r) * RS + t], -sG[(2 * r + 1) * RS + t]};
      if (pr.mask) {
        const T m = sM[r * RS + t];
        if (gmask) sM[r * RS + t] = y.re * wv.re - y.im * wv.im;  // Re(conj(y) g)
        wv = bk::scale(wv, m);
      }
      const Cx<T> wy2 = wv * y2;
      const Cx<T> q{-wy2.re, -wy2.im};
      if (chunked) {
        S = S + Pi * q;
        Pi = Pi * bk::scale(y2, kk);
      }
      if (g.act) {
        w.S0[idx] = y;
        w.P[idx] = q;
      }
    }
    __syncthreads();
    if (gmask) {
      tile_store<T, 1>(sM, gr.grad_mask, L.base, L.len, p0);
      __syncthreads();
    }
  }
  if (chunked && g.act) {
    w.r_start[g.v] = S;
    w.r_prod[g.v] = Pi;
  }
}

template <class T>
__global__ void __launch_bounds__(NT) bwd2_causal(Problem<T> pr, Grads<T> gr, Plan pl, Ws<T> w) {
  constexpr int TP = Cfg<T>::TP;
  __shared__ Lanes L;
  __shared__ T sK[TP * RS], sGA[TP * RS], sGK[TP * RS];
  const Geo g = setup_lanes(pr, pl, L);
  const int t = threadIdx.x;
  const int64_t LP = pl.lanes, Lc = pl.Lc;
  const Cx<T> zero{T(0), T(0)};
  Cx<T> mu = (pl.chunked() && g.act) ? w.r_in[g.v] : zero;
  double zs_re = 0.0, zs_im = 0.0;
  for (int64_t p0 = (Lc - 1) / TP * TP; p0 >= 0; p0 -= TP) {
    tile_load<T, 1>(sK, pr.k, L.kbase, L.klen, p0, T(0), T(0));
    __syncthreads();
    for (int r = tile_count<T>(Lc, p0) - 1; r >= 0; --r) {
      const int64_t p = p0 + r, idx = p * LP + g.v;
      Cx<T> gk = zero;
      if (g.act) {
        const Cx<T> y = w.S0[idx];
        gk = mu * y;
        mu = bk::lin_step(bk::scale(y * y, sK[r * RS + t]), mu, Cx<T>(w.P[idx]));
        if (p < g.len) {
          zs_re += double(mu.re);
          zs_im += double(mu.im);
        }
      }
      sGK[r * RS + t] = -gk.re;
      sGA[r * RS + t] = mu.re;
    }
    __syncthreads();
    tile_store<T, 1>(sGA, gr.grad_a, L.base, L.len, p0);
    tile_store<T, 1>(sGK, gr.grad_k, L.gkbase, L.klen, p0);
    __syncthreads();
  }
  if (g.act) {
    w.zpart[2 * g.v] = zs_re;
    w.zpart[2 * g.v + 1] = zs_im;
  }
}

// One thread per sequence: r_in[v] = R (or mu) at the first position right of chunk v, l_in[v] =
// L at the last position left of it (0 where there is none).
template <class T>
__global__ void grad_carry_kernel(Plan pl, Ws<T> w, bool two_sided) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= pl.B) return;
  const int64_t v0 = b * pl.C;
  Cx<T> acc{T(0), T(0)};
  w.r_in[v0 + pl.C - 1] = acc;
  for (int64_t ch = pl.C - 2; ch >= 0; --ch) {
    acc = Cx<T>(w.r_start[v0 + ch + 1]) + Cx<T>(w.r_prod[v0 + ch + 1]) * acc;
    w.r_in[v0 + ch] = acc;
  }
  if (two_sided) {
    acc = Cx<T>{T(0), T(0)};
    w.l_in[v0] = acc;
    for (int64_t ch = 1; ch < pl.C; ++ch) {
      acc = Cx<T>(w.l_end[v0 + ch - 1]) + Cx<T>(w.l_prod[v0 + ch - 1]) * acc;
      w.l_in[v0 + ch] = acc;
    }
  }
}

// Fixed-order sum of the per-lane partial sums (one block): deterministic grad_z.
// Two-sided: grad_z = conj(sum A); causal: grad_z = -conj(sum mu).
template <class T>
__global__ void __launch_bounds__(kSumThreads) zsum_kernel(gptr<double> zpart, int64_t lanes, bool causal, gptr<T> out) {
  __shared__ double sr[kSumThreads], si[kSumThreads];
  double re = 0.0, im = 0.0;
  for (int64_t v = threadIdx.x; v < lanes; v += kSumThreads) {
    re += zpart[2 * v];
    im += zpart[2 * v + 1];
  }
  sr[threadIdx.x] = re;
  si[threadIdx.x] = im;
  __syncthreads();
  for (int s = kSumThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sr[threadIdx.x] += sr[threadIdx.x + s];
      si[threadIdx.x] += si[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = T(causal ? -sr[0] : sr[0]);
    out[1] = T(causal ? si[0] : -si[0]);
  }
}

template <class T>
__global__ void zero2_kernel(gptr<T> out) {
  out[0] = T(0);
  out[1] = T(0);
}

// ---------------------------------------------------------------------------------------------
// Launchers

#define BK_LAUNCH_CHECK(name)                          \
  do {                                                 \
    cudaError_t e_ = cudaGetLastError();               \
    if (e_ != cudaSuccess) return Status{e_, name};    \
  } while (0)

inline unsigned blocks_for(int64_t n, int per) { return unsigned((n + per - 1) / per); }

template <class T>
Status pivot_carries(const Problem<T>& pr, const Plan& pl, const Ws<T>& w, cudaStream_t st) {
  if (!pl.chunked()) return Status{cudaSuccess, nullptr};
  mobius_kernel<T><<<blocks_for(pl.lanes, NT), NT, 0, st>>>(pr, pl, w.mf, pr.causal ? nullptr : w.mb);
  BK_LAUNCH_CHECK("bk_core_cuda mobius_kernel");
  pivot_carry_kernel<T><<<blocks_for(pl.B, kCarryThreads), kCarryThreads, 0, st>>>(
      pl, w.mf, pr.causal ? nullptr : w.mb, w.din, w.ein);
  BK_LAUNCH_CHECK("bk_core_cuda pivot_carry_kernel");
  return Status{cudaSuccess, nullptr};
}

template <class T>
Status forward_impl(const Problem<T>& pr, gptr<T> out, const Plan& pl, void* ws, cudaStream_t st) {
  if (pr.B == 0) return Status{cudaSuccess, nullptr};
  if (pl.B != pr.B || pl.N != pr.N) return Status{cudaErrorInvalidValue, "bk_core_cuda forward: plan does not match the problem"};
  const Ws<T> w = carve<T>(pl, pr.causal, false, ws, nullptr);
  Status s = pivot_carries(pr, pl, w, st);
  if (!s.ok()) return s;
  fwd_kernel<T><<<blocks_for(pl.lanes, NT), NT, 0, st>>>(pr, pl, w, out);
  BK_LAUNCH_CHECK("bk_core_cuda fwd_kernel");
  return Status{cudaSuccess, nullptr};
}

template <class T>
Status backward_impl(const Problem<T>& pr, const Grads<T>& gr, const Plan& pl, void* ws, cudaStream_t st) {
  if (pr.B == 0) {
    zero2_kernel<T><<<1, 1, 0, st>>>(gr.grad_zri);
    BK_LAUNCH_CHECK("bk_core_cuda zero2_kernel");
    return Status{cudaSuccess, nullptr};
  }
  if (pl.B != pr.B || pl.N != pr.N) return Status{cudaErrorInvalidValue, "bk_core_cuda backward: plan does not match the problem"};
  const Ws<T> w = carve<T>(pl, pr.causal, true, ws, nullptr);
  Status s = pivot_carries(pr, pl, w, st);
  if (!s.ok()) return s;
  const unsigned nb = blocks_for(pl.lanes, NT);
  if (pr.causal)
    bwd1_causal<T><<<nb, NT, 0, st>>>(pr, gr, pl, w);
  else
    bwd1_two_sided<T><<<nb, NT, 0, st>>>(pr, gr, pl, w);
  BK_LAUNCH_CHECK("bk_core_cuda backward phase 1");
  if (pl.chunked()) {
    grad_carry_kernel<T><<<blocks_for(pl.B, kCarryThreads), kCarryThreads, 0, st>>>(pl, w, !pr.causal);
    BK_LAUNCH_CHECK("bk_core_cuda grad_carry_kernel");
  }
  if (pr.causal)
    bwd2_causal<T><<<nb, NT, 0, st>>>(pr, gr, pl, w);
  else
    bwd2_two_sided<T><<<nb, NT, 0, st>>>(pr, gr, pl, w);
  BK_LAUNCH_CHECK("bk_core_cuda backward phase 2");
  zsum_kernel<T><<<1, kSumThreads, 0, st>>>(w.zpart, pl.lanes, pr.causal, gr.grad_zri);
  BK_LAUNCH_CHECK("bk_core_cuda zsum_kernel");
  return Status{cudaSuccess, nullptr};
}

}  // namespace

Plan make_plan(int64_t B, int64_t N, Strategy strategy, int64_t chunk_len, int num_sms) {
  Plan pl;
  pl.B = B;
  pl.N = N;
  pl.C = 1;
  if (N >= 2 && B > 0) {
    if (chunk_len > 0) {
      pl.C = (N + chunk_len - 1) / chunk_len;
    } else if (strategy != Strategy::kLanes) {
      const int64_t want = kLanesPerSm * std::max(1, num_sms);
      const int64_t min_chunk = strategy == Strategy::kChunked ? kMinChunkForced : kMinChunk;
      if (B < want || strategy == Strategy::kChunked) {
        int64_t C = (want + B - 1) / B;
        C = std::min<int64_t>(C, std::max<int64_t>(1, N / min_chunk));
        if (strategy == Strategy::kChunked) C = std::max<int64_t>(C, std::min<int64_t>(N, 2));
        pl.C = C;
      }
    }
  }
  pl.Lc = N > 0 ? (N + pl.C - 1) / pl.C : 0;
  if (pl.Lc > 0) pl.C = (N + pl.Lc - 1) / pl.Lc;  // no empty chunk
  pl.lanes = B * pl.C;
  return pl;
}

size_t workspace_bytes(const Plan& pl, bool causal, bool backward, bool is_double) {
  size_t n = 0;
  if (is_double)
    carve<double>(pl, causal, backward, nullptr, &n);
  else
    carve<float>(pl, causal, backward, nullptr, &n);
  return n;
}

Status forward(const Problem<float>& p, float* out, const Plan& pl, void* ws, cudaStream_t st) {
  return forward_impl(p, gptr<std::remove_pointer_t<decltype(out)>>(out), pl, ws, st);
}
Status forward(const Problem<double>& p, double* out, const Plan& pl, void* ws, cudaStream_t st) {
  return forward_impl(p, gptr<std::remove_pointer_t<decltype(out)>>(out), pl, ws, st);
}
Status backward(const Problem<float>& p, const Grads<float>& g, const Plan& pl, void* ws, cudaStream_t st) {
  return backward_impl(p, g, pl, ws, st);
}
Status backward(const Problem<double>& p, const Grads<double>& g, const Plan& pl, void* ws, cudaStream_t st) {
  return backward_impl(p, g, pl, ws, st);
}

}  // namespace bk_cuda
