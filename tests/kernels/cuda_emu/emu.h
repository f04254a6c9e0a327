// Test-only CPU emulation of the CUDA execution model, force-included (g++ -include emu.h) when
// tests/kernels/test_cuda_emulated.py compiles csrc/cuda/*.cu as C++. A block's threads run as
// fibers (ucontext) on one OS thread: each runs until its next __syncthreads, then the next thread
// runs; when every thread still running has reached the barrier, the next phase starts. The order
// of the threads alternates between phases (0..n-1, then n-1..0), so a missing barrier between a
// thread's store and another thread's load shows in one of the two orders. All threads at one
// barrier must be at the same __syncthreads (source line): a kernel whose threads reach different
// barriers (a deadlock or a race on a GPU) aborts with a message. Threads that have returned count
// as arrived, as on the GPU. `__shared__` variables become thread_local function statics: shared by
// the threads of a block. Blocks run one after another on the calling thread by default; with
// bk_emu::sched (set_sched) they run on `resident` OS threads at once, taken from a shuffled order,
// as several SMs would run them, so kernels whose blocks wait for each other (the decoupled
// look-back: atomic tickets, acquire/release status words) meet real concurrency. Kernel launches
// (`k<<<grid, block, smem, stream>>>(args)`) are rewritten by the test into
// bk_emu::launch(grid, block, [&] { k(args); }).
#pragma once
#include <math.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct bk_emu_dim3 {
  unsigned x, y, z;
};

