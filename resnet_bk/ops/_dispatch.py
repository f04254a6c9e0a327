"""The backend registry: which backend runs an op, and why.

A backend declares once whether it is available at all (``available``: e.g. the compiled
extension imported, Triton is installed) and, per op, whether it can take these particular
inputs (``check``: e.g. CUDA tensors only). ``select`` walks the automatic preference order for
the inputs' device, or honours a forced choice (``backend=`` keyword, else the environment
variable ``RESNET_BK_BACKEND``). A forced backend that cannot run raises; an automatic choice that
had to skip a preferred backend warns once, saying why.

Verify mode (``RESNET_BK_VERIFY=1`` or ``with resnet_bk.ops.verify():``) runs the reference beside
the chosen backend, forward and backward, and raises on a mismatch beyond the dtype's tolerance.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

BACKENDS = ("cuda", "triton", "cpp", "reference")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
ENV_BACKEND = "RESNET_BK_BACKEND"
ENV_VERIFY = "RESNET_BK_VERIFY"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs."""


class VerificationError(AssertionError):
    """A backend disagreed with the reference beyond the dtype's tolerance (verify mode)."""


@dataclass
class _Backend:
    name: str
    available: Callable[[], Tuple[bool, str]]
    impls: Dict[str, Tuple[Callable, Optional[Callable]]] = field(default_factory=dict)


_registry: Dict[str, _Backend] = {}
_warned: set = set()
_state = threading.local()


def register_backend(name: str, available: Callable[[], Tuple[bool, str]]) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    _registry.setdefault(name, _Backend(name, available)).available = available


def register_impl(op: str, backend: str, fn: Callable, check: Optional[Callable] = None) -> None:
    """``fn(*canonical_args)`` runs op with autograd; ``check(*canonical_args)`` returns None if the
    backend can take these inputs, else the reason it cannot."""
    _registry[backend].impls[op] = (fn, check)


def available_backends() -> List[str]:
    """Backends that loaded on this machine (for some device), in preference order."""
    out = []
    for name in BACKENDS:
        be = _registry.get(name)
        if be is not None and be.available()[0]:
            out.append(name)
    return out


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


def _reject_reason(name: str, op: str, device: torch.device, args: Sequence) -> Optional[str]:
    be = _registry.get(name)
    if be is None:
        return f"backend {name!r} is not registered"
    ok, why = be.available()
    if not ok:
        return why
    if op not in be.impls:
        return f"backend {name!r} has no implementation of {op}"
    fn, check = be.impls[op]
    if check is not None:
        return check(*args)
    return None


@dataclass
class Choice:
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


def _forced(backend: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    if backend is not None:
        src = "backend= argument"
    else:
        backend = os.environ.get(ENV_BACKEND) or None
        src = f"{ENV_BACKEND}={backend}" if backend else None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r} (from {src})")
    return backend, src


def choose(op: str, device: torch.device, args: Sequence, backend: Optional[str] = None) -> Choice:
    forced, src = _forced(backend)
    if forced is not None:
        why = _reject_reason(forced, op, device, args)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was forced ({src}) but cannot run: {why}")
        return Choice(op, forced, src, [])
    rejected: List[Tuple[str, str]] = []
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        why = _reject_reason(name, op, device, args)
        if why is None:
            return Choice(op, name, None, rejected)
        rejected.append((name, why))
    raise BackendUnavailableError(f"{op}: no backend can run inputs on {device}: {rejected}")


def select(op: str, device: torch.device, args: Sequence, backend: Optional[str] = None) -> Callable:
    choice = choose(op, device, args, backend)
    if choice.rejected and choice.forced_by is None:
        key = (op, device.type, choice.backend, tuple(choice.rejected))
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"resnet_bk: falling back for {op} on {device.type}: {choice}. "
                          f"Set {ENV_BACKEND} to force a backend (a forced backend that cannot run raises).",
                          RuntimeWarning, stacklevel=3)
    fn = _registry[choice.backend].impls[op][0]
    if choice.backend != "reference" and verify_enabled():
        ref = _registry["reference"].impls[op][0]
        return _make_verified(op, choice.backend, fn, ref)
    return fn


# ---------------------------------------------------------------------------------------------
# verify mode

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def verify_enabled() -> bool:
    if getattr(_state, "verify", None) is not None:
        return bool(_state.verify)
    return os.environ.get(ENV_VERIFY, "0") not in ("", "0", "false", "False")


