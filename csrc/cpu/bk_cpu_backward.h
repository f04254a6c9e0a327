// backward_impl: picks the plan and runs the backward of a call (the causal from the saved
// output, a sequential plan's sub-chunks, or a parallel plan with its carries and scans), then
// sums grad z. Part of bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

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
  if (!pr.d_in) pl.skew_lanes();
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
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
