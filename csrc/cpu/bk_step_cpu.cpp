// BK-Core's one-token decode step on the CPU: the CPU kernels of bk_core_step and bk_core_step_out
// (schemas and contract in csrc/schemas.cpp; autograd in csrc/autograd.cpp). One loop over the
// batch with bk_math.h's pivot step and reciprocal (the arithmetic of the whole-sequence kernels):
//   d = (a - z) - b c / state   (no state: a - z),   y = 1 / d.
// The Python op layer (resnet_bk/ops/bk_core/step.py) validates the arguments with clear errors;
// the checks here guard the raw pointer reads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../bk_math.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

// a batch this large is split over threads; a decode step is usually far smaller (one loop inline)
constexpr int64_t kStepGrain = 1 << 15;

template <class T>
void step_loop(const T* a, const T* b, int64_t bs, const T* c, int64_t cs, const T* zri, const T* state, T* y, T* d,
               int64_t n) {
  const T zr = zri[0], zi = zri[1];
  at::parallel_for(0, n, kStepGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const bk::Cx<T> alpha{a[i] - zr, -zi};
      bk::Cx<T> di = alpha;
      if (state != nullptr) {
        // the whole state entry is read before d (which may be the state) is written
        const bk::Cx<T> prev{state[2 * i], state[2 * i + 1]};
        di = bk::pivot_step(alpha, b[i * bs] * c[i * cs], prev);
      }
      const bk::Cx<T> yi = bk::recip(di);
      d[2 * i] = di.re;
      d[2 * i + 1] = di.im;
      y[2 * i] = yi.re;
      y[2 * i + 1] = yi.im;
    }
  });
}

at::ScalarType complex_of(at::ScalarType t) { return t == at::kDouble ? at::kComplexDouble : at::kComplexFloat; }

void check_step_args(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& zri, const OptT& state) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, "a: expected float32 or float64, got ",
              a.scalar_type());
  TORCH_CHECK(a.device().is_cpu(), "a: expected a CPU tensor, got one on ", a.device());
  for (const Tensor* t : {&b, &c}) {
    const char* name = t == &b ? "b" : "c";
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), name, ": expected dtype ", a.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->numel() == 1 || t->sizes() == a.sizes(), name, ": expected one value or a's shape ", a.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), name, ": expected a CPU tensor, got one on ", t->device());
  }
  TORCH_CHECK(zri.dim() == 1 && zri.size(0) == 2 && zri.scalar_type() == a.scalar_type() && zri.device().is_cpu(),
              "zri: expected a CPU tensor of shape (2,) and dtype ", a.scalar_type(), ", got ", zri.sizes(), " ",
              zri.scalar_type(), " on ", zri.device());
  if (state.has_value()) {
    TORCH_CHECK(state->sizes() == a.sizes() && state->scalar_type() == complex_of(a.scalar_type()) &&
                    state->device().is_cpu(),
                "state: expected a CPU ", complex_of(a.scalar_type()), " tensor of shape ", a.sizes(), ", got ",
                state->scalar_type(), " ", state->sizes(), " on ", state->device());
  }
}

void check_out(const char* name, const Tensor& t, const Tensor& a) {
  TORCH_CHECK(t.sizes() == a.sizes() && t.scalar_type() == complex_of(a.scalar_type()) && t.device().is_cpu(), name,
              ": expected a CPU ", complex_of(a.scalar_type()), " tensor of shape ", a.sizes(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous() && !t.is_conj() && !t.is_neg(), name,
              ": expected a contiguous tensor without a lazy conjugate or negation (it is written in place)");
}

// state (read): contiguous, conjugation resolved (a no-op for the usual contiguous state)
Tensor plain(const Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

void run_step(const Tensor& a_, const Tensor& b_, const Tensor& c_, const Tensor& zri_, const OptT& state_, Tensor& y,
              Tensor& d) {
  const Tensor a = a_.contiguous(), b = b_.contiguous(), c = c_.contiguous(), zri = zri_.contiguous();
  Tensor state;
  if (state_.has_value()) state = (d.is_same(*state_)) ? *state_ : plain(*state_);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bk_core_step_cpu", [&] {
    step_loop<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), b.numel() == 1 ? 0 : 1,
                        c.data_ptr<scalar_t>(), c.numel() == 1 ? 0 : 1, zri.data_ptr<scalar_t>(),
                        state.defined() ? static_cast<const scalar_t*>(state.data_ptr()) : nullptr,
                        static_cast<scalar_t*>(y.data_ptr()), static_cast<scalar_t*>(d.data_ptr()), a.numel());
  });
}

std::tuple<Tensor, Tensor> bk_core_step_cpu(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& zri,
                                            const OptT& state) {
  check_step_args(a, b, c, zri, state);
  const auto opts = a.options().dtype(complex_of(a.scalar_type()));
  Tensor y = at::empty(a.sizes(), opts), d = at::empty(a.sizes(), opts);
  run_step(a, b, c, zri, state, y, d);
  return {y, d};
}

void bk_core_step_out_cpu(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& zri, const OptT& state,
                          const Tensor& y, const Tensor& d) {
  check_step_args(a, b, c, zri, state);
  check_out("y", y, a);
  check_out("d", d, a);
  TORCH_CHECK(!y.is_same(d), "y, d: expected two different tensors");
  TORCH_CHECK(!state.has_value() || !y.is_same(*state), "y: expected a tensor other than state (d may be the state)");
  Tensor yy = y, dd = d;
  run_step(a, b, c, zri, state, yy, dd);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CPU, m) {
  m.impl("bk_core_step", &bk_core_step_cpu);
  m.impl("bk_core_step_out", &bk_core_step_out_cpu);
}
