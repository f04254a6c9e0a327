// BK-Core CUDA kernels: forward and exact backward, two-sided and causal, optional mask.
// No torch headers here (see bk_core_cuda.h); the arithmetic is csrc/bk_math.h, shared with the
// CPU kernels, so the CPU tests exercise the same formulas. Global pointers are bk_cuda::gptr<T>
// (plain pointers; counting accessors in the tests' CPU emulation, which asserts the traffic).
//
// Forward (fwd_chunk_kernel, see "Forward: on-chip chunks" below): a block keeps a tile of lanes x
// positions of a and k in shared memory and the pivots in registers, reads a once and writes the
// output once; the chunk carries are parallel scans of 2x2 Moebius maps over the block's threads,
// and between a row's blocks either a row scan of block maps (two-sided: row_scan) or, causal, a
// decoupled look-back in the same pass (look_back): never a serial walk over a row's chunks.
//
// Backward (bwd_chunk_kernel): the same plan and tiles; the pivots are recomputed on chip, the
// upstream gradient read once per pass, and the gradient recurrences (affine maps) carried by the
// same scans (causal: a look-back from the rows' ends). grad_z: per-block partial sums in double,
// added in a fixed order (zsum_kernel), so the result is deterministic.
//
// A carried state (causal; Problem::d_in, k_in) enters where a row starts: the row's first segment
// starts its chain from d_in with the coupling k_in (rows over several blocks: the row's first
// block's map includes that coupling and its look-back starts at d_in). No extra pass, O(B) more
// traffic; the backward also writes mu at position 0 (Grads::mu0), from which the op layer forms
// the state's gradients.
#include "bk_core_cuda.h"

#include <algorithm>
#include <type_traits>

#include "../bk_math.h"

namespace bk_cuda {
namespace {

using bk::Cx;
using bk::Mobius;

constexpr int kSumThreads = 256;
constexpr int64_t kFwdThreadsPerSm = 2048;  // threads the automatic plan aims for per SM

template <class T>
__device__ __forceinline__ T max_abs(const Mobius<T>& m) {
  T a = fmax(fmax(fabs(m.x0.re), fabs(m.x0.im)), fmax(fabs(m.y0.re), fabs(m.y0.im)));
  T b = fmax(fmax(fabs(m.x1.re), fabs(m.x1.im)), fmax(fabs(m.y1.re), fabs(m.y1.im)));
  return fmax(a, b);
}

// Device workspace, carved from one buffer in a fixed order (the same for the size query).
template <class T>
struct Ws {
  gptr<Mobius<T>> bmf, bmb;  // each block's pivot maps (rows over several blocks); backward: then its
                             // gradient maps (R or mu in bmf, L in bmb)
  gptr<Cx<T>> bdin, bein;    // the pivots entering each block
  gptr<Cx<T>> glin, grin;    // backward: L and R (mu) entering each block
  gptr<double> zpart;        // backward: per-block partial sums of A (two-sided) or mu (causal)
  // causal rows over several blocks (the decoupled look-back): two ticket counters and a status word
  // per block and pass (zeroed by one memset per launch: `flags`, `flag_bytes`), each block's map
  // and the value leaving it
  gptr<int> flags;
  size_t flag_bytes = 0;
  gptr<Mobius<T>> lagg;
  gptr<Cx<T>> lincl;
};

constexpr int kTicketPad = 64;  // ints before the status words: the forward ticket at 0, the backward's at 32

// Whether the launchers carry this plan's rows by the decoupled look-back (causal, several blocks
// per row, not Plan::deterministic).
inline bool uses_lookback(const Plan& pl, bool causal) { return causal && pl.cb > 1 && !pl.deterministic; }

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
  // block carries only (rows over several blocks)
  if (uses_lookback(pl, causal)) {  // the look-back: the forward's pass, or the backward's two
    const int64_t passes = backward ? 2 : 1;
    w.flags = c.take<int>(kTicketPad + passes * pl.blocks);
    w.flag_bytes = sizeof(int) * size_t(kTicketPad + passes * pl.blocks);
    w.lagg = c.take<Mobius<T>>(pl.blocks);
    w.lincl = c.take<Cx<T>>(pl.blocks);
    if (backward) w.bdin = c.take<Cx<T>>(pl.blocks);
  } else if (pl.cb > 1) {  // block maps and row scans (the backward reuses the pivot maps' storage for
                           // its gradient maps)
    w.bmf = c.take<Mobius<T>>(pl.blocks);
    w.bdin = c.take<Cx<T>>(pl.blocks);
    if (!causal) {
      w.bmb = c.take<Mobius<T>>(pl.blocks);
      w.bein = c.take<Cx<T>>(pl.blocks);
    }
    if (backward) {
      w.grin = c.take<Cx<T>>(pl.blocks);
      if (!causal) w.glin = c.take<Cx<T>>(pl.blocks);
    }
  }
  if (backward) w.zpart = c.take<double>(2 * pl.blocks);
  if (bytes) *bytes = c.off;
  return w;
}

// ---------------------------------------------------------------------------------------------
// Forward: on-chip chunks (see Plan). Every block loads its tile of a and k once (16-byte vector
// loads of a where aligned), each thread composes the Moebius maps of its segment (forward and
// backward), a Hillis-Steele scan over the block's threads gives every segment the pivots entering
// it from either side, the thread runs its pivots in registers and the block stores the outputs
// once (16-byte vector stores). A row longer than one block takes its block carries from
// fwd_block_maps (the same tile work, one map pair per block) and fwd_row_scan (a parallel scan of
// the maps of each row's blocks): a twice read, out written once.

template <class T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  static __device__ __forceinline__ float4 make(const float* e) { return float4{e[0], e[1], e[2], e[3]}; }
};
template <>
struct Vec16<double> {
  using type = double2;
  static __device__ __forceinline__ double2 make(const double* e) { return double2{e[0], e[1]}; }
};

#if defined(BK_EMU_TRAFFIC)
template <class P>
__device__ __forceinline__ uintptr_t address_of(const P& p) {
  return reinterpret_cast<uintptr_t>(p.raw());
}
#else
template <class X>
__device__ __forceinline__ uintptr_t address_of(X* p) {
  return reinterpret_cast<uintptr_t>(p);
}
template <class V, class X>
__device__ __forceinline__ V ld_vec(const X* p) {
  return *reinterpret_cast<const V*>(p);
}
template <class V, class X>
__device__ __forceinline__ void st_vec(X* p, const V& v) {
  __stcs(reinterpret_cast<V*>(p), v);  // streaming: the output is not read again by this kernel
}
#endif

constexpr int kTile = kFwdThreads * kSegMax + kFwdThreads;  // padded: segment t starts at t * (S + 1)

