"""A global-memory byte counter for Triton kernels run by Triton's interpreter (TRITON_INTERPRET=1).

``count(...)`` wraps the interpreter's memory operations (``InterpreterBuilder.create_masked_load`` /
``create_masked_store``: every ``tl.load`` / ``tl.store`` ends there, scalar ones included) and its
launcher (``GridExecutor.__call__``) for the duration of a ``with`` block, so that each masked-in
element access is charged ``element size`` bytes to (kernel, buffer tag, "ld" | "st"). Used only
inside tests: nothing is patched outside the block.

Buffers are address ranges. The test registers the tensors it passes in (``a``, ``k``, ...) under
their tags; every other tensor argument of a launch that overlaps none of them (the outputs and the
scratch the host code allocates) is registered for that launch only, tagged by its kernel argument
name (``ARG_TAGS``; scratch is "ws"; otherwise the name without "_ptr"). An access outside every
registered buffer is recorded in ``Traffic.outside`` (the out-of-bounds check: tests assert it is
empty).

Coalescing, per access: the pointer block is viewed as (first axis, everything else) and, along
the second (the program's vector axis: consecutive lanes), each pair of neighbouring active lanes
is classed as contiguous (addresses one element apart, either direction: the same cache lines),
broadcast (the same address) or strided (anything else; the strides are kept). A single active
lane is a scalar access. On a GPU, consecutive lanes are consecutive threads of a warp, so a
contiguous access is coalesced; a stride of two elements (re/im interleaved as two stores) touches
twice the sectors per instruction; a larger stride is a per-lane scatter.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import types
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

# kernel argument name -> tag, for tensors the host code allocates (others: the name without _ptr)
ARG_TAGS = {
    "out_ptr": "out",
    "ga_ptr": "grad_a", "gk_ptr": "grad_k", "gz_ptr": "grad_zri", "gmask_ptr": "grad_mask",
    "gx_ptr": "grad_x", "gy_ptr": "grad_y", "gb_ptr": "grad_bias", "gs_ptr": "grad_scale",
    "u_ptr": "ws", "piv_ptr": "ws", "sum_ptr": "ws", "lsum_ptr": "ws", "cin_ptr": "ws",
    "stat_ptr": "ws", "ctr_ptr": "ws", "desc_ptr": "ws",
}


@dataclass
class Access:
    """Aggregate over the accesses of one (kernel, tag, kind)."""
    bytes: int = 0
    unique_bytes: int = 0   # distinct addresses per access, summed over accesses
    elements: int = 0
    ops: int = 0            # tl.load / tl.store executions with at least one active lane
    scalar_ops: int = 0     # ... with exactly one
    contiguous: int = 0     # neighbouring active lane pairs one element apart
    broadcast: int = 0      # ... at the same address
    strided: int = 0        # ... otherwise
    strides: set = field(default_factory=set)   # the strides (in elements) of the strided pairs

    @property
    def coalesced(self) -> bool:
        """Every vector access runs over consecutive addresses (broadcast lanes allowed)."""
        return self.strided == 0


class Traffic:
    def __init__(self):
        self.explicit = []     # (lo, hi, tag), kept for the whole block
        self.launch = []       # (lo, hi, tag), the current launch's own buffers
        self.acc = defaultdict(Access)   # (kernel, tag, kind) -> Access
        self.outside = []      # (kernel, kind, address, element size)
        self.launches = []     # kernel names in launch order
        self.ticketed = []     # the names of the launches whose programs took tickets
        self.kernel = None

    # -- registration -----------------------------------------------------------------------------
    @staticmethod
    def _range(t: torch.Tensor):
        lo = t.data_ptr()
        return lo, lo + t.numel() * t.element_size()

    def register(self, tag: str, t: torch.Tensor) -> None:
        lo, hi = self._range(t)
        if hi > lo:
            self.explicit.append((lo, hi, tag))

    def _overlaps(self, lo, hi):
        return any(lo < h and l < hi for l, h, _ in self.explicit)

    def _tag_of(self, addr, es):
        for lo, hi, tag in self.explicit + self.launch:
            if lo <= addr and addr + es <= hi:
                return tag
        return None

    # -- charging ---------------------------------------------------------------------------------
    def charge(self, kind: str, ptrs, mask) -> None:
        p = np.asarray(ptrs.data).astype(np.int64)
        m = np.broadcast_to(np.asarray(mask.data).astype(bool), p.shape)
        es = ptrs.get_element_ty().primitive_bitwidth // 8
        act = p[m]
        if act.size == 0:
            return
        # tag each distinct address (buffers are few; group by buffer)
        tags = {}
        bufs = self.explicit + self.launch
        left = np.ones(act.shape, bool)
        for lo, hi, tag in bufs:
            inb = left & (act >= lo) & (act + es <= hi)
            if inb.any():
                tags[tag] = tags.get(tag, 0) + int(inb.sum())
                left &= ~inb
        if left.any():
            for a in np.unique(act[left])[:4]:
                self.outside.append((self.kernel, kind, int(a), es))
        if not tags:
            return
        # one access is charged to its (usually only) tag; coalescing is a property of the access
        tag = max(tags, key=tags.get)
        for tg, n in tags.items():
            rec = self.acc[(self.kernel, tg, kind)]
            rec.bytes += n * es
            rec.elements += n
        rec = self.acc[(self.kernel, tag, kind)]
        rec.unique_bytes += int(np.unique(act).size) * es
        rec.ops += 1
        if act.size == 1:
            rec.scalar_ops += 1
            return
        if p.ndim == 0:
            return
        q = p.reshape(1, -1) if p.ndim == 1 else p.reshape(p.shape[0], -1)
        mq = m.reshape(q.shape)
        both = mq[:, 1:] & mq[:, :-1]
        d = (q[:, 1:] - q[:, :-1])[both]
        contig = np.abs(d) == es
        zero = d == 0
        rec.contiguous += int(contig.sum())
        rec.broadcast += int(zero.sum())
        other = d[~contig & ~zero]
        rec.strided += int(other.size)
        if other.size:
            rec.strides.update(int(s) // es if s % es == 0 else f"{int(s)}B" for s in np.unique(other)[:8])

    # -- summaries --------------------------------------------------------------------------------
    def bytes_by(self, kernel=None, tag=None, kind=None) -> int:
        return sum(a.bytes for (kn, tg, kd), a in self.acc.items()
                   if (kernel is None or kn == kernel) and (tag is None or tg == tag) and (kind is None or kd == kind))

    def tags(self) -> dict:
        """{tag: bytes} over all kernels."""
        out = defaultdict(int)
        for (_, tg, _), a in self.acc.items():
            out[tg] += a.bytes
        return dict(out)

    def kernels(self) -> dict:
        out = defaultdict(int)
        for (kn, _, _), a in self.acc.items():
            out[kn] += a.bytes
        return dict(out)

    def strided(self) -> dict:
        """{(kernel, tag, kind): strides} of the accesses that are not contiguous."""
        return {key: sorted(a.strides, key=str) for key, a in self.acc.items() if not a.coalesced}


def _fast_scan(self, input):
    """``ScanOps.generic_scan`` (one Python-level combine per element) as a Hillis-Steele scan: log2(n)
    combines on whole arrays. The results differ from a sequential scan only by rounding, and no
    load or store mask of these kernels depends on a computed value, so the traffic is the same."""
    ax = self.axis
    vals = [np.array(x.handle.data, copy=True) for x in input]
    dts = [x.dtype for x in input]
    n = vals[0].shape[ax]
    nd = vals[0].ndim
    idx = np.arange(n).reshape([n if i == ax else 1 for i in range(nd)])
    off = 1
    while off < n:
        # lane i combines lane i - off (block shapes must stay powers of two: whole arrays, the
        # first off lanes combine with themselves and keep their value)
        prev = [np.roll(v, off, axis=ax) for v in vals]
        with np.errstate(all="ignore"):
            r = self.combine_fn.fn(*(self.to_tensor(v, d) for v, d in zip(prev, dts)),
                                   *(self.to_tensor(v, d) for v, d in zip(vals, dts)))
        r = r if isinstance(r, tuple) else (r,)
        vals = [np.where(idx >= off, np.broadcast_to(np.asarray(x.handle.data if isinstance(x, tl_tensor()) else x),
                                                     v.shape), v).astype(v.dtype) for x, v in zip(r, vals)]
        off *= 2
    return [self.to_tensor(v, d) for v, d in zip(vals, dts)]


def _take_ticket(ctr):
    """ctr (an interpreter pointer to an int32 ticket counter) += 1 without a kernel access."""
    ctypes.c_int32.from_address(int(np.asarray(ctr.handle.data).item())).value += 1


@dataclass
class TensorHandleLike:
    data: np.ndarray


def tl_tensor():
    import triton.language as tl
    return tl.core.tensor


@contextlib.contextmanager
def count(select=None, fast_scan: bool = True, **tensors):
    """``with count(a=a, k=k) as tr:`` run kernels; ``tr`` holds their traffic (loads, stores and
    atomics, kind "ld", "st", "at").

    ``select(kernel_name, (x, y, z), ticketed) -> bool``: run only these programs (the others return
    at once: outputs are then incomplete, but no access of these kernels depends on a value another
    program wrote, so the selected programs' traffic is what it is in a full launch). ``ticketed``:
    the launch's programs take tickets (an int32 ``ctr_ptr``, the look-back kernels): the
    interpreter runs programs in order, so x is the program's ticket; an unselected program still
    takes its ticket (uncharged), and a selected one needs the programs its look-back reads (its
    row's other chunks) selected too."""
    from triton.runtime import interpreter as I

    tr = Traffic()
    for tag, t in tensors.items():
        if t is not None:
            tr.register(tag, t)
    B = I.InterpreterBuilder
    orig_ld, orig_st, orig_call = B.create_masked_load, B.create_masked_store, I.GridExecutor.__call__
    orig_rmw, orig_cas = B.create_atomic_rmw, B.create_atomic_cas

    def rmw(self, op, ptr, val, mask, sem, scope):
        tr.charge("at", ptr, mask)
        return orig_rmw(self, op, ptr, val, mask, sem, scope)

    def cas(self, ptr, cmp, val, sem, scope):
        tr.charge("at", ptr, TensorHandleLike(np.ones(np.shape(ptr.data), bool)))
        return orig_cas(self, ptr, cmp, val, sem, scope)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        tr.charge("ld", ptrs, mask)
        return orig_ld(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        tr.charge("st", ptrs, mask)
        return orig_st(self, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        names = inspect.getfullargspec(self.fn).args
        bound = dict(zip(names, args))
        bound.update(kwargs)
        launch = []
        for name, v in bound.items():
            if isinstance(v, torch.Tensor) and v.numel() > 0:
                lo, hi = tr._range(v)
                if not tr._overlaps(lo, hi):
                    launch.append((lo, hi, ARG_TAGS.get(name, name[:-4] if name.endswith("_ptr") else name)))
        prev = (tr.kernel, tr.launch)
        name = self.fn.__name__
        tr.kernel, tr.launch = name, launch
        tr.launches.append(name)
        fn = self.fn
        take = _take_ticket   # (only's globals are the kernel's: names it uses are closed over)
        ctr = bound.get("ctr_ptr")
        ticketed = isinstance(ctr, torch.Tensor) and ctr.dtype == torch.int32
        if ticketed:
            tr.ticketed.append(name)
        if select is not None:
            def only(**kw):
                if select(name, I.interpreter_builder.grid_idx, ticketed):
                    return fn(**kw)
                if ticketed:   # take the ticket, uncharged
                    take(kw["ctr_ptr"])
            # with the kernel's globals: the interpreter finds triton.language through them
            only = types.FunctionType(only.__code__, fn.__globals__, name, None, only.__closure__)
            only.__signature__ = inspect.signature(fn)
            self.fn = only
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            tr.kernel, tr.launch = prev
            self.fn = fn

    orig_scan = I.ScanOps.generic_scan
    B.create_masked_load, B.create_masked_store, I.GridExecutor.__call__ = load, store, call
    B.create_atomic_rmw, B.create_atomic_cas = rmw, cas
    if fast_scan:
        I.ScanOps.generic_scan = _fast_scan
    try:
        yield tr
    finally:
        B.create_masked_load, B.create_masked_store, I.GridExecutor.__call__ = orig_ld, orig_st, orig_call
        B.create_atomic_rmw, B.create_atomic_cas = orig_rmw, orig_cas
        I.ScanOps.generic_scan = orig_scan
