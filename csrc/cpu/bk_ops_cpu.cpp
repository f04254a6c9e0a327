// Torch binding of the BK-Core CPU kernels: the CPU implementations of bk_core_fwd / bk_core_bwd
// (TORCH_LIBRARY_IMPL; the schemas and the arguments' contract are in csrc/schemas.cpp), argument
// checks, the run-time choice of instruction set, and the two settings ops cpu_isa and
// cpu_huge_pages (bk_ops_cpu.h; registered with the schemas).
//
// The ops take the canonical arguments the Python op layer builds:
//   a (B, N) real, k (Bk, N-1) with Bk in {1, B} (the products b_i c_i), zri (2,) = [Re z, Im z],
//   mask (B, N) or None. Their autograd is C++ (csrc/autograd.cpp); fake kernels are registered
//   from Python (resnet_bk/ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "../bk_core_args.h"
#include "bk_core_cpu.h"
#include "bk_ops_cpu.h"
#include "huge_pages.h"

namespace {

using resnet_bk::OptT;

void par_for(int64_t n, void* ctx, void (*fn)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

enum Isa : int64_t { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  Isa best = kBase;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    best = kAvx512;
#endif
  // RESNET_BK_CPU_ISA=base|avx2|avx512 lowers the choice (for testing every path); it never
  // raises it above what the CPU has.
  if (const char* env = std::getenv("RESNET_BK_CPU_ISA")) {
    std::string s(env);
    Isa want = s == "base" ? kBase : s == "avx2" ? kAvx2 : s == "avx512" ? kAvx512 : best;
    TORCH_CHECK(s == "base" || s == "avx2" || s == "avx512" || s.empty(),
                "RESNET_BK_CPU_ISA: expected base, avx2 or avx512, got '", s, "'");
    if (want < best) best = want;
  }
  return best;
}

Isa isa() {
  static Isa v = detect_isa();
  return v;
}

template <class T>
void run_forward(const bk_cpu::Problem<T>& p, T* out) {
  bk_cpu::Par par{par_for, at::get_num_threads()};
  switch (isa()) {
    case kAvx512:
      bk_cpu::isa_avx512::forward(p, out, par);
      break;
    case kAvx2:
      bk_cpu::isa_avx2::forward(p, out, par);
      break;
    default:
      bk_cpu::isa_base::forward(p, out, par);
  }
}

template <class T>
void run_backward(const bk_cpu::Problem<T>& p, bk_cpu::Grads<T>& g) {
  bk_cpu::Par par{par_for, at::get_num_threads()};
  switch (isa()) {
    case kAvx512:
      bk_cpu::isa_avx512::backward(p, g, par);
      break;
    case kAvx2:
      bk_cpu::isa_avx2::backward(p, g, par);
      break;
    default:
      bk_cpu::isa_base::backward(p, g, par);
  }
}

// the CPU kernels' device rule for check_bk_args / state_args
void on_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

void check_args(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask) {
  resnet_bk::check_bk_args(a, k, zri, mask, on_cpu);
}

template <class T>
bk_cpu::Problem<T> make_problem(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri,
                                const c10::optional<at::Tensor>& mask, bool causal) {
  bk_cpu::Problem<T> p;
  p.a = a.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.k_row_stride = k.size(0) == 1 ? 0 : k.size(1);
  p.mask = mask.has_value() ? mask->data_ptr<T>() : nullptr;
  p.B = a.size(0);
  p.N = a.size(1);
  auto z = zri.accessor<T, 1>();
  p.zr = z[0];
  p.zi = z[1];
  p.causal = causal;
  return p;
}

std::pair<at::Tensor, at::Tensor> state_args(const at::Tensor& a, bool causal, const OptT& d_in, const OptT& k_in) {
  return resnet_bk::state_args(a, causal, d_in, k_in, on_cpu);
}

at::Tensor fwd_impl(const at::Tensor& a_, const at::Tensor& k_, const at::Tensor& zri_, const OptT& mask_, bool causal,
                    const OptT& d_in_, const OptT& k_in_) {
  check_args(a_, k_, zri_, mask_);
  auto st = state_args(a_, causal, d_in_, k_in_);
  at::Tensor a = a_.contiguous(), k = k_.contiguous(), zri = zri_.contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_.has_value()) mask = mask_->contiguous();
  auto cdt = a.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  at::Tensor out = at::empty({a.size(0), a.size(1)}, a.options().dtype(cdt));
  resnet_bk::advise_huge_pages(out);
  at::Tensor outr = at::view_as_real(out);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bk_core_fwd_cpu", [&] {
    auto p = make_problem<scalar_t>(a, k, zri, mask, causal);
    if (st.first.defined()) {
      p.d_in = st.first.data_ptr<scalar_t>();
      p.k_in = st.second.data_ptr<scalar_t>();
    }
    run_forward<scalar_t>(p, outr.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor bk_core_fwd_cpu(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
                           bool causal) {
  return fwd_impl(a, k, zri, mask, causal, {}, {});
}

at::Tensor bk_core_fwd_state_cpu(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
                                 const at::Tensor& d_in, const at::Tensor& k_in) {
  return fwd_impl(a, k, zri, mask, true, d_in, k_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& k_, const at::Tensor& zri_, const OptT& mask_,
    bool causal, bool need_mask_grad, bool need_k_grad, bool need_z_grad, const OptT& out_, const OptT& d_in_,
    const OptT& k_in_) {
  check_args(a_, k_, zri_, mask_);
  auto st = state_args(a_, causal, d_in_, k_in_);
  resnet_bk::check_grad_args(grad_, a_, mask_, need_mask_grad, on_cpu);
  auto cdt = a_.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  at::Tensor a = a_.contiguous(), k = k_.contiguous(), zri = zri_.contiguous();
  at::Tensor gradr = at::view_as_real(grad_.resolve_conj().contiguous()).contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_.has_value()) mask = mask_->contiguous();
  const int64_t B = a.size(0), N = a.size(1);
  // the forward's output (optional): the causal kernel without a mask reads its pivots from it
  at::Tensor outr;
  if (out_.has_value()) {
    TORCH_CHECK(out_->sizes() == a_.sizes() && out_->scalar_type() == cdt && out_->device().is_cpu(),
                "out: expected the forward's output, a CPU ", cdt, " tensor of shape ", a_.sizes(), ", got ",
                out_->scalar_type(), " ", out_->sizes());
    if (causal && !mask.has_value()) outr = at::view_as_real(out_->resolve_conj().contiguous()).contiguous();
  }
  at::Tensor grad_a = at::empty_like(a);
  // Gradients not asked for are not computed (an empty tensor in their place): with neither
  // grad k nor grad z the sweeps form only grad a (see bwd_sweep's kLean).
  at::Tensor grad_k_rows = need_k_grad ? at::empty({B, N - 1}, a.options()) : at::empty({0}, a.options());
  at::Tensor grad_mask = need_mask_grad ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor grad_z = at::empty({need_z_grad ? 2 : 0}, a.options());
  // mu at each row's position 0, from which the op layer forms the state's gradients
  at::Tensor mu0 = st.first.defined() ? at::empty({B}, a.options().dtype(cdt)) : at::empty({0}, a.options().dtype(cdt));
  resnet_bk::advise_huge_pages(grad_a);
  if (need_k_grad) resnet_bk::advise_huge_pages(grad_k_rows);
  if (need_mask_grad) resnet_bk::advise_huge_pages(grad_mask);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bk_core_bwd_cpu", [&] {
    auto p = make_problem<scalar_t>(a, k, zri, mask, causal);
    bk_cpu::Grads<scalar_t> g;
    g.grad = gradr.data_ptr<scalar_t>();
    g.grad_a = grad_a.data_ptr<scalar_t>();
    g.grad_k = need_k_grad ? grad_k_rows.data_ptr<scalar_t>() : nullptr;
    g.grad_mask = need_mask_grad ? grad_mask.data_ptr<scalar_t>() : nullptr;
    g.need_z = need_z_grad;
    g.out = outr.defined() ? outr.data_ptr<scalar_t>() : nullptr;
    if (st.first.defined()) {
      p.d_in = st.first.data_ptr<scalar_t>();
      p.k_in = st.second.data_ptr<scalar_t>();
      g.mu0 = static_cast<scalar_t*>(mu0.data_ptr());
    }
    run_backward<scalar_t>(p, g);
    if (need_z_grad) {
      grad_z.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(g.grad_z[0]);
      grad_z.data_ptr<scalar_t>()[1] = static_cast<scalar_t>(g.grad_z[1]);
    }
  });
  at::Tensor grad_k = (need_k_grad && k.size(0) == 1 && B != 1) ? grad_k_rows.sum(0, true) : grad_k_rows;
  return {grad_a, grad_k, grad_z, grad_mask, mu0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bk_core_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
    bool causal, bool need_mask_grad, bool need_k_grad, bool need_z_grad, const OptT& out) {
  auto r = bwd_impl(grad, a, k, zri, mask, causal, need_mask_grad, need_k_grad, need_z_grad, out, {}, {});
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bk_core_bwd_state_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
    const at::Tensor& d_in, const at::Tensor& k_in, bool need_mask_grad, bool need_k_grad, bool need_z_grad,
    const OptT& out) {
  return bwd_impl(grad, a, k, zri, mask, true, need_mask_grad, need_k_grad, need_z_grad, out, d_in, k_in);
}

}  // namespace

int64_t resnet_bk::cpu_isa() { return static_cast<int64_t>(isa()); }

bool resnet_bk::cpu_huge_pages(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "mode: expected -1 (query), 0 (off) or 1 (on), got ", mode);
  auto& on = resnet_bk::huge_pages_enabled();
  return mode < 0 ? on.load() : on.exchange(mode == 1);
}

TORCH_LIBRARY_IMPL(resnet_bk, CPU, m) {
  m.impl("bk_core_fwd", &bk_core_fwd_cpu);
  m.impl("bk_core_bwd", &bk_core_bwd_cpu);
  m.impl("bk_core_fwd_state", &bk_core_fwd_state_cpu);
  m.impl("bk_core_bwd_state", &bk_core_bwd_state_cpu);
}
