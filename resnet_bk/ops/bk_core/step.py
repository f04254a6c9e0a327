"""BK-Core's one-token decode step: the causal recurrence advanced by one position.

    y_t, d_t = ops.bk_core_step(diag_t, super_t, sub_t, z, state)

The causal BK-Core (``bk_core(..., causal=True)``) is ``y_i = 1 / d_i`` with the pivots
``d_i = (a_i - z) - k_{i-1} / d_{i-1}``, ``k = super * sub``: the whole cross-token state of a
sequence is its last pivot ``d``. One step computes ``d_t = (diag_t - z) - super_t sub_t / state``
(``diag_t - z`` for the first token, ``state=None``) and ``y_t = 1 / d_t``, so decoding a sequence
token by token gives ``bk_core`` of the whole sequence, in O(1) time and memory per token.

This module is the whole op: argument checks (``canon_step``), the reference backend (pure torch),
the compiled ops' Python side (``torch.ops.resnet_bk.bk_core_step`` / ``bk_core_step_out``: fake
kernels; kernels in csrc/cpu/bk_step_cpu.cpp and csrc/cuda/bk_step_cuda.cu, autograd in
csrc/autograd.cpp), the Triton ops (kernel in ``triton_kernels/step.py``), the registry entries
(registry ops ``"bk_core_step"``, functional, and ``"bk_core_step_out"``, writing its outputs) and
the public function with its CPU fast path.

Canonical arguments (what every backend receives): ``a`` float32/float64 contiguous, the batch
shape (0-dim allowed); ``b``, ``c`` of ``a``'s dtype, 0-dim (one value shared by the batch) or
``a``'s shape; ``zri`` (2,) ``[Re z, Im z]``; ``state`` complex (complex64, complex128 for float64)
of ``a``'s shape, or None. The functional form returns ``(y, d)``; the out form writes them into
``y`` and ``d`` (contiguous, ``a``'s shape), where ``d`` may be ``state`` itself (in place).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _extension, _registry, _triton, _verify
from .._checks import (check_bool, check_precision_class, check_same_device, check_tensor, compute_dtype,
                       describe)
from .canon import _broadcastable_to, cached_z, canon_z
from .reference import complex_dtype_for

Number = Union[int, float, complex]

__all__ = ["bk_core_step", "canon_step", "canonical_step_call", "step_reference", "StepArgs"]


# ---- arguments ------------------------------------------------------------------------------------

@dataclass
class StepArgs:
    a: Tensor                # batch shape, compute dtype, contiguous
    b: Tensor                # 0-dim or a's shape
    c: Tensor
    zri: Tensor              # (2,)
    state: Optional[Tensor]  # a's shape, complex, or None
    y: Optional[Tensor]      # out= (a's shape, complex, contiguous) or None
    d: Optional[Tensor]      # where d is written (state when inplace) or None
    inplace: bool

    @property
    def canon(self) -> tuple:
        return (self.a, self.b, self.c, self.zri, self.state)


def _canon_off(t: Tensor, shape: Tuple[int, ...], rdt: torch.dtype) -> Tensor:
    t = t.to(rdt)
    if t.numel() == 1 and tuple(t.shape) != shape:
        return t.reshape(())
    if tuple(t.shape) != shape:
        t = t.expand(shape)
    return t.contiguous()


def _check_complex_out(name: str, t, diag_t: Tensor, cdt: torch.dtype, shape: Tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {describe(t)}")
    check_same_device("diag_t", diag_t, name, t)
    if t.dtype != cdt:
        raise TypeError(f"{name}: expected dtype {cdt} (the output dtype for {diag_t.dtype} diag_t), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected diag_t's shape {shape}, got {tuple(t.shape)}")
    return t


def _writable(name: str, t: Tensor) -> None:
    # (torch.compile cannot trace the conjugate bit's query; an output is never a conjugate view there)
    lazy = False if torch.compiler.is_compiling() else (t.is_conj() or t.is_neg())
    if not t.is_contiguous() or lazy:
        raise ValueError(f"{name}: expected a contiguous tensor without a lazy conjugate (it is written in place), "
                         f"got strides {t.stride()}{' with a lazy conjugate or negation' if lazy else ''}")


def _needs_grad(diag_t, super_t, sub_t, z, state) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (diag_t.requires_grad or super_t.requires_grad or sub_t.requires_grad
            or (isinstance(z, Tensor) and z.requires_grad) or (state is not None and state.requires_grad))


def canon_step(diag_t, super_t, sub_t, z, state, out=None, inplace=False) -> StepArgs:
    """Validates a ``bk_core_step`` call (errors name the argument, expected vs got) and returns its
    canonical form."""
    diag_t = check_tensor("diag_t", diag_t)
    shape = tuple(diag_t.shape)
    rdt = compute_dtype(diag_t)
    cdt = complex_dtype_for(rdt)
    offs = []
    for name, t in (("super_t", super_t), ("sub_t", sub_t)):
        t = check_tensor(name, t)
        check_same_device("diag_t", diag_t, name, t)
        check_precision_class("diag_t", diag_t, name, t)
        if not _broadcastable_to(tuple(t.shape), shape):
            raise ValueError(f"{name}: expected a shape broadcastable to diag_t's batch shape {shape}, "
                             f"got {tuple(t.shape)}")
        offs.append(t)
    inplace = check_bool("inplace", inplace)
    if state is not None:
        if not isinstance(state, Tensor):
            raise TypeError(f"state: expected a complex tensor (the previous pivot d) or None, got {describe(state)}")
        check_same_device("diag_t", diag_t, "state", state)
        if state.dtype != cdt:
            raise TypeError(f"state: expected dtype {cdt} (the pivot of {diag_t.dtype} diag_t), got {state.dtype}")
        if tuple(state.shape) != shape:
            raise ValueError(f"state: expected diag_t's batch shape {shape}, got {tuple(state.shape)}")
    zri = canon_z(z, rdt, diag_t.device, ref_name="diag_t")
    grad = _needs_grad(diag_t, super_t, sub_t, z, state)
    if out is not None:
        _check_complex_out("out", out, diag_t, cdt, shape)
        _writable("out", out)
        if state is not None and out is state:
            raise ValueError("out: expected a tensor other than state (inplace=True writes d into the state)")
    if inplace:
        if state is None:
            raise ValueError("inplace: expected a state to update (inplace=True writes d_t into state), got state=None")
        _writable("state", state)
    if grad and (inplace or out is not None):
        raise RuntimeError(
            f"{'inplace=True' if inplace else 'out='}: expected no input to require grad (the in-place and out= forms "
            f"are not differentiable: they overwrite their outputs); call it under torch.no_grad(), or without "
            f"out=/inplace= to get a differentiable step")
    a = diag_t.to(rdt).contiguous()
    b, c = (_canon_off(t, shape, rdt) for t in offs)
    d = None
    if out is not None or inplace:
        d = state if inplace else torch.empty(shape, dtype=cdt, device=diag_t.device)
        if out is None:
            out = torch.empty(shape, dtype=cdt, device=diag_t.device)
    return StepArgs(a, b, c, zri, state, out, d, inplace)


def canonical_step_call(diag_t, super_t, sub_t, z, state=None, *, out=None, inplace=False):
    """(device, canonical arguments) of a ``bk_core_step`` call (for ``explain``)."""
    args = canon_step(diag_t, super_t, sub_t, z, state, out, inplace)
    return args.a.device, args.canon


# ---- reference backend (pure torch; autograd differentiates it) -----------------------------------

def step_reference(a: Tensor, b: Tensor, c: Tensor, zri: Tensor, state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    cdt = complex_dtype_for(a.dtype)
    d = a.to(cdt) - torch.complex(zri[0], zri[1])
    if state is not None:
        d = d - (b * c).to(cdt) / state
    return 1.0 / d, d


def step_out_reference(a, b, c, zri, state, y, d) -> None:
    yv, dv = step_reference(a, b, c, zri, state)
    d.copy_(dv)  # d may be the state: both were computed before either is written
    y.copy_(yv)


_registry.register_impl("bk_core_step", "reference", step_reference)
_registry.register_impl("bk_core_step_out", "reference", step_out_reference)


# ---- compiled ops (cpp and cuda backends) ---------------------------------------------------------

def step_fake(a, b, c, zri, state):
    cdt = complex_dtype_for(a.dtype)
    return a.new_empty(a.shape, dtype=cdt), a.new_empty(a.shape, dtype=cdt)


def step_out_fake(a, b, c, zri, state, y, d):
    return None


def step_compiled(a, b, c, zri, state):
    return torch.ops.resnet_bk.bk_core_step.default(a, b, c, zri, state)


def step_out_compiled(a, b, c, zri, state, y, d):
    torch.ops.resnet_bk.bk_core_step_out.default(a, b, c, zri, state, y, d)


HAS_COMPILED = _extension.has_op("bk_core_step")
if HAS_COMPILED:
    torch.library.register_fake("resnet_bk::bk_core_step")(step_fake)
    torch.library.register_fake("resnet_bk::bk_core_step_out")(step_out_fake)
_registry.register_compiled("bk_core_step", step_compiled, "bk_core_step")
_registry.register_compiled("bk_core_step_out", step_out_compiled, "bk_core_step_out")


# ---- Triton ops -----------------------------------------------------------------------------------

def step_backward(gy: Tensor, gd: Tensor, y: Tensor, b: Tensor, c: Tensor, state: Optional[Tensor],
                  needs: Tuple[bool, ...]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of (a, b, c, zri, state) from those of (y, d): the Python twin of csrc/autograd.cpp's
    ``BkStepFunction::backward`` (see its formulas)."""
    if gy is None or gd is None:  # an output that received no gradient
        gy = torch.zeros_like(y) if gy is None else gy
        gd = torch.zeros_like(y) if gd is None else gd
    gt = gd - gy * (y * y).conj()
    ga = gt.real.clone() if needs[0] else None
    gz = torch.view_as_real(-gt.sum()).clone() if needs[3] else None
    gb = gc = gs = None
    if state is not None and (needs[1] or needs[2] or needs[4]):
        r = state.reciprocal().conj()
        gtr = gt * r
        gk = -gtr.real
        if needs[1]:
            gb = gk * c if b.numel() != 1 or gk.numel() == 1 else (gk * c).sum()
            gb = gb.reshape(b.shape)
        if needs[2]:
            gc = gk * b if c.numel() != 1 or gk.numel() == 1 else (gk * b).sum()
            gc = gc.reshape(c.shape)
        if needs[4]:
            gs = gtr * r * (b * c)
    return ga, gb, gc, gz, gs


