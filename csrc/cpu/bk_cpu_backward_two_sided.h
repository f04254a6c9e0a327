// Two-sided backward: the bidirectional gradient sweep (bwd_sweep and its steps), the chunk
// summaries of its accumulators, and the blocks of parallel and sequential plans. Part of
// bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

// Two-sided backward: one bidirectional sweep (docs/BK_CORE_MATH.md's gradient, anchored the
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
// bwd_sweep (below) runs the phases; the structs and steps before it are its parts.

// The running values of one bidirectional backward sweep (but the z sum, a separate local of
// bwd_sweep: flush_zsum takes its address, which would keep this whole struct out of registers).
template <class T>
struct BwdChains {
  typedef typename VecOf<T>::type V;
  Cx<V> d, e;   // the last pivot of the d chain (left to right) and of the e chain (right to left)
  Cx<V> U, Rt;  // their accumulators
  // Pending halves of grad k: gk_pend = Re(X_{j-1} / e_j) for the left chain's next output,
  // gkb_pend = Re(Y_{j+1} / d_j) for the right chain's next output.
  V gk_pend, gkb_pend;
};

// What one sweep reads and where it stores: the block's I/O, the chunk [0, L) and its halves
// [0, h) and [h2, L), the per-position scratch (SI: inverse pivots, SU: accumulators, SA: Re alpha,
// SW / SM: w and the mask, lane-major), and one step of each chain.
template <class T>
struct BwdSweepCtx {
  typedef typename VecOf<T>::type V;
  static constexpr int NL = Plan<T>::NL;
  const BwdIO<T>& io;
  const BlockIn<T>& in;
  V aim;  // Im alpha = -Im z
  int64_t L, h, h2;
  Cx<V>* SI;
  Cx<V>* SU;
  V* SA;
  Cx<V>* SW;
  V* SM;
  bool has_mask;

  // w and the masked w' = m w at position j (gathered into SW / SM by the chain that passes j first)
  // (with a software prefetch of the chain's next tile: the lanes' rows are far apart, and the
  // hardware prefetchers do not follow that many streams)
  BK_AI void gather(int64_t p0, int64_t n) const {
    io.Wre.prefetch(p0 < h ? p0 + kTile : p0 - kTile);
    w_tile<T>(io.Wre, io.Wim, p0, n, SW + p0);
    if (has_mask) in.M.tile(p0, n, reinterpret_cast<T*>(SM + p0), NL);
  }
  BK_AI Cx<V> wm(int64_t j) const { return has_mask ? masked<T>(SW[j], SM[j]) : SW[j]; }
  // One step of the d chain and U (lstep) or of the e chain and Rt (rstep); inv: 1 / the pivot before.
  BK_AI Cx<V> lstep(BwdChains<T>& c, V a, V k, const Cx<V>& wm, Cx<V>& inv) const {
    Cx<V> d = bk::pivot_step(Cx<V>{a, aim}, k, c.d, &inv);
    c.d = d;
    c.U = bk::lin_step(bk::k_over_sq(k, inv), c.U, wm);
    return d;
  }
  BK_AI Cx<V> rstep(BwdChains<T>& c, V a, V k, const Cx<V>& wm, Cx<V>& inv) const {
    Cx<V> e = bk::pivot_step(Cx<V>{a, aim}, k, c.e, &inv);
    c.e = e;
    c.Rt = bk::lin_step(bk::k_over_sq(k, inv), c.Rt, wm);
    return e;
  }
};

// The tiles of one tile pair (bwd_sweep's arrays): couplings in (kTile + 1), gradients out
// (kTile); no suffix: the d chain's tile, B: the e chain's.
template <class T>
struct BwdTiles {
  typedef typename VecOf<T>::type V;
  V *K, *KB;
  V *GA, *GAB, *GK, *GKB, *GM, *GMB;
};

// X = G^2 U, Y = G^2 Rt and A = X + Y - G^2 w' at one position, from G and the two accumulators
// that meet there.
template <class V>
struct GradParts {
  Cx<V> X, Y, A;
};
template <class V>
static BK_AI GradParts<V> grad_parts(const Cx<V>& G, const Cx<V>& U, const Cx<V>& Rt, const Cx<V>& w1) {
  Cx<V> G2 = G * G;
  Cx<V> X = G2 * U, Y = G2 * Rt;
  Cx<V> A = X + Y - G2 * w1;
  return {X, Y, A};
}

