// Top-1 mixture-of-experts FFN for inference, as one op called from C++: the router, the gate and
// the experts' GEMMs through ATen, the grouping of tokens by expert, the gather and the gated
// scatter as plain loops.
//
// The same computation, bit for bit, as SparseMoELayer's no-grad path (resnet_bk/models/base.py)
// and the reference resnet_bk.ops.moe.moe_top1_ref: logits (E, T) = W_r x^T + b_r, softmax over
// the E experts in float32, each token to its arg-max expert, its output scaled by that expert's
// probability. What it saves is most of the ~8 Python-dispatched ops per expert and ~15 per call
// of the module's path (at 8 tokens, d_model 128: 197 us for the layer's path, 71 us for this op
// here): the fixed cost of a call, which at small batches is most of a layer's time. No autograd:
// inference only. The schema is in csrc/schemas.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_list(const char* name, at::TensorList l, int64_t E, std::vector<int64_t> shape, const at::Tensor& x) {
  TORCH_CHECK(static_cast<int64_t>(l.size()) == E, name, ": expected ", E, " tensors (one per expert), got ",
              l.size());
  for (const auto& t : l) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, ": expected shape ", at::IntArrayRef(shape), ", got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), name, ": expected dtype ",
                x.scalar_type(), " on ", x.device(), ", got ", t.scalar_type(), " on ", t.device());
  }
}

at::Tensor moe_top1_infer_cpu(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& router_b,
                              at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2) {
  TORCH_CHECK(x.dim() == 2, "x: expected shape (T, D), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: expected float32 or float64, got ", x.scalar_type());
  const int64_t T = x.size(0), D = x.size(1), E = router_w.size(0);
  TORCH_CHECK(router_w.dim() == 2 && router_w.size(1) == D && E >= 1, "router_w: expected shape (E, ", D, "), got ",
              router_w.sizes());
  TORCH_CHECK(router_b.sizes() == at::IntArrayRef({E}), "router_b: expected shape (", E, "), got ", router_b.sizes());
  TORCH_CHECK(!w1.empty() && w1[0].dim() == 2, "w1: expected (H, D) matrices");
  const int64_t H = w1[0].size(0);
  TORCH_CHECK(!w2.empty() && w2[0].dim() == 2, "w2: expected (D_out, H) matrices");
  const int64_t Do = w2[0].size(0);
  check_list("w1", w1, E, {H, D}, x);
  check_list("b1", b1, E, {H}, x);
  check_list("w2", w2, E, {Do, H}, x);
  check_list("b2", b2, E, {Do}, x);
  for (const auto* t : {&router_w, &router_b})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "router: expected dtype ",
                x.scalar_type(), " on ", x.device(), ", got ", t->scalar_type(), " on ", t->device());
  if (T == 0) return at::zeros({0, Do}, x.options());

  // Router and gate with the module's own ops, so that its values are bit-identical to the
  // module's path: logits (E, T), float32 softmax over the experts, the max and its index.
  at::Tensor logits = at::addmm(router_b.unsqueeze(1), router_w, x.t()).to(at::kFloat);
  at::Tensor ex = (logits - logits.amax(0, true)).exp_();
  auto top = (ex / ex.sum(0, true)).max(0);
  at::Tensor gate_f = std::get<0>(top).contiguous();
  at::Tensor idx = std::get<1>(top).contiguous();
  const float* gate = gate_f.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> expert(ip, ip + T), count(E, 0);
  for (int64_t t = 0; t < T; ++t) ++count[expert[t]];
  // Tokens grouped by expert, in token order within a group (a stable counting sort).
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> perm(T), fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t) perm[fill[expert[t]]++] = t;
  // The gather and the gated scatter are plain row loops: at a few tokens every ATen call (~3 us
  // here) is a large share of the layer.
  at::Tensor xc = x.contiguous();
  at::Tensor xs = at::empty({T, D}, x.options());
  at::Tensor out = at::empty({T, Do}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_top1_infer", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = xs.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) std::copy(src + perm[i] * D, src + (perm[i] + 1) * D, dst + i * D);
    });
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = count[e];
      if (n == 0) continue;
      at::Tensor h = at::addmm(b1[e], xs.narrow(0, start[e], n), w1[e].t());
      h.relu_();
      at::Tensor y = at::addmm(b2[e], h, w2[e].t()).contiguous();
      const scalar_t* yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = perm[start[e] + i];
          const scalar_t g = static_cast<scalar_t>(gate[t]);
          for (int64_t d = 0; d < Do; ++d) o[t * Do + d] = yp[i * Do + d] * g;
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CPU, m) {
  m.impl("moe_top1_infer", &moe_top1_infer_cpu);
}
