// Torch binding of the BK-Core CUDA kernels: argument checks, output and workspace allocation
// (torch's caching allocator, so CUDA-graph capture works), device guard and current stream
// (c10::cuda::getCurrentCUDAStream, which at::cuda::getCurrentCUDAStream forwards to), and
// TORCH_LIBRARY_IMPL(resnet_bk, CUDA): bk_core_fwd / bk_core_bwd, their carried-state forms
// bk_core_fwd_state / bk_core_bwd_state (the same kernels, each row's first block entered from the
// state), and the decode step. The schemas are in csrc/schemas.cpp; the autograd is C++
// (csrc/autograd.cpp, every device); fake kernels are registered from Python (resnet_bk/ops).
//
// Plan (see bk_core_cuda.h): RESNET_BK_CUDA_STRATEGY=auto|lanes|chunked (default auto; lanes: the
// longest thread segments) and RESNET_BK_CUDA_CHUNK=<positions per thread segment, capped at 8>
// are read once per process, at the first CUDA call (set them before it). A bad value raises,
// naming the variable, at that call and at every later one (a value is kept only once it parsed).
#ifdef RESNET_BK_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "../bk_core_args.h"
#include "bk_core_cuda.h"
#include "bk_step_cuda.h"

namespace {

using resnet_bk::OptT;

bk_cuda::Strategy parse_strategy(const char* env) {
  if (env == nullptr || env[0] == '\0') return bk_cuda::Strategy::kAuto;
  const std::string s(env);
  if (s == "auto") return bk_cuda::Strategy::kAuto;
  if (s == "lanes") return bk_cuda::Strategy::kLanes;
  if (s == "chunked") return bk_cuda::Strategy::kChunked;
  TORCH_CHECK(false, "RESNET_BK_CUDA_STRATEGY: expected auto, lanes or chunked, got '", s, "'");
}

int64_t parse_chunk(const char* env) {
  if (env == nullptr || env[0] == '\0') return 0;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v >= 1,
              "RESNET_BK_CUDA_CHUNK: expected a positive integer (positions per chunk), got '", env, "'");
  return static_cast<int64_t>(v);
}

// Read and validated once (a static whose initialiser throws on a bad value stays uninitialised,
// so the next call reads and raises again).
bk_cuda::Strategy strategy_from_env() {
  static const bk_cuda::Strategy v = parse_strategy(std::getenv("RESNET_BK_CUDA_STRATEGY"));
  return v;
}

int64_t chunk_from_env() {
  static const int64_t v = parse_chunk(std::getenv("RESNET_BK_CUDA_CHUNK"));
  return v;
}

// Multiprocessor count of a device, queried once per device (sizes the automatic strategy).
int sm_count(c10::DeviceIndex dev) {
  static std::array<int, 64> cache{};
  static std::mutex mu;
  const std::lock_guard<std::mutex> lock(mu);
  TORCH_CHECK(dev >= 0 && dev < static_cast<c10::DeviceIndex>(cache.size()), "resnet_bk CUDA: device index ", int(dev),
              " out of range");
  if (cache[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = n;
  }
  return cache[dev];
}

bk_cuda::Plan plan_for(const at::Tensor& a) {
  const int sms = sm_count(a.device().index());
  bk_cuda::Plan pl = bk_cuda::make_plan(a.size(0), a.size(1), strategy_from_env(), chunk_from_env(), sms);
  // torch.use_deterministic_algorithms(True): causal rows over several blocks take the row scan, not
  // the look-back, whose rounding depends on the order the blocks run in
  pl.deterministic = at::globalContext().deterministicAlgorithms();
  return pl;
}

void check_cuda_tensor(const char* name, const at::Tensor& t, const at::Tensor& a) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == a.device(), name, ": expected a tensor on ", a.device(), " (the device of a), got one on ",
              t.device());
}

void check_args(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask) {
  resnet_bk::check_bk_args(a, k, zri, mask, [&a](const char* name, const at::Tensor& t) { check_cuda_tensor(name, t, a); });
}

