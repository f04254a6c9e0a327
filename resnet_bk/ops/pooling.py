"""Learned down/upsampling for multi-scale sequence models: public ops, their pure-PyTorch
reference twins, argument checking, and registration of the compiled kernels with dispatch.

    low = learned_downsample(x, logits, causal=True)          # (B, N, D) -> (B, N/r, D)
    ...                                                        # low-resolution layers (causal)
    x = learned_upsample(W(low), position_bias, residual=x, scale=s)   # x + s * up(W(low))

Canonical arguments (what every backend receives; schemas in csrc/cpu/pool_ops_cpu.cpp):

* downsample: ``x`` (B, N, D) activation dtype T, ``logits`` (M, r) accumulation dtype A, ``causal``.
* upsample:   ``y`` (B, M, r*D) T, ``bias`` (Mb, r, Db) A with Mb in {1, M} and Db in {1, D},
  ``residual`` (B, M*r, D) T or None, ``scale`` 0-dim A or None (None means 1).

T is float32, float64, bfloat16 or float16; A is float64 for float64 activations, else float32
(bf16/fp16 activations are read and written in their own dtype and computed in float32).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpp, _dispatch, _ref_backend  # noqa: F401  (backends must exist before register_impl)
from ._bk_autograd import down_bwd_fake, down_fwd_fake, register_pool_autograd, up_bwd_fake, up_fwd_fake
from ._canon import check_precision_class, check_same_device, check_tensor

__all__ = ["learned_downsample", "learned_upsample", "learned_downsample_ref", "learned_upsample_ref"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# reference twins (canonical arguments; gradients by autograd, which is the exact gradient)

def learned_downsample_ref(x: Tensor, logits: Tensor, causal: bool) -> Tensor:
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


def learned_upsample_ref(y: Tensor, bias: Tensor, residual: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
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


_dispatch.register_impl("learned_downsample", "reference", learned_downsample_ref)
_dispatch.register_impl("learned_upsample", "reference", learned_upsample_ref)


# ---------------------------------------------------------------------------------------------
# compiled kernels: fake kernels, autograd, dispatch registration

def _has_op(name: str) -> bool:
    if not _cpp.HAS_C:
        return False
    try:
        getattr(torch.ops.resnet_bk, name)
    except (AttributeError, RuntimeError):
        return False
    return True


HAS_POOL_OPS = _has_op("learned_downsample_fwd") and _has_op("learned_upsample_fwd")

if HAS_POOL_OPS:
    torch.library.register_fake("resnet_bk::learned_downsample_fwd")(down_fwd_fake)
    torch.library.register_fake("resnet_bk::learned_downsample_bwd")(down_bwd_fake)
    torch.library.register_fake("resnet_bk::learned_upsample_fwd")(up_fwd_fake)
    torch.library.register_fake("resnet_bk::learned_upsample_bwd")(up_bwd_fake)
    # The autograd of these ops is C++ (csrc/autograd.cpp: no Python per call); a build without it
    # gets the same backward registered from Python.
    if not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_bk::learned_downsample_fwd", "Autograd"):
        register_pool_autograd("resnet_bk::learned_downsample_fwd", torch.ops.resnet_bk.learned_downsample_bwd,
                               "resnet_bk::learned_upsample_fwd", torch.ops.resnet_bk.learned_upsample_bwd)


def learned_downsample_compiled(x, logits, causal):
    return torch.ops.resnet_bk.learned_downsample_fwd(x, logits, causal)


def learned_upsample_compiled(y, bias, residual, scale):
    return torch.ops.resnet_bk.learned_upsample_fwd(y, bias, residual, scale)


def _cpp_check(*args) -> Optional[str]:
    if not HAS_POOL_OPS:
        return ("resnet_bk._C was built without the pooling kernels (csrc/cpu/pool_ops_cpu.cpp): rebuild with "
                "`pip install --no-build-isolation .`")
    if args[0].device.type != "cpu":
        return f"takes cpu tensors, got {args[0].device.type}"
    return None


_dispatch.register_impl("learned_downsample", "cpp", learned_downsample_compiled, _cpp_check)
_dispatch.register_impl("learned_upsample", "cpp", learned_upsample_compiled, _cpp_check)


# ---------------------------------------------------------------------------------------------
# public ops

def _canon_down(x, logits) -> Tuple[Tensor, Tensor, Tuple[int, ...], int, int, int]:
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
    B = 1
    for s in lead:
        B *= s
    return x.reshape(B, N, D), logits.to(_acc(x.dtype)), lead, M, r, D


def _fast_cpu_downsample(x, logits, causal, backend) -> Optional[Tensor]:
    """The call a multi-scale model makes every step (x (B, N, D) float32/float64 on the CPU with
    B >= 1, logits (N // r, r) of x's dtype, a bool ``causal``, the backend automatic or "cpp":
    ``_dispatch.fast_cpu_path_ok``), recognised in a few attribute reads and sent straight to the
    compiled op: the same op and arguments the general path would build. Anything else returns
    None and takes the general path (which validates, raises on bad input, dispatches and
    verifies)."""
    if not (HAS_POOL_OPS and type(causal) is bool and isinstance(x, Tensor) and isinstance(logits, Tensor)):
        return None
    if (x.dtype not in _dispatch.FAST_CPU_DTYPES or x.device.type != "cpu" or x.dim() != 3 or logits.dim() != 2
            or logits.dtype != x.dtype or logits.device != x.device):
        return None
    B, N, D = x.shape
    M, r = logits.shape
    if B == 0 or D == 0 or r == 0 or M == 0 or M * r != N:
        return None
    if not _dispatch.fast_cpu_path_ok("learned_downsample", learned_downsample_compiled, backend):
        return None
    return torch.ops.resnet_bk.learned_downsample_fwd(x, logits, causal)


def _fast_cpu_upsample(y, bias, residual, scale, backend) -> Optional[Tensor]:
    """As ``_fast_cpu_downsample`` for the upsample: y (B, M, r*D) float32/float64 on the CPU with
    B, M >= 1, a 3-dim ``position_bias`` (1 | M, r, 1 | D) of y's dtype, ``residual`` None or
    (B, M*r, D) of y's dtype, ``scale`` None."""
    if not (HAS_POOL_OPS and scale is None and isinstance(y, Tensor) and isinstance(bias, Tensor)):
        return None
    if (y.dtype not in _dispatch.FAST_CPU_DTYPES or y.device.type != "cpu" or y.dim() != 3 or bias.dim() != 3
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
    if not _dispatch.fast_cpu_path_ok("learned_upsample", learned_upsample_compiled, backend):
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
    xc, lc, lead, M, r, D = _canon_down(x, logits)
    causal = bool(causal)
    if xc.shape[0] == 0:
        return x.new_empty(lead + (M, D))
    fn = _dispatch.select("learned_downsample", xc.device, (xc, lc, causal), backend)
    return fn(xc, lc, causal).reshape(lead + (M, D))


def _canon_up(y, position_bias, residual, scale):
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
    acc = _acc(y.dtype)
    lead = tuple(y.shape[:-2])
    B = 1
    for s in lead:
        B *= s
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
            sc = torch.tensor(float(scale), dtype=acc, device=y.device)
        else:
            raise TypeError(f"scale: expected a Python real number or a 0-dim real tensor, got {type(scale).__name__}")
    return y.reshape(B, M, RD), pb.to(acc), res, sc, out_shape


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
    yc, bc, rc, sc, out_shape = _canon_up(y, position_bias, residual, scale)
    if yc.shape[0] == 0:
        return y.new_empty(out_shape)
    fn = _dispatch.select("learned_upsample", yc.device, (yc, bc, rc, sc), backend)
    return fn(yc, bc, rc, sc).reshape(out_shape)
