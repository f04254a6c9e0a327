// Parallel chunks: the 2x2 Moebius transfer matrices of each chunk's pivots (rescaled by exact
// powers of two), the scan per sequence that turns them into the pivots entering every chunk,
// and their load into a block. Part of bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

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

template <class T>
static void compute_carries(const Problem<T>& pr, const Plan<T>& pl, const Par& par, bool two_sided, Carries<T>& c) {
  c.d_in.assign(pl.lanes, Cx<T>{T(1), T(0)});
  c.e_in.assign(pl.lanes, Cx<T>{T(1), T(0)});
  if (pr.d_in)  // a carried state: the pivot before each row's first chunk
    for (int64_t b = 0; b < pl.B; ++b) c.d_in[pl.lane(b, 0)] = Cx<T>{pr.d_in[2 * b], pr.d_in[2 * b + 1]};
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

// The pivots entering the lanes of a block that start their row: the carried state where there is
// one (Problem::d_in), else 1 (with the zero coupling into position 0, a fresh start).
template <class T>
static Cx<typename VecOf<T>::type> entry_pivot(const Problem<T>& pr, const LaneInfo* li) {
  typedef typename VecOf<T>::type V;
  Cx<V> out{V{} + 1, V{}};
  if (pr.d_in)
    for (int l = 0; l < Plan<T>::NL; ++l)
      if (li[l].row >= 0 && li[l].start == 0) {
        set_lane<T>(out.re, l, pr.d_in[2 * li[l].row]);
        set_lane<T>(out.im, l, pr.d_in[2 * li[l].row + 1]);
      }
  return out;
}

// mu at position 0 of the lanes that start their row, into Grads::mu0 (a carried state's adjoint).
template <class T>
static void store_mu0(const Cx<typename VecOf<T>::type>& mu, const LaneInfo* li, T* mu0) {
  if (!mu0) return;
  for (int l = 0; l < Plan<T>::NL; ++l)
    if (li[l].row >= 0 && li[l].start == 0) {
      mu0[2 * li[l].row] = lane<T>(mu.re, l);
      mu0[2 * li[l].row + 1] = lane<T>(mu.im, l);
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

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