void check_status(const bk_cuda::Status& s) {
  TORCH_CHECK(s.ok(), "resnet_bk CUDA kernel failed in ", (s.where ? s.where : "?"), ": ", cudaGetErrorName(s.err),
              " (", cudaGetErrorString(s.err), ")");
}

template <class T>
bk_cuda::Problem<T> make_problem(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri,
                                 const c10::optional<at::Tensor>& mask, bool causal) {
  bk_cuda::Problem<T> p;
  p.a = a.data_ptr<T>();
  p.k = k.numel() > 0 ? k.data_ptr<T>() : nullptr;
  p.k_row_stride = k.size(0) == 1 ? 0 : k.size(1);
  p.zri = zri.data_ptr<T>();
  p.mask = mask.has_value() ? mask->data_ptr<T>() : nullptr;
  p.B = a.size(0);
  p.N = a.size(1);
  p.causal = causal;
  return p;
}

at::Tensor workspace(const at::Tensor& a, const bk_cuda::Plan& plan, bool causal, bool backward) {
  const size_t bytes = bk_cuda::workspace_bytes(plan, causal, backward, a.scalar_type() == at::kDouble);
  // torch's caching allocator returns blocks aligned to at least 256 bytes, as the launchers need.
  return at::empty({static_cast<int64_t>(bytes)}, a.options().dtype(at::kByte));
}

std::pair<at::Tensor, at::Tensor> state_args(const at::Tensor& a, bool causal, const OptT& d_in, const OptT& k_in) {
  return resnet_bk::state_args(a, causal, d_in, k_in,
                               [&a](const char* name, const at::Tensor& t) { check_cuda_tensor(name, t, a); });
}

at::Tensor fwd_impl(const at::Tensor& a_, const at::Tensor& k_, const at::Tensor& zri_, const OptT& mask_, bool causal,
                    const OptT& d_in_, const OptT& k_in_) {
  check_args(a_, k_, zri_, mask_);
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto st = state_args(a_, causal, d_in_, k_in_);
  at::Tensor a = a_.contiguous(), k = k_.contiguous(), zri = zri_.contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_.has_value()) mask = mask_->contiguous();
  const auto cdt = a.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  at::Tensor out = at::empty({a.size(0), a.size(1)}, a.options().dtype(cdt));
  if (a.size(0) == 0) return out;
  at::Tensor outr = at::view_as_real(out);
  const bk_cuda::Plan plan = plan_for(a);
  at::Tensor ws = workspace(a, plan, causal, false);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bk_core_fwd_cuda", [&] {
    auto p = make_problem<scalar_t>(a, k, zri, mask, causal);
    if (st.first.defined()) {
      p.d_in = st.first.data_ptr<scalar_t>();
      p.k_in = st.second.data_ptr<scalar_t>();
    }
    check_status(bk_cuda::forward(p, outr.data_ptr<scalar_t>(), plan, ws.data_ptr(), stream));
  });
  return out;
}

at::Tensor bk_core_fwd_cuda(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
                            bool causal) {
  return fwd_impl(a, k, zri, mask, causal, {}, {});
}