namespace bk_emu {

inline thread_local bk_emu_dim3 tid{0, 0, 0}, bid{0, 0, 0}, bdim{1, 1, 1}, gdim{1, 1, 1};

// ---- Global-memory traffic counter ---------------------------------------------------------------
// Kernels that wrap their global pointers in GPtr<T> (bk_core_cuda.h does, when BK_EMU_TRAFFIC is
// defined, as here) count the bytes of every load and store. The test registers each buffer (inputs,
// outputs, workspace) with a tag; every access is charged to (current kernel, tag of the buffer it
// falls in, load/store). An access outside every registered buffer is charged to kUnknownTag: the
// tests require that to stay 0 (an out-of-bounds check of every global access).
#define BK_EMU_TRAFFIC 1
constexpr int kMaxKernels = 32, kMaxTags = 16, kUnknownTag = kMaxTags - 1;

struct Traffic {
  struct Range {
    uintptr_t lo, hi;
    int tag;
  };
  std::vector<Range> ranges;                     // set before a launch, read-only during it
  std::atomic<uint64_t> bytes[kMaxKernels][kMaxTags][2];  // [kernel][tag][0 load, 1 store]
  std::atomic<uint64_t> accesses[kMaxKernels][kMaxTags][2];
  const char* names[kMaxKernels] = {};
  std::atomic<int> cur{0};
  bool on = false;
  void reset() {
    ranges.clear();
    for (auto& k : bytes)
      for (auto& t : k) t[0] = t[1] = 0;
    for (auto& k : accesses)
      for (auto& t : k) t[0] = t[1] = 0;
    for (auto& n : names) n = nullptr;
    on = false;
  }
  void add_range(const void* p, size_t n, int tag) {
    if (p && n) ranges.push_back(Range{uintptr_t(p), uintptr_t(p) + n, tag});
    on = true;
  }
  void set_kernel(const char* name) {
    for (int i = 0; i < kMaxKernels; ++i) {
      if (names[i] == nullptr) names[i] = name;
      if (names[i] == name || std::strcmp(names[i], name) == 0) {
        cur = i;
        return;
      }
    }
    cur = kMaxKernels - 1;
  }
  void count(const void* p, size_t n, int st) {
    if (!on) return;
    const uintptr_t a = uintptr_t(p);
    int tag = kUnknownTag;
    for (const Range& r : ranges)
      if (a >= r.lo && a + n <= r.hi) {
        tag = r.tag;
        break;
      }
    bytes[cur][tag][st] += n;
    accesses[cur][tag][st] += 1;
  }
};
inline Traffic traffic;

// A global pointer that counts: loads through conversion of the reference proxy, stores through
// its assignment. Vector accesses (ld_vec/st_vec) count as one access of the vector's size.
template <class T>
struct GRef {
  T* p;
  operator T() const {
    traffic.count(p, sizeof(T), 0);
    return *p;
  }
  const GRef& operator=(const T& v) const {
    traffic.count(p, sizeof(T), 1);
    *p = v;
    return *this;
  }
  const GRef& operator=(const GRef& o) const { return *this = T(o); }
};

template <class T>
struct GPtr {
  T* p = nullptr;
  GPtr() = default;
  GPtr(T* q) : p(q) {}  // NOLINT: implicit, like a plain pointer
  GPtr(std::nullptr_t) : p(nullptr) {}
  template <class U>
  GPtr(const GPtr<U>& o) : p(o.p) {}  // T* from U* (adds const)
  GRef<T> operator[](int64_t i) const { return GRef<T>{p + i}; }
  GRef<T> operator*() const { return GRef<T>{p}; }
  GPtr operator+(int64_t i) const { return GPtr(p + i); }
  explicit operator bool() const { return p != nullptr; }
  bool operator==(std::nullptr_t) const { return p == nullptr; }
  bool operator!=(std::nullptr_t) const { return p != nullptr; }
  T* raw() const { return p; }
};

// Counted vector load/store of V (e.g. 16 bytes) at a GPtr's address.
template <class V, class T>
inline V ld_vec(const GPtr<T>& q) {
  traffic.count(q.p, sizeof(V), 0);
  V v;
  std::memcpy(&v, q.p, sizeof(V));
  return v;
}
template <class V, class T>
inline void st_vec(const GPtr<T>& q, const V& v) {
  traffic.count(q.p, sizeof(V), 1);
  std::memcpy(q.p, &v, sizeof(V));
}

// ---- Fibers: a block's threads on one OS thread ----------------------------------------------------
struct Fiber {
  ucontext_t ctx;
  bool done = false;
  int barrier_line = 0;  // the __syncthreads it waits at (0: none)
};

struct Block {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
};
inline thread_local Block* cur_block = nullptr;

inline void fiber_main() {
  Block* blk = cur_block;
  (*blk->body)();
  blk->cur->done = true;  // returns to blk->sched through uc_link
}

inline void sync_threads(int line) {
  Block* blk = cur_block;
  if (blk == nullptr) {
    std::fprintf(stderr, "bk_emu: __syncthreads outside a kernel launch\n");
    std::abort();
  }
  Fiber* f = blk->cur;
  f->barrier_line = line;
  swapcontext(&f->ctx, &blk->sched);
}

// How launches run their blocks: resident == 1 and seed == 0 (default), one after another in index
// order on the calling thread; otherwise in an order shuffled with `seed`, on max(resident, 1) OS
// threads at once, each taking the next block, yielding between barrier phases when there are
// several so that blocks interleave.
struct Sched {
  int resident = 1;
  unsigned seed = 0;
};
inline Sched sched;

struct Stacks {
  void* mem = nullptr;
  size_t bytes = 0;
  static constexpr size_t kStack = 256 * 1024;
  explicit Stacks(unsigned threads) : bytes(kStack * threads) {
    mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "bk_emu: cannot map %zu bytes of fiber stacks\n", bytes);
      std::abort();
    }
  }
  ~Stacks() { munmap(mem, bytes); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
};

