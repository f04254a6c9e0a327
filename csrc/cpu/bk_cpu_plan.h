// How a call is cut into work: the tuning constants, the Plan (lanes, blocks, parallel chunks,
// sequential sub-chunks, skewed lanes), each block's lane geometry, the per-thread scratch and
// the parallel loops over blocks. Part of bk_core_cpu_impl.h (one copy per instruction set).
#pragma once

#ifndef BK_ISA_NS
#error "included by bk_core_cpu_impl.h only (which the per-ISA .cpp files include)"
#endif

namespace bk_cpu {
namespace BK_ISA_NS {
namespace {

constexpr int64_t kMinChunk = 256;  // shortest chunk worth its carry phases
constexpr int64_t kTile = 16;       // positions per transpose tile
// Moebius products are rescaled every 4 (float) / 16 (double) steps: each step grows the entries
// by at most ~|alpha| + |k|, so |a| up to ~1e9 stays far inside the exponent range between rescales.
template <class T>
constexpr int64_t kRescaleMask = sizeof(T) == 4 ? 3 : 15;
constexpr int64_t kMaxChunkFwd = 4096;  // forward keeps 1 complex per position and lane
constexpr int64_t kMaxChunkBwd = 4096;  // backward keeps 2 (two-sided) or 3 (causal)
constexpr int64_t kStreamOutBytes = int64_t(1) << 20;
#ifndef BK_SKEW_GROUPS
#define BK_SKEW_GROUPS 8
#endif
#ifndef BK_SKEW_MIN_BYTES
#define BK_SKEW_MIN_BYTES 4096
#endif
constexpr int64_t kSkewGroups = BK_SKEW_GROUPS;  // distinct lane offsets of a skewed plan
constexpr int64_t kSkewMinN = BK_SKEW_MIN_BYTES;  // shortest row (bytes) worth skewing

template <class T>
struct Plan {
  typedef typename VecOf<T>::type V;
  static constexpr int NL = BK_PACK_BYTES / sizeof(T);
  int64_t B, N, C, Lc, lanes, blocks;
  // Sequential sub-chunks (S > 1 only when C == 1): each lane is a whole sequence, run by its
  // block as S sub-chunks of Ls positions (a multiple of kTile), one after the other.
  int64_t S = 1, Ls = 0;

  // max_chunk bounds a chunk so that the block's per-position scratch stays in L2. When the batch
  // fills every thread's lanes without cutting sequences, a sequence longer than max_chunk is cut
  // into sequential sub-chunks instead of parallel chunks (no carries phase).
  Plan(int64_t B_, int64_t N_, int threads, int64_t max_chunk) : B(B_), N(N_) {
    int64_t want = int64_t(NL) * std::max(1, threads);
    C = 1;
    if (B < want) {
      C = (want + B - 1) / B;
      C = std::min<int64_t>(C, std::max<int64_t>(1, N / kMinChunk));
    }
    if (C == 1 && N > max_chunk) {
      S = (N + max_chunk - 1) / max_chunk;
      Ls = ((N + S - 1) / S + kTile - 1) / kTile * kTile;
      S = (N + Ls - 1) / Ls;
    }
    if (S == 1) C = std::max<int64_t>(C, (N + max_chunk - 1) / max_chunk);
    Lc = (N + C - 1) / C;
    C = (N + Lc - 1) / Lc;  // no empty chunk
    if (S == 1) Ls = Lc;
    lanes = B * C;
    blocks = (lanes + NL - 1) / NL;
  }
  bool chunked() const { return C > 1; }
  // Skewed lanes (see skew_lanes): lane l of a block starts its sweep sk * (l % kSkewGroups)
  // positions before its row, so the rows a tile touches sit at different offsets.
  int64_t sk = 0;
  // Rows of N elements of T whose starts are (almost) a multiple of 4 KiB apart put every lane's
  // tile in the same L1 sets: a tile's 16 row loads and 32 output lines then evict each other
  // (measured 30% of the two-sided forward at B = 64, N = 4096 float32). Whole-sequence plans
  // (C = S = 1) of such rows run with skewed lanes instead: lane l is shifted by sk * (l % G)
  // positions, sk = 64 bytes of T and G = kSkewGroups, so its rows spread over G line offsets. The lanes' first
  // and last positions are padding (alpha = 1 - i Im z, k = 0: decoupled, never written), the
  // sweep is (G - 1) * sk positions longer. The forward's output is bit-for-bit that of an
  // unskewed sweep (a pivot chain entering a row through k = 0 starts at d = alpha exactly); the
  // backward's two halves meet at another position, so its gradients agree to rounding.
  void skew_lanes() {
    if (C != 1 || S != 1 || N * int64_t(sizeof(T)) < kSkewMinN) return;
    const int64_t r = (N * int64_t(sizeof(T))) % 4096, d = std::min(r, 4096 - r);
    if (d * kSkewGroups >= 2048) return;  // the rows already fall on different sets
    sk = 64 / int64_t(sizeof(T));
    Lc = N + sk * (kSkewGroups - 1);
    Ls = Lc;
  }
  int64_t shift(int l) const { return sk * (l % kSkewGroups); }
  // Lanes are chunk-major: lane (b, ch) = ch * B + b, so with B a multiple of NL every block holds
  // one chunk of NL sequences, and a shared coupling row is uniform across the block's lanes.
  int64_t lane(int64_t b, int64_t ch) const { return ch * B + b; }
};

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
      li[l].row = v % pl.B;
      li[l].chunk = v / pl.B;
      li[l].start = li[l].chunk * pl.Lc;
      li[l].len = std::min(pl.Lc, pl.N - li[l].start);
      if (pl.sk) {  // skewed: chunk positions [shift, shift + N) hold the row
        li[l].start = -pl.shift(l);
        li[l].len = pl.N + pl.shift(l);
      }
    } else {
      li[l] = LaneInfo{-1, 0, 0, 0};
    }
  }
}

