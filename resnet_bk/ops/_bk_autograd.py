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


def bwd_fake(grad, a, k, zri, mask, causal, need_mask_grad):
    gm = a.new_empty(a.shape) if (mask is not None and need_mask_grad) else a.new_empty((0,))
    return a.new_empty(a.shape), k.new_empty(k.shape), zri.new_empty((2,)), gm


def register_bk_autograd(fwd_qualname: str, bwd_op: Callable) -> None:
    """Registers the exact backward of ``fwd_qualname`` as a call of ``bwd_op``."""

    def setup_context(ctx, inputs, output):
        a, k, zri, mask, causal = inputs
        ctx.save_for_backward(a, k, zri, mask)
        ctx.causal = causal

    def backward(ctx, grad):
        a, k, zri, mask = ctx.saved_tensors
        need_mask = mask is not None and ctx.needs_input_grad[3]
        ga, gk, gz, gm = bwd_op(grad, a, k, zri, mask, ctx.causal, need_mask)
        return ga, gk, gz, (gm if need_mask else None), None

    torch.library.register_autograd(fwd_qualname, backward, setup_context=setup_context)


def register_no_double_backward(bwd_qualname: str) -> None:
    def backward(ctx, *grads):
        raise NotImplementedError(
            "resnet_bk.ops.bk_core: double backward (gradient of the gradient) is not implemented; "
            "the first-order gradient is exact. Use the reference backend if you need create_graph=True.")

    torch.library.register_autograd(bwd_qualname, backward, setup_context=lambda ctx, inputs, output: None)
