// Every op schema of resnet_bk, in one place: the contract each backend implements. Kernel files
// register only implementations against these names (TORCH_LIBRARY_IMPL); the schema strings are
// what Python calls, so they change only with the callers.
//
//   op                        CPU kernel               CUDA kernel               autograd
//   bk_core_fwd               cpu/bk_ops_cpu.cpp       cuda/bk_ops_cuda.cpp      csrc/autograd.cpp
//   bk_core_bwd               cpu/bk_ops_cpu.cpp       cuda/bk_ops_cuda.cpp      (none: no double backward)
//   bk_core_fwd_state         cpu/bk_ops_cpu.cpp       cuda/bk_ops_cuda.cpp      ops/bk_core/stream.py
//   bk_core_bwd_state         cpu/bk_ops_cpu.cpp       cuda/bk_ops_cuda.cpp      (none)
//   bk_core_step              cpu/bk_step_cpu.cpp      cuda/bk_ops_cuda.cpp      csrc/autograd.cpp
//   bk_core_step_out          cpu/bk_step_cpu.cpp      cuda/bk_ops_cuda.cpp      (none: writes its outputs)
//   learned_downsample_fwd    cpu/pool_ops_cpu.cpp     cuda/pool_ops_cuda.cpp    csrc/autograd.cpp
//   learned_downsample_bwd    cpu/pool_ops_cpu.cpp     cuda/pool_ops_cuda.cpp
//   learned_upsample_fwd      cpu/pool_ops_cpu.cpp     cuda/pool_ops_cuda.cpp    csrc/autograd.cpp
//   learned_upsample_bwd      cpu/pool_ops_cpu.cpp     cuda/pool_ops_cuda.cpp
//   moe_top1_infer            cpu/moe_cpu.cpp          -                         - (inference only)
//   moe_bk_block_step         cpu/block_step_cpu.cpp   -                         - (inference only)
//   cpu_isa, cpu_huge_pages   no tensors: registered here for every key, defined in cpu/bk_ops_cpu.cpp
// Fake (meta) kernels, for torch.compile, are registered from Python (resnet_bk/ops).
//
// ============================================================================================
// bk_core_fwd(Tensor a, Tensor k, Tensor zri, Tensor? mask, bool causal) -> Tensor
//   The canonical arguments (built by the Python op layer): a (B, N) float32/float64, the
//   diagonal; k (Bk, N-1) with Bk in {1, B}, the products super * sub of the off-diagonals (one
//   row shared by the batch, or one per row); zri (2,) = [Re z, Im z]; mask (B, N) of a's dtype or
//   None. Returns (B, N) complex: G_ii = ((H - z)^-1)_ii, or 1 / d_i when causal, times the mask.
// bk_core_bwd(grad, a, k, zri, mask, causal, need_mask_grad, need_k_grad=True, need_z_grad=True,
//             out=None) -> (grad_a, grad_k, grad_z, grad_mask)
//   grad (B, N) complex, the upstream gradient. grad_k has k's shape (summed over the batch for a
//   shared row), grad_z is [Re, Im] (2,); a gradient not asked for comes back empty (0,). out: the
//   forward's output (the CPU causal kernel without a mask reads its pivots from it).
// bk_core_fwd_state(a, k, zri, mask, d_in, k_in) -> Tensor
// bk_core_bwd_state(grad, a, k, zri, mask, d_in, k_in, need_mask_grad, need_k_grad, need_z_grad,
//                   out=None) -> (grad_a, grad_k, grad_z, grad_mask, mu0)
//   The causal op continuing a carried state: d_in (B,) complex, the pivot of the position before
//   each row; k_in (B,) real, that position's coupling to position 0 (d_0 = a_0 - z - k_in / d_in).
//   The backward also returns mu0 (B,) complex, the recurrence's mu at position 0, from which the
//   Python op layer forms the gradients of d_in and k_in (resnet_bk/ops/bk_core/stream.py); its
//   autograd is there too. CPU and CUDA kernels (other backends build it from ghost positions).
// bk_core_step(Tensor a, Tensor b, Tensor c, Tensor zri, Tensor? state) -> (Tensor y, Tensor d)
//   The causal BK-Core's one-token decode step. a: the diagonal entries of one position for a
//   batch of sequences, any shape, float32/float64; b, c: the off-diagonal entries coupling the
//   previous position to this one, one value (numel 1) or a's shape, a's dtype; zri (2,);
//   state: the previous position's pivot, complex of a's precision and a's shape, or None (the
//   first position: no coupling, b and c unused). d = (a - z) - b c / state (None: a - z) and
//   y = 1 / d, both a's shape, complex. The autograd's backward is elementwise torch formulas.
// bk_core_step_out(a, b, c, zri, state, Tensor(a!) y, Tensor(b!) d) -> ()
//   The same written into y and d (contiguous, a's shape, complex); d may be the state itself
//   (the state updated in place). Not differentiable. Allocates nothing, reads nothing on the
//   host: CUDA-graph capturable.
// moe_top1_infer(x, router_w, router_b, w1[], b1[], w2[], b2[]) -> Tensor
//   Top-1 mixture-of-experts FFN forward (see cpu/moe_cpu.cpp); x (T, D) -> (T, D_out).
// moe_bk_block_step(h, ln_w, ln_b, eps, router_w, router_b, w1[], b1[], w2[], b2[], v_w, v_b,
//                   h0_diag, h0_super, h0_sub, pos, z, state, bk_scale, out_w, out_b) -> (h', d)
//   The cached one-token step of a MoE ResNet-BK block (LayerNorm, top-1 MoE, potential, BK-Core
//   step, output projection, residual; see cpu/block_step_cpu.cpp): h (B, D) -> h' (B, D) and the
//   new pivot d (B,) complex. h0_* are the layer's H0 buffers (float32 or h's dtype), pos the
//   position; state the previous pivot (None at position 0). Inference only.
// cpu_isa() -> int: instruction set of the CPU kernels (0 base, 1 AVX2 + FMA, 2 AVX-512).
// cpu_huge_pages(int mode) -> bool: -1 query, 0 off, 1 on; returns the setting before the call.
//
// Notation: T = dtype of the activations (float32, float64, bfloat16, float16);
//           A = accumulation dtype = float64 if T is float64 else float32.
//           Inputs of any strides are accepted (the kernel makes them contiguous).
//
// learned_downsample_fwd(Tensor x, Tensor logits, bool causal) -> Tensor out
//   x      (B, N, D) T,  logits (M, r) A,  N == M * r,  B >= 1, M >= 1, r >= 1, D >= 1
//   w = softmax(logits, dim=-1)              (computed inside the kernel)
//   s = causal ? r - 1 : 0                   (causal windows end at j*r instead of j*r + r - 1)
//   out[b, j, :] = sum_k w[j, k] * x[b, j*r + k - s, :]     (terms with j*r + k - s < 0 are 0)
//   out (B, M, D) T; accumulated in A, rounded to T once.
//
// learned_downsample_bwd(Tensor grad, Tensor x, Tensor logits, bool causal, bool need_x_grad,
//                        bool need_logits_grad) -> (Tensor grad_x, Tensor grad_logits)
//   grad (B, M, D) T.
//   grad_x (B, N, D) T: grad_x[b, j*r + k - s, :] = w[j, k] * grad[b, j, :]; 0 at positions that no
//          window reads (the last r - 1 positions when causal). (0,) when not needed.
//   grad_logits (M, r) A: S[j, k] = sum_{b, d} grad[b, j, d] * x[b, j*r + k - s, d],
//          grad_logits[j, k] = w[j, k] * (S[j, k] - sum_k' w[j, k'] S[j, k']). (0,) when not needed.
//
// learned_upsample_fwd(Tensor y, Tensor bias, Tensor? residual, Tensor? scale) -> Tensor out
//   y (B, M, r*D) T,  bias (Mb, r, Db) A with Mb in {1, M}, Db in {1, D} (broadcast over m / d),
//   residual (B, M*r, D) T or None,  scale 0-dim A or None (None means 1).
//   v[b, m*r + k, d] = y[b, m, k*D + d] + bias[Mb == 1 ? 0 : m, k, Db == 1 ? 0 : d]
//   out = residual + scale * v   (without residual: scale * v);  out (B, M*r, D) T.
//   r is bias.size(1); D = y.size(2) / r.
//
// learned_upsample_bwd(Tensor grad, Tensor y, Tensor bias, Tensor? scale, bool need_y_grad,
//                      bool need_bias_grad, bool need_scale_grad)
//     -> (Tensor grad_y, Tensor grad_bias, Tensor grad_scale)
//   grad (B, M*r, D) T.
//   grad_y (B, M, r*D) T = scale * grad (the same memory order).
//   grad_bias (Mb, r, Db) A = scale * (grad summed over b and over the broadcast m / d).
//   grad_scale () A = sum(grad * v).            Each is (0,) when not needed.
//   The residual's gradient is grad itself (returned by the autograd, csrc/autograd.cpp).
// ============================================================================================
#include <torch/library.h>

