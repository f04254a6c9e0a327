// Autograd of the compiled forward ops (resnet_bk::bk_core_fwd, learned_downsample_fwd,
// learned_upsample_fwd; every device they have kernels for), in C++: each exact backward is
// another op (bk_core_bwd, learned_downsample_bwd, learned_upsample_bwd).
//
// This is the only autograd of these ops: there is no Python fallback. Registered at the Autograd
// key, so a call records one C++ node and the backward runs no Python. (It is C++ because a Python
// torch.library.register_autograd costs about 16 us per forward and 40 us per backward in its
// wrapper: at B=16, N=128, a layer's size, BK-Core forward+backward took 90 us against 33 us for
// the two kernels.) torch.compile traces through these like any C++ autograd kernel, with the fake
// kernels registered from Python (resnet_bk/ops).
//
// With create_graph=True the backward ops are called through the dispatcher's autograd (where the
// op layer makes a double backward of bk_core_bwd raise a clear "not implemented"); otherwise
// below autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptT = std::optional<Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A backward op's call: below autograd unless the caller builds a graph of the gradient.
template <class Sig, class... Args>
auto call_bwd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

Tensor opt_in(const OptT& t) { return t.has_value() ? *t : Tensor(); }
OptT opt_out(const Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }
Tensor if_needed(bool need, const Tensor& t) { return need ? t : Tensor(); }

// ---- BK-Core ----------------------------------------------------------------------------------

using BkFwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptT&, bool);
using BkBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const OptT&, bool, bool, bool, bool,
                                                            const OptT&);

class BkCoreFunction : public torch::autograd::Function<BkCoreFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& k, const Tensor& zri, const OptT& mask,
                        bool causal) {
    static auto op = op_handle<BkFwdSig>("resnet_bk::bk_core_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(a, k, zri, mask, causal);
    // The causal output without a mask is 1 / d, every pivot the backward needs: saved (no copy;
    // an in-place change of it before backward raises the usual version-counter error), the CPU
    // kernel's backward is then one pass with no pivot chain.
    const bool keep_out = causal && !mask.has_value();
    ctx->save_for_backward({a, k, zri, opt_in(mask), keep_out ? out : Tensor()});
    ctx->saved_data["causal"] = causal;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<BkBwdSig>("resnet_bk::bk_core_bwd");
    auto s = ctx->get_saved_variables();
    const OptT mask = opt_out(s[3]);
    const bool need_mask = mask.has_value() && ctx->needs_input_grad(3);  // mask: the last tensor input
    const bool need_k = ctx->needs_input_grad(1), need_z = ctx->needs_input_grad(2);
    // (grad a is always formed: the sweeps produce it on the way to the others)
    auto g = call_bwd(op, grads[0], s[0], s[1], s[2], mask, ctx->saved_data["causal"].toBool(), need_mask, need_k,
                      need_z, opt_out(s[4]));
    return {std::get<0>(g), if_needed(need_k, std::get<1>(g)), if_needed(need_z, std::get<2>(g)),
            if_needed(need_mask, std::get<3>(g)), Tensor()};
  }
};

Tensor bk_core_fwd_autograd(const Tensor& a, const Tensor& k, const Tensor& zri, const OptT& mask, bool causal) {
  return BkCoreFunction::apply(a, k, zri, mask, causal);
}

// ---- BK-Core decode step ---------------------------------------------------------------------
// d = (a - z) - b c / s, y = 1 / d (s the state). With gt = grad_d - grad_y conj(y^2) (the
// gradient reaching d), PyTorch's conjugate-Wirtinger convention gives, elementwise:
//   grad_a = Re gt,  grad_zri = [Re, Im] of -sum(gt),  grad_b = c g_k, grad_c = b g_k with
//   g_k = -Re(gt conj(1/s)),  grad_s = gt b c conj(1/s)^2.
// Torch ops on saved tensors (y is the forward's output), so a double backward differentiates
// them through this same function.

using StepSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&);

// a gradient for an input of `like`'s shape (one value shared by the batch: summed)
Tensor reduce_to(const Tensor& g, const Tensor& like) {
  // (symbolic sizes: torch.compile and opcheck trace the backward with dynamic shapes)
  return like.sym_numel() == 1 && g.sym_numel() != 1 ? g.sum().reshape_symint(like.sym_sizes())
                                                       : g.reshape_symint(like.sym_sizes());
}