if _triton.AVAILABLE:
    @torch.library.custom_op("resnet_bk::bk_core_step_triton", mutates_args=())
    def bk_core_step_triton(a: Tensor, b: Tensor, c: Tensor, zri: Tensor,
                            state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(y, d) on canonical arguments."""
        return _triton.kernels("step").bk_core_step(a, b, c, zri, state)

    @torch.library.custom_op("resnet_bk::bk_core_step_out_triton", mutates_args=("y", "d"))
    def bk_core_step_out_triton(a: Tensor, b: Tensor, c: Tensor, zri: Tensor, state: Optional[Tensor],
                                y: Tensor, d: Tensor) -> None:
        """Writes y and d (d may be the state: updated in place)."""
        _triton.kernels("step").bk_core_step(a, b, c, zri, state, y, d)

    bk_core_step_triton.register_fake(step_fake)
    bk_core_step_out_triton.register_fake(step_out_fake)

    def _triton_setup(ctx, inputs, output):
        a, b, c, zri, state = inputs
        ctx.save_for_backward(b, c, state, output[0])

    def _triton_backward(ctx, gy, gd):
        b, c, state, y = ctx.saved_tensors
        return step_backward(gy, gd, y, b, c, state, ctx.needs_input_grad)

    torch.library.register_autograd("resnet_bk::bk_core_step_triton", _triton_backward, setup_context=_triton_setup)

    def step_triton(a, b, c, zri, state):
        return torch.ops.resnet_bk.bk_core_step_triton(a, b, c, zri, state)

    def step_out_triton(a, b, c, zri, state, y, d):
        torch.ops.resnet_bk.bk_core_step_out_triton(a, b, c, zri, state, y, d)

    _registry.register_impl("bk_core_step", "triton", step_triton, _triton.check)
    _registry.register_impl("bk_core_step_out", "triton", step_out_triton, _triton.check)


# ---- verify mode ----------------------------------------------------------------------------------

class _VerifyStepGrad(torch.autograd.Function):
    """The backend's (y, d), whose backward compares the backend's gradients with the reference's."""

    @staticmethod
    def forward(ctx, name, fn, args, needs, y, d, *inputs):
        ctx.info = (name, fn, args, needs)
        return y.detach().clone(), d.detach().clone()

    @staticmethod
    def backward(ctx, gy, gd):
        name, fn, args, needs = ctx.info
        results = []
        for f in (fn, step_reference):
            a = [x.detach().requires_grad_(i in needs) if isinstance(x, Tensor) else x for i, x in enumerate(args)]
            with torch.enable_grad():
                o = f(*a)
                gs = torch.autograd.grad(o, [a[i] for i in needs], (gy, gd), allow_unused=True)
            results.append(gs)
        for i, g_fn, g_ref in zip(needs, *results):
            if g_ref is None:
                continue
            g_fn = torch.zeros_like(g_ref) if g_fn is None else g_fn
            _verify.assert_close(g_fn, g_ref, what=f"gradient of argument {i} from backend {name!r}", op="bk_core_step")
        return (None,) * 6 + tuple(results[0])


def _check_against_reference(name: str, y: Tensor, d: Tensor, expect: Tuple[Tensor, Tensor]) -> None:
    _verify.assert_close(y, expect[0], what=f"output y of backend {name!r}", op="bk_core_step")
    _verify.assert_close(d, expect[1], what=f"output d of backend {name!r}", op="bk_core_step")


# ---- the public op --------------------------------------------------------------------------------

def _run(args: StepArgs, backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    canon = args.canon
    choice = _registry.choose_warned("bk_core_step", args.a.device, canon, backend)
    verify = choice.backend != "reference" and _verify.verify_enabled()
    if args.y is not None:  # out= / inplace: not differentiable (canon_step made sure)
        expect = None
        if verify:
            with torch.no_grad():
                expect = step_reference(*canon)  # before the state may be overwritten
        _registry.impl("bk_core_step_out", choice.backend)(*canon, args.y, args.d)
        if expect is not None:
            _check_against_reference(choice.backend, args.y, args.d, expect)
        return args.y, args.d
    fn = _registry.impl("bk_core_step", choice.backend)
    y, d = fn(*canon)
    if verify:
        with torch.no_grad():
            expect = step_reference(*[x.detach() if isinstance(x, Tensor) else x for x in canon])
        _check_against_reference(choice.backend, y, d, expect)
        needs = [i for i, x in enumerate(canon) if isinstance(x, Tensor) and x.requires_grad]
        if torch.is_grad_enabled() and needs and (y.requires_grad or d.requires_grad):
            y, d = _VerifyStepGrad.apply(choice.backend, fn, canon, needs, y, d, *[canon[i] for i in needs])
    return y, d


_OPS = None  # the compiled ops' C++ entry points, looked up once
_F32, _F64, _C64, _C128 = torch.float32, torch.float64, torch.complex64, torch.complex128
_CPU = torch.device("cpu")


def _fast_cpu(diag_t, super_t, sub_t, z, state, out, inplace, backend):
    """The decode loop's call on CPU tensors, recognised in a few attribute reads and sent straight
    to the compiled op when ``_registry.compiled_cpu_takes`` allows it: float32/float64 ``diag_t``;
    ``super_t``/``sub_t`` of its dtype, each one value or ``diag_t``'s shape; a Python ``z`` or a
    0-dim complex tensor of the matching dtype; a state of the output dtype and ``diag_t``'s shape,
    or None; for out=/inplace=True contiguous outputs and no input requiring grad. The same op and
    arguments the general path would build. Anything else returns None and takes the general path
    (which validates, raises on bad input, dispatches, warns and verifies)."""
    global _OPS
    if not (HAS_COMPILED and isinstance(diag_t, Tensor) and isinstance(super_t, Tensor)
            and isinstance(sub_t, Tensor) and type(inplace) is bool):
        return None
    dt = diag_t.dtype
    if not ((dt is _F32 or dt is _F64) and diag_t.is_cpu):
        return None
    shape = diag_t.shape
    for t in (super_t, sub_t):
        if not (t.dtype is dt and t.is_cpu and (t.shape == shape or (t.numel() == 1 and t.dim() <= len(shape)))):
            return None
    cdt = _C128 if dt is _F64 else _C64
    if state is not None and not (isinstance(state, Tensor) and state.dtype is cdt and state.is_cpu
                                  and state.shape == shape):
        return None
    if type(z) in (complex, float, int):
        zri = cached_z(z, dt, _CPU)  # (diag_t is on the CPU)
    elif isinstance(z, Tensor) and z.dtype is cdt and z.dim() == 0 and z.is_cpu:
        zri = torch.view_as_real(z)
    else:
        return None
    if not _registry.compiled_cpu_takes("bk_core_step", step_compiled, backend):
        return None
    if _OPS is None:
        # the overloads' C++ callables (OpOverload.__call__ adds a Python frame)
        _OPS = (torch.ops.resnet_bk.bk_core_step.default._op, torch.ops.resnet_bk.bk_core_step_out.default._op)
    if out is None and not inplace:
        return _OPS[0](diag_t, super_t, sub_t, zri, state)
    if _needs_grad(diag_t, super_t, sub_t, z, state):
        return None
    if out is not None and not (isinstance(out, Tensor) and out.dtype is cdt and out.is_cpu and out.shape == shape
                                and out.is_contiguous() and not out.is_conj() and out is not state):
        return None
    if inplace:
        if state is None or not state.is_contiguous() or state.is_conj():
            return None
        y = torch.empty(shape, dtype=cdt, device=_CPU) if out is None else out
        _OPS[1](diag_t, super_t, sub_t, zri, state, y, state)
        return y, state
    d = torch.empty(shape, dtype=cdt, device=_CPU)
    _OPS[1](diag_t, super_t, sub_t, zri, state, out, d)
    return out, d


def bk_core_step(diag_t: Tensor, super_t: Tensor, sub_t: Tensor, z: Union[Number, Tensor],
                 state: Optional[Tensor], *, out: Optional[Tensor] = None, inplace: bool = False,
                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One token of the causal BK-Core: ``(y_t, d_t)`` with ``d_t = (diag_t - z) - super_t sub_t / state``
    (``state=None``, the first token of a sequence: ``diag_t - z``) and ``y_t = 1 / d_t``.

    Decoding token by token equals ``bk_core(diag, super_diag, sub_diag, z, causal=True)`` of the
    whole sequence: feed ``diag[..., t]``, the coupling ``super_diag[..., t-1]``, ``sub_diag[..., t-1]``
    and the previous step's ``d_t`` as ``state``.

    Args:
        diag_t: (...,) real, the batch shape (0-dim allowed); float32/float64 (bfloat16/float16 are
            computed in float32).
        super_t, sub_t: real, broadcastable to diag_t's shape: the coupling of the previous position
            to this one (unused where ``state`` is None, but validated).
        z: Python number or 0-dim complex/real tensor (may require grad), as for ``bk_core``.
        state: the previous position's pivot d: complex64 (complex128 for float64) of diag_t's shape on
            its device, or None.
        out: a contiguous complex tensor of diag_t's shape and the output dtype: y_t is written
            into it and it is returned.
        inplace: write d_t into ``state`` (required) and return ``(y_t, state)``. With ``out=`` too,
            the call allocates nothing and reads nothing on the host (a CUDA graph can capture it).
        backend: force a backend ("reference", "cpp", "cuda", "triton"); raises if it cannot run.

    Returns:
        (y_t, d_t), each of diag_t's shape, complex64 (complex128 for float64). Differentiable
        (exact gradients for diag_t, super_t, sub_t, a tensor z and state) unless ``out=`` or
        ``inplace=True`` is given, which raise when an input requires grad. Under ``torch.no_grad``
        (or with no input requiring grad) there is no autograd bookkeeping; the cpp backend is one
        compiled op, the cuda backend one kernel launch.
    """
    res = _fast_cpu(diag_t, super_t, sub_t, z, state, out, inplace, backend)
    if res is not None:
        return res
    args = canon_step(diag_t, super_t, sub_t, z, state, out, inplace)
    return _run(args, backend)
