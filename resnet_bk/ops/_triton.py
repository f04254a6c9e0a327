"""The Triton backend: registration of the kernels in ``triton_kernels/`` (imported as
``resnet_bk.triton_kernels``) as PyTorch ops and as the "triton" backend of dispatch.

``torch.ops.resnet_bk.bk_core_fwd_triton`` / ``bk_core_bwd_triton`` are ``torch.library.custom_op``s
with fake kernels, so torch.compile traces calls to them (as opaque ops); autograd of the forward
op calls the backward op (the exact O(N) gradient, shared/BK_CORE_MATH.md). Why custom_op and not
``triton_op``: a triton_op is decomposed into its kernel launches under torch.compile, which cannot
work with interpreted kernels (they would run on fake tensors), and CI tests compile through the
interpreter; the kernels are sequential scans with nothing for Inductor to fuse into anyway.

Devices: CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment *before triton is first
imported* (``@triton.jit`` picks the interpreter at decoration time, for triton's own library
functions as for ours), Triton's interpreter runs the kernels on CPU tensors instead: that is how
CI tests them on a machine without a GPU (tests/conftest.py sets it). The kernel modules are
imported lazily, on the first call; ``_check`` says why CPU tensors are refused when the order
was wrong.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from ._bk_autograd import (bwd_fake, down_bwd_fake, down_fwd_fake, fwd_fake, register_bk_autograd,
                           register_no_double_backward, register_pool_autograd, up_bwd_fake, up_fwd_fake)

try:
    import triton  # noqa: F401
    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001  (a broken install raises more than ImportError)
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"

ENV_INTERPRET = "TRITON_INTERPRET"
_KERNEL_MODULE = "resnet_bk.triton_kernels.bk_core"
_KERNEL_MODULES = (_KERNEL_MODULE, "resnet_bk.triton_kernels.pooling")


def _kernels():
    return importlib.import_module(_KERNEL_MODULE)


def _loaded_interpreted() -> Optional[bool]:
    """Whether the imported kernel modules are interpreted (each fixes that at import, from
    TRITON_INTERPRET); None while none is imported yet (they will follow TRITON_INTERPRET then)."""
    for name in _KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is not None:
            return mod.INTERPRETED
    return None


def _interpreter_problem() -> Optional[str]:
    """Why the interpreter cannot run the kernels (triton itself was imported before
    TRITON_INTERPRET=1), or None."""
    mod = sys.modules.get(_KERNEL_MODULE)
    if mod is None:
        # not imported yet: triton's library functions decide, as they will for the kernels
        import triton.language as tl
        return None if type(tl.zeros).__name__ == "InterpretedFunction" else (
            "triton was imported before TRITON_INTERPRET=1 was set; set it before importing resnet_bk or triton")
    return mod.INTERPRETER_PROBLEM


def interpret_requested() -> bool:
    """TRITON_INTERPRET=1 (read the way triton reads it: "1", "true", "on" ...)."""
    return os.environ.get(ENV_INTERPRET, "0").lower() in ("1", "true", "on", "yes", "y")


def _available() -> Tuple[bool, str]:
    if _TRITON_ERROR is not None:
        return False, _TRITON_ERROR
    return True, "Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)"


def _check(a: Tensor, *args) -> Optional[str]:
    """None if the Triton kernels can run on these canonical arguments, else why not."""
    dev = a.device.type
    if dev == "cuda":
        interp = _loaded_interpreted()
        if interp or (interp is None and interpret_requested()):
            return ("the Triton kernels run in the interpreter (TRITON_INTERPRET=1), which takes CPU "
                    "tensors, not CUDA ones")
        return None
    if dev == "cpu":
        if not interpret_requested():
            return "takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, Triton's interpreter)"
        if _loaded_interpreted() is False:
            return ("TRITON_INTERPRET=1 was set after the Triton kernels had been compiled for the GPU; "
                    "set it before the first Triton call")
        if _interpreter_problem() is not None:
            return _interpreter_problem()
        return None
    return f"takes CUDA tensors, got {dev}"


if _TRITON_ERROR is None:
    @torch.library.custom_op("resnet_bk::bk_core_fwd_triton", mutates_args=())
    def bk_core_fwd_triton(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """(B, N) complex: G (or 1/d when causal) times mask; canonical arguments."""
        return _kernels().bk_core_fwd(a, k, zri, mask, causal)

    @torch.library.custom_op("resnet_bk::bk_core_bwd_triton", mutates_args=())
    def bk_core_bwd_triton(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor],
                           causal: bool, need_mask_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grad_a (B, N), grad_k (Bk, N-1), grad_zri (2,), grad_mask (B, N), or (0,) when not needed)."""
        ga, gk, gz, gm = _kernels().bk_core_bwd(grad, a, k, zri, mask, causal, need_mask_grad)
        if gm is None:
            gm = a.new_empty((0,))
        return ga, gk, gz, gm

    bk_core_fwd_triton.register_fake(fwd_fake)
    bk_core_bwd_triton.register_fake(bwd_fake)
    register_bk_autograd("resnet_bk::bk_core_fwd_triton", torch.ops.resnet_bk.bk_core_bwd_triton)
    register_no_double_backward("resnet_bk::bk_core_bwd_triton")

    def bk_core_triton(a, k, zri, mask, causal):
        return torch.ops.resnet_bk.bk_core_fwd_triton(a, k, zri, mask, causal)

    _dispatch.register_backend("triton", _available)
    _dispatch.register_impl("bk_core", "triton", bk_core_triton, _check)

    # ---- learned down/upsampling (the ops live in resnet_bk.ops.pooling; until that module is
    # present these registrations are inert: dispatch is only asked for ops that exist)
    _POOL_MODULE = "resnet_bk.triton_kernels.pooling"

    def _pool():
        return importlib.import_module(_POOL_MODULE)

    @torch.library.custom_op("resnet_bk::learned_downsample_fwd_triton", mutates_args=())
    def learned_downsample_fwd_triton(x: Tensor, logits: Tensor, causal: bool) -> Tensor:
        """x (B, N, D), logits (M, r) -> (B, M, D)."""
        return _pool().learned_downsample_fwd(x, logits, causal)

    @torch.library.custom_op("resnet_bk::learned_downsample_bwd_triton", mutates_args=())
    def learned_downsample_bwd_triton(grad: Tensor, x: Tensor, logits: Tensor, causal: bool, need_x: bool,
                                      need_logits: bool) -> Tuple[Tensor, Tensor]:
        """(grad_x (B, N, D) or (0,), grad_logits (M, r) or (0,))."""
        gx, gl = _pool().learned_downsample_bwd(grad, x, logits, causal, need_x, need_logits)
        return (x.new_empty((0,)) if gx is None else gx), (logits.new_empty((0,)) if gl is None else gl)

    learned_downsample_fwd_triton.register_fake(down_fwd_fake)
    learned_downsample_bwd_triton.register_fake(down_bwd_fake)

    @torch.library.custom_op("resnet_bk::learned_upsample_fwd_triton", mutates_args=())
    def learned_upsample_fwd_triton(y: Tensor, bias: Tensor, residual: Optional[Tensor],
                                    scale: Optional[Tensor]) -> Tensor:
        """y (B, M, r*D), bias (Mb, r, Db) -> (B, M*r, D)."""
        return _pool().learned_upsample_fwd(y, bias, residual, scale)

    @torch.library.custom_op("resnet_bk::learned_upsample_bwd_triton", mutates_args=())
    def learned_upsample_bwd_triton(grad: Tensor, y: Tensor, bias: Tensor, scale: Optional[Tensor], need_y: bool,
                                    need_bias: bool, need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(grad_y, grad_bias, grad_scale), each (0,) when not needed."""
        gy, gb, gs = _pool().learned_upsample_bwd(grad, y, bias, scale, need_y, need_bias, need_scale)
        # a fresh empty tensor per missing gradient: a custom op's outputs may not alias each other
        return (y.new_empty((0,)) if gy is None else gy, bias.new_empty((0,)) if gb is None else gb,
                bias.new_empty((0,)) if gs is None else gs)

    learned_upsample_fwd_triton.register_fake(up_fwd_fake)
    learned_upsample_bwd_triton.register_fake(up_bwd_fake)
    register_pool_autograd("resnet_bk::learned_downsample_fwd_triton",
                           torch.ops.resnet_bk.learned_downsample_bwd_triton,
                           "resnet_bk::learned_upsample_fwd_triton", torch.ops.resnet_bk.learned_upsample_bwd_triton)

    def learned_downsample_triton(x, logits, causal):
        return torch.ops.resnet_bk.learned_downsample_fwd_triton(x, logits, causal)

    def learned_upsample_triton(y, bias, residual, scale):
        return torch.ops.resnet_bk.learned_upsample_fwd_triton(y, bias, residual, scale)

    _dispatch.register_impl("learned_downsample", "triton", learned_downsample_triton, _check)
    _dispatch.register_impl("learned_upsample", "triton", learned_upsample_triton, _check)
else:
    _dispatch.register_backend("triton", _available)
