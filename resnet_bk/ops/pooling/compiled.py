"""The learned pooling ops' compiled kernels (``torch.ops.resnet_bk.learned_downsample_fwd/_bwd``,
``learned_upsample_fwd/_bwd``; schemas in csrc/schemas.cpp, CPU and CUDA kernels in csrc/, autograd
in csrc/autograd.cpp): their Python side (fake kernels for torch.compile and export) and their
registration as the "cpp" and "cuda" backends.

The contract every compiled pooling backend keeps (the Triton ops in ``triton.py`` take the same
arguments):

    learned_downsample_fwd(x, logits, causal) -> (B, M, D)
    learned_downsample_bwd(grad, x, logits, causal, need_x_grad, need_logits_grad) -> (grad_x | (0,), grad_logits | (0,))
    learned_upsample_fwd(y, bias, residual, scale) -> (B, M*r, D)
    learned_upsample_bwd(grad, y, bias, scale, need_y_grad, need_bias_grad, need_scale_grad)
        -> (grad_y | (0,), grad_bias | (0,), grad_scale | (0,))

(the gradient for ``residual`` is the upstream gradient itself, formed by the autograd).
"""
from __future__ import annotations

import torch

from .. import _extension, _registry


def down_fwd_fake(x, logits, causal):
    torch._check(x.dim() == 3, lambda: "x: expected shape (B, N, D)")
    return x.new_empty((x.shape[0], logits.shape[0], x.shape[2]))


def down_bwd_fake(grad, x, logits, causal, need_x_grad, need_logits_grad):
    return (x.new_empty(x.shape) if need_x_grad else x.new_empty((0,)),
            logits.new_empty(logits.shape) if need_logits_grad else logits.new_empty((0,)))


def up_fwd_fake(y, bias, residual, scale):
    r = bias.shape[1]
    return y.new_empty((y.shape[0], y.shape[1] * r, y.shape[2] // r))


def up_bwd_fake(grad, y, bias, scale, need_y_grad, need_bias_grad, need_scale_grad):
    return (y.new_empty(y.shape) if need_y_grad else y.new_empty((0,)),
            bias.new_empty(bias.shape) if need_bias_grad else bias.new_empty((0,)),
            bias.new_empty(()) if (need_scale_grad and scale is not None) else bias.new_empty((0,)))


HAS_POOL_OPS = _extension.has_op("learned_downsample_fwd") and _extension.has_op("learned_upsample_fwd")

if HAS_POOL_OPS:
    torch.library.register_fake("resnet_bk::learned_downsample_fwd")(down_fwd_fake)
    torch.library.register_fake("resnet_bk::learned_downsample_bwd")(down_bwd_fake)
    torch.library.register_fake("resnet_bk::learned_upsample_fwd")(up_fwd_fake)
    torch.library.register_fake("resnet_bk::learned_upsample_bwd")(up_bwd_fake)


def learned_downsample_compiled(x, logits, causal):
    return torch.ops.resnet_bk.learned_downsample_fwd(x, logits, causal)


def learned_upsample_compiled(y, bias, residual, scale):
    return torch.ops.resnet_bk.learned_upsample_fwd(y, bias, residual, scale)


_registry.register_compiled("learned_downsample", learned_downsample_compiled, "learned_downsample_fwd")
_registry.register_compiled("learned_upsample", learned_upsample_compiled, "learned_upsample_fwd")