// Phase 1, one tile pair: the d chain over [t0, t0 + n), the e chain over the mirror tile
// [L - t0 - n, L - t0); each stores its inverse pivot and accumulator; alpha is gathered into SA.
template <class T>
static BK_AI void bwd_phase1_tiles(const BwdSweepCtx<T>& cx, BwdChains<T>& c, const BwdTiles<T>& t, int64_t t0) {
  constexpr int NL = Plan<T>::NL;
  const int64_t n = std::min(kTile, cx.h - t0);
  const int64_t pb = cx.L - t0 - n;
  cx.in.A.tile(t0, n, reinterpret_cast<T*>(cx.SA + t0), NL);
  cx.in.k_tile(t0, n, t.K);
  cx.gather(t0, n);
  cx.in.A.tile(pb, n, reinterpret_cast<T*>(cx.SA + pb), NL);
  cx.in.k_tile(pb, n, t.KB);
  cx.gather(pb, n);
  for (int64_t q = 0; q < n; ++q) {
    const int64_t qb = n - 1 - q;
    cx.lstep(c, cx.SA[t0 + q], t.K[q], cx.wm(t0 + q), cx.SI[t0 + q]);
    cx.SU[t0 + q] = c.U;
    cx.rstep(c, cx.SA[pb + qb], t.KB[qb + 1], cx.wm(pb + qb), cx.SI[pb + qb]);
    cx.SU[pb + qb] = c.Rt;
  }
}

// Odd L: the middle position h, which both chains pass; its gradients at once.
template <class T, bool kLean>
static BK_AI void bwd_middle(const BwdSweepCtx<T>& cx, BwdChains<T>& c, Cx<typename VecOf<T>::type>& zs,
                             const BwdTiles<T>& t) {
  typedef typename VecOf<T>::type V;
  constexpr int NL = Plan<T>::NL;
  const BwdIO<T>& io = cx.io;
  const int64_t h = cx.h;
  cx.in.A.tile(h, 1, reinterpret_cast<T*>(cx.SA + h), NL);
  cx.in.k_tile(h, 1, t.K);
  cx.gather(h, 1);
  const V a = cx.SA[h];
  const Cx<V> w1 = cx.wm(h);
  Cx<V> idm, iep;
  Cx<V> d = cx.lstep(c, a, t.K[0], w1, idm);
  Cx<V> e = cx.rstep(c, a, t.K[1], w1, iep);
  Cx<V> G = bk::combine(d, e, Cx<V>{a, cx.aim});
  if constexpr (kLean) {
    t.GA[0] = neg_re_g2s(G, c.U + c.Rt - w1);
  } else {
    const GradParts<V> g = grad_parts(G, c.U, c.Rt, w1);
    t.GA[0] = -g.A.re;
    zs = zs + g.A;
    c.gk_pend = re_prod(g.X, iep);
    c.gkb_pend = re_prod(g.Y, idm);
  }
  scatter_tile<T>(io.oga, h, 1, reinterpret_cast<T*>(t.GA), NL);
  if (io.has_gm) {
    t.GM[0] = re_prod(G, cx.SW[h]);
    scatter_tile<T>(io.ogm, h, 1, reinterpret_cast<T*>(t.GM), NL);
  }
}

// Phase 2, the d chain at j = pa + q (q of its tile) meets the stored (1/e_{j+1}, Rt_j): grad a
// (and grad mask) at j, and grad k one position behind, at j - 1.
template <class T, bool kLean>
static BK_AI void bwd_left_meets(const BwdSweepCtx<T>& cx, BwdChains<T>& c, Cx<typename VecOf<T>::type>& zs,
                                 const BwdTiles<T>& t, int64_t j, int64_t q) {
  typedef typename VecOf<T>::type V;
  Cx<V> idp;
  const Cx<V> w1 = cx.wm(j);
  Cx<V> d = cx.lstep(c, cx.SA[j], t.K[q], w1, idp);
  const Cx<V> ie = cx.SI[j];
  const V k = t.K[q + 1];
  Cx<V> G = bk::recip(Cx<V>{d.re - k * ie.re, d.im - k * ie.im});
  if (cx.io.has_gm) t.GM[q] = re_prod(G, cx.SW[j]);
  if constexpr (kLean) {
    t.GA[q] = neg_re_g2s(G, c.U + cx.SU[j] - w1);
  } else {
    const GradParts<V> g = grad_parts(G, c.U, cx.SU[j], w1);
    t.GA[q] = -g.A.re;
    zs = zs + g.A;
    const V gb = re_prod(g.Y, idp);
    if (j - 1 >= cx.h)
      t.GK[q] = c.gk_pend + gb;
    else
      c.gkb_pend = gb;  // even L: grad k at h - 1 is the e chain's first output
    c.gk_pend = re_prod(g.X, ie);
  }
}

// Phase 2, the e chain at j = pb + qb (qb of its tile) meets the stored (1/d_{j-1}, U_j): grad a
// (and grad mask) at j, and grad k at j.
template <class T, bool kLean>
static BK_AI void bwd_right_meets(const BwdSweepCtx<T>& cx, BwdChains<T>& c, Cx<typename VecOf<T>::type>& zs,
                                  const BwdTiles<T>& t, int64_t j, int64_t qb) {
  typedef typename VecOf<T>::type V;
  Cx<V> iep;
  const Cx<V> w1 = cx.wm(j);
  Cx<V> e = cx.rstep(c, cx.SA[j], t.KB[qb + 1], w1, iep);
  const Cx<V> id = cx.SI[j];
  const V k = t.KB[qb];
  Cx<V> G = bk::recip(Cx<V>{e.re - k * id.re, e.im - k * id.im});
  if (cx.io.has_gm) t.GMB[qb] = re_prod(G, cx.SW[j]);
  if constexpr (kLean) {
    t.GAB[qb] = neg_re_g2s(G, cx.SU[j] + c.Rt - w1);
  } else {
    const GradParts<V> g = grad_parts(G, cx.SU[j], c.Rt, w1);
    t.GAB[qb] = -g.A.re;
    zs = zs + g.A;
    t.GKB[qb] = re_prod(g.X, iep) + c.gkb_pend;
    c.gkb_pend = re_prod(g.Y, id);
  }
}