// The block's piece of the (B, N) arrays: the contiguous range [g0, g0 + glen), rows r0.. (cb == 1)
// or positions p0.. of row r0 (cb > 1); local position q of global offset o (from g0) is
// (o / rowlen) * (segs * S) + o % rowlen.
struct FwdGeo {
  int64_t r0, p0, g0, glen, rowlen, rows;
  int nseg;  // segments of one row in this block
};

// blk: the block's logical index (blockIdx.x, or its look-back ticket's block).
__device__ __forceinline__ FwdGeo fwd_geo(const Plan& pl, int64_t blk) {
  FwdGeo g;
  if (pl.cb == 1) {
    g.r0 = blk * pl.rpb;
    g.rows = pl.B - g.r0 < pl.rpb ? pl.B - g.r0 : pl.rpb;
    g.p0 = 0;
    g.rowlen = pl.N;
    g.glen = g.rows * pl.N;
    g.nseg = int(pl.segs);
  } else {
    const int64_t ci = blk / pl.B;
    g.r0 = blk - ci * pl.B;
    g.rows = 1;
    g.p0 = ci * pl.T * pl.S;
    g.rowlen = pl.N - g.p0 < int64_t(pl.T) * pl.S ? pl.N - g.p0 : int64_t(pl.T) * pl.S;
    g.glen = g.rowlen;
    g.nseg = int((g.rowlen + pl.S - 1) / pl.S);
  }
  g.g0 = g.r0 * pl.N + g.p0;
  return g;
}

// Shared-memory slot of local position q: one padding slot per segment (conflict-free walks).
__device__ __forceinline__ int sidx(int64_t q, int S) { return int(q + q / S); }

template <class T>
struct FwdSmem {
  // [0, kTile): alpha.re (a - Re z), pad 1; [kTile, 2 kTile): k at the same position (coupling to
  // the next), pad 0. Reused for the outputs (2 values per position).
  T ak[2 * kTile];
  Mobius<T> m[kFwdThreads];
  // per row slot of the block: k coupling the row's first position in the block to the one left of
  // it, and the pivot there (a row start: 0 and 1, or a carried state's k_in and d_in; rows over
  // several blocks: the block carries)
  T kin[kFwdThreads];
  Cx<T> din[kFwdThreads];
  T zr, zi;    // z, read once per block
  Cx<T> ein;   // the pivot entering the block from the right (rows over several blocks)
};

// Loads a and k of the block's tile (and kin, din). Threads past the block's range only help.
// Every global value a block needs once (z, the block carries) is read by thread 0 into shared
// memory: one load per block, not one per thread; the values of each row it holds (kin, din) by
// one thread per row.
template <class T>
__device__ __forceinline__ T fwd_load(const Problem<T>& pr, const Plan& pl, const FwdGeo& g, FwdSmem<T>& sm,
                                      gptr<Cx<T>> bdin, gptr<Cx<T>> bein, int64_t blk) {
  const int S = int(pl.S), t = threadIdx.x, nt = blockDim.x;
  const int64_t rowq = pl.segs * pl.S;
  for (int i = t; i < kTile; i += nt) {
    sm.ak[i] = T(1);
    sm.ak[kTile + i] = T(0);
  }
  if (t == 0) {
    sm.zr = pr.zri[0];
    sm.zi = pr.zri[1];
    sm.ein = bein ? Cx<T>(bein[blk]) : Cx<T>{T(1), T(0)};
  }
  if (t < g.rows) {  // rows <= rpb <= blockDim.x
    const int64_t r = g.r0 + t;
    const bool start = g.p0 == 0;
    sm.kin[t] = !start ? T(pr.k[r * pr.k_row_stride + g.p0 - 1]) : pr.k_in ? T(pr.k_in[r]) : T(0);
    // rows over several blocks: the block carry (from the row scan, which starts at the state; the
    // block maps need none); whole rows: the state, or a fresh start
    sm.din[t] = bdin                            ? Cx<T>(bdin[blk])
                : (start && pr.d_in && pl.cb == 1) ? Cx<T>{T(pr.d_in[2 * r]), T(pr.d_in[2 * r + 1])}
                                                   : Cx<T>{T(1), T(0)};
  }
  __syncthreads();
  const T zr = sm.zr;
  auto put_a = [&](int64_t o, T v) {
    const int64_t r = o / g.rowlen, p = o - r * g.rowlen;
    sm.ak[sidx(r * rowq + p, S)] = v - zr;
  };
  // a: scalar head up to 16-byte alignment, 16-byte vectors, scalar tail
  constexpr int VW = 16 / int(sizeof(T));
  using V = typename Vec16<T>::type;
  const auto base = pr.a + g.g0;
  const uintptr_t ad = address_of(base);
  int64_t head = ad % sizeof(T) ? g.glen : int64_t((16 - ad % 16) % 16 / sizeof(T));
  head = head < g.glen ? head : g.glen;
  const int64_t nvec = (g.glen - head) / VW, tail0 = head + nvec * VW;
  for (int64_t o = t; o < head; o += nt) put_a(o, base[o]);
  for (int64_t v = t; v < nvec; v += nt) {
    const V x = ld_vec<V>(base + (head + v * VW));
    const T* e = reinterpret_cast<const T*>(&x);
#pragma unroll
    for (int c = 0; c < VW; ++c) put_a(head + v * VW + c, e[c]);
  }
  for (int64_t o = tail0 + t; o < g.glen; o += nt) put_a(o, base[o]);
  // k (rows of N - 1; 0 at a row's last position)
  for (int64_t o = t; o < g.glen; o += nt) {
    const int64_t r = o / g.rowlen, pl_ = o - r * g.rowlen, p = g.p0 + pl_;
    if (p < pl.N - 1) sm.ak[kTile + sidx(r * rowq + pl_, S)] = pr.k[(g.r0 + r) * pr.k_row_stride + p];
  }
  __syncthreads();
  return sm.zi;
}

// This thread's segment: row slot, index in the block's part of the row, local start q, length.
struct Seg {
  int64_t slot, u, q, len;
  bool act;
};

__device__ __forceinline__ Seg fwd_seg(const Plan& pl, const FwdGeo& g) {
  Seg s;
  const int t = threadIdx.x;
  s.slot = t / g.nseg;
  s.u = t - s.slot * g.nseg;
  s.act = s.slot < g.rows;
  s.q = s.slot * pl.segs * pl.S + s.u * pl.S;
  const int64_t p = s.u * pl.S;  // position in the block's part of the row
  const int64_t left = g.rowlen - p;
  s.len = s.act ? (left < pl.S ? left : pl.S) : 0;
  return s;
}

