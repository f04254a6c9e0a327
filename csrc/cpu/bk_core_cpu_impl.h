// BK-Core CPU kernels, compiled once per instruction set: the including file defines BK_ISA_NS
// and the target (see bk_core_cpu_avx512.cpp). No torch headers here, so the target pragma only
// touches this code. This file is the entry: it includes the parts below in order, inside
// bk_cpu::BK_ISA_NS, and defines the entry points that bk_core_cpu.h declares.
//
//   bk_cpu_vpack.h               the SIMD pack of a block's lanes and its arithmetic
//   bk_cpu_plan.h                constants, Plan (chunks, sub-chunks, skew), lane geometry, scratch
//   bk_cpu_tile_io.h             row-major tensors <-> lane-major tiles (loads, transposes, scatters)
//   bk_cpu_carries.h             parallel chunks: Moebius transfer matrices and their scan
//   bk_cpu_forward.h             forward sweeps and forward_impl
//   bk_cpu_backward_common.h     the backward's per-call state and block I/O
//   bk_cpu_backward_two_sided.h  two-sided backward sweep
//   bk_cpu_backward_causal.h     causal backward
//   bk_cpu_backward.h            backward_impl
//
// Macros: BK_ISA_NS (the namespace of this copy), BK_VEC_BYTES (the target's native vector
// width), BK_ISA_AVX512 (the AVX-512 specialisation: VRCP14 reciprocals, masked gathers, the
// transposes of bk_transpose_avx512.h, non-temporal stores), BK_PACK_BYTES (bytes of lanes per
// block), BK_SKEW_GROUPS / BK_SKEW_MIN_BYTES (the skewed-lane plan, bk_cpu_plan.h).
//
// Layout. A "lane" is one (sequence, chunk) pair; a block is NL lanes (NL = 64 bytes of T: 16
// floats or 8 doubles, one AVX-512 register), processed together as one vector, so every
// arithmetic instruction advances NL independent recursions; the two pivot chains of the
// bidirectional sweeps run side by side and hide each other's latency. The public [B, N] rows are
// transposed into the block's lane-major scratch tile by tile inside the kernel, never through a
// separate pass over memory. (Blocks of 128 bytes, two registers per value, measured 1.4-1.5x
// slower on AVX-512 and 3x slower forward on AVX2: twice the scratch per block, which no longer
// fits L2 at N = 4096, twice the row streams per tile, and register spills in the sweeps.)
//
// Chunking. When the batch is too small to fill every thread with a block, each sequence is cut
// into C parallel chunks (lanes of their own; lanes are chunk-major). The pivots cross chunk
// boundaries through 2x2 Moebius transfer matrices (docs/BK_CORE_MATH.md, "Parallel form"), the
// gradient's linear recurrences through (product, local sum) pairs; a short sequential scan per
// sequence joins them. With C = 1 those phases are skipped. When the batch does fill the threads
// and a sequence is longer than the scratch allows (kMaxChunk*), it is cut into sequential
// sub-chunks that its block runs in order instead: the left-to-right recurrences carry from one
// sub-chunk into the next as in one sweep, and the right-to-left ones (two-sided) start from the
// values one boundary pass recorded, the same steps as the sweep's own, so the result equals an
// unchunked sweep's.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../bk_math.h"
#include "bk_core_cpu.h"
#ifdef BK_ISA_AVX512
#include "bk_transpose_avx512.h"
#endif

#ifndef BK_AI
#define BK_AI inline __attribute__((always_inline))
#endif
#define BK_AI_LAMBDA __attribute__((always_inline))
#ifndef BK_VEC_BYTES
#define BK_VEC_BYTES 16  // native vector width of the target (16: SSE/NEON, 32: AVX2, 64: AVX-512)
#endif
#ifndef BK_PACK_BYTES
#define BK_PACK_BYTES 64  // bytes of lanes per block (see above)
#endif

#include "bk_cpu_vpack.h"
#include "bk_cpu_plan.h"
#include "bk_cpu_tile_io.h"
#include "bk_cpu_carries.h"
#include "bk_cpu_forward.h"
#include "bk_cpu_backward_common.h"
#include "bk_cpu_backward_two_sided.h"
#include "bk_cpu_backward_causal.h"
#include "bk_cpu_backward.h"

namespace bk_cpu {
namespace BK_ISA_NS {

void forward(const Problem<float>& p, float* out, const Par& par) { forward_impl(p, out, par); }
void forward(const Problem<double>& p, double* out, const Par& par) { forward_impl(p, out, par); }
void backward(const Problem<float>& p, Grads<float>& g, const Par& par) { backward_impl(p, g, par); }
void backward(const Problem<double>& p, Grads<double>& g, const Par& par) { backward_impl(p, g, par); }

}  // namespace BK_ISA_NS
}  // namespace bk_cpu
