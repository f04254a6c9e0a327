// BK-Core CPU kernels, compiled once per instruction set: the including file defines BK_ISA_NS
// and the target (see bk_core_cpu_avx512.cpp). No torch headers here, so the target pragma only
// touches this code.
//
// Layout. A "lane" is one (sequence, chunk) pair; a block is NL lanes (NL = 128 bytes of T: 32
// floats or 16 doubles), processed together as one GCC vector, so every arithmetic instruction
// advances NL independent recursions (two AVX-512 registers' worth, which also hides the latency of
// the division chain). The public [B, N] rows are transposed into the block's lane-major scratch
// tile by tile inside the kernel, never through a separate pass over memory.
//
// Chunking. When the batch is too small to fill every thread with a block, each sequence is cut
// into C chunks. The pivots cross chunk boundaries through 2x2 Moebius transfer matrices
// (shared/BK_CORE_MATH.md, "Parallel form"), the gradient's linear recurrences through
// (product, local sum) pairs; a short sequential scan per sequence joins them. With C = 1 those
// phases are skipped.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "../bk_math.h"
#include "bk_core_cpu.h"

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

using bk::Cx;
using bk::Mobius;

template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(128)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(128)));
};

constexpr int64_t kMinChunk = 256;  // shortest chunk worth its carry phases
constexpr int64_t kTile = 16;       // positions per transpose tile

template <class T>
struct Plan {
  typedef typename VecOf<T>::type V;
  static constexpr int NL = 128 / sizeof(T);
  int64_t B, N, C, Lc, lanes, blocks;

  Plan(int64_t B_, int64_t N_, int threads) : B(B_), N(N_) {
    int64_t want = int64_t(NL) * std::max(1, threads);
    C = 1;
    if (B < want) {
      C = (want + B - 1) / B;
      C = std::min<int64_t>(C, std::max<int64_t>(1, N / kMinChunk));
    }
    Lc = (N + C - 1) / C;
    C = (N + Lc - 1) / Lc;  // no empty chunk
    lanes = B * C;
    blocks = (lanes + NL - 1) / NL;
  }
  bool chunked() const { return C > 1; }
};

template <class V>
static inline V vabs(V x) {
  return x < 0 ? -x : x;
}
template <class V>
static inline V vmax(V x, V y) {
  return x > y ? x : y;
}

template <class T>
static inline T lane(const typename VecOf<T>::type& v, int l) {
  return reinterpret_cast<const T*>(&v)[l];
}
template <class T>
static inline void set_lane(typename VecOf<T>::type& v, int l, T x) {
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

// Everything one block needs across its passes.
template <class T>
struct Scratch {
  typedef typename VecOf<T>::type V;
  Buf<V> Aa;         // Re(alpha) = a - Re z, per position
  Buf<V> Kx;         // Kx[p + 1] = k at chunk position p (coupling p, p+1); Kx[0] = coupling into the chunk
  Buf<Cx<V>> D;      // forward pivots (forward: reused for the output)
  Buf<Cx<V>> ID;     // 1 / d
  Buf<Cx<V>> IE;     // 1 / e, with IE[Lc] = 1 / (e just right of the chunk)
  Buf<Cx<V>> P;      // w G^2
  Buf<Cx<V>> R;      // R recurrence, R[Lc] = value just right of the chunk
  Buf<Cx<V>> CR;     // R coefficients k_j / d_j^2 (chunked only)
  Buf<Cx<V>> W;      // conj(upstream gradient), unmasked
  Buf<V> M;          // mask
  void alloc_fwd(int64_t Lc) {
    Aa.alloc(Lc);
    Kx.alloc(Lc + 1);
    D.alloc(Lc);
  }
  void alloc_bwd(int64_t Lc, bool chunked, bool mask) {
    alloc_fwd(Lc);
    ID.alloc(Lc + 1);
    IE.alloc(Lc + 1);
    P.alloc(Lc);
    R.alloc(Lc + 1);
    W.alloc(Lc);
    if (chunked) CR.alloc(Lc);
    if (mask) M.alloc(Lc);
  }
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
      li[l].row = v / pl.C;
      li[l].chunk = v % pl.C;
      li[l].start = li[l].chunk * pl.Lc;
      li[l].len = std::min(pl.Lc, pl.N - li[l].start);
    } else {
      li[l] = LaneInfo{-1, 0, 0, 0};
    }
  }
}

