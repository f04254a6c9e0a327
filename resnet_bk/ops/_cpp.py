"""The compiled backends (``cpp`` on CPU tensors, ``cuda`` on CUDA tensors): loading of
``resnet_bk._C``, fake kernels and autograd for its ops, and their registration with dispatch.

The schemas and kernels live in C++ (``TORCH_LIBRARY(resnet_bk, ...)``); this file makes them
first-class PyTorch ops: ``register_fake`` (meta kernels, so torch.compile can trace them) and
``register_autograd`` (the exact backward is another op, ``bk_core_bwd``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import _dispatch
from .reference import complex_dtype_for

_LOAD_ERROR: Optional[str] = None
try:
    from .. import _C  # noqa: F401  (registers torch.ops.resnet_bk.*)
except Exception as exc:  # noqa: BLE001
    _LOAD_ERROR = (f"the compiled extension resnet_bk._C did not load ({type(exc).__name__}: {exc}); "
                   f"it may be missing (no compiler at install time) or built for another torch than "
                   f"{torch.__version__}: reinstall with `pip install --no-build-isolation .`")

HAS_C = _LOAD_ERROR is None
HAS_CUDA_KERNELS = HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key("resnet_bk::bk_core_fwd", "CUDA")
CPU_ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}


_CPU_ISA = CPU_ISA_NAMES.get(int(torch.ops.resnet_bk.cpu_isa()), "unknown") if HAS_C else "unavailable"


def cpu_isa() -> str:
    """Instruction set the CPU kernels run with on this machine (chosen once per process)."""
    return _CPU_ISA


if HAS_C:
    @torch.library.register_fake("resnet_bk::bk_core_fwd")
    def _bk_core_fwd_fake(a, k, zri, mask, causal):
        torch._check(a.dim() == 2, lambda: "a: expected shape (B, N)")
        return a.new_empty(a.shape, dtype=complex_dtype_for(a.dtype))

    @torch.library.register_fake("resnet_bk::bk_core_bwd")
    def _bk_core_bwd_fake(grad, a, k, zri, mask, causal, need_mask_grad):
        gm = a.new_empty(a.shape) if need_mask_grad else a.new_empty((0,))
        return a.new_empty(a.shape), k.new_empty(k.shape), zri.new_empty((2,)), gm

    def _setup_context(ctx, inputs, output):
        a, k, zri, mask, causal = inputs
        ctx.save_for_backward(a, k, zri, mask)
        ctx.causal = causal

    def _backward(ctx, grad):
        a, k, zri, mask = ctx.saved_tensors
        need_mask = mask is not None and ctx.needs_input_grad[3]
        ga, gk, gz, gm = torch.ops.resnet_bk.bk_core_bwd(grad, a, k, zri, mask, ctx.causal, need_mask)
        return ga, gk, gz, (gm if need_mask else None), None

    torch.library.register_autograd("resnet_bk::bk_core_fwd", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError(
            "resnet_bk.ops.bk_core: double backward (gradient of the gradient) is not implemented; "
            "the first-order gradient is exact. Use the reference backend with create_graph=True "
            "through plain autograd if you need it.")

    torch.library.register_autograd("resnet_bk::bk_core_bwd", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def bk_core_compiled(a, k, zri, mask, causal):
    return torch.ops.resnet_bk.bk_core_fwd(a, k, zri, mask, causal)


def _cpp_available() -> Tuple[bool, str]:
    if not HAS_C:
        return False, _LOAD_ERROR  # type: ignore[return-value]
    return True, f"C++ CPU kernels ({cpu_isa()})"


def _cuda_available() -> Tuple[bool, str]:
    if not HAS_C:
        return False, _LOAD_ERROR  # type: ignore[return-value]
    if not HAS_CUDA_KERNELS:
        return False, ("resnet_bk._C was built without CUDA kernels (torch without CUDA or no nvcc at build "
                       "time; rebuild with RESNET_BK_FORCE_CUDA=1 and --no-build-isolation)")
    return True, "CUDA C++ kernels"


def _check_device(kind: str):
    def check(*args):
        t = args[0]
        if t.device.type != kind:
            return f"takes {kind} tensors, got {t.device.type}"
        return None
    return check


_dispatch.register_backend("cpp", _cpp_available)
_dispatch.register_backend("cuda", _cuda_available)
for _name, _kind in (("cpp", "cpu"), ("cuda", "cuda")):
    _dispatch.register_impl("bk_core", _name, bk_core_compiled, _check_device(_kind))
