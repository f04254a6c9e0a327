// Torch-free interface of BK-Core's one-token decode step on CUDA (bk_step_cuda.cu). The torch
// binding (bk_ops_cuda.cpp) checks the tensors, allocates the outputs (or takes the caller's) and
// calls the launcher on the current stream: one kernel launch, nothing read on the host, so a CUDA
// graph can capture it.
//
// Arguments (flat over the batch, n entries): a the diagonal; b, c the off-diagonal entries
// coupling the previous position to this one (stride 0 when one value is shared by the batch, 1
// otherwise); zri = [Re z, Im z] on the device; state the previous pivot d, interleaved complex, or
// nullptr (the first token: no coupling). Writes d = (a - z) - b c / state (without a state:
// a - z) and y = 1 / d, interleaved complex. d may be the state itself (updated in place: each
// thread reads its state entry before writing its d entry).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "bk_core_cuda.h"

namespace bk_cuda {

template <class T>
struct StepProblem {
  const T* a;        // (n,)
  const T* b;        // b[i * b_stride]
  int64_t b_stride;  // 0 or 1
  const T* c;        // c[i * c_stride]
  int64_t c_stride;  // 0 or 1
  const T* zri;      // (2,) device pointer
  const T* state;    // (n, 2) or nullptr
  int64_t n;
};

// y, d: (n, 2) interleaved complex; d may equal state.
Status step(const StepProblem<float>& p, float* y, float* d, cudaStream_t stream);
Status step(const StepProblem<double>& p, double* y, double* d, cudaStream_t stream);

}  // namespace bk_cuda