// Phase 2, the gradients of a tile pair out: the d chain's tile at pa, the e chain's at pb.
template <class T, bool kLean>
static BK_AI void bwd_phase2_store(const BwdSweepCtx<T>& cx, const BwdTiles<T>& t, int64_t pa, int64_t pb, int64_t n) {
  constexpr int NL = Plan<T>::NL;
  const BwdIO<T>& io = cx.io;
  scatter_tile<T>(io.oga, pa, n, reinterpret_cast<T*>(t.GA), NL, io.stream);
  scatter_tile<T>(io.oga, pb, n, reinterpret_cast<T*>(t.GAB), NL, io.stream);
  if (io.has_gm) {
    scatter_tile<T>(io.ogm, pa, n, reinterpret_cast<T*>(t.GM), NL);
    scatter_tile<T>(io.ogm, pb, n, reinterpret_cast<T*>(t.GMB), NL);
  }
  if (!kLean && io.has_gk) {
    // the left tile's grad k covers positions [pa - 1, pa - 1 + n), minus h - 1 (see bwd_left_meets)
    if (pa - 1 >= cx.h)
      scatter_tile<T>(io.ogk, pa - 1, n, reinterpret_cast<T*>(t.GK), NL);
    else if (n > 1)
      scatter_tile<T>(io.ogk, pa, n - 1, reinterpret_cast<T*>(t.GK + 1), NL);
    scatter_tile<T>(io.ogk, pb, n, reinterpret_cast<T*>(t.GKB), NL);
  }
}

// The sweep: phase 1 (each chain over its half, storing), the middle position of an odd L,
// phase 2 (each chain over the other half, finishing the gradients where it meets the other's
// stored values; the d chain over [h2, L), the e chain over [0, h)).
template <class T, bool kLean>
static void bwd_sweep(const BwdIO<T>& io, const Problem<T>& pr, int64_t L, Cx<typename VecOf<T>::type> dprev,
                      Cx<typename VecOf<T>::type> eprev, Cx<typename VecOf<T>::type> U,
                      Cx<typename VecOf<T>::type> Rt, Scratch<T>& s, double* zacc,
                      typename VecOf<T>::type* gk_left, typename VecOf<T>::type* gk_right,
                      Cx<typename VecOf<T>::type>* carry_out = nullptr) {
  typedef typename VecOf<T>::type V;
  const int64_t h = L / 2;
  const BwdSweepCtx<T> cx{io, io.in, V{} - pr.zi, L, h, L - h, s.D.p, s.SU.p, s.SA.p, s.SW.p, s.SM.p, io.in.has_mask};
  BwdChains<T> c{dprev, eprev, U, Rt, V{}, V{}};
  Cx<V> zs{V{}, V{}};  // sum of A_j over the current tile pair (flushed into double per tile)
  alignas(128) V tK[kTile + 1], tKB[kTile + 1];
  alignas(128) V tGA[kTile], tGAB[kTile], tGK[kTile], tGKB[kTile], tGM[kTile], tGMB[kTile];
  const BwdTiles<T> t{tK, tKB, tGA, tGAB, tGK, tGKB, tGM, tGMB};
  for (int64_t t0 = 0; t0 < h; t0 += kTile) bwd_phase1_tiles<T>(cx, c, t, t0);
  if (L & 1) bwd_middle<T, kLean>(cx, c, zs, t);
  for (int64_t t0 = 0; t0 < h; t0 += kTile) {
    const int64_t n = std::min(kTile, h - t0);
    const int64_t pa = cx.h2 + t0;  // d tile [pa, pa + n)
    const int64_t pb = h - t0 - n;  // e tile [pb, pb + n)
    io.in.k_tile(pa, n, t.K);
    io.in.k_tile(pb, n, t.KB);
    for (int64_t q = 0; q < n; ++q) {
      const int64_t qb = n - 1 - q;
      bwd_left_meets<T, kLean>(cx, c, zs, t, pa + q, q);
      bwd_right_meets<T, kLean>(cx, c, zs, t, pb + qb, qb);
    }
    bwd_phase2_store<T, kLean>(cx, t, pa, pb, n);
    if (!kLean) flush_zsum<T>(zs, zacc);
  }
  if (!kLean) flush_zsum<T>(zs, zacc);
#ifdef BK_ISA_AVX512
  if (io.stream) _mm_sfence();  // order the non-temporal stores before the block is reported done
#endif
  *gk_left = c.gk_pend;
  *gk_right = c.gkb_pend;
  if (carry_out) {  // d and U at L - 1: the carries into a sequential plan's next sub-chunk
    carry_out[0] = c.d;
    carry_out[1] = c.U;
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

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
