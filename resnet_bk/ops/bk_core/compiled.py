"""BK-Core's compiled ops (``torch.ops.resnet_bk.bk_core_fwd`` / ``bk_core_bwd``; schemas in
csrc/schemas.cpp, CPU and CUDA kernels in csrc/, autograd in csrc/autograd.cpp): their Python side
(fake kernels for torch.compile and export, the double-backward guard) and their registration as the
"cpp" and "cuda" backends.

The contract every compiled BK-Core backend keeps (the Triton ops in ``triton.py`` take the same
arguments):

    bk_core_fwd(a, k, zri, mask, causal) -> G                     (B, N) complex
    bk_core_bwd(grad, a, k, zri, mask, causal, need_mask_grad, need_k_grad, need_z_grad, out)
        -> (grad_a (B, N), grad_k (Bk, N-1) | (0,), grad_zri (2,) | (0,), grad_mask (B, N) | (0,))

``out`` is the forward's output when it was saved (causal without a mask: it holds every pivot),
else None; a gradient that is not needed comes back as an empty (0,) tensor.

The CPU and CUDA kernels also have the causal op entered from a carried state (``bk_core_fwd_state`` /
``bk_core_bwd_state``, with d_in (B,) complex and k_in (B,); the backward returns mu at position 0
too): its autograd and use are in ``stream.py``; its fake kernels are here.
"""
from __future__ import annotations

import torch

from .. import _extension, _registry
from .reference import complex_dtype_for


def fwd_fake(a, k, zri, mask, causal):
    torch._check(a.dim() == 2, lambda: "a: expected shape (B, N)")
    return a.new_empty(a.shape, dtype=complex_dtype_for(a.dtype))


def bwd_fake(grad, a, k, zri, mask, causal, need_mask_grad, need_k_grad=True, need_z_grad=True, out=None):
    gm = a.new_empty(a.shape) if (mask is not None and need_mask_grad) else a.new_empty((0,))
    gk = k.new_empty(k.shape) if need_k_grad else k.new_empty((0,))
    return a.new_empty(a.shape), gk, zri.new_empty((2,) if need_z_grad else (0,)), gm


def fwd_state_fake(a, k, zri, mask, d_in, k_in):
    torch._check(a.dim() == 2, lambda: "a: expected shape (B, N)")
    return a.new_empty(a.shape, dtype=complex_dtype_for(a.dtype))


def bwd_state_fake(grad, a, k, zri, mask, d_in, k_in, need_mask_grad, need_k_grad, need_z_grad, out=None):
    ga, gk, gz, gm = bwd_fake(grad, a, k, zri, mask, True, need_mask_grad, need_k_grad, need_z_grad, out)
    return ga, gk, gz, gm, d_in.new_empty(d_in.shape)


def register_no_double_backward(bwd_qualname: str) -> None:
    """A backward op's own autograd: the gradient of the gradient raises a clear error."""
    def backward(ctx, *grads):
        raise NotImplementedError(
            "resnet_bk.ops.bk_core: double backward (gradient of the gradient) is not implemented; "
            "the first-order gradient is exact. Use the reference backend if you need create_graph=True.")

    torch.library.register_autograd(bwd_qualname, backward, setup_context=lambda ctx, inputs, output: None)


def bk_core_compiled(a, k, zri, mask, causal):
    return torch.ops.resnet_bk.bk_core_fwd(a, k, zri, mask, causal)


if _extension.has_op("bk_core_fwd"):
    torch.library.register_fake("resnet_bk::bk_core_fwd")(fwd_fake)
    torch.library.register_fake("resnet_bk::bk_core_bwd")(bwd_fake)
    register_no_double_backward("resnet_bk::bk_core_bwd")
if _extension.has_op("bk_core_fwd_state"):
    torch.library.register_fake("resnet_bk::bk_core_fwd_state")(fwd_state_fake)
    torch.library.register_fake("resnet_bk::bk_core_bwd_state")(bwd_state_fake)

_registry.register_compiled("bk_core", bk_core_compiled, "bk_core_fwd")