// The lanes of a sequential plan (whole sequences) restricted to sub-chunk s.
template <class T>
static int64_t sub_chunk(const Plan<T>& pl, const LaneInfo* li, int64_t s, LaneInfo* out) {
  const int64_t start = s * pl.Ls, len = std::min(pl.Ls, pl.N - start);
  for (int l = 0; l < Plan<T>::NL; ++l)
    out[l] = li[l].row >= 0 ? LaneInfo{li[l].row, start, len, s} : LaneInfo{-1, 0, 0, 0};
  return len;
}

// Everything one block keeps across its passes (full chunk length).
template <class T>
struct Scratch {
  typedef typename VecOf<T>::type V;
  Buf<Cx<V>> D;      // two-sided forward: the pivots each chain stores on its half; causal forward: 1/d
  Buf<Cx<V>> ID;     // causal backward: 1 / d
  Buf<Cx<V>> P;      // causal backward: q_j = -w'_j / d_j^2
  Buf<Cx<V>> R;      // causal backward: the mu coefficients k_j / d_j^2
  Buf<V> SA;         // two-sided: Re alpha, lane-major (gathered once, read by both halves)
  Buf<Cx<V>> SI;     // two-sided backward: the inverse pivot each chain stores on its half
  Buf<Cx<V>> SU;     // two-sided backward: the accumulator (U or Rt) each chain stores on its half
  Buf<Cx<V>> SW;     // two-sided backward: w, lane-major (gathered once, read by both halves)
  Buf<V> SM;         // two-sided backward with a mask: the mask, lane-major
  void alloc_fwd(int64_t Lc) {
    D.alloc(Lc);
    SA.alloc(Lc);
  }
  void alloc_bwd_causal(int64_t Lc) {
    ID.alloc(Lc);
    P.alloc(Lc);
    R.alloc(Lc);
  }
  void alloc_bwd_two_sided(int64_t Lc, bool mask) {
    SA.alloc(Lc);
    D.alloc(Lc);
    SU.alloc(Lc);
    SW.alloc(Lc);
    if (mask) SM.alloc(Lc);
  }
};

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

// Runs f(blk0, nb) over the blocks in groups of nb = 2 when there are enough to give every thread
// at least one group (the sequential plans' boundary chains run two blocks at once), else singly.
template <class T, class F>
static void parallel_block_groups(const Par& par, const Plan<T>& pl, F&& f) {
  if (pl.blocks >= 2 * int64_t(std::max(1, par.num_threads)))
    parallel_blocks(par, (pl.blocks + 1) / 2, [&](int64_t i) { f(2 * i, std::min<int64_t>(2, pl.blocks - 2 * i)); });
  else
    parallel_blocks(par, pl.blocks, [&](int64_t blk) { f(blk, 1); });
}

}  // namespace
}  // namespace BK_ISA_NS
}  // namespace bk_cpu
