// Test-only CPU emulation of the CUDA execution model, force-included (g++ -include emu.h) when
// tests/kernels/test_cuda_emulated.py compiles csrc/cuda/*.cu as C++. Every block runs its threads as
// real concurrent std::threads with a real barrier for __syncthreads, so the kernels' indexing,
// tiling, chunk carries and synchronisation are exercised without a GPU. `__shared__` variables
// become function statics: shared by the threads of a block; blocks run one after another.
// Kernel launches (`k<<<grid, block, smem, stream>>>(args)`) are rewritten by the test into
// bk_emu::launch(grid, block, [&] { k(args); }).
#pragma once
#include <math.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
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

inline void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
  if (grid == 0 || block == 0) return;
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