// Transposes rows of src (row stride N) into lane-major dst[p * NL + l] for positions [0, Lc);
// positions past a lane's length get `pad`. `shift` offsets the position read (used for k).
template <class T>
static void gather_rows(const Plan<T>& pl, const LaneInfo* li, const T* src, int64_t row_stride, int64_t avail,
                        int64_t offset, int64_t count, T sub, T pad, T* dst) {
  constexpr int NL = Plan<T>::NL;
  for (int64_t p0 = 0; p0 < count; p0 += kTile) {
    int64_t p1 = std::min(count, p0 + kTile);
    for (int l = 0; l < NL; ++l) {
      const LaneInfo& L = li[l];
      if (L.row < 0) {
        for (int64_t p = p0; p < p1; ++p) dst[p * NL + l] = pad;
        continue;
      }
      const T* s = src + L.row * row_stride;
      for (int64_t p = p0; p < p1; ++p) {
        int64_t pos = L.start + offset + p;
        bool in = pos >= 0 && pos < avail && (offset + p) < L.len;
        dst[p * NL + l] = in ? s[pos] - sub : pad;
      }
    }
  }
}

template <class T>
static void gather_block(const Problem<T>& pr, const Plan<T>& pl, const LaneInfo* li, Scratch<T>& s) {
  T* A = reinterpret_cast<T*>(s.Aa.p);
  // Padding positions get alpha = 1 - i Im z (never a zero pivot) and k = 0 (decoupled).
  gather_rows<T>(pl, li, pr.a, pr.N, pr.N, 0, pl.Lc, pr.zr, T(1), A);
  T* K = reinterpret_cast<T*>(s.Kx.p);
  // Kx[q] holds k at position start + q - 1; k exists for positions 0..N-2.
  constexpr int NL = Plan<T>::NL;
  for (int l = 0; l < NL; ++l) {
    const LaneInfo& L = li[l];
    const T* krow = L.row >= 0 ? pr.k + L.row * pr.k_row_stride : nullptr;
    for (int64_t q = 0; q <= pl.Lc; ++q) {
      int64_t pos = L.start + q - 1;
      bool in = krow && pos >= 0 && pos < pr.N - 1 && (q - 1) < L.len;
      K[q * NL + l] = in ? krow[pos] : T(0);
    }
  }
}

// Forward pivots over the chunk. Stores D[p]; when ID is given also stores 1/d (the division of
// the next step yields it for free, the last one costs one more).
template <class T>
static inline Cx<typename VecOf<T>::type> d_pass(int64_t Lc, const typename VecOf<T>::type* Aa,
                                                  const typename VecOf<T>::type* Kx, T zi,
                                                  Cx<typename VecOf<T>::type> prev, Cx<typename VecOf<T>::type>* D,
                                                  Cx<typename VecOf<T>::type>* ID) {
  typedef typename VecOf<T>::type V;
  const V aim = V{} - zi;
  for (int64_t p = 0; p < Lc; ++p) {
    V r = bk::bk_one<V>() / bk::norm2(prev);
    V q = Kx[p] * r;
    if (ID && p > 0) ID[p - 1] = Cx<V>{prev.re * r, -prev.im * r};
    Cx<V> d{Aa[p] - prev.re * q, aim + prev.im * q};
    D[p] = d;
    prev = d;
  }
  if (ID) ID[Lc - 1] = bk::recip(prev);
  return prev;
}

// ---------------------------------------------------------------------------------------------
// Chunk carries: Moebius transfer matrices of the pivots, then a scan per sequence.

template <class T>
struct Carries {
  std::vector<Cx<T>> d_in, e_in;  // pivot just left / right of each lane's chunk
};

