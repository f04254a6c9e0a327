"""The backend registry: which backend runs an op, and why.

A backend declares once whether it is available at all (``available``: the compiled extension
loaded, Triton is installed) and, per op, whether it can take these particular inputs (``check``:
e.g. CUDA tensors only). ``select`` walks the automatic preference order for the inputs' device,
or honours a forced choice (``backend=`` keyword, else the environment variable
``RESNET_BK_BACKEND``). A forced backend that cannot run raises; an automatic choice that had to
skip a preferred backend warns once, saying why. In verify mode (``_verify``) the chosen backend is
checked against the reference on every call.

``compiled_cpu_takes`` is the one decision behind every fast path: whether a CPU call may go
straight to the compiled op, skipping the general path.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _extension, _verify

BACKENDS = ("cuda", "triton", "cpp", "reference")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
ENV_BACKEND = "RESNET_BK_BACKEND"
# dtypes the compiled CPU kernels take as they are (the fast paths' first test)
FAST_CPU_DTYPES = (torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs."""


@dataclass
class _Backend:
    name: str
    available: Callable[[], Tuple[bool, str]]
    impls: Dict[str, Tuple[Callable, Optional[Callable]]] = field(default_factory=dict)


_registry: Dict[str, _Backend] = {}
_warned: set = set()
_warn_lock = threading.Lock()


def register_backend(name: str, available: Callable[[], Tuple[bool, str]]) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    _registry.setdefault(name, _Backend(name, available)).available = available


def register_impl(op: str, backend: str, fn: Callable, check: Optional[Callable] = None) -> None:
    """``fn(*canonical_args)`` runs op with autograd; ``check(*canonical_args)`` returns None if the
    backend can take these inputs, else the reason it cannot."""
    _registry[backend].impls[op] = (fn, check)


def impl(op: str, backend: str) -> Callable:
    """The function registered for ``op`` on ``backend`` (canonical arguments)."""
    return _registry[backend].impls[op][0]


def available_backends() -> List[str]:
    """Backends that loaded on this machine (for some device), in preference order."""
    return [name for name in BACKENDS if name in _registry and _registry[name].available()[0]]


def backend_status() -> Dict[str, str]:
    """Every backend with 'available' or the reason it is not."""
    res = {}
    for name in BACKENDS:
        be = _registry.get(name)
        if be is None:
            res[name] = "not registered"
        else:
            ok, why = be.available()
            res[name] = "available" if ok else why
    return res


def _reject_reason(name: str, op: str, args: Sequence) -> Optional[str]:
    be = _registry.get(name)
    if be is None:
        return f"backend {name!r} is not registered"
    ok, why = be.available()
    if not ok:
        return why
    if op not in be.impls:
        return f"backend {name!r} has no implementation of {op}"
    fn, check = be.impls[op]
    return None if check is None else check(*args)


@dataclass
class Choice:
    """The backend a call uses (``backend``), what forced it (None: the automatic choice) and the
    backends skipped before it, each with its reason. ``str(choice)`` reads as a sentence."""
    op: str
    backend: str
    forced_by: Optional[str]
    rejected: List[Tuple[str, str]]

    def __str__(self) -> str:
        lines = [f"{self.op}: backend {self.backend!r}"
                 + (f" (forced by {self.forced_by})" if self.forced_by else " (automatic choice)")]
        for name, why in self.rejected:
            lines.append(f"  skipped {name!r}: {why}")
        return "\n".join(lines)


