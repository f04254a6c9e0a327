"""The learned pooling reference: pure PyTorch, the specification in code, and the "reference"
backend. ``learned_downsample_ref`` / ``learned_upsample_ref`` are the twins of the public ops (same
arguments and checks); the ``*_canonical`` functions take the canonical arguments every backend
receives (``canon.py``), with gradients by autograd (the exact gradient)."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _registry
from .._checks import check_bool
from .canon import canon_down, canon_up

__all__ = ["learned_downsample_ref", "learned_upsample_ref"]


def downsample_ref_canonical(x: Tensor, logits: Tensor, causal: bool) -> Tensor:
    """x (B, N, D), logits (M, r) -> (B, M, D):
    ``out[b, j] = sum_k softmax(logits[j])_k * x[b, j*r + k - s]`` with s = r - 1 when causal (positions
    before 0 read as 0), else s = 0."""
    B, N, D = x.shape
    M, r = logits.shape
    w = torch.softmax(logits, dim=-1)
    xs = x.to(logits.dtype)
    if causal and r > 1:
        xs = F.pad(xs, (0, 0, r - 1, 0))[:, :N]
    out = (xs.reshape(B, M, r, D) * w[None, :, :, None]).sum(2)
    return out.to(x.dtype)


def upsample_ref_canonical(y: Tensor, bias: Tensor, residual: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """y (B, M, r*D), bias (Mb, r, Db) -> (B, M*r, D):
    ``v[b, m*r + k, d] = y[b, m, k*D + d] + bias[m, k, d]`` (bias broadcast over m / d when Mb / Db
    is 1); returns ``residual + scale * v`` (terms left out when None)."""
    B, M, RD = y.shape
    r = bias.shape[1]
    D = RD // r
    v = (y.to(bias.dtype).reshape(B, M, r, D) + bias).reshape(B, M * r, D)
    if scale is not None:
        v = scale * v
    if residual is not None:
        v = residual.to(bias.dtype) + v
    return v.to(y.dtype)


def learned_downsample_ref(x: Tensor, logits: Tensor, causal: bool = False) -> Tensor:
    """Reference twin of :func:`resnet_bk.ops.learned_downsample` (same arguments and checks)."""
    xc, lc, lead, M, r, D = canon_down(x, logits)
    return downsample_ref_canonical(xc, lc, check_bool("causal", causal)).reshape(lead + (M, D))


def learned_upsample_ref(y: Tensor, position_bias: Tensor, residual: Optional[Tensor] = None,
                         scale: Union[None, float, Tensor] = None) -> Tensor:
    """Reference twin of :func:`resnet_bk.ops.learned_upsample` (same arguments and checks)."""
    yc, bc, rc, sc, out_shape = canon_up(y, position_bias, residual, scale)
    return upsample_ref_canonical(yc, bc, rc, sc).reshape(out_shape)


_registry.register_impl("learned_downsample", "reference", downsample_ref_canonical)
_registry.register_impl("learned_upsample", "reference", upsample_ref_canonical)
