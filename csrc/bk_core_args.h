// The argument contract of BK-Core's kernel ops (schemas in csrc/schemas.cpp), shared by the CPU
// binding (cpu/bk_ops_cpu.cpp) and the CUDA binding (cuda/bk_ops_cuda.cpp): the same checks and
// messages (each names the argument, expected vs got); each binding passes its device rule,
// on_device(name, tensor), which raises unless the tensor is where its kernels run.
#pragma once
#include <ATen/ATen.h>

#include <utility>

namespace resnet_bk {

using OptT = c10::optional<at::Tensor>;

// a (B, N) float32/float64, k (1 or B, N-1) and zri (2,) of a's dtype, mask (B, N) of a's dtype.
template <class OnDevice>
void check_bk_args(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
                   OnDevice&& on_device) {
  TORCH_CHECK(a.dim() == 2, "a: expected shape (B, N), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "a: expected float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.size(1) >= 1, "a: expected N >= 1, got shape ", a.sizes());
  on_device("a", a);
  TORCH_CHECK(k.dim() == 2 && k.size(1) == a.size(1) - 1 && (k.size(0) == 1 || k.size(0) == a.size(0)),
              "k: expected shape (1, N-1) or (B, N-1) = (", a.size(0), ", ", a.size(1) - 1, "), got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == a.scalar_type(), "k: expected dtype ", a.scalar_type(), ", got ", k.scalar_type());
  on_device("k", k);
  TORCH_CHECK(zri.dim() == 1 && zri.size(0) == 2 && zri.scalar_type() == a.scalar_type(),
              "zri: expected shape (2,) of dtype ", a.scalar_type(), ", got ", zri.sizes(), " ", zri.scalar_type());
  on_device("zri", zri);
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == a.sizes() && mask->scalar_type() == a.scalar_type(), "mask: expected shape ",
                a.sizes(), " and dtype ", a.scalar_type(), ", got ", mask->sizes(), " ", mask->scalar_type());
    on_device("mask", *mask);
  }
}

// The backward's upstream gradient: grad (B, N) complex of a's precision, on a's device; a mask
// gradient only with a mask.
template <class OnDevice>
void check_grad_args(const at::Tensor& grad, const at::Tensor& a, const OptT& mask, bool need_mask_grad,
                     OnDevice&& on_device) {
  const auto cdt = a.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  TORCH_CHECK(grad.sizes() == a.sizes() && grad.scalar_type() == cdt, "grad: expected a ", cdt, " tensor of shape ",
              a.sizes(), ", got ", grad.scalar_type(), " ", grad.sizes());
  on_device("grad", grad);
  TORCH_CHECK(!need_mask_grad || mask.has_value(), "need_mask_grad: requires a mask");
}

// A carried state (causal only): d_in (B,) complex of a's precision, the pivot before each row;
// k_in (B,) of a's dtype, the coupling from that position to position 0. Returned as contiguous
// real views ((B, 2) and (B,)) for Problem::d_in / k_in; undefined tensors without a state.
template <class OnDevice>
std::pair<at::Tensor, at::Tensor> state_args(const at::Tensor& a, bool causal, const OptT& d_in, const OptT& k_in,
                                             OnDevice&& on_device) {
  TORCH_CHECK(d_in.has_value() == k_in.has_value(), "d_in, k_in: expected both or neither");
  if (!d_in.has_value()) return {};
  TORCH_CHECK(causal, "d_in: a carried state is defined for the causal op only");
  const auto cdt = a.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  TORCH_CHECK(d_in->sizes() == at::IntArrayRef({a.size(0)}) && d_in->scalar_type() == cdt,
              "d_in: expected a ", cdt, " tensor of shape (", a.size(0), "), got ", d_in->scalar_type(), " ",
              d_in->sizes());
  on_device("d_in", *d_in);
  TORCH_CHECK(k_in->sizes() == at::IntArrayRef({a.size(0)}) && k_in->scalar_type() == a.scalar_type(),
              "k_in: expected a ", a.scalar_type(), " tensor of shape (", a.size(0), "), got ", k_in->scalar_type(),
              " ", k_in->sizes());
  on_device("k_in", *k_in);
  return {at::view_as_real(d_in->resolve_conj().resolve_neg().contiguous()).contiguous(), k_in->contiguous()};
}

}  // namespace resnet_bk
