// What every backward sweep shares: the per-call state (BwdShared: carries, chunk summaries, z
// sums), a block's view of its inputs and gradient outputs (BwdIO), and small complex helpers.
// Part of bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

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

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
