// Torch-free interface of the BK-Core CUDA kernels (bk_core_cuda.cu). The torch binding
// (bk_ops_cuda.cpp) checks the tensors, allocates the outputs and the workspace with torch's
// caching allocator, and calls these launchers on the current stream.
//
// Canonical arguments (as for the CPU kernels, see csrc/cpu/bk_core_cpu.h): a (B, N) contiguous,
// k rows of length N-1 at k + r * k_row_stride (stride 0 when one off-diagonal product is shared by
// the batch), zri = [Re z, Im z] read on the device (never copied to the host: no synchronisation,
// capturable in a CUDA graph), mask (B, N) contiguous or nullptr.
//
// Plan: one thread per segment of S <= kSegMax positions, blocks of T threads holding whole rows
// or T segments of one row; a block keeps its tile on chip and its carries come from parallel
// scans of 2x2 Moebius maps (pivots) and affine maps (gradient recurrences), docs/BK_CORE_MATH.md
// "Parallel form". Strategy: "auto" (and "chunked") size the segments to fill the GPU; "lanes"
// takes the longest segments.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define BK_CUDA_HD __host__ __device__
#else
#define BK_CUDA_HD
#endif

namespace bk_cuda {

// Global-memory pointers the kernels receive. A plain pointer, except in the CPU emulation build of
// the tests (tests/kernels/cuda_emu/emu.h defines BK_EMU_TRAFFIC), where it is an accessor that counts
// the bytes of every load and store: the kernels' global traffic is a test assertion there.
#if defined(BK_EMU_TRAFFIC)
template <class T>
using gptr = bk_emu::GPtr<T>;
#else
template <class T>
using gptr = T*;
#endif

enum class Strategy : int { kAuto = 0, kLanes = 1, kChunked = 2 };

struct Plan {
  int64_t B = 0, N = 0;
  // One thread per segment of S positions, T threads per block. A block holds rpb whole rows
  // (cb == 1) or T segments of one row (cb > 1 blocks per row, carried by a scan of the blocks'
  // Moebius maps; block index = chunk * B + row, so the rows' blocks at the same positions run
  // together and share a coupling row in L2).
  int64_t S = 1;       // positions per thread segment (1..kSegMax)
  int64_t segs = 0;    // segments per row: ceil(N / S)
  int64_t rpb = 1;     // rows per block
  int64_t cb = 1;      // blocks per row
  int64_t blocks = 0;  // grid
  int T = 128;         // threads per block
  // Causal rows over several blocks take their carries by a decoupled look-back in one pass; which
  // blocks' maps a block composes depends on the order they run in, so the results can differ in
  // the last bits from run to run. deterministic: the block maps and a row scan instead (one more
  // read of the inputs), bitwise reproducible (the bindings set it under
  // torch.use_deterministic_algorithms).
  bool deterministic = false;
};


constexpr int kSegMax = 8;         // longest forward thread segment
constexpr int kFwdThreads = 128;   // forward block width (largest)
constexpr int kRowScanThreads = 256;  // threads of the per-row scan of block maps

// chunk_len > 0 forces the segment length min(chunk_len, kSegMax); num_sms sizes the automatic
// choice; threads > 0 forces the block width (tests: several blocks per row at small N).
Plan make_plan(int64_t B, int64_t N, Strategy strategy, int64_t chunk_len, int num_sms, int threads = 0);

// Dependent steps (a pivot step, a Moebius compose or apply) on the longest chain from the first
// position of a row to its last output, forward: the depth of the carries.
int64_t forward_carry_depth(const Plan& plan);
// The same for the backward (the launcher's passes: pivot block maps, pivot row scan, gradient
// summaries, gradient row scan, final pass; one pass when a block holds whole rows), to the last
// gradient written.
int64_t backward_carry_depth(const Plan& plan);

// Bytes of device workspace the launchers need for this plan (0 is possible); the caller passes a
// buffer at least that large, aligned to 256 bytes.
size_t workspace_bytes(const Plan& plan, bool causal, bool backward, bool is_double);

template <class T>
struct Problem {
  // Every member has a default: the bindings fill the fields they use into `Problem<T> p;`, and an
  // optional pointer left out must read as nullptr, not as an indeterminate address.
  gptr<const T> a = nullptr;       // (B, N) contiguous
  gptr<const T> k = nullptr;       // row r at k + r * k_row_stride, length N - 1 (may be null when N == 1)
  int64_t k_row_stride = 0;        // 0 when shared, else N - 1
  gptr<const T> zri = nullptr;     // (2,) device pointer: [Re z, Im z]
  gptr<const T> mask = nullptr;    // (B, N) contiguous, or nullptr
  int64_t B = 0, N = 0;
  bool causal = false;
  // A carried state (causal only; both or neither): d_in (B, 2) interleaved complex, the pivot of
  // the position before each row; k_in (B,), its coupling to position 0 (d_0 = a_0 - z - k_in /
  // d_in). nullptr: each row starts afresh (d_0 = a_0 - z).
  gptr<const T> d_in = nullptr;
  gptr<const T> k_in = nullptr;
};

template <class T>
struct Grads {  // defaults as for Problem: an output left out is nullptr (not written)
  gptr<const T> grad = nullptr;  // (B, N, 2) upstream gradient of the complex output, contiguous
  gptr<T> grad_a = nullptr;       // (B, N)
  gptr<T> grad_k = nullptr;       // (B, N - 1), per row (the caller reduces a shared k), or nullptr: not written
  gptr<T> grad_zri = nullptr;     // (2,) device pointer, written (not accumulated)
  gptr<T> grad_mask = nullptr;    // (B, N) or nullptr
  gptr<T> mu0 = nullptr;          // (B, 2) interleaved complex: mu at each row's position 0 (causal; with a
                                  // carried state, for its gradients), or nullptr
};

// Result of a launcher: err == cudaSuccess, or the CUDA error and the kernel that raised it.
struct Status {
  cudaError_t err;
  const char* where;
  BK_CUDA_HD bool ok() const { return err == cudaSuccess; }
};

// out: (B, N, 2) interleaved complex.
Status forward(const Problem<float>& p, float* out, const Plan& plan, void* workspace, cudaStream_t stream);
Status forward(const Problem<double>& p, double* out, const Plan& plan, void* workspace, cudaStream_t stream);
Status backward(const Problem<float>& p, const Grads<float>& g, const Plan& plan, void* workspace,
                cudaStream_t stream);
Status backward(const Problem<double>& p, const Grads<double>& g, const Plan& plan, void* workspace,
                cudaStream_t stream);

}  // namespace bk_cuda