// k coupling position q - 1 to q in the tile (the row's kin before its first position in the block).
template <class T>
__device__ __forceinline__ T k_left(const FwdSmem<T>& sm, const Seg& s, int S) {
  if (s.u > 0) return sm.ak[kTile + sidx(s.q - 1, S)];
  return s.act ? sm.kin[s.slot] : T(0);  // a row start: 0, or a carried state's k_in
}

// The pivot left of the row's first position in the block (see FwdSmem::din).
template <class T>
__device__ __forceinline__ Cx<T> d_left(const FwdSmem<T>& sm, const Seg& s) {
  return s.act ? Cx<T>(sm.din[s.slot]) : Cx<T>{T(1), T(0)};
}

template <class T>
__device__ __forceinline__ Mobius<T> mul_rescaled(const Mobius<T>& x, const Mobius<T>& y) {
  // x * y as matrices on (d, 1) columns: apply y first, then x
  Mobius<T> r;
  r.x0 = x.x0 * y.x0 + x.x1 * y.y0;
  r.y0 = x.y0 * y.x0 + x.y1 * y.y0;
  r.x1 = x.x0 * y.x1 + x.x1 * y.y1;
  r.y1 = x.y0 * y.x1 + x.y1 * y.y1;
  const T s = max_abs(r);
  if (s > T(0) && s < T(INFINITY)) bk::mobius_rescale(r, T(1) / s);
  return r;
}

// Inclusive Hillis-Steele scan of the threads' maps within each row part of nseg threads.
// forward: m_t <- m_t * m_{t-off} (prefix, left to right); backward: m_t <- m_t * m_{t+off}.
template <class T>
__device__ __forceinline__ Mobius<T> block_scan(FwdSmem<T>& sm, Mobius<T> m, const Seg& s, int nseg, bool fwd) {
  const int t = threadIdx.x;
  sm.m[t] = m;
  __syncthreads();
  for (int off = 1; off < nseg; off <<= 1) {
    const bool take = s.act && (fwd ? s.u >= off : s.u + off < nseg);
    Mobius<T> o;
    if (take) o = sm.m[fwd ? t - off : t + off];
    __syncthreads();
    if (take) {
      m = mul_rescaled(m, o);
      sm.m[t] = m;
    }
    __syncthreads();
  }
  return m;  // sm.m holds the inclusive scan
}

// The segment's maps: f maps d left of the segment to d at its last position; b maps e right of
// it to e at its first position.
template <class T>
__device__ __forceinline__ void seg_maps(const FwdSmem<T>& sm, const Seg& s, int S, T zi, Mobius<T>& f,
                                         Mobius<T>& b, bool two_sided) {
  f = bk::mobius_identity<T>();
  b = bk::mobius_identity<T>();
  T kprev = k_left(sm, s, S);
  for (int j = 0; j < s.len; ++j) {
    const int i = sidx(s.q + j, S);
    const Cx<T> al{sm.ak[i], -zi};
    const T kk = sm.ak[kTile + i];
    bk::mobius_step(f, al, kprev);
    if (two_sided) bk::mobius_step_right(b, al, kk);
    kprev = kk;
    if (j & 1) {
      bk::mobius_rescale(f, T(1) / max_abs(f));
      if (two_sided) bk::mobius_rescale(b, T(1) / max_abs(b));
    }
  }
}

// Pass 1 (rows spanning several blocks): each block's total maps.
template <class T>
__global__ void __launch_bounds__(kFwdThreads) fwd_block_maps(Problem<T> pr, Plan pl, gptr<Mobius<T>> bmf,
                                                               gptr<Mobius<T>> bmb) {
  __shared__ FwdSmem<T> sm;
  const int64_t blk = blockIdx.x;
  const FwdGeo g = fwd_geo(pl, blk);
  const T zi = fwd_load(pr, pl, g, sm, gptr<Cx<T>>(nullptr), gptr<Cx<T>>(nullptr), blk);
  const Seg s = fwd_seg(pl, g);
  const int S = int(pl.S);
  const bool two = !pr.causal;
  Mobius<T> f, b;
  seg_maps(sm, s, S, zi, f, b, two);
  block_scan(sm, f, s, g.nseg, true);
  if (threadIdx.x == 0) bmf[blockIdx.x] = Mobius<T>(sm.m[g.nseg - 1]);
  __syncthreads();
  if (two) {
    block_scan(sm, b, s, g.nseg, false);
    if (threadIdx.x == 0) bmb[blockIdx.x] = Mobius<T>(sm.m[0]);
  }
}