template <class T>
static void mobius_block(const Problem<T>& pr, const Plan<T>& pl, int64_t blk, Scratch<T>& s, bool backward_too,
                         Mobius<T>* mf, Mobius<T>* mb) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  gather_block(pr, pl, li, s);
  const V aim = V{} - pr.zi;
  auto rescale = [](Mobius<V>& m) {
    V mx = vmax(vmax(vmax(vabs(m.x0.re), vabs(m.x0.im)), vmax(vabs(m.y0.re), vabs(m.y0.im))),
                vmax(vmax(vabs(m.x1.re), vabs(m.x1.im)), vmax(vabs(m.y1.re), vabs(m.y1.im))));
    bk::mobius_rescale(m, bk::bk_one<V>() / mx);
  };
  Mobius<V> m = bk::mobius_identity<V>();
  for (int64_t p = 0; p < pl.Lc; ++p) {
    bk::mobius_step(m, Cx<V>{s.Aa[p], aim}, s.Kx[p]);
    if (p & 1) rescale(m);
  }
  for (int l = 0; l < NL; ++l)
    if (li[l].row >= 0) {
      Mobius<T>& o = mf[blk * NL + l];
      o.x0 = {lane<T>(m.x0.re, l), lane<T>(m.x0.im, l)};
      o.y0 = {lane<T>(m.y0.re, l), lane<T>(m.y0.im, l)};
      o.x1 = {lane<T>(m.x1.re, l), lane<T>(m.x1.im, l)};
      o.y1 = {lane<T>(m.y1.re, l), lane<T>(m.y1.im, l)};
    }
  if (!backward_too) return;
  m = bk::mobius_identity<V>();
  for (int64_t p = pl.Lc - 1; p >= 0; --p) {
    bk::mobius_step(m, Cx<V>{s.Aa[p], aim}, s.Kx[p + 1]);
    if (p & 1) rescale(m);
  }
  for (int l = 0; l < NL; ++l)
    if (li[l].row >= 0) {
      Mobius<T>& o = mb[blk * NL + l];
      o.x0 = {lane<T>(m.x0.re, l), lane<T>(m.x0.im, l)};
      o.y0 = {lane<T>(m.y0.re, l), lane<T>(m.y0.im, l)};
      o.x1 = {lane<T>(m.x1.re, l), lane<T>(m.x1.im, l)};
      o.y1 = {lane<T>(m.y1.re, l), lane<T>(m.y1.im, l)};
    }
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
  parallel_blocks(par, pl.blocks, [&](int64_t blk) {
    Scratch<T>& s = thread_scratch<T>();
    s.alloc_fwd(pl.Lc);
    mobius_block(pr, pl, blk, s, two_sided, mf.data(), mb.data());
  });
  for (int64_t b = 0; b < pl.B; ++b) {
    int64_t v0 = b * pl.C;
    for (int64_t ch = 1; ch < pl.C; ++ch)
      c.d_in[v0 + ch] = bk::mobius_apply(mf[v0 + ch - 1], c.d_in[v0 + ch - 1]);
    if (two_sided)
      for (int64_t ch = pl.C - 2; ch >= 0; --ch)
        c.e_in[v0 + ch] = bk::mobius_apply(mb[v0 + ch + 1], c.e_in[v0 + ch + 1]);
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

// Writes lane-major complex values back to interleaved [B, N, 2] rows.
template <class T>
static void scatter_complex(const Plan<T>& pl, const LaneInfo* li, const Cx<typename VecOf<T>::type>* src, T* out) {
  constexpr int NL = Plan<T>::NL;
  for (int64_t p0 = 0; p0 < pl.Lc; p0 += kTile) {
    int64_t p1 = std::min(pl.Lc, p0 + kTile);
    for (int l = 0; l < NL; ++l) {
      const LaneInfo& L = li[l];
      if (L.row < 0) continue;
      T* o = out + (L.row * pl.N + L.start) * 2;
      int64_t pe = std::min(p1, L.len);
      for (int64_t p = p0; p < pe; ++p) {
        o[2 * p] = lane<T>(src[p].re, l);
        o[2 * p + 1] = lane<T>(src[p].im, l);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

template <class T>
static void forward_block(const Problem<T>& pr, const Plan<T>& pl, int64_t blk, const Carries<T>& car, T* out) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  Scratch<T>& s = thread_scratch<T>();
  s.alloc_fwd(pl.Lc);
  if (pr.mask) s.M.alloc(pl.Lc);
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  gather_block(pr, pl, li, s);
  if (pr.mask) gather_rows<T>(pl, li, pr.mask, pr.N, pr.N, 0, pl.Lc, T(0), T(0), reinterpret_cast<T*>(s.M.p));
  const int64_t Lc = pl.Lc;
  const V aim = V{} - pr.zi;
  Cx<V> dprev = load_carry(car.d_in, blk, li);
  if (pr.causal) {
    // y = 1 / d: the reciprocal of d_{p} falls out of step p + 1's division.
    d_pass<T>(Lc, s.Aa.p, s.Kx.p, pr.zi, dprev, s.D.p, s.D.p);
  } else {
    d_pass<T>(Lc, s.Aa.p, s.Kx.p, pr.zi, dprev, s.D.p, nullptr);
    Cx<V> eprev = load_carry(car.e_in, blk, li);
    for (int64_t p = Lc - 1; p >= 0; --p) {
      Cx<V> al{s.Aa[p], aim};
      Cx<V> e = bk::pivot_step(al, s.Kx[p + 1], eprev);
      s.D[p] = bk::combine(s.D[p], e, al);
      eprev = e;
    }
  }
  if (pr.mask)
    for (int64_t p = 0; p < Lc; ++p) s.D[p] = bk::scale(s.D[p], s.M[p]);
  scatter_complex(pl, li, s.D.p, out);
}

template <class T>
static void forward_impl(const Problem<T>& pr, T* out, const Par& par) {
  if (pr.B == 0) return;
  Plan<T> pl(pr.B, pr.N, par.num_threads);
  Carries<T> car;
  compute_carries(pr, pl, par, !pr.causal, car);
  parallel_blocks(par, pl.blocks, [&](int64_t blk) { forward_block(pr, pl, blk, car, out); });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <class T>
struct BwdShared {
  const Problem<T>& pr;
  const Plan<T>& pl;
  Grads<T>& g;
  Carries<T> car;
  // per-lane linear-recurrence summaries and carries (chunked only)
  std::vector<Cx<T>> r_start, r_prod, r_in;   // R (two-sided) or mu (causal)
  std::vector<Cx<T>> l_end, l_prod, l_in;     // L (two-sided)
  std::vector<double> zsum;                   // per lane [re, im]
  std::vector<Scratch<T>> keep;               // per block scratch kept between phases (chunked only)
};

template <class T>
static Cx<T> lane_cx(const Cx<typename VecOf<T>::type>& v, int l) {
  return Cx<T>{lane<T>(v.re, l), lane<T>(v.im, l)};
}

template <class T>
static void bwd_phase1(BwdShared<T>& sh, int64_t blk, Scratch<T>& s) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Problem<T>& pr = sh.pr;
  const Plan<T>& pl = sh.pl;
  const int64_t Lc = pl.Lc;
  const bool chunked = pl.chunked();
  s.alloc_bwd(Lc, chunked, pr.mask != nullptr);
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  gather_block(pr, pl, li, s);
  {  // W = conj(g): gather real and imaginary parts of the interleaved upstream gradient
    T* W = reinterpret_cast<T*>(s.W.p);
    for (int64_t p0 = 0; p0 < Lc; p0 += kTile) {
      int64_t p1 = std::min(Lc, p0 + kTile);
      for (int l = 0; l < NL; ++l) {
        const LaneInfo& L = li[l];
        const T* gr = L.row >= 0 ? sh.g.grad + (L.row * pr.N + L.start) * 2 : nullptr;
        for (int64_t p = p0; p < p1; ++p) {
          bool in = gr && p < L.len;
          W[p * 2 * NL + l] = in ? gr[2 * p] : T(0);
          W[p * 2 * NL + NL + l] = in ? -gr[2 * p + 1] : T(0);
        }
      }
    }
  }
  if (pr.mask) gather_rows<T>(pl, li, pr.mask, pr.N, pr.N, 0, Lc, T(0), T(0), reinterpret_cast<T*>(s.M.p));
  const V aim = V{} - pr.zi;
  Cx<V> dprev = load_carry(sh.car.d_in, blk, li);
  d_pass<T>(Lc, s.Aa.p, s.Kx.p, pr.zi, dprev, s.D.p, s.ID.p);
  T* gm = sh.g.grad_mask;

  if (pr.causal) {
    // y = 1/d. mu_j = c_j mu_{j+1} + q_j with c_j = k_j / d_j^2, q_j = -w_j / d_j^2.
    // Phase 1 keeps y in D and, when chunked, the (product, local sum) summary of mu.
    Cx<V> S{V{}, V{}}, Pi{V{} + 1, V{}};
    for (int64_t p = 0; p < Lc; ++p) {
      Cx<V> y = s.ID[p];
      Cx<V> y2 = y * y;
      Cx<V> w = s.W[p];
      if (pr.mask) w = bk::scale(w, s.M[p]);
      Cx<V> q{-(w.re * y2.re - w.im * y2.im), -(w.re * y2.im + w.im * y2.re)};
      s.P[p] = q;
      s.D[p] = bk::scale(y2, s.Kx[p + 1]);  // mu coefficient (y itself stays in ID)
      if (chunked) {
        S = S + Pi * q;
        Pi = Pi * s.D[p];
      }
    }
    if (gm) {
      for (int l = 0; l < NL; ++l) {
        const LaneInfo& L = li[l];
        if (L.row < 0) continue;
        T* o = gm + L.row * pr.N + L.start;
        for (int64_t p = 0; p < L.len; ++p) {
          Cx<T> y = lane_cx<T>(s.ID[p], l), w = lane_cx<T>(s.W[p], l);
          o[p] = y.re * w.re - y.im * w.im;  // Re(conj(y) g) = Re(y conj(g))
        }
      }
    }
    if (chunked)
      for (int l = 0; l < NL; ++l)
        if (li[l].row >= 0) {
          sh.r_start[blk * NL + l] = lane_cx<T>(S, l);
          sh.r_prod[blk * NL + l] = lane_cx<T>(Pi, l);
        }
    return;
  }

  // Two-sided: e (right to left), G, p = w G^2, R_j = p_j + (k_j / d_j^2) R_{j+1} (carry 0 here).
  Cx<V> eprev = load_carry(sh.car.e_in, blk, li);
  Cx<V> R{V{}, V{}}, Pi{V{} + 1, V{}};
  for (int64_t p = Lc - 1; p >= 0; --p) {
    Cx<V> al{s.Aa[p], aim};
    V kk = s.Kx[p + 1];
    V r = bk::bk_one<V>() / bk::norm2(eprev);
    V q = kk * r;
    s.IE[p + 1] = Cx<V>{eprev.re * r, -eprev.im * r};
    Cx<V> e{al.re - eprev.re * q, al.im + eprev.im * q};
    Cx<V> G = bk::combine(s.D[p], e, al);
    Cx<V> w = s.W[p];
    if (pr.mask) {
      s.D[p] = G;  // kept for the mask gradient
      w = bk::scale(w, s.M[p]);
    }
    Cx<V> pp = w * (G * G);
    s.P[p] = pp;
    Cx<V> cr = bk::k_over_sq(kk, s.ID[p]);
    if (chunked) {
      s.CR[p] = cr;
      Pi = Pi * cr;
    }
    R = cr * R + pp;
    s.R[p] = R;
    eprev = e;
  }
  s.IE[0] = bk::recip(eprev);
  if (gm) {
    for (int l = 0; l < NL; ++l) {
      const LaneInfo& L = li[l];
      if (L.row < 0) continue;
      T* o = gm + L.row * pr.N + L.start;
      for (int64_t p = 0; p < L.len; ++p) {
        Cx<T> G = lane_cx<T>(s.D[p], l), w = lane_cx<T>(s.W[p], l);
        o[p] = G.re * w.re - G.im * w.im;
      }
    }
  }
  if (chunked) {
    // L summary: L_end = Pi_L * L_in + local sum (left to right, no divisions)
    Cx<V> L{V{}, V{}}, PiL{V{} + 1, V{}};
    for (int64_t p = 0; p < Lc; ++p) {
      Cx<V> cl = bk::k_over_sq(s.Kx[p], s.IE[p]);
      L = cl * L + s.P[p];
      PiL = PiL * cl;
    }
    for (int l = 0; l < NL; ++l)
      if (li[l].row >= 0) {
        int64_t v = blk * NL + l;
        sh.r_start[v] = lane_cx<T>(R, l);
        sh.r_prod[v] = lane_cx<T>(Pi, l);
        sh.l_end[v] = lane_cx<T>(L, l);
        sh.l_prod[v] = lane_cx<T>(PiL, l);
      }
  }
}

template <class T>
static void bwd_phase2(BwdShared<T>& sh, int64_t blk, Scratch<T>& s) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const Problem<T>& pr = sh.pr;
  const Plan<T>& pl = sh.pl;
  const int64_t Lc = pl.Lc;
  const bool chunked = pl.chunked();
  LaneInfo li[NL];
  lane_info(pl, blk, li);
  T* GA = reinterpret_cast<T*>(s.Aa.p);  // grad_a, lane-major (Aa no longer needed)
  T* GK = reinterpret_cast<T*>(s.W.p);   // grad_k, lane-major (W no longer needed)
  Cx<V> rin{V{}, V{}};
  if (chunked) rin = load_carry(sh.r_in, blk, li);
  double zacc[2 * NL];
  std::memset(zacc, 0, sizeof(zacc));
  auto flush = [&](Cx<V>& t) {
    for (int l = 0; l < NL; ++l) {
      zacc[2 * l] += lane<T>(t.re, l);
      zacc[2 * l + 1] += lane<T>(t.im, l);
    }
    t = Cx<V>{V{}, V{}};
  };
  Cx<V> tile{V{}, V{}};
  if (pr.causal) {
    // mu pass, right to left, with the true carry.
    Cx<V> mu = rin;
    for (int64_t p = Lc - 1; p >= 0; --p) {
      Cx<V> gk = mu * s.ID[p];
      reinterpret_cast<V*>(GK)[p] = -gk.re;
      mu = s.D[p] * mu + s.P[p];
      reinterpret_cast<V*>(GA)[p] = mu.re;
      tile = tile + mu;
      if ((p & 63) == 0) flush(tile);
    }
    flush(tile);
  } else {
    s.R[Lc] = rin;
    if (chunked) {
      Cx<V> R = rin;
      for (int64_t p = Lc - 1; p >= 0; --p) {
        R = s.CR[p] * R + s.P[p];
        s.R[p] = R;
      }
    }
    Cx<V> L{V{}, V{}};
    if (chunked) L = load_carry(sh.l_in, blk, li);
    for (int64_t p = 0; p < Lc; ++p) {
      Cx<V> cl = bk::k_over_sq(s.Kx[p], s.IE[p]);
      L = cl * L + s.P[p];
      Cx<V> A = L + s.R[p] - s.P[p];
      reinterpret_cast<V*>(GA)[p] = -A.re;
      Cx<V> gk = L * s.IE[p + 1] + s.R[p + 1] * s.ID[p];
      reinterpret_cast<V*>(GK)[p] = gk.re;
      tile = tile + A;
      if ((p & 63) == 63) flush(tile);
    }
    flush(tile);
  }
  // scatter grad_a and grad_k rows
  for (int l = 0; l < NL; ++l) {
    const LaneInfo& L = li[l];
    if (L.row < 0) continue;
    T* oa = sh.g.grad_a + L.row * pr.N + L.start;
    for (int64_t p = 0; p < L.len; ++p) oa[p] = GA[p * NL + l];
    if (pr.N > 1) {
      T* ok = sh.g.grad_k + L.row * (pr.N - 1) + L.start;
      int64_t kend = std::min(L.len, pr.N - 1 - L.start);
      for (int64_t p = 0; p < kend; ++p) ok[p] = GK[p * NL + l];
    }
    int64_t v = blk * NL + l;
    sh.zsum[2 * v] = zacc[2 * l];
    sh.zsum[2 * v + 1] = zacc[2 * l + 1];
  }
}

template <class T>
static void backward_impl(const Problem<T>& pr, Grads<T>& g, const Par& par) {
  g.grad_z[0] = g.grad_z[1] = 0.0;
  if (pr.B == 0) return;
  Plan<T> pl(pr.B, pr.N, par.num_threads);
  BwdShared<T> sh{pr, pl, g, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  compute_carries(pr, pl, par, !pr.causal, sh.car);
  const int64_t nl = pl.blocks * Plan<T>::NL;
  sh.zsum.assign(2 * nl, 0.0);
  if (!pl.chunked()) {
    parallel_blocks(par, pl.blocks, [&](int64_t blk) {
      Scratch<T>& s = thread_scratch<T>();
      bwd_phase1(sh, blk, s);
      bwd_phase2(sh, blk, s);
    });
  } else {
    Cx<T> zero{T(0), T(0)};
    sh.r_start.assign(nl, zero);
    sh.r_prod.assign(nl, zero);
    sh.r_in.assign(nl, zero);
    sh.l_end.assign(nl, zero);
    sh.l_prod.assign(nl, zero);
    sh.l_in.assign(nl, zero);
    sh.keep.resize(pl.blocks);
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { bwd_phase1(sh, blk, sh.keep[blk]); });
    for (int64_t b = 0; b < pl.B; ++b) {
      int64_t v0 = b * pl.C;
      for (int64_t ch = pl.C - 2; ch >= 0; --ch)  // carry from the right: value at the next chunk's start
        sh.r_in[v0 + ch] = sh.r_start[v0 + ch + 1] + sh.r_prod[v0 + ch + 1] * sh.r_in[v0 + ch + 1];
      if (!pr.causal)
        for (int64_t ch = 1; ch < pl.C; ++ch)
          sh.l_in[v0 + ch] = sh.l_end[v0 + ch - 1] + sh.l_prod[v0 + ch - 1] * sh.l_in[v0 + ch - 1];
    }
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { bwd_phase2(sh, blk, sh.keep[blk]); });
  }
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
