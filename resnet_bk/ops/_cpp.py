"""The compiled backends (``cpp`` on CPU tensors, ``cuda`` on CUDA tensors): loading of
``resnet_bk._C``, fake kernels and autograd for its ops, and their registration with dispatch.

The schemas, kernels and the autograd of ``bk_core_fwd`` live in C++ (``TORCH_LIBRARY(resnet_bk, ...)``,
csrc/autograd.cpp: the exact backward is another op, ``bk_core_bwd``); this file adds
``register_fake`` (meta kernels, so torch.compile can trace them) and the Python autograd of the
ops that have none in C++.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch
from ._bk_autograd import bwd_fake, fwd_fake, register_bk_autograd, register_no_double_backward

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


def cpu_huge_pages(enabled: Optional[bool] = None) -> bool:
    """Whether the C++ CPU ops advise transparent huge pages on their fresh outputs of 8 MiB or
    more (``madvise(MADV_HUGEPAGE)`` before the kernel first writes them, saving the 4 KiB page
    faults of a fresh large output; off by default, ``RESNET_BK_HUGEPAGE=1`` turns it on at
    start-up). With ``enabled`` given, sets it for the whole process and returns the previous
    setting; else returns the current one."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool or None, got {type(enabled).__name__}")
    if not HAS_C:
        raise RuntimeError(f"cpu_huge_pages: {_LOAD_ERROR}")
    return bool(torch.ops.resnet_bk.cpu_huge_pages(-1 if enabled is None else int(enabled)))


if HAS_C:
    torch.library.register_fake("resnet_bk::bk_core_fwd")(fwd_fake)
    torch.library.register_fake("resnet_bk::bk_core_bwd")(bwd_fake)
    # bk_core_fwd's autograd is C++ (csrc/autograd.cpp: no Python per call); a build without
    # it gets the same backward registered from Python.
    if not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_bk::bk_core_fwd", "Autograd"):
        register_bk_autograd("resnet_bk::bk_core_fwd", torch.ops.resnet_bk.bk_core_bwd, grad_flags=True)
    register_no_double_backward("resnet_bk::bk_core_bwd")


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