at::Tensor bk_core_fwd_state_cuda(const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
                                  const at::Tensor& d_in, const at::Tensor& k_in) {
  return fwd_impl(a, k, zri, mask, true, d_in, k_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& k_, const at::Tensor& zri_, const OptT& mask_,
    bool causal, bool need_mask_grad, bool need_k_grad, bool need_z_grad, const OptT& d_in_, const OptT& k_in_) {
  check_args(a_, k_, zri_, mask_);
  resnet_bk::check_grad_args(grad_, a_, mask_, need_mask_grad,
                             [&a_](const char* name, const at::Tensor& t) { check_cuda_tensor(name, t, a_); });
  const auto cdt = a_.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
  const c10::cuda::CUDAGuard guard(a_.device());
  const auto st = state_args(a_, causal, d_in_, k_in_);
  at::Tensor a = a_.contiguous(), k = k_.contiguous(), zri = zri_.contiguous();
  // view_as_real needs the conjugation resolved; the kernel reads (B, N, 2) contiguous.
  at::Tensor gradr = at::view_as_real(grad_.resolve_conj().contiguous()).contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_.has_value()) mask = mask_->contiguous();
  const int64_t B = a.size(0), N = a.size(1);
  at::Tensor grad_a = at::empty_like(a);
  // grad k is written only when asked for (the kernel gets a null pointer otherwise: no traffic)
  at::Tensor grad_k_rows = need_k_grad ? at::empty({B, N - 1}, a.options()) : at::empty({0}, a.options());
  at::Tensor grad_mask = need_mask_grad ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor grad_z = at::empty({2}, a.options());
  // mu at each row's position 0, from which the op layer forms the state's gradients
  at::Tensor mu0 = st.first.defined() ? at::empty({B}, a.options().dtype(cdt)) : at::empty({0}, a.options().dtype(cdt));
  const bk_cuda::Plan plan = plan_for(a);
  at::Tensor ws = workspace(a, plan, causal, true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bk_core_bwd_cuda", [&] {
    auto p = make_problem<scalar_t>(a, k, zri, mask, causal);
    bk_cuda::Grads<scalar_t> g;
    g.grad = gradr.data_ptr<scalar_t>();
    g.grad_a = grad_a.data_ptr<scalar_t>();
    g.grad_k = grad_k_rows.numel() > 0 ? grad_k_rows.data_ptr<scalar_t>() : nullptr;
    g.grad_zri = grad_z.data_ptr<scalar_t>();
    g.grad_mask = need_mask_grad ? grad_mask.data_ptr<scalar_t>() : nullptr;
    if (st.first.defined()) {
      p.d_in = st.first.data_ptr<scalar_t>();
      p.k_in = st.second.data_ptr<scalar_t>();
      if (B > 0) g.mu0 = static_cast<scalar_t*>(mu0.data_ptr());
    }
    check_status(bk_cuda::backward(p, g, plan, ws.data_ptr(), stream));
  });
  // A shared k (one row for the whole batch) gets the sum of the per-row gradients. (grad z is
  // always computed here, from the per-block partial sums; one not asked for is returned empty, as
  // on CPU.)
  at::Tensor grad_k = (need_k_grad && k.size(0) == 1 && B != 1) ? grad_k_rows.sum(0, true) : grad_k_rows;
  return {grad_a, grad_k, need_z_grad ? grad_z : at::empty({0}, a.options()), grad_mask, mu0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bk_core_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
    bool causal, bool need_mask_grad, bool need_k_grad, bool need_z_grad,
    const OptT& /*out: the forward's output, used by the CPU kernel only*/) {
  auto r = bwd_impl(grad, a, k, zri, mask, causal, need_mask_grad, need_k_grad, need_z_grad, {}, {});
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bk_core_bwd_state_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& k, const at::Tensor& zri, const OptT& mask,
    const at::Tensor& d_in, const at::Tensor& k_in, bool need_mask_grad, bool need_k_grad, bool need_z_grad,
    const OptT& /*out: used by the CPU kernel only*/) {
  return bwd_impl(grad, a, k, zri, mask, true, need_mask_grad, need_k_grad, need_z_grad, d_in, k_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CUDA, m) {
  m.impl("bk_core_fwd", &bk_core_fwd_cuda);
  m.impl("bk_core_bwd", &bk_core_bwd_cuda);
  m.impl("bk_core_fwd_state", &bk_core_fwd_state_cuda);
  m.impl("bk_core_bwd_state", &bk_core_bwd_state_cuda);
}

// ---- BK-Core decode step (bk_step_cuda.h): one launch, no host reads, no workspace -------------

namespace {

at::ScalarType step_complex_of(at::ScalarType t) { return t == at::kDouble ? at::kComplexDouble : at::kComplexFloat; }

void check_step_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& zri,
                     const c10::optional<at::Tensor>& state) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, "a: expected float32 or float64, got ",
              a.scalar_type());
  TORCH_CHECK(a.is_cuda(), "a: expected a CUDA tensor, got one on ", a.device());
  for (const at::Tensor* t : {&b, &c}) {
    const char* name = t == &b ? "b" : "c";
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), name, ": expected dtype ", a.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->numel() == 1 || t->sizes() == a.sizes(), name, ": expected one value or a's shape ", a.sizes(),
                ", got ", t->sizes());
    check_cuda_tensor(name, *t, a);
  }
  TORCH_CHECK(zri.dim() == 1 && zri.size(0) == 2 && zri.scalar_type() == a.scalar_type(),
              "zri: expected shape (2,) of dtype ", a.scalar_type(), ", got ", zri.sizes(), " ", zri.scalar_type());
  check_cuda_tensor("zri", zri, a);
  if (state.has_value()) {
    TORCH_CHECK(state->sizes() == a.sizes() && state->scalar_type() == step_complex_of(a.scalar_type()),
                "state: expected a ", step_complex_of(a.scalar_type()), " tensor of shape ", a.sizes(), ", got ",
                state->scalar_type(), " ", state->sizes());
    check_cuda_tensor("state", *state, a);
  }
}

