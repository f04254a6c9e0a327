"""The public learned pooling ops for multi-scale sequence models:

    low = learned_downsample(x, logits, causal=True)          # (B, N, D) -> (B, N/r, D)
    ...                                                        # low-resolution layers (causal)
    x = learned_upsample(W(low), position_bias, residual=x, scale=s)   # x + s * up(W(low))

Each call is canonicalised once (``canon.py``), then the registry chooses the backend; the call a
model makes every step goes straight to the compiled op when ``_registry.compiled_cpu_takes``
allows it (the same op and arguments the general path would build).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _registry
from .._checks import check_bool
from .canon import canon_down, canon_up
from .compiled import HAS_POOL_OPS, learned_downsample_compiled, learned_upsample_compiled


def _fast_cpu_downsample(x, logits, causal, backend) -> Optional[Tensor]:
    """The call a multi-scale model makes every step (x (B, N, D) float32/float64 on the CPU with
    B >= 1, logits (N // r, r) of x's dtype, a bool ``causal``, the backend automatic or "cpp":
    ``_registry.compiled_cpu_takes``), recognised in a few attribute reads and sent straight to the
    compiled op: the same op and arguments the general path would build. Anything else returns
    None and takes the general path (which validates, raises on bad input, dispatches and
    verifies)."""
    if not (HAS_POOL_OPS and type(causal) is bool and isinstance(x, Tensor) and isinstance(logits, Tensor)):
        return None
    if (x.dtype not in _registry.FAST_CPU_DTYPES or x.device.type != "cpu" or x.dim() != 3 or logits.dim() != 2
            or logits.dtype != x.dtype or logits.device != x.device):
        return None
    B, N, D = x.shape
    M, r = logits.shape
    if B == 0 or D == 0 or r == 0 or M == 0 or M * r != N:
        return None
    if not _registry.compiled_cpu_takes("learned_downsample", learned_downsample_compiled, backend):
        return None
    return torch.ops.resnet_bk.learned_downsample_fwd(x, logits, causal)


def _fast_cpu_upsample(y, bias, residual, scale, backend) -> Optional[Tensor]:
    """As ``_fast_cpu_downsample`` for the upsample: y (B, M, r*D) float32/float64 on the CPU with
    B, M >= 1, a 3-dim ``position_bias`` (1 | M, r, 1 | D) of y's dtype, ``residual`` None or
    (B, M*r, D) of y's dtype, ``scale`` None."""
    if not (HAS_POOL_OPS and scale is None and isinstance(y, Tensor) and isinstance(bias, Tensor)):
        return None
    if (y.dtype not in _registry.FAST_CPU_DTYPES or y.device.type != "cpu" or y.dim() != 3 or bias.dim() != 3
            or bias.dtype != y.dtype or bias.device != y.device):
        return None
    B, M, RD = y.shape
    Mb, r, Db = bias.shape
    if B == 0 or M == 0 or r == 0 or RD == 0 or RD % r != 0:
        return None
    D = RD // r
    if Mb not in (1, M) or Db not in (1, D):
        return None
    if residual is not None:
        if not (isinstance(residual, Tensor) and residual.dtype == y.dtype and residual.device == y.device
                and residual.shape == (B, M * r, D)):
            return None
    if not _registry.compiled_cpu_takes("learned_upsample", learned_upsample_compiled, backend):
        return None
    return torch.ops.resnet_bk.learned_upsample_fwd(y, bias, residual, None)


def learned_downsample(x: Tensor, logits: Tensor, *, causal: bool = False, backend: Optional[str] = None) -> Tensor:
    """Learned weighted pooling of groups of r neighbouring positions (softmax fused in the kernel).

    Args:
        x: (..., N, D) float32/float64/bfloat16/float16 (bf16/fp16 computed in float32, output in x's dtype).
        logits: (N // r, r) real, float64 iff x is float64; r = logits.shape[-1] >= 1. Row j holds the
            pooling logits of output j (position-specific weights, as in the original design).
        causal: see below.
        backend: force "reference" or "cpp" (else automatic).

    Returns:
        (..., N // r, D) in x's dtype, with gradients for x and logits:
        ``out[..., j, :] = sum_k softmax(logits[j])_k * x[..., j*r + k - s, :]``,
        s = 0 (``causal=False``) or s = r - 1 (``causal=True``); positions before 0 read as 0.

    Causality. With ``causal=False`` output j pools the group [j*r, j*r + r - 1]; it uses no position
    after the group's last one, but a model that adds it back to the r positions of the group (as
    ``learned_upsample`` does) lets positions j*r .. j*r + r - 2 see later tokens: a future-token leak.
    ``causal=True`` shifts every window back by r - 1 positions (the Hourglass shift): output j pools
    [j*r - r + 1, j*r] (zero-padded before position 0; ``logits[j, r - 1]`` weights position j*r itself),
    so output j depends only on positions <= j*r, the FIRST position of the group that
    ``learned_upsample`` writes it back to. Hence the round trip

        out = learned_upsample(f(learned_downsample(x, logits, causal=True)), bias, residual=x, scale=s)

    is causal whenever f is causal along the low-resolution axis (position-wise layers, causal BK-Core):
    ``out[t]`` depends on x only at positions <= t (perturbing x[p] leaves out[:p] unchanged). No extra
    shift is needed on the way up. Position 0's low-resolution input is ``w[0, r-1] * x[0]`` only, and
    the last r - 1 positions never enter the low-resolution stream (no position of this sequence may
    use them through it) and get a zero gradient from it. With r = 1 both forms are the identity times 1.
    """
    out = _fast_cpu_downsample(x, logits, causal, backend)
    if out is not None:
        return out
    xc, lc, lead, M, r, D = canon_down(x, logits)
    causal = check_bool("causal", causal)
    if xc.shape[0] == 0:
        return x.new_empty(lead + (M, D))
    fn = _registry.select("learned_downsample", xc.device, (xc, lc, causal), backend)
    return fn(xc, lc, causal).reshape(lead + (M, D))


def learned_upsample(y: Tensor, position_bias: Tensor, residual: Optional[Tensor] = None,
                     scale: Union[None, float, Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """Split each low-resolution vector into r tokens, add a position bias, optionally fold in the
    residual add, all in one pass.

    Args:
        y: (..., M, r*D) float32/float64/bfloat16/float16 (bf16/fp16 computed in float32).
        position_bias: float64 iff y is float64, one of
            (M, r, D)  a bias per output position and feature;
            (1, r, D)  a per-phase bias shared over m (the original ``position_refine``);
            (M, r, 1) or (M, r)  ``position_bias[m, k]``, one scalar per output position, broadcast over D.
            r is taken from position_bias (its dim -2 when 3-dim, dim -1 when 2-dim).
        residual: (..., M*r, D) of y's dtype, or None.
        scale: 0-dim real tensor (may require grad) or Python number, or None (means 1).
        backend: force "reference" or "cpp" (else automatic).

    Returns:
        (..., M*r, D) in y's dtype: ``v[..., m*r + k, d] = y[..., m, k*D + d] + position_bias[m, k, d]``,
        ``out = residual + scale * v`` (each term only when given). Gradients for y, position_bias,
        residual and scale.

    Causality: output position m*r + k reads only low-resolution entry m; pair it with
    ``learned_downsample(..., causal=True)`` (see its docstring) for a leak-free round trip.
    """
    out = _fast_cpu_upsample(y, position_bias, residual, scale, backend)
    if out is not None:
        return out
    yc, bc, rc, sc, out_shape = canon_up(y, position_bias, residual, scale)
    if yc.shape[0] == 0:
        return y.new_empty(out_shape)
    fn = _registry.select("learned_upsample", yc.device, (yc, bc, rc, sc), backend)
    return fn(yc, bc, rc, sc).reshape(out_shape)


def canonical_downsample_call(x, logits, *, causal=False):
    """(device, canonical arguments) of a ``learned_downsample`` call (for ``explain``)."""
    xc, lc, *_ = canon_down(x, logits)
    return xc.device, (xc, lc, check_bool("causal", causal))


def canonical_upsample_call(y, position_bias, residual=None, scale=None):
    """(device, canonical arguments) of a ``learned_upsample`` call (for ``explain``)."""
    yc, bc, rc, sc, _ = canon_up(y, position_bias, residual, scale)
    return yc.device, (yc, bc, rc, sc)
