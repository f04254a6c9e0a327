"""The compiled extension ``resnet_bk._C``: loading it once, what it holds, and its two process-wide
settings (public as ``resnet_bk.ops.cpu_isa()`` and ``resnet_bk.ops.cpu_huge_pages()``).

Importing ``_C`` runs the static ``TORCH_LIBRARY`` registrations (schemas in csrc/schemas.cpp,
kernels in csrc/cpu and csrc/cuda, autograd in csrc/autograd.cpp); the ops are then reached as
``torch.ops.resnet_bk.*``. When it did not load, ``LOAD_ERROR`` says why and every op runs on the
reference backend (the automatic choice warns once with that reason; a forced backend raises it).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

_REINSTALL = "reinstall with `pip install --no-build-isolation .` (docs/ENV.md: RESNET_BK_REQUIRE_EXT=1 makes a failed build an error)"


def _load() -> Optional[str]:
    """Imports resnet_bk._C; None when it loaded, else why not (the build's recorded failure when
    there is no extension at all, rather than Python's ImportError about a partial module)."""
    if importlib.util.find_spec("resnet_bk._C") is None:
        why = "it was not built"
        marker = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_error.txt")
        if os.path.exists(marker):
            with open(marker) as f:
                why = f"its build failed: {f.read().strip()}"
        return f"the compiled extension resnet_bk._C is missing ({why}); {_REINSTALL}"
    try:
        importlib.import_module("resnet_bk._C")  # registers torch.ops.resnet_bk.*
    except Exception as exc:  # noqa: BLE001  (a stale build raises OSError / ImportError / RuntimeError)
        return (f"the compiled extension resnet_bk._C did not load ({type(exc).__name__}: {exc}); it may "
                f"have been built for another torch than {torch.__version__}: {_REINSTALL}")
    return None


LOAD_ERROR: Optional[str] = _load()

HAS_C = LOAD_ERROR is None
CPU_ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}


def has_op(name: str) -> bool:
    """Whether ``torch.ops.resnet_bk.<name>`` exists (the extension loaded and defines it)."""
    if not HAS_C:
        return False
    try:
        getattr(torch.ops.resnet_bk, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether op ``resnet_bk::<name>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA", "Autograd")."""
    return has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_bk::{name}", dispatch_key)


HAS_CUDA_KERNELS = has_kernel("bk_core_fwd", "CUDA")
_CPU_ISA = CPU_ISA_NAMES.get(int(torch.ops.resnet_bk.cpu_isa()), "unknown") if HAS_C else "unavailable"


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels run with in this process: "baseline", "avx2" or
    "avx512" (the widest the CPU has, chosen once at load; ``RESNET_BK_CPU_ISA`` lowers it), or
    "unavailable" when the compiled extension did not load."""
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
        raise RuntimeError(f"cpu_huge_pages: {LOAD_ERROR}")
    return bool(torch.ops.resnet_bk.cpu_huge_pages(-1 if enabled is None else int(enabled)))


def compiled_reason(op: str, device_type: str) -> Optional[str]:
    """None if the compiled op ``op`` has a kernel for ``device_type`` tensors, else why not."""
    if not HAS_C:
        return LOAD_ERROR
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return f"takes cpu or cuda tensors, got {device_type}"
    if not has_op(op):
        return (f"resnet_bk._C defines no op {op} (built from older sources?): rebuild with "
                f"`pip install --no-build-isolation .`")
    if not has_kernel(op, key):
        if key == "CUDA":
            return ("resnet_bk._C was built without CUDA kernels (torch without CUDA or no nvcc at build "
                    "time; rebuild with RESNET_BK_FORCE_CUDA=1 and --no-build-isolation)")
        return f"resnet_bk._C has no {key} kernel for {op}"
    return None