class BkStepFunction : public torch::autograd::Function<BkStepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const Tensor& c,
                               const Tensor& zri, const OptT& state) {
    static auto op = op_handle<StepSig>("resnet_bk::bk_core_step");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, d] = op.call(a, b, c, zri, state);
    ctx->save_for_backward({b, c, opt_in(state), y});
    ctx->saved_data["has_state"] = state.has_value();
    return {y, d};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &b = s[0], &c = s[1], &st = s[2], &y = s[3];
    const bool has_state = ctx->saved_data["has_state"].toBool();
    Tensor gt = grads[1];
    if (grads[0].defined()) {
      Tensor t = grads[0] * (y * y).conj();
      gt = gt.defined() ? gt - t : -t;
    }
    variable_list res(5);
    if (!gt.defined()) return res;
    if (ctx->needs_input_grad(0)) res[0] = at::real(gt).clone();
    if (ctx->needs_input_grad(3)) res[3] = at::view_as_real(gt.sum().neg()).clone();
    const bool nb = ctx->needs_input_grad(1), nc = ctx->needs_input_grad(2), ns = has_state && ctx->needs_input_grad(4);
    if (has_state && (nb || nc || ns)) {
      const Tensor r = at::reciprocal(st).conj();  // conj(1 / s)
      const Tensor gtr = gt * r;
      if (nb || nc) {
        const Tensor gk = at::real(gtr).neg();
        if (nb) res[1] = reduce_to(gk * c, b);
        if (nc) res[2] = reduce_to(gk * b, c);
      }
      if (ns) res[4] = gtr * r * (b * c);
    }
    return res;
  }
};

variable_list bk_core_step_autograd_impl(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& zri,
                                         const OptT& state) {
  return BkStepFunction::apply(a, b, c, zri, state);
}

std::tuple<Tensor, Tensor> bk_core_step_autograd(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& zri,
                                                 const OptT& state) {
  // The decode loop under no_grad (or with nothing requiring grad): straight to the kernel, no
  // autograd node, context or saved tensors (the outputs would not require grad either way).
  if (!at::GradMode::is_enabled() || !(a.requires_grad() || b.requires_grad() || c.requires_grad() ||
                                       zri.requires_grad() || (state.has_value() && state->requires_grad()))) {
    static auto op = op_handle<StepSig>("resnet_bk::bk_core_step");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(a, b, c, zri, state);
  }
  auto out = bk_core_step_autograd_impl(a, b, c, zri, state);
  return {out[0], out[1]};
}

// ---- learned pooling --------------------------------------------------------------------------

using DownFwdSig = Tensor(const Tensor&, const Tensor&, bool);
using DownBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool, bool, bool);
using UpFwdSig = Tensor(const Tensor&, const Tensor&, const OptT&, const OptT&);
using UpBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptT&, bool,
                                                    bool, bool);

class DownsampleFunction : public torch::autograd::Function<DownsampleFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& logits, bool causal) {
    static auto op = op_handle<DownFwdSig>("resnet_bk::learned_downsample_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(x, logits, causal);
    ctx->save_for_backward({x, logits});
    ctx->saved_data["causal"] = causal;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<DownBwdSig>("resnet_bk::learned_downsample_bwd");
    auto s = ctx->get_saved_variables();
    const bool nx = ctx->needs_input_grad(0), nl = ctx->needs_input_grad(1);
    auto g = call_bwd(op, grads[0], s[0], s[1], ctx->saved_data["causal"].toBool(), nx, nl);
    return {if_needed(nx, std::get<0>(g)), if_needed(nl, std::get<1>(g)), Tensor()};
  }
};

class UpsampleFunction : public torch::autograd::Function<UpsampleFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& bias, const OptT& residual,
                        const OptT& scale) {
    static auto op = op_handle<UpFwdSig>("resnet_bk::learned_upsample_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(y, bias, residual, scale);
    ctx->save_for_backward({y, bias, opt_in(scale)});
    ctx->saved_data["has_residual"] = residual.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<UpBwdSig>("resnet_bk::learned_upsample_bwd");
    auto s = ctx->get_saved_variables();
    const OptT scale = opt_out(s[2]);
    // needs_input_grad counts the tensor inputs that were given: scale's index moves without residual
    const bool has_res = ctx->saved_data["has_residual"].toBool();
    const bool ny = ctx->needs_input_grad(0), nb = ctx->needs_input_grad(1),
               nr = has_res && ctx->needs_input_grad(2), ns = scale.has_value() && ctx->needs_input_grad(has_res ? 3 : 2);
    auto g = call_bwd(op, grads[0], s[0], s[1], scale, ny, nb, ns);
    // d out / d residual is the identity: the upstream gradient itself
    return {if_needed(ny, std::get<0>(g)), if_needed(nb, std::get<1>(g)), if_needed(nr, grads[0]),
            if_needed(ns, std::get<2>(g))};
  }
};

Tensor downsample_fwd_autograd(const Tensor& x, const Tensor& logits, bool causal) {
  return DownsampleFunction::apply(x, logits, causal);
}

Tensor upsample_fwd_autograd(const Tensor& y, const Tensor& bias, const OptT& residual, const OptT& scale) {
  return UpsampleFunction::apply(y, bias, residual, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, Autograd, m) {
  m.impl("bk_core_fwd", &bk_core_fwd_autograd);
  m.impl("bk_core_step", &bk_core_step_autograd);
  m.impl("learned_downsample_fwd", &downsample_fwd_autograd);
  m.impl("learned_upsample_fwd", &upsample_fwd_autograd);
}
