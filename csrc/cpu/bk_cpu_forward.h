// Forward sweeps: the two-sided bidirectional sweep (d and e chains meeting in the middle), the
// causal d chains (y = 1 / d), the sequential plans' right-to-left boundary pass (shared with the
// two-sided backward), and forward_impl, which picks the plan and runs the blocks. Part of
// bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

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
#ifdef BK_ISA_AVX512
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
#ifdef BK_ISA_AVX512
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
    dprev[b] = pl.S > 1 ? entry_pivot(pr, li[b]) : load_carry(car.d_in, blk0 + b, li[b]);
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
  if (!pr.d_in) pl.skew_lanes();  // (a skewed lane's row starts after padding: no entering pivot)
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

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
