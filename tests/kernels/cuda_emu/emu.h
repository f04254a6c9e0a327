// Test-only CPU emulation of the CUDA execution model, force-included (g++ -include emu.h) when
// tests/kernels/test_cuda_emulated.py compiles csrc/cuda/*.cu as C++. Every block runs its threads as
// real concurrent std::threads with a real barrier for __syncthreads, so the kernels' indexing,
// tiling, chunk carries and synchronisation are exercised without a GPU. `__shared__` variables
// become function statics: shared by the threads of a block; blocks run one after another.
// Kernel launches (`k<<<grid, block, smem, stream>>>(args)`) are rewritten by the test into
// bk_emu::launch(grid, block, [&] { k(args); }).
#pragma once
#include <math.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct bk_emu_dim3 {
  unsigned x, y, z;
};

namespace bk_emu {

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const unsigned gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    // A kernel whose threads reach different numbers of __syncthreads deadlocks on a GPU; here it
    // aborts with a message instead of hanging the test run.
    if (!cv_.wait_for(lk, std::chrono::seconds(60), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "bk_emu: __syncthreads deadlock (threads reached different barriers)\n");
      std::abort();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, count_ = 0, gen_ = 0;
};

inline thread_local bk_emu_dim3 tid{0, 0, 0}, bid{0, 0, 0}, bdim{1, 1, 1}, gdim{1, 1, 1};
inline thread_local Barrier* cur_barrier = nullptr;

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

inline void launch(unsigned grid, unsigned block, const std::function<void()>& body, const char* name = nullptr) {
  if (grid == 0 || block == 0) return;
  if (name) traffic.set_kernel(name);
  // One std::thread per thread of a block, reused for every block: a block's threads run
  // concurrently; blocks run one after another (a barrier between them, since __shared__
  // variables are statics).
  Barrier bar(block);
  std::vector<std::thread> ts;
  ts.reserve(block);
  for (unsigned t = 0; t < block; ++t)
    ts.emplace_back([&, t] {
      tid = bk_emu_dim3{t, 0, 0};
      bdim = bk_emu_dim3{block, 1, 1};
      gdim = bk_emu_dim3{grid, 1, 1};
      cur_barrier = &bar;
      for (unsigned b = 0; b < grid; ++b) {
        bid = bk_emu_dim3{b, 0, 0};
        body();
        bar.wait();
      }
    });
  for (auto& th : ts) th.join();
}

}  // namespace bk_emu

#define threadIdx (bk_emu::tid)
#define blockIdx (bk_emu::bid)
#define blockDim (bk_emu::bdim)
#define gridDim (bk_emu::gdim)
inline void __syncthreads() { bk_emu::cur_barrier->wait(); }
