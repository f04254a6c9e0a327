// Torch-free interface of the BK-Core CPU kernels. The kernels are compiled once per instruction
// set (bk_core_cpu_{base,avx2,avx512}.cpp, each including bk_core_cpu_impl.h under a different
// target) and chosen at run time from what the CPU supports; the torch binding lives in
// bk_ops_cpu.cpp and supplies the thread pool through Par.
#pragma once
#include <cstdint>

namespace bk_cpu {

// Runs fn(ctx, begin, end) over [0, n) on the caller's thread pool.
struct Par {
  void (*parallel_for)(int64_t n, void* ctx, void (*fn)(void* ctx, int64_t begin, int64_t end));
  int num_threads;
};

template <class T>
struct Problem {
  const T* a;          // (B, N) contiguous
  const T* k;          // k row r at k + r * k_row_stride, length N - 1
  int64_t k_row_stride;  // 0 when one off-diagonal product is shared by the whole batch
  const T* mask;       // (B, N) contiguous, or nullptr
  int64_t B, N;
  T zr, zi;
  bool causal;
  // Causal only, a carried state (resnet_bk/ops/bk_core/stream.py): the pivot of the position before
  // each row, (B, 2) [re, im], and the coupling of that position to the row's position 0, (B,).
  // Both nullptr: every row starts fresh (d_0 = a_0 - z).
  const T* d_in = nullptr;
  const T* k_in = nullptr;
};

template <class T>
struct Grads {
  const T* grad;       // (B, N, 2) upstream gradient of the complex output, contiguous
  T* grad_a;           // (B, N)
  T* grad_k;           // (B, N - 1), per row (the caller reduces a shared k), or nullptr: not wanted
  T* grad_mask;        // (B, N) or nullptr
  double grad_z[2];    // [Re, Im] of the gradient for z, summed (0 when need_z is false)
  bool need_z = true;  // false: grad_z is not wanted (with no grad_k, the sweeps skip their work)
  // (B, N, 2) the forward's output, or nullptr. Used by the causal backward without a mask, where
  // the output y = 1 / d is every pivot the gradient needs: no pivot chain is recomputed.
  const T* out = nullptr;
  // (B, 2) or nullptr: mu at each row's position 0, the adjoint the carried state's gradients
  // are formed from (with Problem::d_in; see csrc/cpu/bk_ops_cpu.cpp)
  T* mu0 = nullptr;
};

#define BK_CPU_DECLARE(NS)                                                  \
  namespace NS {                                                            \
  void forward(const Problem<float>& p, float* out, const Par& par);       \
  void forward(const Problem<double>& p, double* out, const Par& par);     \
  void backward(const Problem<float>& p, Grads<float>& g, const Par& par);  \
  void backward(const Problem<double>& p, Grads<double>& g, const Par& par); \
  }

BK_CPU_DECLARE(isa_base)
BK_CPU_DECLARE(isa_avx2)
BK_CPU_DECLARE(isa_avx512)

}  // namespace bk_cpu