void check_step_out(const char* name, const at::Tensor& t, const at::Tensor& a) {
  TORCH_CHECK(t.sizes() == a.sizes() && t.scalar_type() == step_complex_of(a.scalar_type()), name, ": expected a ",
              step_complex_of(a.scalar_type()), " tensor of shape ", a.sizes(), ", got ", t.scalar_type(), " ",
              t.sizes());
  check_cuda_tensor(name, t, a);
  TORCH_CHECK(t.is_contiguous() && !t.is_conj() && !t.is_neg(), name,
              ": expected a contiguous tensor without a lazy conjugate or negation (it is written in place)");
}

void launch_step(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& c_, const at::Tensor& zri_,
                 const c10::optional<at::Tensor>& state_, const at::Tensor& y, const at::Tensor& d) {
  const c10::cuda::CUDAGuard guard(a_.device());
  // .contiguous() of a contiguous tensor is the tensor itself: no copy on the decode path
  const at::Tensor a = a_.contiguous(), b = b_.contiguous(), c = c_.contiguous(), zri = zri_.contiguous();
  at::Tensor state;
  if (state_.has_value()) {
    state = d.is_same(*state_) ? *state_ : state_->resolve_conj().resolve_neg().contiguous();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bk_core_step_cuda", [&] {
    bk_cuda::StepProblem<scalar_t> p;
    p.a = a.data_ptr<scalar_t>();
    p.b = b.data_ptr<scalar_t>();
    p.b_stride = b.numel() == 1 ? 0 : 1;
    p.c = c.data_ptr<scalar_t>();
    p.c_stride = c.numel() == 1 ? 0 : 1;
    p.zri = zri.data_ptr<scalar_t>();
    p.state = state.defined() ? static_cast<const scalar_t*>(state.data_ptr()) : nullptr;
    p.n = a.numel();
    check_status(bk_cuda::step(p, static_cast<scalar_t*>(y.data_ptr()), static_cast<scalar_t*>(d.data_ptr()), stream));
  });
}

std::tuple<at::Tensor, at::Tensor> bk_core_step_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                                     const at::Tensor& zri, const c10::optional<at::Tensor>& state) {
  check_step_args(a, b, c, zri, state);
  const auto opts = a.options().dtype(step_complex_of(a.scalar_type()));
  at::Tensor y = at::empty(a.sizes(), opts), d = at::empty(a.sizes(), opts);
  launch_step(a, b, c, zri, state, y, d);
  return {y, d};
}

void bk_core_step_out_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& zri,
                           const c10::optional<at::Tensor>& state, const at::Tensor& y, const at::Tensor& d) {
  check_step_args(a, b, c, zri, state);
  check_step_out("y", y, a);
  check_step_out("d", d, a);
  TORCH_CHECK(!y.is_same(d), "y, d: expected two different tensors");
  TORCH_CHECK(!state.has_value() || !y.is_same(*state), "y: expected a tensor other than state (d may be the state)");
  launch_step(a, b, c, zri, state, y, d);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CUDA, m) {
  m.impl("bk_core_step", &bk_core_step_cuda);
  m.impl("bk_core_step_out", &bk_core_step_out_cuda);
}

#endif  // RESNET_BK_WITH_CUDA
