"""Autograd and fake kernels shared by every compiled BK-Core op pair (C++/CUDA ``bk_core_fwd``
/ ``bk_core_bwd``, Triton ``bk_core_fwd_triton`` / ``bk_core_bwd_triton``): the forward op returns
G (B, N) complex, the backward op the exact gradients (grad_a, grad_k, grad_zri, grad_mask)."""
from __future__ import annotations

from typing import Callable

import torch

from .reference import complex_dtype_for


def fwd_fake(a, k, zri, mask, causal):
    torch._check(a.dim() == 2, lambda: "a: expected shape (B, N)")
    return a.new_empty(a.shape, dtype=complex_dtype_for(a.dtype))


def bwd_fake(grad, a, k, zri, mask, causal, need_mask_grad, need_k_grad=True, need_z_grad=True, out=None):
    gm = a.new_empty(a.shape) if (mask is not None and need_mask_grad) else a.new_empty((0,))
    gk = k.new_empty(k.shape) if need_k_grad else k.new_empty((0,))
    return a.new_empty(a.shape), gk, zri.new_empty((2,) if need_z_grad else (0,)), gm


def register_bk_autograd(fwd_qualname: str, bwd_op: Callable, grad_flags: bool = False) -> None:
    """Registers the exact backward of ``fwd_qualname`` as a call of ``bwd_op``; with
    ``grad_flags`` the op also takes (need_k_grad, need_z_grad, out): it skips what is not
    needed, and gets the forward's output back."""

    def setup_context(ctx, inputs, output):
        a, k, zri, mask, causal = inputs
        # the causal output without a mask (1 / d) is given back to an op that reads its pivots from it
        keep = grad_flags and causal and mask is None
        ctx.save_for_backward(a, k, zri, mask, output if keep else None)
        ctx.causal = causal

    def backward(ctx, grad):
        a, k, zri, mask, out = ctx.saved_tensors
        need_mask = mask is not None and ctx.needs_input_grad[3]
        need_k, need_z = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if grad_flags:
            ga, gk, gz, gm = bwd_op(grad, a, k, zri, mask, ctx.causal, need_mask, need_k, need_z, out)
        else:
            ga, gk, gz, gm = bwd_op(grad, a, k, zri, mask, ctx.causal, need_mask)
        return ga, (gk if need_k else None), (gz if need_z else None), (gm if need_mask else None), None

    torch.library.register_autograd(fwd_qualname, backward, setup_context=setup_context)


def register_no_double_backward(bwd_qualname: str) -> None:
    def backward(ctx, *grads):
        raise NotImplementedError(
            "resnet_bk.ops.bk_core: double backward (gradient of the gradient) is not implemented; "
            "the first-order gradient is exact. Use the reference backend if you need create_graph=True.")

    torch.library.register_autograd(bwd_qualname, backward, setup_context=lambda ctx, inputs, output: None)


# ---- learned down/upsampling op pairs (C++/CUDA and Triton) ----------------------------------

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


def register_pool_autograd(down_fwd_qualname: str, down_bwd_op: Callable, up_fwd_qualname: str,
                           up_bwd_op: Callable) -> None:
    """Registers the backward of a (downsample, upsample) forward-op pair as calls of their
    backward ops; unneeded gradients are not computed."""

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