// Runs block b of the launch: its threads as fibers, phase by phase (see the top of this file).
inline void run_block(unsigned b, unsigned block, const std::function<void()>& body, Stacks& st, bool yield) {
  Block blk;
  blk.body = &body;
  blk.fibers.resize(block);
  Block* const outer = cur_block;
  cur_block = &blk;
  bid = bk_emu_dim3{b, 0, 0};
  for (unsigned t = 0; t < block; ++t) {
    Fiber& f = blk.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = static_cast<char*>(st.mem) + Stacks::kStack * t;
    f.ctx.uc_stack.ss_size = Stacks::kStack;
    f.ctx.uc_link = &blk.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (unsigned phase = 0;; ++phase) {
    unsigned alive = 0;
    int line = 0;
    for (unsigned i = 0; i < block; ++i) {
      const unsigned t = (phase & 1) ? block - 1 - i : i;
      Fiber& f = blk.fibers[t];
      if (f.done) continue;
      tid = bk_emu_dim3{t, 0, 0};
      blk.cur = &f;
      f.barrier_line = 0;
      swapcontext(&blk.sched, &f.ctx);
      if (f.done) continue;
      ++alive;
      if (line == 0) line = f.barrier_line;
      if (f.barrier_line != line) {
        std::fprintf(stderr, "bk_emu: block %u: threads wait at different __syncthreads (lines %d and %d): a "
                     "deadlock or a race on a GPU\n", b, line, f.barrier_line);
        std::abort();
      }
    }
    if (alive == 0) break;
    if (yield) std::this_thread::yield();
  }
  cur_block = outer;
}

inline void launch(unsigned grid, unsigned block, const std::function<void()>& body, const char* name = nullptr) {
  if (grid == 0 || block == 0) return;
  if (name) traffic.set_kernel(name);
  const Sched sc = sched;
  if (sc.resident <= 1 && sc.seed == 0) {
    Stacks st(block);
    bdim = bk_emu_dim3{block, 1, 1};
    gdim = bk_emu_dim3{grid, 1, 1};
    for (unsigned b = 0; b < grid; ++b) run_block(b, block, body, st, false);
    return;
  }
  std::vector<unsigned> order(grid);
  for (unsigned b = 0; b < grid; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), std::mt19937(sc.seed));
  std::atomic<unsigned> next{0};
  std::vector<std::thread> sms;
  for (int r = 0; r < (sc.resident > 1 ? sc.resident : 1); ++r)
    sms.emplace_back([&] {
      Stacks st(block);
      bdim = bk_emu_dim3{block, 1, 1};
      gdim = bk_emu_dim3{grid, 1, 1};
      for (unsigned i; (i = next.fetch_add(1)) < grid;) run_block(order[i], block, body, st, sc.resident > 1);
    });
  for (auto& t : sms) t.join();
}

// ---- Inter-block primitives (the look-back) -------------------------------------------------------
// The kernels call these names; on the GPU they are atomicAdd, ld.acquire.gpu, st.release.gpu and
// __nanosleep. Counted as global traffic like any other access.
inline int take_ticket(const GPtr<int>& p) {
  traffic.count(p.p, sizeof(int), 0);
  traffic.count(p.p, sizeof(int), 1);
  return std::atomic_ref<int>(*p.p).fetch_add(1);
}
// acquired[v]: how often an acquire load returned v (0..3; the tests see which look-back paths ran)
inline std::atomic<uint64_t> acquired[4];
inline int load_acquire(const GPtr<int>& p) {
  traffic.count(p.p, sizeof(int), 0);
  const int v = std::atomic_ref<int>(*p.p).load(std::memory_order_acquire);
  acquired[v >= 0 && v < 4 ? v : 3] += 1;
  return v;
}
inline void store_release(const GPtr<int>& p, int v) {
  traffic.count(p.p, sizeof(int), 1);
  std::atomic_ref<int>(*p.p).store(v, std::memory_order_release);
}
inline void backoff() { std::this_thread::yield(); }

}  // namespace bk_emu

// Shared-memory atomics: a block's threads are fibers of one OS thread, so a plain update is atomic.
inline int atomicMin(int* p, int v) {
  const int old = *p;
  if (v < old) *p = v;
  return old;
}

namespace bk_emu {

// cudaMemsetAsync: the stores of a memset, charged to the pseudo-kernel "cudaMemsetAsync".
inline void memset_counted(void* p, int v, size_t n) {
  traffic.set_kernel("cudaMemsetAsync");
  traffic.count(p, n, 1);
  std::memset(p, v, n);
}

}  // namespace bk_emu

#define threadIdx (bk_emu::tid)
#define blockIdx (bk_emu::bid)
#define blockDim (bk_emu::bdim)
#define gridDim (bk_emu::gdim)
#define __syncthreads() bk_emu::sync_threads(__LINE__)
