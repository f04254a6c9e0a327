// Causal backward: from recomputed pivots in two phases (with a mask, or no saved output), or in
// one right-to-left pass from the forward's saved output y = 1 / d. Part of bk_core_cpu_impl.h
// (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

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
    store_mu0<T>(mu, li, sh.g.mu0);
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
#ifdef BK_ISA_AVX512
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
    store_mu0<T>(mu, li, sh.g.mu0);
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
  Cx<V> dprev = entry_pivot(sh.pr, li);
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
  store_mu0<T>(mu, li, sh.g.mu0);
}

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
