"""BK-Core's Triton ops (kernels in ``triton_kernels/bk_core.py``) as PyTorch ops and the "triton"
backend's implementation of ``bk_core``.

``torch.ops.resnet_bk.bk_core_fwd_triton`` / ``bk_core_bwd_triton`` keep the compiled ops' contract
(``compiled.py``): the backward op takes the same arguments as ``bk_core_bwd``, and gives an empty
(0,) tensor for a gradient that is not needed. The autograd below is the Python twin of
csrc/autograd.cpp's ``BkCoreFunction`` (a custom_op cannot have a C++ autograd kernel).

``bk_core_fwd_state_triton`` / ``bk_core_bwd_state_triton`` are the causal op entered from a carried
state, with the contract of the CPU/CUDA ``bk_core_fwd_state`` / ``bk_core_bwd_state``
(csrc/schemas.cpp; the backward also returns mu0 (B,) complex); their autograd is ``stream.py``'s
``_CarriedState``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _registry, _triton
from .compiled import bwd_fake, bwd_state_fake, fwd_fake, fwd_state_fake, register_no_double_backward


def _register_autograd(fwd_qualname: str, bwd_op) -> None:
    def setup_context(ctx, inputs, output):
        a, k, zri, mask, causal = inputs
        # the causal output without a mask (1 / d) is handed to the backward, as csrc/autograd.cpp does
        ctx.save_for_backward(a, k, zri, mask, output if (causal and mask is None) else None)
        ctx.causal = causal

    def backward(ctx, grad):
        a, k, zri, mask, out = ctx.saved_tensors
        need_mask = mask is not None and ctx.needs_input_grad[3]
        need_k, need_z = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ga, gk, gz, gm = bwd_op(grad, a, k, zri, mask, ctx.causal, need_mask, need_k, need_z, out)
        return ga, (gk if need_k else None), (gz if need_z else None), (gm if need_mask else None), None

    torch.library.register_autograd(fwd_qualname, backward, setup_context=setup_context)


if _triton.AVAILABLE:
    @torch.library.custom_op("resnet_bk::bk_core_fwd_triton", mutates_args=())
    def bk_core_fwd_triton(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """(B, N) complex: G (or 1/d when causal) times mask; canonical arguments."""
        return _triton.kernels("bk_core").bk_core_fwd(a, k, zri, mask, causal)

    @torch.library.custom_op("resnet_bk::bk_core_bwd_triton", mutates_args=())
    def bk_core_bwd_triton(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool,
                           need_mask_grad: bool, need_k_grad: bool = True, need_z_grad: bool = True,
                           out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grad_a (B, N), grad_k (Bk, N-1), grad_zri (2,), grad_mask (B, N)), each (0,) when not
        needed (grad_k is then not stored; grad_zri's partial sums are formed on the way to grad_a;
        ``out`` is not used)."""
        ga, gk, gz, gm = _triton.kernels("bk_core").bk_core_bwd(grad, a, k, zri, mask, causal, need_mask_grad,
                                                                need_k_grad)
        # a fresh empty tensor per missing gradient: a custom op's outputs may not alias each other
        return (ga, gk if need_k_grad else k.new_empty((0,)), gz if need_z_grad else zri.new_empty((0,)),
                a.new_empty((0,)) if gm is None else gm)

    bk_core_fwd_triton.register_fake(fwd_fake)
    bk_core_bwd_triton.register_fake(bwd_fake)
    _register_autograd("resnet_bk::bk_core_fwd_triton", torch.ops.resnet_bk.bk_core_bwd_triton)
    register_no_double_backward("resnet_bk::bk_core_bwd_triton")

    @torch.library.custom_op("resnet_bk::bk_core_fwd_state_triton", mutates_args=())
    def bk_core_fwd_state_triton(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], d_in: Tensor,
                                 k_in: Tensor) -> Tensor:
        """(B, N) complex: 1/d times mask, the causal chain continuing the state (d_in, k_in)."""
        return _triton.kernels("bk_core").bk_core_fwd(a, k, zri, mask, True, d_in=d_in, k_in=k_in)

    @torch.library.custom_op("resnet_bk::bk_core_bwd_state_triton", mutates_args=())
    def bk_core_bwd_state_triton(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor],
                                 d_in: Tensor, k_in: Tensor, need_mask_grad: bool, need_k_grad: bool,
                                 need_z_grad: bool, out: Optional[Tensor] = None
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(grad_a, grad_k, grad_zri, grad_mask, mu0 (B,) complex), each of the first four (0,) when
        not needed (``out`` is not used)."""
        ga, gk, gz, gm, mu0 = _triton.kernels("bk_core").bk_core_bwd(
            grad, a, k, zri, mask, True, need_mask_grad, need_k_grad, d_in=d_in, k_in=k_in)
        return (ga, gk if need_k_grad else k.new_empty((0,)), gz if need_z_grad else zri.new_empty((0,)),
                a.new_empty((0,)) if gm is None else gm, mu0)

    bk_core_fwd_state_triton.register_fake(fwd_state_fake)
    bk_core_bwd_state_triton.register_fake(bwd_state_fake)
    register_no_double_backward("resnet_bk::bk_core_bwd_state_triton")

    def bk_core_triton(a, k, zri, mask, causal):
        return torch.ops.resnet_bk.bk_core_fwd_triton(a, k, zri, mask, causal)

    _registry.register_impl("bk_core", "triton", bk_core_triton, _triton.check)