def forced(backend: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(forced backend or None, where it came from); raises on an unknown backend name."""
    if backend is not None:
        src = "backend= argument"
    else:
        backend = os.environ.get(ENV_BACKEND) or None
        src = f"{ENV_BACKEND}={backend}" if backend else None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r} (from {src})")
    return backend, src


def choose(op: str, device: torch.device, args: Sequence, backend: Optional[str] = None) -> Choice:
    name, src = forced(backend)
    if name is not None:
        why = _reject_reason(name, op, args)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} was forced ({src}) but cannot run: {why}")
        return Choice(op, name, src, [])
    rejected: List[Tuple[str, str]] = []
    for cand in AUTO_ORDER.get(device.type, ("reference",)):
        why = _reject_reason(cand, op, args)
        if why is None:
            return Choice(op, cand, None, rejected)
        rejected.append((cand, why))
    raise BackendUnavailableError(f"{op}: no backend can run inputs on {device}: {rejected}")


def choose_warned(op: str, device: torch.device, args: Sequence, backend: Optional[str] = None,
                  stacklevel: int = 3) -> Choice:
    """``choose``, warning once per distinct fallback of an automatic choice."""
    choice = choose(op, device, args, backend)
    if choice.rejected and choice.forced_by is None:
        key = (op, device.type, choice.backend, tuple(choice.rejected))
        with _warn_lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            warnings.warn(f"resnet_bk: falling back for {op} on {device.type}: {choice}. "
                          f"Set {ENV_BACKEND} to force a backend (a forced backend that cannot run raises).",
                          RuntimeWarning, stacklevel=stacklevel + 1)
    return choice


def select(op: str, device: torch.device, args: Sequence, backend: Optional[str] = None) -> Callable:
    """The implementation to call for ``op`` on these canonical arguments (warns once per distinct
    fallback; wrapped with the reference check in verify mode)."""
    choice = choose_warned(op, device, args, backend)
    fn = impl(op, choice.backend)
    if choice.backend != "reference" and _verify.verify_enabled():
        return _verify.verified(op, choice.backend, fn, impl(op, "reference"))
    return fn


def compiled_cpu_takes(op: str, compiled: Callable, backend: Optional[str]) -> bool:
    """Whether a CPU call of ``op`` may go straight to its compiled op ``compiled``: the backend is
    automatic or forced to "cpp" (the one automatic dispatch picks for CPU tensors), no backend is
    forced by the environment, verify mode is off, the cpp backend is available with this function
    registered for ``op``, and neither torch.compile nor a torch function mode is tracing (the
    conditions under which the general path adds nothing but checks). The caller checks the
    arguments' dtypes, devices and shapes."""
    if backend not in (None, "cpp") or _verify.getenv(ENV_BACKEND) or _verify.verify_enabled():
        return False
    be = _registry.get("cpp")
    if be is None or be.impls.get(op, (None,))[0] is not compiled or not be.available()[0]:
        return False
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled())


# ---- the backends themselves ------------------------------------------------------------------

def _compiled_available() -> Tuple[bool, str]:
    if not _extension.HAS_C:
        return False, _extension.LOAD_ERROR  # type: ignore[return-value]
    return True, f"C++ CPU kernels ({_extension.cpu_isa()})"


def _cuda_available() -> Tuple[bool, str]:
    if not _extension.HAS_C:
        return False, _extension.LOAD_ERROR  # type: ignore[return-value]
    if not _extension.HAS_CUDA_KERNELS:
        return False, _extension.compiled_reason("bk_core_fwd", "cuda")  # type: ignore[return-value]
    return True, "CUDA C++ kernels"


register_backend("reference", lambda: (True, "pure PyTorch, always available"))
register_backend("cpp", _compiled_available)
register_backend("cuda", _cuda_available)


def compiled_check(op: str, device_type: str) -> Callable:
    """The per-call check of a compiled backend ("cpp": device_type "cpu", "cuda": "cuda") for the
    compiled op named ``op``: the tensors' device, and that the build has that op's kernel."""
    reason = _extension.compiled_reason(op, device_type)  # fixed once the extension loaded

    def check(*args) -> Optional[str]:
        dev = args[0].device.type
        if dev != device_type:
            return f"takes {device_type} tensors, got {dev}"
        return reason
    return check


def register_compiled(op: str, fn: Callable, compiled_op: str) -> None:
    """Registers ``fn`` (calling ``torch.ops.resnet_bk.<compiled_op>``) as ``op``'s cpp and cuda
    implementation."""
    register_impl(op, "cpp", fn, compiled_check(compiled_op, "cpu"))
    register_impl(op, "cuda", fn, compiled_check(compiled_op, "cuda"))