#include "cpu/bk_ops_cpu.h"

TORCH_LIBRARY(resnet_bk, m) {
  // BK-Core
  m.def("bk_core_fwd(Tensor a, Tensor k, Tensor zri, Tensor? mask, bool causal) -> Tensor");
  m.def(
      "bk_core_bwd(Tensor grad, Tensor a, Tensor k, Tensor zri, Tensor? mask, bool causal, bool need_mask_grad, "
      "bool need_k_grad=True, bool need_z_grad=True, Tensor? out=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Causal BK-Core with a carried state (CPU and CUDA kernels; other backends build it from ghost positions)
  m.def("bk_core_fwd_state(Tensor a, Tensor k, Tensor zri, Tensor? mask, Tensor d_in, Tensor k_in) -> Tensor");
  m.def(
      "bk_core_bwd_state(Tensor grad, Tensor a, Tensor k, Tensor zri, Tensor? mask, Tensor d_in, Tensor k_in, "
      "bool need_mask_grad, bool need_k_grad, bool need_z_grad, Tensor? out=None) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  // BK-Core decode step
  m.def("bk_core_step(Tensor a, Tensor b, Tensor c, Tensor zri, Tensor? state) -> (Tensor, Tensor)");
  m.def(
      "bk_core_step_out(Tensor a, Tensor b, Tensor c, Tensor zri, Tensor? state, Tensor(a!) y, Tensor(b!) d) -> ()");
  // CPU kernel settings
  m.def("cpu_isa() -> int");
  m.impl("cpu_isa", &resnet_bk::cpu_isa);
  m.def("cpu_huge_pages(int mode) -> bool");
  m.impl("cpu_huge_pages", &resnet_bk::cpu_huge_pages);
  // Mixture of experts
  m.def("moe_top1_infer(Tensor x, Tensor router_w, Tensor router_b, Tensor[] w1, Tensor[] b1, Tensor[] w2, "
        "Tensor[] b2) -> Tensor");
  m.def("moe_bk_block_step(Tensor h, Tensor ln_w, Tensor ln_b, float eps, Tensor router_w, Tensor router_b, "
        "Tensor[] w1, Tensor[] b1, Tensor[] w2, Tensor[] b2, Tensor v_w, Tensor v_b, Tensor h0_diag, "
        "Tensor h0_super, Tensor h0_sub, int pos, Tensor z, Tensor? state, Tensor bk_scale, Tensor out_w, "
        "Tensor out_b) -> (Tensor, Tensor)");
  // Learned pooling
  m.def("learned_downsample_fwd(Tensor x, Tensor logits, bool causal) -> Tensor");
  m.def(
      "learned_downsample_bwd(Tensor grad, Tensor x, Tensor logits, bool causal, bool need_x_grad, "
      "bool need_logits_grad) -> (Tensor, Tensor)");
  m.def("learned_upsample_fwd(Tensor y, Tensor bias, Tensor? residual, Tensor? scale) -> Tensor");
  m.def(
      "learned_upsample_bwd(Tensor grad, Tensor y, Tensor bias, Tensor? scale, bool need_y_grad, "
      "bool need_bias_grad, bool need_scale_grad) -> (Tensor, Tensor, Tensor)");
}
