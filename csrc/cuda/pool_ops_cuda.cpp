// Torch binding of the CUDA learned_downsample / learned_upsample kernels (pool_cuda.cu):
// argument checks (naming the argument, expected vs got), output and workspace allocation, device
// guard, current stream, TORCH_LIBRARY_IMPL(resnet_bk, CUDA). The schemas, with the semantics
// implemented here, are in csrc/schemas.cpp.
#ifdef RESNET_BK_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pool_cuda.h"

namespace {

using bk_pool_cuda::DType;

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kHalf;
    default:
      break;
  }
  TORCH_CHECK(false, "resnet_bk pooling: expected float32, float64, bfloat16 or float16, got ", t);
}

void check_act(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-dim tensor, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              ": expected float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got one on ", t.device());
}

void check_acc(const at::Tensor& t, const char* name, const at::Tensor& act, const char* act_name) {
  TORCH_CHECK(t.scalar_type() == acc_type_of(act.scalar_type()), name, ": expected dtype ",
              acc_type_of(act.scalar_type()), " (the accumulation dtype of ", act.scalar_type(), " activations), got ",
              t.scalar_type());
  check_same_device(t, name, act, act_name);
}

void check_status(const bk_pool_cuda::Status& s) {
  TORCH_CHECK(s.ok(), "resnet_bk CUDA kernel failed in ", (s.where ? s.where : "?"), ": ", cudaGetErrorName(s.err),
              " (", cudaGetErrorString(s.err), ")");
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

// ---------------------------------------------------------------------------------------------
// learned_downsample

void check_down(const at::Tensor& x, const at::Tensor& logits) {
  check_act(x, "x", 3);
  check_acc(logits, "logits", x, "x");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) >= 1 && logits.size(1) >= 1,
              "logits: expected shape (M, r) with M, r >= 1, got ", logits.sizes());
  TORCH_CHECK(x.size(1) == logits.size(0) * logits.size(1), "x: expected N = M * r = ", logits.size(0), " * ",
              logits.size(1), " positions (logits of shape ", logits.sizes(), "), got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 1, "x: expected D >= 1, got shape ", x.sizes());
}