# dtypes the compiled CPU kernels take as they are (the fast paths' first test)
FAST_CPU_DTYPES = (torch.float32, torch.float64)


def fast_cpu_path_ok(op: str, compiled: Callable, backend: Optional[str]) -> bool:
    """Whether a CPU call of ``op`` may go straight to its compiled kernel ``compiled``: the backend
    is automatic or forced to "cpp" (the one automatic dispatch picks for CPU tensors), no backend
    is forced by the environment, verify mode is off, the cpp backend is available with this
    kernel registered, and neither torch.compile nor a torch function mode is tracing (the
    conditions under which the general path adds nothing but checks). The caller checks the
    arguments' dtypes, devices and shapes."""
    if backend not in (None, "cpp") or os.environ.get(ENV_BACKEND) or verify_enabled():
        return False
    be = _registry.get("cpp")
    if be is None or be.impls.get(op, (None,))[0] is not compiled or not be.available()[0]:
        return False
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled())


@contextlib.contextmanager
def verify(enabled: bool = True):
    """Within this context every op also runs the reference and raises VerificationError on a
    mismatch (forward, and backward when gradients are taken)."""
    prev = getattr(_state, "verify", None)
    _state.verify = enabled
    try:
        yield
    finally:
        _state.verify = prev


def _tol(t: Tensor) -> float:
    real = t.real if t.is_complex() else t
    if real.dtype in (torch.bfloat16, torch.float16):
        # outputs stored in a 16-bit dtype may differ by one rounding of that dtype
        return max(1e-5, 2 * torch.finfo(real.dtype).eps)
    return TOLERANCE.get(real.dtype, 1e-5)


def assert_close(op: str, what: str, got: Tensor, ref: Tensor, tol: Optional[float] = None) -> None:
    """Relative check scaled by the reference's magnitude: |got - ref| <= tol * (|ref| + max|ref|)."""
    tol = _tol(ref) if tol is None else tol
    if got.shape != ref.shape:
        raise VerificationError(f"{op}: {what} has shape {tuple(got.shape)}, reference {tuple(ref.shape)}")
    g = got.detach().to(ref.dtype)
    r = ref.detach()
    both_nan = torch.isnan(g) & torch.isnan(r) if not r.is_complex() else (
        torch.isnan(g.real) & torch.isnan(r.real))
    scale = r.abs().max() if r.numel() else torch.zeros((), dtype=r.abs().dtype)
    err = (g - r).abs()
    bad = (err > tol * (r.abs() + scale)) & ~both_nan
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise VerificationError(
            f"{op}: {what} differs from the reference beyond relative tolerance {tol:g}: "
            f"{int(bad.sum())} of {bad.numel()} elements, first at flat index {i}: "
            f"got {g.reshape(-1)[i].item()}, reference {r.reshape(-1)[i].item()}")


def _make_verified(op: str, name: str, fn: Callable, ref: Callable) -> Callable:
    def run(*args):
        tensors = [i for i, x in enumerate(args) if isinstance(x, Tensor)]
        out = fn(*args)
        with torch.no_grad():
            expect = ref(*[x.detach() if isinstance(x, Tensor) else x for x in args])
        assert_close(op, f"forward output of backend {name!r}", out, expect)
        needs = [i for i in tensors if args[i].requires_grad]
        if not (torch.is_grad_enabled() and needs and out.requires_grad):
            return out
        return _VerifyGrad.apply(op, name, fn, ref, args, needs, out, *[args[i] for i in needs])

    return run


class _VerifyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, name, fn, ref, args, needs, out, *inputs):
        ctx.info = (op, name, fn, ref, args, needs)
        return out.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        op, name, fn, ref, args, needs = ctx.info
        results = []
        for f in (fn, ref):
            a = [x.detach().requires_grad_(i in needs) if isinstance(x, Tensor) else x
                 for i, x in enumerate(args)]
            with torch.enable_grad():
                o = f(*a)
                gs = torch.autograd.grad(o, [a[i] for i in needs], grad, allow_unused=True)
            results.append(gs)
        for i, g_fn, g_ref in zip(needs, *results):
            if g_ref is None:
                continue
            g_fn = torch.zeros_like(g_ref) if g_fn is None else g_fn
            assert_close(op, f"gradient of argument {i} from backend {name!r}", g_fn, g_ref)
        return (None,) * 7 + tuple(results[0])
