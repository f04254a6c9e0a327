"""Argument checking and canonicalisation of the learned pooling ops.

Canonical arguments (what every backend receives):

* downsample: ``x`` (B, N, D) activation dtype T, ``logits`` (M, r) accumulation dtype A, ``causal``.
* upsample:   ``y`` (B, M, r*D) T, ``bias`` (Mb, r, Db) A with Mb in {1, M} and Db in {1, D},
  ``residual`` (B, M*r, D) T or None, ``scale`` 0-dim A or None (None means 1).

T is float32, float64, bfloat16 or float16; A is float64 for float64 activations, else float32
(bf16/fp16 activations are read and written in their own dtype and computed in float32).
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch
from torch import Tensor

from .._checks import check_precision_class, check_same_device, check_tensor, compute_dtype


def canon_down(x, logits) -> Tuple[Tensor, Tensor, Tuple[int, ...], int, int, int]:
    x = check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., N, D), got {tuple(x.shape)}")
    logits = check_tensor("logits", logits)
    check_same_device("x", x, "logits", logits)
    check_precision_class("x", x, "logits", logits)
    if logits.dim() != 2 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (N // r, r) with r >= 1, got {tuple(logits.shape)}")
    N, D = x.shape[-2], x.shape[-1]
    r = logits.shape[-1]
    if N == 0 or N % r != 0:
        raise ValueError(f"x: expected a sequence length N (x.shape[-2]) that is a positive multiple of "
                         f"r = logits.shape[-1] = {r}, got N = {N} (x of shape {tuple(x.shape)})")
    M = N // r
    if logits.shape[0] != M:
        raise ValueError(f"logits: expected shape (N // r, r) = ({M}, {r}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(logits.shape)}")
    if D == 0:
        raise ValueError(f"x: expected a feature dimension D >= 1, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-2])
    B = math.prod(lead)
    return x.reshape(B, N, D), logits.to(compute_dtype(x)), lead, M, r, D


def canon_up(y, position_bias, residual, scale):
    y = check_tensor("y", y)
    if y.dim() < 2:
        raise ValueError(f"y: expected shape (..., M, r*D), got {tuple(y.shape)}")
    pb = check_tensor("position_bias", position_bias)
    check_same_device("y", y, "position_bias", pb)
    check_precision_class("y", y, "position_bias", pb)
    M, RD = y.shape[-2], y.shape[-1]
    if M == 0:
        raise ValueError(f"y: expected M >= 1 low-resolution positions, got shape {tuple(y.shape)}")
    if pb.dim() == 2:
        r = pb.shape[1]
        if pb.shape[0] != M or r < 1:
            raise ValueError(f"position_bias: a 2-dim position_bias means (M, r) = ({M}, r) (one scalar per output "
                             f"position, broadcast over D), got {tuple(pb.shape)}; pass a (1, r, D) tensor for a "
                             f"per-phase bias shared over m")
        pb = pb.reshape(M, r, 1)
    elif pb.dim() == 3:
        r = pb.shape[1]
        if r < 1:
            raise ValueError(f"position_bias: expected shape (M, r, D) with r >= 1, got {tuple(pb.shape)}")
    else:
        raise ValueError(f"position_bias: expected shape (M, r, D), (1, r, D), (M, r, 1) or (M, r), got "
                         f"{tuple(pb.shape)}")
    if RD == 0 or RD % r != 0:
        raise ValueError(f"y: expected a last dimension r * D with r = {r} (from position_bias of shape "
                         f"{tuple(position_bias.shape)}) and D >= 1, got y of shape {tuple(y.shape)}")
    D = RD // r
    if pb.shape[0] not in (1, M) or pb.shape[2] not in (1, D):
        raise ValueError(f"position_bias: expected shape ({M}, {r}, {D}) or a broadcastable (1 | {M}, {r}, 1 | {D}) "
                         f"for y of shape {tuple(y.shape)}, got {tuple(position_bias.shape)}")
    acc = compute_dtype(y)
    lead = tuple(y.shape[:-2])
    B = math.prod(lead)
    out_shape = lead + (M * r, D)
    res = None
    if residual is not None:
        residual = check_tensor("residual", residual)
        check_same_device("y", y, "residual", residual)
        if residual.dtype != y.dtype:
            raise TypeError(f"residual: expected dtype {y.dtype} (the dtype of y), got {residual.dtype}")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual: expected the output shape {out_shape} for y of shape {tuple(y.shape)} and "
                             f"r = {r}, got {tuple(residual.shape)}")
        res = residual.reshape(B, M * r, D)
    sc = None
    if scale is not None:
        if isinstance(scale, Tensor):
            if scale.dim() != 0:
                raise ValueError(f"scale: expected a Python number or a 0-dim tensor, got shape {tuple(scale.shape)}")
            if not scale.is_floating_point():
                raise TypeError(f"scale: expected a real floating 0-dim tensor, got dtype {scale.dtype}")
            check_same_device("y", y, "scale", scale)
            sc = scale.to(acc)
        elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
            sc = torch.full((), float(scale), dtype=acc, device=y.device)  # a fill, no host-to-device copy
        else:
            raise TypeError(f"scale: expected a Python real number or a 0-dim real tensor, got {type(scale).__name__}")
    return y.reshape(B, M, RD), pb.to(acc), res, sc, out_shape
