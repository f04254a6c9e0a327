"""The learned pooling ops' Triton kernels (``triton_kernels/pooling.py``) as PyTorch ops and the
"triton" backend's implementations. They keep the compiled ops' contract (``compiled.py``); the
autograd below is the Python twin of csrc/autograd.cpp's (a custom_op cannot have a C++ autograd
kernel)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _registry, _triton
from .compiled import down_bwd_fake, down_fwd_fake, up_bwd_fake, up_fwd_fake


def _register_autograd(down_fwd_qualname: str, down_bwd_op, up_fwd_qualname: str, up_bwd_op) -> None:
    def down_setup(ctx, inputs, output):
        x, logits, causal = inputs
        ctx.save_for_backward(x, logits)
        ctx.causal = causal

    def down_backward(ctx, grad):
        x, logits = ctx.saved_tensors
        nx, nl = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gl = down_bwd_op(grad, x, logits, ctx.causal, nx, nl)
        return (gx if nx else None), (gl if nl else None), None

    def up_setup(ctx, inputs, output):
        y, bias, residual, scale = inputs
        ctx.save_for_backward(y, bias, scale)

    def up_backward(ctx, grad):
        y, bias, scale = ctx.saved_tensors
        ny, nb, nr, ns = ctx.needs_input_grad
        gy, gb, gs = up_bwd_op(grad, y, bias, scale, ny, nb, ns)
        # d out / d residual is the identity: the upstream gradient itself
        return (gy if ny else None), (gb if nb else None), (grad if nr else None), (gs if ns else None)

    torch.library.register_autograd(down_fwd_qualname, down_backward, setup_context=down_setup)
    torch.library.register_autograd(up_fwd_qualname, up_backward, setup_context=up_setup)


if _triton.AVAILABLE:
    def _pool():
        return _triton.kernels("pooling")

    @torch.library.custom_op("resnet_bk::learned_downsample_fwd_triton", mutates_args=())
    def learned_downsample_fwd_triton(x: Tensor, logits: Tensor, causal: bool) -> Tensor:
        """x (B, N, D), logits (M, r) -> (B, M, D)."""
        return _pool().learned_downsample_fwd(x, logits, causal)

    @torch.library.custom_op("resnet_bk::learned_downsample_bwd_triton", mutates_args=())
    def learned_downsample_bwd_triton(grad: Tensor, x: Tensor, logits: Tensor, causal: bool, need_x: bool,
                                      need_logits: bool) -> Tuple[Tensor, Tensor]:
        """(grad_x (B, N, D) or (0,), grad_logits (M, r) or (0,))."""
        gx, gl = _pool().learned_downsample_bwd(grad, x, logits, causal, need_x, need_logits)
        return (x.new_empty((0,)) if gx is None else gx), (logits.new_empty((0,)) if gl is None else gl)

    @torch.library.custom_op("resnet_bk::learned_upsample_fwd_triton", mutates_args=())
    def learned_upsample_fwd_triton(y: Tensor, bias: Tensor, residual: Optional[Tensor],
                                    scale: Optional[Tensor]) -> Tensor:
        """y (B, M, r*D), bias (Mb, r, Db) -> (B, M*r, D)."""
        return _pool().learned_upsample_fwd(y, bias, residual, scale)

    @torch.library.custom_op("resnet_bk::learned_upsample_bwd_triton", mutates_args=())
    def learned_upsample_bwd_triton(grad: Tensor, y: Tensor, bias: Tensor, scale: Optional[Tensor], need_y: bool,
                                    need_bias: bool, need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(grad_y, grad_bias, grad_scale), each (0,) when not needed."""
        gy, gb, gs = _pool().learned_upsample_bwd(grad, y, bias, scale, need_y, need_bias, need_scale)
        # a fresh empty tensor per missing gradient: a custom op's outputs may not alias each other
        return (y.new_empty((0,)) if gy is None else gy, bias.new_empty((0,)) if gb is None else gb,
                bias.new_empty((0,)) if gs is None else gs)

    learned_downsample_fwd_triton.register_fake(down_fwd_fake)
    learned_downsample_bwd_triton.register_fake(down_bwd_fake)
    learned_upsample_fwd_triton.register_fake(up_fwd_fake)
    learned_upsample_bwd_triton.register_fake(up_bwd_fake)
    _register_autograd("resnet_bk::learned_downsample_fwd_triton", torch.ops.resnet_bk.learned_downsample_bwd_triton,
                       "resnet_bk::learned_upsample_fwd_triton", torch.ops.resnet_bk.learned_upsample_bwd_triton)

    def learned_downsample_triton(x, logits, causal):
        return torch.ops.resnet_bk.learned_downsample_fwd_triton(x, logits, causal)

    def learned_upsample_triton(y, bias, residual, scale):
        return torch.ops.resnet_bk.learned_upsample_fwd_triton(y, bias, residual, scale)

    _registry.register_impl("learned_downsample", "triton", learned_downsample_triton, _triton.check)
    _registry.register_impl("learned_upsample", "triton", learned_upsample_triton, _triton.check)
