"""The reference backend: the pure-PyTorch twins of reference.py wrapped with their exact
(spec) backward, so the reference gives the same gradients as every other backend."""
from __future__ import annotations

import torch

from . import _dispatch
from .reference import bk_core_bwd_ref, bk_core_fwd_ref


class _BKCoreRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, k, zri, mask, causal):
        ctx.save_for_backward(a, k, zri, mask)
        ctx.causal = causal
        return bk_core_fwd_ref(a, k, zri, mask, causal)

    @staticmethod
    def backward(ctx, grad):
        a, k, zri, mask = ctx.saved_tensors
        ga, gk, gz, gm = bk_core_bwd_ref(grad, a, k, zri, mask, ctx.causal)
        return ga, gk, gz, gm, None


def bk_core_reference(a, k, zri, mask, causal):
    return _BKCoreRef.apply(a, k, zri, mask, causal)


_dispatch.register_backend("reference", lambda: (True, "pure PyTorch, always available"))
_dispatch.register_impl("bk_core", "reference", bk_core_reference)
