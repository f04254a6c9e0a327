// BK-Core's one-token decode step on CUDA (interface and contract: bk_step_cuda.h): one thread per
// sequence, one launch. No torch headers here; the arithmetic is csrc/bk_math.h's pivot step and
// reciprocal, the same as the whole-sequence kernels use, so a decoded sequence matches
// bk_core(..., causal=True) of the whole sequence to rounding.
#include "bk_step_cuda.h"

#include "../bk_math.h"

namespace bk_cuda {
namespace {

constexpr int kStepThreads = 128;

template <class T>
__global__ void __launch_bounds__(kStepThreads) step_kernel(StepProblem<T> p, T* y, T* d) {
  const int64_t i = int64_t(blockIdx.x) * kStepThreads + threadIdx.x;
  if (i >= p.n) return;
  const T zr = p.zri[0], zi = p.zri[1];
  bk::Cx<T> alpha{p.a[i] - zr, -zi};
  bk::Cx<T> di = alpha;
  if (p.state != nullptr) {
    // read the whole state entry before d (which may be the state) is written
    const bk::Cx<T> prev{p.state[2 * i], p.state[2 * i + 1]};
    di = bk::pivot_step(alpha, p.b[i * p.b_stride] * p.c[i * p.c_stride], prev);
  }
  const bk::Cx<T> yi = bk::recip(di);
  d[2 * i] = di.re;
  d[2 * i + 1] = di.im;
  y[2 * i] = yi.re;
  y[2 * i + 1] = yi.im;
}

template <class T>
Status step_t(const StepProblem<T>& p, T* y, T* d, cudaStream_t st) {
  if (p.n == 0) return Status{cudaSuccess, nullptr};
  const int64_t blocks = (p.n + kStepThreads - 1) / kStepThreads;
  if (blocks > 0x7fffffffLL) return Status{cudaErrorInvalidValue, "bk_core_step: batch too large for one grid"};
  step_kernel<T><<<static_cast<unsigned>(blocks), kStepThreads, 0, st>>>(p, y, d);
  const cudaError_t e = cudaGetLastError();
  return Status{e, e == cudaSuccess ? nullptr : "step_kernel"};
}

}  // namespace

Status step(const StepProblem<float>& p, float* y, float* d, cudaStream_t stream) { return step_t(p, y, d, stream); }
Status step(const StepProblem<double>& p, double* y, double* d, cudaStream_t stream) {
  return step_t(p, y, d, stream);
}

}  // namespace bk_cuda