// Pass 2 (rows over several blocks, except causal ones with the look-back): one block per row scans
// the row's `count` maps (map c of row r at c * cstride + r * rstride): fin[c] = the value left of
// piece c (maps mf, left to right, from `start`, or from the row's entry of start_rows ((rows, 2)
// interleaved complex: a carried state) when given), bin[c] = the value right of it (maps mb, right
// to left); either map array may be null. Each thread composes a run of ceil(count / threads) maps,
// a Hillis-Steele scan joins the runs, each thread applies its run. The forward uses it for the
// pivots entering each block (start 1: the coupling there is 0); the backward for the pivots and,
// with affine maps x -> c x + p written as [[c, p], [0, 1]], for its gradient recurrences (start 0).
template <class T>
__global__ void __launch_bounds__(kRowScanThreads) row_scan(int64_t count, int64_t cstride, int64_t rstride,
                                                            gptr<Mobius<T>> mf, gptr<Mobius<T>> mb, gptr<Cx<T>> fin,
                                                            gptr<Cx<T>> bin, Cx<T> start_all,
                                                            gptr<const T> start_rows) {
  __shared__ Cx<T> start_sm;
  __shared__ Mobius<T> sm[kRowScanThreads];
  const int t = threadIdx.x, nt = blockDim.x;
  const int64_t row = blockIdx.x, cb = count, run = (cb + nt - 1) / nt;
  const int64_t c0 = t * run, c1 = c0 + run < cb ? c0 + run : cb;
  if (t == 0) start_sm = start_rows ? Cx<T>{T(start_rows[2 * row]), T(start_rows[2 * row + 1])} : start_all;
  __syncthreads();
  const Cx<T> start = start_sm;
  for (int dir = 0; dir < 2; ++dir) {
    const bool fwd = dir == 0;
    const gptr<Mobius<T>> maps = fwd ? mf : mb;
    if (!maps) continue;
    auto at = [&](int64_t c) { return c * cstride + row * rstride; };
    // the run's composed map (forward: applied left to right; backward: right to left)
    Mobius<T> m = bk::mobius_identity<T>();
    for (int64_t c = c0; c < c1; ++c) {
      if (fwd)
        m = mul_rescaled(Mobius<T>(maps[at(c)]), m);
      else
        m = mul_rescaled(m, Mobius<T>(maps[at(c)]));
    }
    sm[t] = m;
    __syncthreads();
    for (int off = 1; off < nt; off <<= 1) {
      const bool take = fwd ? t >= off : t + off < nt;
      Mobius<T> o;
      if (take) o = sm[fwd ? t - off : t + off];
      __syncthreads();
      if (take) {
        m = mul_rescaled(m, o);
        sm[t] = m;
      }
      __syncthreads();
    }
    // exclusive: the maps of all runs before (forward) or after (backward) this one
    Mobius<T> ex = bk::mobius_identity<T>();
    if (fwd ? t > 0 : t + 1 < nt) ex = sm[fwd ? t - 1 : t + 1];
    __syncthreads();
    if (c0 < c1) {
      if (fwd) {
        Cx<T> d = t > 0 ? bk::mobius_apply(ex, start) : start;
        for (int64_t c = c0; c < c1; ++c) {
          fin[at(c)] = d;
          d = bk::mobius_apply(Mobius<T>(maps[at(c)]), d);
        }
      } else {
        Cx<T> e = (t + 1 < nt && c1 < cb) ? bk::mobius_apply(ex, start) : start;
        for (int64_t c = c1 - 1; c >= c0; --c) {
          bin[at(c)] = e;
          e = bk::mobius_apply(Mobius<T>(maps[at(c)]), e);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decoupled look-back (causal rows over several blocks): one pass instead of block maps, a row
// scan and a second read of the tile. A block takes a ticket (atomicAdd: blocks may start in any
// order, a ticket's predecessors have all started), which names the logical block it works on: in
// the forward ticket t is block t (chunk t / B of row t % B), in the backward's gradient pass the
// chunks run from the row's end. The block loads its tile, scans its map (the pivots' Moebius map,
// or the gradient recurrence's affine map) and publishes it with status kAgg. It then reads the
// statuses of the blocks before it in its row, nearest first, in windows (4, then one per thread of
// the block), each thread reading its block's status and then what it published: it composes the
// maps of those still kAgg up to the nearest kIncl one (a tree over the window), whose published
// value (the pivot or gradient leaving it) gives the value entering this block. It publishes its own leaving
// value with status kIncl and goes on with its outputs. A row's first block starts from the row
// start at once. Only thread 0 publishes; a value is written before its status word is released
// (st.release), and read after the status was acquired (ld.acquire) by the same thread, so it is
// never stale. A block waits only for blocks with smaller tickets, which are running or done: no
// deadlock however many blocks are resident.

enum : int { kEmpty = 0, kAgg = 1, kIncl = 2 };
constexpr int kLookFirst = 4, kLookWindow = kFwdThreads, kLookNone = 1 << 30;

#if defined(BK_EMU_TRAFFIC)
using bk_emu::backoff;
using bk_emu::load_acquire;
using bk_emu::store_release;
using bk_emu::take_ticket;
#else
__device__ __forceinline__ int take_ticket(int* p) { return atomicAdd(p, 1); }
__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void backoff() { __nanosleep(32); }
#endif

template <class T>
struct Look {  // one pass's descriptors (see Ws); status == nullptr: no look-back
  gptr<int> ticket, status;
  gptr<Mobius<T>> agg;
  gptr<Cx<T>> incl;
};

template <class T>
struct LookSmem {
  Mobius<T> m[kLookWindow];  // the window's aggregate maps
  Cx<T> v[kLookWindow];      // the window's inclusive values
  Cx<T> carry;
  int ticket, first, done;
};

template <class T>
__device__ __forceinline__ int64_t look_ticket(const Look<T>& lk, LookSmem<T>& ls) {
  if (threadIdx.x == 0) ls.ticket = take_ticket(lk.ticket);
  __syncthreads();
  return ls.ticket;
}

// The value entering logical block blk from the blocks before it in its row: blk - step,
// blk - 2 step, ... (nprev of them; step = B forward, -B for the backward's right-to-left pass).
// own: this block's map (thread 0's is used); start: the value entering the row's first block
// (thread 0's). Publishes the block's map and then its leaving value. Every thread of the block
// calls it and gets the carry.
template <class T>
__device__ Cx<T> look_back(const Look<T>& lk, LookSmem<T>& ls, int64_t blk, int64_t step, int64_t nprev,
                           const Mobius<T>& own, const Cx<T>& start) {
  const int t = threadIdx.x;
  if (nprev == 0) {
    if (t == 0) {
      lk.incl[blk] = bk::mobius_apply(own, start);
      store_release(lk.status + blk, kIncl);
      ls.carry = start;
    }
    __syncthreads();
    return ls.carry;
  }
  if (t == 0) {
    lk.agg[blk] = own;
    store_release(lk.status + blk, kAgg);
    ls.first = kLookNone;
  }
  __syncthreads();
  Mobius<T> acc = bk::mobius_identity<T>();  // thread 0: from the value leaving the window's end to here
  int64_t base = 0;                          // predecessors composed so far
  for (int round = 0;; ++round) {
    int64_t w_ = round == 0 ? kLookFirst : kLookWindow;
    w_ = w_ < int64_t(blockDim.x) ? w_ : int64_t(blockDim.x);
    const int w = int(nprev - base < w_ ? nprev - base : w_);
    const int64_t j = blk - (base + t + 1) * step;  // thread t's predecessor (t < w)
    if (t < w) {  // its status, then at once what it published (read after the status was acquired)
      int st;
      while ((st = load_acquire(lk.status + j)) == kEmpty) backoff();
      if (st == kIncl) {
        ls.v[t] = Cx<T>(lk.incl[j]);
        atomicMin(&ls.first, t);
      } else {
        ls.m[t] = Mobius<T>(lk.agg[j]);
      }
    }
    __syncthreads();
    const int f = ls.first < w ? ls.first : w;  // the nearest inclusive one, or w
    // ls.m[0] <- m_0 m_1 ... m_{f-1} (nearest first): a tree, log2(w) steps
    for (int off = 1; off < w; off <<= 1) {
      if (t % (2 * off) == 0 && t + off < f) ls.m[t] = mul_rescaled(Mobius<T>(ls.m[t]), Mobius<T>(ls.m[t + off]));
      __syncthreads();
    }
    if (t == 0) {
      if (f > 0) acc = mul_rescaled(acc, Mobius<T>(ls.m[0]));
      ls.done = f < w;
      if (f < w) {
        ls.carry = bk::mobius_apply(acc, Cx<T>(ls.v[f]));
        lk.incl[blk] = bk::mobius_apply(own, ls.carry);
        store_release(lk.status + blk, kIncl);
      }
      ls.first = kLookNone;
    }
    __syncthreads();
    if (ls.done) break;
    base += w;
  }
  return ls.carry;
}

// Pass 3 (the only one when a block holds whole rows): pivots and outputs.
// With a look-back (lk.status, causal rows over several blocks) the block's carry comes from it
// (bdin unused on entry); carry_only: only the carry is wanted, written to bdin[blk] (the backward's
// first pass), no outputs. kLook: compiled for the look-back (causal only: no two-sided code, fewer
// registers).
template <class T, bool kLook>
__global__ void __launch_bounds__(kFwdThreads) fwd_chunk_kernel(Problem<T> pr, Plan pl, gptr<Cx<T>> bdin,
                                                                 gptr<Cx<T>> bein, gptr<T> out, Look<T> lk,
                                                                 bool carry_only) {
  __shared__ FwdSmem<T> sm;
  __shared__ LookSmem<T> ls;
  constexpr bool look = kLook;
  const int64_t blk = look ? look_ticket(lk, ls) : int64_t(blockIdx.x);
  const FwdGeo g = fwd_geo(pl, blk);
  const bool two = !look && !pr.causal, multi = pl.cb > 1;
  const T zi = fwd_load(pr, pl, g, sm, (multi && !look) ? bdin : gptr<Cx<T>>(nullptr),
                        (multi && two) ? bein : gptr<Cx<T>>(nullptr), blk);
  const Seg s = fwd_seg(pl, g);
  const int S = int(pl.S), t = threadIdx.x;
  const Cx<T> one{T(1), T(0)};
  Mobius<T> f, b;
  seg_maps(sm, s, S, zi, f, b, two);
  block_scan(sm, f, s, g.nseg, true);
  if (look) {  // one row per block (cb > 1): its slot 0
    const int64_t ci = blk / pl.B;
    Cx<T> start = one;
    if (t == 0 && ci == 0 && pr.d_in) start = Cx<T>{T(pr.d_in[2 * g.r0]), T(pr.d_in[2 * g.r0 + 1])};
    const Cx<T> c = look_back(lk, ls, blk, pl.B, ci, Mobius<T>(sm.m[g.nseg - 1]), start);
    if (t == 0) {
      sm.din[0] = c;
      if (carry_only) bdin[blk] = c;
    }
    __syncthreads();
    if (carry_only) return;
  }
  // pivot entering the segment from the left
  const Cx<T> din_blk = d_left(sm, s);
  Cx<T> dprev = din_blk;
  if (s.act && s.u > 0) dprev = bk::mobius_apply(Mobius<T>(sm.m[t - 1]), din_blk);
  __syncthreads();
  Cx<T> eprev = one;
  if (two) {
    const Cx<T> ein_blk = sm.ein;
    block_scan(sm, b, s, g.nseg, false);
    eprev = ein_blk;
    if (s.act && s.u + 1 < g.nseg) eprev = bk::mobius_apply(Mobius<T>(sm.m[t + 1]), ein_blk);
  }
  // pivots in registers
  Cx<T> v[kSegMax];
  T kprev = k_left(sm, s, S);
#pragma unroll
  for (int j = 0; j < kSegMax; ++j) {
    if (j < s.len) {
      const int i = sidx(s.q + j, S);
      const Cx<T> al{sm.ak[i], -zi};
      const Cx<T> d = bk::pivot_step(al, kprev, dprev);
      kprev = sm.ak[kTile + i];
      dprev = d;
      v[j] = two ? d : bk::recip(d);
    }
  }
  if (two) {
#pragma unroll
    for (int j = kSegMax - 1; j >= 0; --j) {
      if (j < s.len) {
        const int i = sidx(s.q + j, S);
        const Cx<T> al{sm.ak[i], -zi};
        const Cx<T> e = bk::pivot_step(al, sm.ak[kTile + i], eprev);
        v[j] = bk::combine(v[j], e, al);
        eprev = e;
      }
    }
  }
  __syncthreads();  // every thread is done with the a and k tiles: they become the output tile
  T* so = sm.ak;
#pragma unroll
  for (int j = 0; j < kSegMax; ++j) {
    if (j < s.len) {
      const int i = sidx(s.q + j, S);
      so[2 * i] = v[j].re;
      so[2 * i + 1] = v[j].im;
    }
  }
  __syncthreads();
  // out[2 (g0 + o) + c] for o in [0, glen): 16-byte vectors where aligned; the mask scales
  const int nt = blockDim.x;
  const int64_t rowq = pl.segs * pl.S;
  int64_t mo = -1;  // the element whose mask value mv this thread read last (read once per element)
  T mv = T(1);
  auto val = [&](int64_t w) -> T {  // w: index into the block's 2 * glen output values
    const int64_t o = w >> 1, r = o / g.rowlen, p = o - r * g.rowlen;
    T x = so[2 * sidx(r * rowq + p, S) + (w & 1)];
    if (pr.mask) {
      if (o != mo) {
        mo = o;
        mv = pr.mask[g.g0 + o];
      }
      x *= mv;
    }
    return x;
  };
  constexpr int VW = 16 / int(sizeof(T));
  using V = typename Vec16<T>::type;
  const auto base = out + 2 * g.g0;
  const int64_t n2 = 2 * g.glen;
  const uintptr_t ad = address_of(base);
  int64_t head = ad % sizeof(T) ? n2 : int64_t((16 - ad % 16) % 16 / sizeof(T));
  head = head < n2 ? head : n2;
  const int64_t nvec = (n2 - head) / VW, tail0 = head + nvec * VW;
  for (int64_t w = t; w < head; w += nt) base[w] = val(w);
  for (int64_t q = t; q < nvec; q += nt) {
    T e[VW];
#pragma unroll
    for (int c = 0; c < VW; ++c) e[c] = val(head + q * VW + c);
    st_vec(base + (head + q * VW), Vec16<T>::make(e));
  }
  for (int64_t w = tail0 + t; w < n2; w += nt) base[w] = val(w);
}

// ---------------------------------------------------------------------------------------------
// Backward on chip (the forward's plan and tiles): pivots recomputed in registers, the upstream
// gradient read once per pass, the gradient recurrences (L left to right, R or mu right to left:
// affine x -> c x + p, written as the 2x2 map [[c, p], [0, 1]]) carried by the same scans as the
// pivots. Rows over several blocks take three passes: the pivot block maps (fwd_block_maps,
// row_scan), this kernel in summary mode (each block's affine maps, then row_scan from 0), this
// kernel in final mode. grad_z: per-block partial sums in double, added in a fixed order.

template <class T, bool kLook>
__global__ void __launch_bounds__(kFwdThreads) bwd_chunk_kernel(Problem<T> pr, Grads<T> gr, Plan pl,
                                                                 gptr<Cx<T>> bdin, gptr<Cx<T>> bein,
                                                                 gptr<Mobius<T>> gmf, gptr<Mobius<T>> gmb,
                                                                 gptr<Cx<T>> glin, gptr<Cx<T>> grin,
                                                                 gptr<double> zpart, bool summary, Look<T> lk) {
  // lk.status (causal rows over several blocks): mu entering the block from the right comes from a
  // look-back over the row's later blocks (tickets from the row's end), in the final pass itself
  __shared__ FwdSmem<T> sm;
  __shared__ double zs[2 * kFwdThreads];
  __shared__ Cx<T> lr_in[2];
  __shared__ LookSmem<T> ls;
  constexpr bool look = kLook;  // compiled for the look-back: causal only
  int64_t blk = blockIdx.x;
  if (look) {
    const int64_t tk = look_ticket(lk, ls), ci = pl.cb - 1 - tk / pl.B;
    blk = ci * pl.B + tk % pl.B;
  }
  const FwdGeo g = fwd_geo(pl, blk);
  const bool two = !look && !pr.causal, multi = pl.cb > 1;
  const T zi = fwd_load(pr, pl, g, sm, multi ? bdin : gptr<Cx<T>>(nullptr),
                        (multi && two) ? bein : gptr<Cx<T>>(nullptr), blk);
  const Seg s = fwd_seg(pl, g);
  const int S = int(pl.S), t = threadIdx.x, nt = blockDim.x;
  const Cx<T> zero{T(0), T(0)}, one{T(1), T(0)};
  if (t == 0) {
    const bool carried = multi && !summary && !look;
    lr_in[0] = (carried && two) ? Cx<T>(glin[blk]) : zero;
    lr_in[1] = carried ? Cx<T>(grin[blk]) : zero;
  }
  Mobius<T> f, b;
  seg_maps(sm, s, S, zi, f, b, two);
  block_scan(sm, f, s, g.nseg, true);
  const Cx<T> din_blk = d_left(sm, s);
  Cx<T> dprev = din_blk;
  if (s.act && s.u > 0) dprev = bk::mobius_apply(Mobius<T>(sm.m[t - 1]), din_blk);
  __syncthreads();
  Cx<T> e_right = one;  // e just right of the segment
  if (two) {
    block_scan(sm, b, s, g.nseg, false);
    e_right = sm.ein;
    if (s.act && s.u + 1 < g.nseg) e_right = bk::mobius_apply(Mobius<T>(sm.m[t + 1]), sm.ein);
    __syncthreads();
  }
  // the segment's pivots, upstream gradient and recurrence terms, in registers
  const int64_t row = g.r0 + s.slot, p_seg = g.p0 + s.u * pl.S;
  const int64_t gbase = row * pl.N + p_seg;
  Cx<T> id[kSegMax], ie[kSegMax], P[kSegMax], X[kSegMax];
  T kseg[kSegMax];
  const T kin = k_left(sm, s, S);
  {
    T kprev = kin;
#pragma unroll
    for (int j = 0; j < kSegMax; ++j) {
      if (j < s.len) {
        const int i = sidx(s.q + j, S);
        const Cx<T> al{sm.ak[i], -zi};
        const Cx<T> d = bk::pivot_step(al, kprev, dprev);
        kprev = sm.ak[kTile + i];
        kseg[j] = kprev;
        dprev = d;
        id[j] = bk::recip(d);
      }
    }
  }
  if (two) {
    Cx<T> eprev = e_right;
#pragma unroll
    for (int j = kSegMax - 1; j >= 0; --j) {
      if (j < s.len) {
        const int i = sidx(s.q + j, S);
        const Cx<T> al{sm.ak[i], -zi};
        const Cx<T> e = bk::pivot_step(al, kseg[j], eprev);
        eprev = e;
        ie[j] = bk::recip(e);
        X[j] = bk::combine(bk::recip(id[j]), e, al);  // G (recip of 1/d: d itself is not kept)
      }
    }
  }
  const bool gmask = !summary && gr.grad_mask;
#pragma unroll
  for (int j = 0; j < kSegMax; ++j) {
    if (j < s.len) {
      const Cx<T> y = two ? X[j] : id[j];  // G, or the causal output 1/d
      Cx<T> wv{T(gr.grad[2 * (gbase + j)]), -T(gr.grad[2 * (gbase + j) + 1])};
      if (pr.mask) {
        const T m = pr.mask[gbase + j];
        if (gmask) gr.grad_mask[gbase + j] = y.re * wv.re - y.im * wv.im;  // Re(conj(y) g)
        wv = bk::scale(wv, m);
      }
      const Cx<T> wy2 = wv * (y * y);
      P[j] = two ? wy2 : Cx<T>{-wy2.re, -wy2.im};
    }
  }
  // the segment's affine summaries: R (or mu) right to left, L left to right
  Cx<T> rloc = zero, rpi = one, lloc = zero, lpi = one;
#pragma unroll
  for (int j = kSegMax - 1; j >= 0; --j) {
    if (j < s.len) {
      const Cx<T> c = two ? bk::k_over_sq(kseg[j], id[j]) : bk::scale(id[j] * id[j], kseg[j]);
      rloc = bk::lin_step(c, rloc, P[j]);
      rpi = rpi * c;
    }
  }
  if (two) {
#pragma unroll
    for (int j = 0; j < kSegMax; ++j) {
      if (j < s.len) {
        const Cx<T> c = bk::k_over_sq(j > 0 ? kseg[j - 1] : kin, ie[j]);
        lloc = bk::lin_step(c, lloc, P[j]);
        lpi = lpi * c;
      }
    }
  }
  const Mobius<T> mr{rpi, zero, rloc, one}, ml{lpi, zero, lloc, one};
  __syncthreads();
  block_scan(sm, mr, s, g.nseg, false);
  if (summary && t == 0) gmb[blk] = Mobius<T>(sm.m[0]);
  if (look) {  // mu (R) entering from the right: 0 at the row's end
    const Cx<T> c = look_back(lk, ls, blk, -pl.B, pl.cb - 1 - blk / pl.B, Mobius<T>(sm.m[0]), zero);
    if (t == 0) lr_in[1] = c;
    __syncthreads();
  }
  Cx<T> r_in = lr_in[1];
  if (s.act && s.u + 1 < g.nseg) r_in = bk::mobius_apply(Mobius<T>(sm.m[t + 1]), lr_in[1]);
  __syncthreads();
  Cx<T> l_in = lr_in[0];
  if (two) {
    block_scan(sm, ml, s, g.nseg, true);
    if (summary && t == 0) gmf[blk] = Mobius<T>(sm.m[g.nseg - 1]);
    if (s.act && s.u > 0) l_in = bk::mobius_apply(Mobius<T>(sm.m[t - 1]), lr_in[0]);
  }
  if (summary) return;
  // final: R (mu) right to left into X, then L left to right with the outputs
  double zr_ = 0.0, zi_ = 0.0;
  Cx<T> R = r_in;
#pragma unroll
  for (int j = kSegMax - 1; j >= 0; --j) {
    if (j < s.len) {
      const int64_t p = p_seg + j;
      if (two) {
        const Cx<T> c = bk::k_over_sq(kseg[j], id[j]);
        X[j] = R;  // R_{j+1}
        R = bk::lin_step(c, R, P[j]);
      } else {
        if (gr.grad_k && p < pl.N - 1) {
          const Cx<T> gk = R * id[j];  // mu_{j+1} / d_j
          gr.grad_k[row * (pl.N - 1) + p] = -gk.re;
        }
        R = bk::lin_step(bk::scale(id[j] * id[j], kseg[j]), R, P[j]);
        gr.grad_a[gbase + j] = R.re;
        if (p == 0 && gr.mu0) {  // mu_0: a carried state's gradients come from it
          gr.mu0[2 * row] = R.re;
          gr.mu0[2 * row + 1] = R.im;
        }
        zr_ += double(R.re);
        zi_ += double(R.im);
      }
    }
  }
  if (two) {
    Cx<T> Lr = l_in;
#pragma unroll
    for (int j = 0; j < kSegMax; ++j) {
      if (j < s.len) {
        const int64_t p = p_seg + j;
        Lr = bk::lin_step(bk::k_over_sq(j > 0 ? kseg[j - 1] : kin, ie[j]), Lr, P[j]);
        const Cx<T> Rnext = X[j];
        const Cx<T> Rj = P[j] + bk::k_over_sq(kseg[j], id[j]) * Rnext;
        const Cx<T> A = Lr + Rj - P[j];
        gr.grad_a[gbase + j] = -A.re;
        if (gr.grad_k && p < pl.N - 1) {
          const Cx<T> ie_next = j + 1 < s.len ? ie[j + 1 < kSegMax ? j + 1 : j] : bk::recip(e_right);
          gr.grad_k[row * (pl.N - 1) + p] = (Lr * ie_next + Rnext * id[j]).re;
        }
        zr_ += double(A.re);
        zi_ += double(A.im);
      }
    }
  }
  // the block's partial sum, in a fixed order
  zs[2 * t] = zr_;
  zs[2 * t + 1] = zi_;
  __syncthreads();
  if (t == 0) {
    double a0 = 0.0, a1 = 0.0;
    for (int i = 0; i < nt; ++i) {
      a0 += zs[2 * i];
      a1 += zs[2 * i + 1];
    }
    zpart[2 * blk] = a0;
    zpart[2 * blk + 1] = a1;
  }
}

// Fixed-order sum of the per-block partial sums (one block): deterministic grad_z.
// Two-sided: grad_z = conj(sum A); causal: grad_z = -conj(sum mu).
template <class T>
__global__ void __launch_bounds__(kSumThreads) zsum_kernel(gptr<double> zpart, int64_t n, bool causal, gptr<T> out) {
  __shared__ double sr[kSumThreads], si[kSumThreads];
  double re = 0.0, im = 0.0;
  for (int64_t v = threadIdx.x; v < n; v += kSumThreads) {
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

// A carried state: both pointers or neither, causal only.
template <class T>
bool state_ok(const Problem<T>& pr) {
  const bool d = pr.d_in != nullptr, k = pr.k_in != nullptr;
  return d == k && (!d || pr.causal);
}

// The look-back descriptors of pass `pass` (0: the forward pivots, 1: the backward's gradients).
template <class T>
Look<T> look_of(const Ws<T>& w, const Plan& pl, int pass) {
  Look<T> lk;
  lk.ticket = w.flags + 32 * pass;
  lk.status = w.flags + kTicketPad + pass * pl.blocks;
  lk.agg = w.lagg;
  lk.incl = w.lincl;
  return lk;
}

template <class T>
Status zero_flags(const Ws<T>& w, cudaStream_t st) {
#if defined(BK_EMU_TRAFFIC)
  void* p = w.flags.raw();
#else
  void* p = w.flags;
#endif
  const cudaError_t e = cudaMemsetAsync(p, 0, w.flag_bytes, st);
  return Status{e, e == cudaSuccess ? nullptr : "bk_core_cuda look-back flags (cudaMemsetAsync)"};
}

template <class T>
Status forward_impl(const Problem<T>& pr, gptr<T> out, const Plan& pl, void* ws, cudaStream_t st) {
  if (pr.B == 0) return Status{cudaSuccess, nullptr};
  if (pl.B != pr.B || pl.N != pr.N) return Status{cudaErrorInvalidValue, "bk_core_cuda forward: plan does not match the problem"};
  if (!state_ok(pr)) return Status{cudaErrorInvalidValue, "bk_core_cuda forward: a carried state needs causal, d_in and k_in"};
  const Ws<T> w = carve<T>(pl, pr.causal, false, ws, nullptr);
  const unsigned nb = unsigned(pl.blocks), nt = unsigned(pl.T);
  Look<T> lk{};
  if (uses_lookback(pl, pr.causal)) {  // one pass: the decoupled look-back
    const Status z = zero_flags(w, st);
    if (!z.ok()) return z;
    lk = look_of(w, pl, 0);
  } else if (pl.cb > 1) {
    fwd_block_maps<T><<<nb, nt, 0, st>>>(pr, pl, w.bmf, pr.causal ? nullptr : w.bmb);
    BK_LAUNCH_CHECK("bk_core_cuda fwd_block_maps");
    row_scan<T><<<unsigned(pl.B), kRowScanThreads, 0, st>>>(pl.cb, pl.B, 1, w.bmf, pr.causal ? nullptr : w.bmb,
                                                             w.bdin, w.bein, Cx<T>{T(1), T(0)}, pr.d_in);
    BK_LAUNCH_CHECK("bk_core_cuda fwd_row_scan");
  }
  if (lk.status)
    fwd_chunk_kernel<T, true><<<nb, nt, 0, st>>>(pr, pl, w.bdin, w.bein, out, lk, false);
  else
    fwd_chunk_kernel<T, false><<<nb, nt, 0, st>>>(pr, pl, w.bdin, w.bein, out, lk, false);
  BK_LAUNCH_CHECK("bk_core_cuda fwd_chunk_kernel");
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
  if (!state_ok(pr)) return Status{cudaErrorInvalidValue, "bk_core_cuda backward: a carried state needs causal, d_in and k_in"};
  if (gr.mu0 && !pr.causal) return Status{cudaErrorInvalidValue, "bk_core_cuda backward: mu0 is defined for the causal op only"};
  const Ws<T> w = carve<T>(pl, pr.causal, true, ws, nullptr);
  const unsigned nb = unsigned(pl.blocks), nt = unsigned(pl.T);
  const bool two = !pr.causal;
  // gradient maps in the pivot maps' storage: R (mu) backward in bmf, L forward in bmb
  const gptr<Mobius<T>> gmb = w.bmf, gmf = two ? w.bmb : gptr<Mobius<T>>(nullptr);
  Look<T> lk{};
  if (uses_lookback(pl, pr.causal)) {  // two look-back passes: the pivots entering each block, then
                                       // the gradients from the rows' ends
    const Status z = zero_flags(w, st);
    if (!z.ok()) return z;
    fwd_chunk_kernel<T, true><<<nb, nt, 0, st>>>(pr, pl, w.bdin, nullptr, gptr<T>(nullptr), look_of(w, pl, 0), true);
    BK_LAUNCH_CHECK("bk_core_cuda backward fwd_chunk_kernel (carries)");
    lk = look_of(w, pl, 1);
  } else if (pl.cb > 1) {
    fwd_block_maps<T><<<nb, nt, 0, st>>>(pr, pl, w.bmf, two ? w.bmb : nullptr);
    BK_LAUNCH_CHECK("bk_core_cuda backward fwd_block_maps");
    row_scan<T><<<unsigned(pl.B), kRowScanThreads, 0, st>>>(pl.cb, pl.B, 1, w.bmf, two ? w.bmb : nullptr, w.bdin,
                                                             w.bein, Cx<T>{T(1), T(0)}, pr.d_in);
    BK_LAUNCH_CHECK("bk_core_cuda backward pivot row_scan");
    bwd_chunk_kernel<T, false><<<nb, nt, 0, st>>>(pr, gr, pl, w.bdin, w.bein, gmf, gmb, w.glin, w.grin, w.zpart, true,
                                                  lk);
    BK_LAUNCH_CHECK("bk_core_cuda bwd_chunk_kernel (summary)");
    row_scan<T><<<unsigned(pl.B), kRowScanThreads, 0, st>>>(pl.cb, pl.B, 1, gmf, gmb, w.glin, w.grin,
                                                             Cx<T>{T(0), T(0)}, gptr<const T>(nullptr));
    BK_LAUNCH_CHECK("bk_core_cuda backward gradient row_scan");
  }
  if (lk.status)
    bwd_chunk_kernel<T, true><<<nb, nt, 0, st>>>(pr, gr, pl, w.bdin, w.bein, gmf, gmb, w.glin, w.grin, w.zpart, false,
                                                 lk);
  else
    bwd_chunk_kernel<T, false><<<nb, nt, 0, st>>>(pr, gr, pl, w.bdin, w.bein, gmf, gmb, w.glin, w.grin, w.zpart, false,
                                                  lk);
  BK_LAUNCH_CHECK("bk_core_cuda bwd_chunk_kernel");
  zsum_kernel<T><<<1, kSumThreads, 0, st>>>(w.zpart, pl.blocks, pr.causal, gr.grad_zri);
  BK_LAUNCH_CHECK("bk_core_cuda zsum_kernel");
  return Status{cudaSuccess, nullptr};
}

}  // namespace

Plan make_plan(int64_t B, int64_t N, Strategy strategy, int64_t chunk_len, int num_sms, int threads) {
  Plan pl;
  pl.B = B;
  pl.N = N;
  // segments of S positions, enough threads to fill the GPU (kFwdThreadsPerSm per SM)
  pl.T = threads > 0 ? std::min(threads, kFwdThreads) : kFwdThreads;
  if (chunk_len > 0) {
    pl.S = std::min<int64_t>(chunk_len, kSegMax);
  } else if (strategy == Strategy::kLanes) {
    pl.S = kSegMax;
  } else {
    const int64_t want = kFwdThreadsPerSm * std::max(1, num_sms);
    pl.S = std::clamp<int64_t>((B * N + want - 1) / std::max<int64_t>(want, 1), 1, kSegMax);
  }
  pl.segs = N > 0 ? (N + pl.S - 1) / pl.S : 0;
  if (threads <= 0) {  // a tiny problem gets a narrower block (a warp at least), not idle threads
    int64_t need = 32;
    while (need < kFwdThreads && need < B * pl.segs) need *= 2;
    pl.T = int(need);
  }
  if (pl.segs <= pl.T) {
    pl.rpb = pl.segs > 0 ? pl.T / pl.segs : 1;
    pl.cb = 1;
    pl.blocks = (B + pl.rpb - 1) / pl.rpb;
  } else {
    pl.rpb = 1;
    pl.cb = (pl.segs + pl.T - 1) / pl.T;
    pl.blocks = B * pl.cb;
  }
  return pl;
}

// ceil(log2(n)): the steps of a Hillis-Steele scan over n values
static int64_t log2c(int64_t n) {
  int64_t l = 0;
  while ((int64_t(1) << l) < n) ++l;
  return l;
}

// row_scan's depth: compose a run of block maps, scan the runs, apply the run
static int64_t row_scan_depth(const Plan& pl) {
  const int64_t run = (pl.cb + kRowScanThreads - 1) / kRowScanThreads;
  return run + log2c(std::min<int64_t>(pl.cb, kRowScanThreads)) + 1 + run;
}

int64_t forward_carry_depth(const Plan& pl) {
  // segment maps, block scan and its apply, pivots of the segment
  int64_t d = pl.S + log2c(std::min<int64_t>(pl.segs, pl.T)) + 1 + pl.S;
  if (pl.cb > 1) d += row_scan_depth(pl);
  return d;
}

int64_t backward_carry_depth(const Plan& pl) {
  // the passes of backward_impl, in order (two-sided: its d and e chains, and its R and L chains,
  // run side by side: the same depth as the causal pivots and mu)
  const int64_t bscan = log2c(std::min<int64_t>(pl.segs, pl.T));  // block scan over segments
  const int64_t seg_maps = pl.S;     // a segment's composed pivot map
  const int64_t pivots = 1 + pl.S;   // apply the carry entering the segment, its pivots
  const int64_t grad_sum = pl.S;     // the segment's affine summary of mu (R, L), from its pivots
  const int64_t walk = 1 + pl.S;     // apply the gradient carry entering the segment, walk it
  if (pl.cb == 1)  // one kernel: pivot maps, block scan, pivots, summaries, block scan, walk
    return seg_maps + bscan + pivots + grad_sum + bscan + walk;
  const int64_t row_scan = row_scan_depth(pl);
  return (seg_maps + bscan)               // fwd_block_maps: each block's pivot map
         + row_scan                       // pivot row_scan: the pivot entering each block
         + (pivots + grad_sum + bscan)    // bwd_chunk_kernel (summary): each block's gradient map
         + row_scan                       // gradient row_scan: mu (R, L) entering each block
         + walk;                          // bwd_chunk_kernel (final): the gradients
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