at::Tensor learned_downsample_fwd_cuda(const at::Tensor& x_, const at::Tensor& logits_, bool causal) {
  check_down(x_, logits_);
  const c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous(), logits = logits_.contiguous();
  const int64_t B = x.size(0), D = x.size(2), M = logits.size(0), r = logits.size(1);
  at::Tensor out = at::empty({B, M, D}, x.options());
  if (B == 0) return out;
  const DType t = dtype_of(x.scalar_type());
  at::Tensor ws = at::empty({static_cast<int64_t>(bk_pool_cuda::down_workspace_bytes(M, r, t))},
                            x.options().dtype(at::kByte));
  check_status(bk_pool_cuda::down_fwd(t, x.data_ptr(), logits.data_ptr(), out.data_ptr(), B, M, r, D, causal,
                                      ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> learned_downsample_bwd_cuda(const at::Tensor& grad_, const at::Tensor& x_,
                                                               const at::Tensor& logits_, bool causal,
                                                               bool need_x_grad, bool need_logits_grad) {
  check_down(x_, logits_);
  check_act(grad_, "grad", 3);
  check_same_device(grad_, "grad", x_, "x");
  const int64_t B = x_.size(0), N = x_.size(1), D = x_.size(2), M = logits_.size(0), r = logits_.size(1);
  TORCH_CHECK(grad_.size(0) == B && grad_.size(1) == M && grad_.size(2) == D && grad_.scalar_type() == x_.scalar_type(),
              "grad: expected a ", x_.scalar_type(), " tensor of shape (", B, ", ", M, ", ", D, "), got ",
              grad_.scalar_type(), " ", grad_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous(), logits = logits_.contiguous(), grad = grad_.contiguous();
  at::Tensor grad_x = need_x_grad ? at::empty({B, N, D}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_logits = need_logits_grad ? at::empty({M, r}, logits.options()) : at::empty({0}, logits.options());
  if (!need_x_grad && !need_logits_grad) return {grad_x, grad_logits};
  const DType t = dtype_of(x.scalar_type());
  at::Tensor ws = at::empty({static_cast<int64_t>(bk_pool_cuda::down_workspace_bytes(M, r, t))},
                            x.options().dtype(at::kByte));
  check_status(bk_pool_cuda::down_bwd(t, ptr_or_null(grad), ptr_or_null(x), logits.data_ptr(),
                                      need_x_grad ? grad_x.data_ptr() : nullptr,
                                      need_logits_grad ? grad_logits.data_ptr() : nullptr, B, M, r, D, causal,
                                      ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return {grad_x, grad_logits};
}

// ---------------------------------------------------------------------------------------------
// learned_upsample

bk_pool_cuda::UpDims check_up(const at::Tensor& y, const at::Tensor& bias, const c10::optional<at::Tensor>& scale) {
  check_act(y, "y", 3);
  check_acc(bias, "bias", y, "y");
  TORCH_CHECK(bias.dim() == 3 && bias.size(1) >= 1, "bias: expected shape (Mb, r, Db), got ", bias.sizes());
  bk_pool_cuda::UpDims u;
  u.B = y.size(0);
  u.M = y.size(1);
  u.r = bias.size(1);
  TORCH_CHECK(u.M >= 1, "y: expected M >= 1, got shape ", y.sizes());
  TORCH_CHECK(y.size(2) >= u.r && y.size(2) % u.r == 0, "y: expected a last dimension r * D with r = ", u.r,
              " (bias.size(1)) and D >= 1, got shape ", y.sizes());
  u.D = y.size(2) / u.r;
  u.Mb = bias.size(0);
  u.Db = bias.size(2);
  TORCH_CHECK((u.Mb == 1 || u.Mb == u.M) && (u.Db == 1 || u.Db == u.D), "bias: expected shape (1 or ", u.M, ", ",
              u.r, ", 1 or ", u.D, "), got ", bias.sizes());
  if (scale.has_value()) {
    check_acc(*scale, "scale", y, "y");
    TORCH_CHECK(scale->dim() == 0, "scale: expected a 0-dim tensor, got shape ", scale->sizes());
  }
  return u;
}

at::Tensor learned_upsample_fwd_cuda(const at::Tensor& y_, const at::Tensor& bias_,
                                     const c10::optional<at::Tensor>& residual_,
                                     const c10::optional<at::Tensor>& scale_) {
  const bk_pool_cuda::UpDims u = check_up(y_, bias_, scale_);
  if (residual_.has_value()) {
    const auto& rs = *residual_;
    TORCH_CHECK(rs.dim() == 3 && rs.size(0) == u.B && rs.size(1) == u.M * u.r && rs.size(2) == u.D &&
                    rs.scalar_type() == y_.scalar_type(),
                "residual: expected a ", y_.scalar_type(), " tensor of shape (", u.B, ", ", u.M * u.r, ", ", u.D,
                "), got ", rs.scalar_type(), " ", rs.sizes());
    check_same_device(rs, "residual", y_, "y");
  }
  const c10::cuda::CUDAGuard guard(y_.device());
  at::Tensor y = y_.contiguous(), bias = bias_.contiguous();
  at::Tensor res = residual_.has_value() ? residual_->contiguous() : at::Tensor();
  at::Tensor scale = scale_.has_value() ? scale_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({u.B, u.M * u.r, u.D}, y.options());
  if (u.B == 0) return out;
  check_status(bk_pool_cuda::up_fwd(dtype_of(y.scalar_type()), y.data_ptr(), bias.data_ptr(), ptr_or_null(res),
                                    ptr_or_null(scale), out.data_ptr(), u, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> learned_upsample_bwd_cuda(
    const at::Tensor& grad_, const at::Tensor& y_, const at::Tensor& bias_, const c10::optional<at::Tensor>& scale_,
    bool need_y_grad, bool need_bias_grad, bool need_scale_grad) {
  const bk_pool_cuda::UpDims u = check_up(y_, bias_, scale_);
  check_act(grad_, "grad", 3);
  check_same_device(grad_, "grad", y_, "y");
  TORCH_CHECK(grad_.size(0) == u.B && grad_.size(1) == u.M * u.r && grad_.size(2) == u.D &&
                  grad_.scalar_type() == y_.scalar_type(),
              "grad: expected a ", y_.scalar_type(), " tensor of shape (", u.B, ", ", u.M * u.r, ", ", u.D, "), got ",
              grad_.scalar_type(), " ", grad_.sizes());
  const c10::cuda::CUDAGuard guard(y_.device());
  at::Tensor y = y_.contiguous(), bias = bias_.contiguous(), grad = grad_.contiguous();
  at::Tensor scale = scale_.has_value() ? scale_->contiguous() : at::Tensor();
  const auto aopt = y.options().dtype(acc_type_of(y.scalar_type()));
  at::Tensor grad_y = need_y_grad ? at::empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  at::Tensor grad_bias = need_bias_grad ? at::empty(bias.sizes(), aopt) : at::empty({0}, aopt);
  at::Tensor grad_scale = need_scale_grad ? at::empty({}, aopt) : at::empty({0}, aopt);
  if (!need_y_grad && !need_bias_grad && !need_scale_grad) return {grad_y, grad_bias, grad_scale};
  at::Tensor ws = at::empty({static_cast<int64_t>(bk_pool_cuda::up_workspace_bytes(u))}, y.options().dtype(at::kByte));
  check_status(bk_pool_cuda::up_bwd(dtype_of(y.scalar_type()), ptr_or_null(grad), ptr_or_null(y), bias.data_ptr(),
                                    ptr_or_null(scale), grad_y.numel() > 0 ? grad_y.data_ptr() : nullptr,
                                    need_bias_grad ? grad_bias.data_ptr() : nullptr,
                                    need_scale_grad ? grad_scale.data_ptr() : nullptr, u, ws.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream().stream()));
  return {grad_y, grad_bias, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_bk, CUDA, m) {
  m.impl("learned_downsample_fwd", &learned_downsample_fwd_cuda);
  m.impl("learned_downsample_bwd", &learned_downsample_bwd_cuda);
  m.impl("learned_upsample_fwd", &learned_upsample_fwd_cuda);
  m.impl("learned_upsample_bwd", &learned_upsample_bwd_cuda);
}

#endif  // RESNET_BK_WITH_CUDA
