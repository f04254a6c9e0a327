"""The top-1 MoE reference: pure PyTorch (one gather, two addmm per expert, one scatter), the
twin of ``moe_top1_inference`` and the "reference" backend's implementation."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .. import _registry

__all__ = ["moe_top1_ref"]


def moe_top1_ref(x: Tensor, router_weight: Tensor, router_bias: Tensor, w1: Sequence[Tensor], b1: Sequence[Tensor],
                 w2: Sequence[Tensor], b2: Sequence[Tensor]) -> Tensor:
    """Reference twin of :func:`resnet_bk.ops.moe_top1_inference` (x (T, D) -> (T, D_out))."""
    T = x.shape[0]
    if T == 0:
        return x.new_zeros(0, w2[0].shape[0])
    logits = torch.addmm(router_bias.unsqueeze(1), router_weight, x.t()).float()   # (E, T)
    ex = (logits - logits.amax(dim=0, keepdim=True)).exp()
    gate, expert = (ex / ex.sum(dim=0, keepdim=True)).max(dim=0)
    order = torch.argsort(expert, stable=True)
    counts: List[int] = torch.bincount(expert, minlength=len(w1)).tolist()
    xs, gs = x.index_select(0, order), gate.index_select(0, order).to(x.dtype)
    out = x.new_empty(T, w2[0].shape[0])
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = torch.addmm(b1[e], xs[start:start + n], w1[e].t()).relu_()
            y = torch.addmm(b2[e], h, w2[e].t()).mul_(gs[start:start + n].unsqueeze(1))
            out.index_copy_(0, order[start:start + n], y)
        start += n
    return out


_registry.register_impl("moe_top1_inference", "reference", moe_top1_ref)
