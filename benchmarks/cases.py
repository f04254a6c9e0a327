"""The registered benchmark cases: every op (per variant) and every adaptive module.

An op case knows its size grid, how to make a pool of inputs, which implementations to time
(every dispatch backend that can take the inputs, plus the named plain-PyTorch baselines), how
many elements it processes (for ns/element) and how many bytes it must move (for GB/s). A case
whose op is not importable yet reports why and is skipped. Module cases are in ``modules.py``.

Inputs follow shared/BK_CORE_MATH.md's test distribution: diag = -2 + U(-3, 3), one shared
off-diagonal b = c = 1 (the model's Laplacian H0, a buffer), z = 1j; the gradient is taken with
respect to the diagonal (the learned potential) and, for the masked variant, the mask.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import Tensor

import resnet_bk.ops as ops

Inputs = Dict[str, object]

MODES = ("forward", "backward", "forward+backward")
DENSE_MAX_WORK = 8 * 256 ** 3  # torch.linalg.inv is O(B N^3): the dense baseline runs for B*N^3 up to this
NAIVE_MAX_N = 512       # the theta/phi continuants overflow complex128 past N ~ 700 (ORIGINAL_DESIGN 3.1b)
REF_LARGE_N = 16384     # above this the reference (a Python loop over N) takes seconds per call


@dataclass
class Impl:
    """One implementation timed in a case: a dispatch backend or a named baseline."""
    name: str                       # "cpp", "cuda", "triton", "reference", "naive", "dense", ...
    kind: str                       # "backend" or "baseline"
    label: str                      # what it is, for the tables
    fn: Optional[Callable[[Inputs], Tensor]]
    skip: Optional[str] = None      # reason it is not run at this size (row is SKIPPED)
    split: bool = False             # time forward and backward inside one fwd+bwd call (see run.py)
    context: Optional[Callable[[], ContextManager]] = None  # entered around all of its timing
    versus: Optional[str] = None    # another implementation its speedup is also given over
    interleave: bool = False        # also time it alternately with `versus` (a ratio robust to load drift)
    checked: bool = True            # False: computes a different output (a timing baseline only)


@dataclass
class OpCase:
    name: str                       # op name in the tables, e.g. "bk_core"
    variant: str                    # "two-sided", "causal", "masked", ...
    group: str                      # what --ops selects
    unavailable: Callable[[], Optional[str]]
    sizes: Callable[[str], List[Dict[str, int]]]          # grid name ("full", "quick", "smoke") -> sizes
    dtypes: Callable[[str], List[torch.dtype]]
    make_inputs: Callable[[Dict[str, int], torch.dtype, torch.device, torch.Generator], Inputs]
    impls: Callable[[Dict[str, int], torch.dtype, torch.device, Inputs], List[Impl]]
    elements: Callable[[Dict[str, int]], int]
    bytes_moved: Callable[[Dict[str, int], torch.dtype, str], int]
    leaves: Sequence[str]           # inputs that receive gradients
    ref_plan: Callable[[Dict[str, int], torch.dtype], Optional[str]] = lambda s, d: None
    ref_rows: Callable[[Inputs, int], Inputs] = None  # type: ignore[assignment]
    baseline_note: str = ""
    claims: Dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}[{self.variant}]"


def _dsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _backend_impls(op_fn: Callable, call_args: tuple, call_kwargs: dict, call: Callable[[str], Callable[[Inputs], Tensor]],
                   ) -> List[Impl]:
    """Every backend other than the reference, with the reason a backend cannot take these inputs
    (it is then a SKIPPED row) from ``ops.explain`` of the public op ``op_fn`` on these arguments."""
    out = []
    for name in ops.available_backends():
        if name == "reference":
            continue
        try:
            ops.explain(op_fn, *call_args, backend=name, **call_kwargs)
            out.append(Impl(name, "backend", f"{name} backend", call(name)))
        except ops.BackendUnavailableError as exc:
            out.append(Impl(name, "backend", f"{name} backend", None, skip=str(exc)))
    return out


HUGE_ADVICE_MIN_BYTES = 8 << 20  # the C++ CPU ops advise huge pages on outputs of this size and more


@contextlib.contextmanager
def _huge_pages_on():
    prev = ops.cpu_huge_pages(True)
    try:
        yield
    finally:
        ops.cpu_huge_pages(prev)


def _huge_pages_impl(impls: List[Impl], device: torch.device, largest_output_bytes: int,
                     call: Callable[[str], Callable[[Inputs], Tensor]]) -> List[Impl]:
    """``cpp-huge``: the cpp backend with its huge-page advice switched on (``ops.cpu_huge_pages(True)``
    around all of its timing; off by default), where an output or gradient is large enough for the
    advice to apply; its rows give the speedup over the plain cpp rows of the same run."""
    cpp = [i for i in impls if i.name == "cpp" and i.fn is not None]
    if device.type != "cpu" or not cpp or largest_output_bytes < HUGE_ADVICE_MIN_BYTES:
        return []
    return [Impl("cpp-huge", "backend", "cpp backend with the huge-page advice on (ops.cpu_huge_pages(True)): "
                 "fresh outputs of 8 MiB or more in 2 MiB pages", call("cpp"), context=_huge_pages_on,
                 versus="cpp")]


# ---------------------------------------------------------------------------------------------
# bk_core (two-sided, causal) and bk_core_masked

def _bk_sizes(grid: str) -> List[Dict[str, int]]:
    if grid == "smoke":
        return [{"B": 2, "N": 64}]
    if grid == "quick":
        return [{"B": 8, "N": 256}, {"B": 64, "N": 4096}]
    return [{"B": B, "N": N} for N in (256, 4096, 65536) for B in (8, 64)]


def _bk_dtypes(grid: str) -> List[torch.dtype]:
    return [torch.float32] if grid in ("smoke", "quick") else [torch.float32, torch.float64]


def _bk_inputs(masked: bool):
    def make(size, dtype, device, gen) -> Inputs:
        B, N = size["B"], size["N"]
        diag = (torch.rand(B, N, generator=gen, dtype=torch.float64) * 6 - 5).to(dtype).to(device)
        off = torch.ones(N - 1, dtype=dtype, device=device)
        inp: Inputs = {"diag": diag, "super": off, "sub": off, "z": 1j}
        if masked:
            inp["mask"] = (torch.rand(B, N, generator=gen) < 0.5).to(dtype).to(device)
        return inp
    return make


def _naive_continuants(a: Tensor, b: Tensor, c: Tensor, z: complex, causal: bool) -> Tensor:
    """What a user would write from the textbook: the theta/phi continuant recursion in complex128
    with a Python loop over N (vectorised over the batch), gradients by autograd through the loop.
    Exact in exact arithmetic; overflows past N ~ 700 (hence NAIVE_MAX_N).

    a (B, N) real, b, c (N-1,) real -> (B, N) complex (complex64 unless a is float64)."""
    B, N = a.shape
    alpha = a.to(torch.complex128) - z
    k = (b * c).to(torch.complex128)
    theta = [torch.ones(B, dtype=torch.complex128, device=a.device), alpha[:, 0]]
    for i in range(1, N):
        theta.append(alpha[:, i] * theta[-1] - k[i - 1] * theta[-2])
    th = torch.stack(theta, 1)  # (B, N+1): th[:, i] = det of the leading i x i block
    if causal:
        out = th[:, :-1] / th[:, 1:]
    else:
        phi: List[Tensor] = [None] * (N + 1)  # type: ignore[list-item]
        phi[N] = torch.ones(B, dtype=torch.complex128, device=a.device)
        phi[N - 1] = alpha[:, N - 1]
        for i in range(N - 2, -1, -1):
            phi[i] = alpha[:, i] * phi[i + 1] - k[i] * phi[i + 2]
        ph = torch.stack(phi, 1)  # ph[:, i] = det of the trailing block starting at i
        out = th[:, :-1] * ph[:, 1:] / th[:, N:N + 1]
    return out.to(torch.complex128 if a.dtype == torch.float64 else torch.complex64)


def _dense_diag(a: Tensor, b: Tensor, c: Tensor, z: complex) -> Tensor:
    """The dense oracle a user might reach for: diag(inv(H - zI)), O(N^3) per row, autograd."""
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    B, N = a.shape
    T = torch.diag_embed(a.to(cdt) - z)
    T = T + torch.diag_embed(b.to(cdt), 1) + torch.diag_embed(c.to(cdt), -1)
    return torch.linalg.inv(T).diagonal(dim1=-2, dim2=-1)


def _cpp_op_impl(causal: bool, zri: Tensor) -> Impl:
    """The compiled CPU op called directly on the public [B, N] tensors: the C++ kernel and the
    dispatcher (with the registered autograd), without the Python argument checks, canonicalisation
    and backend dispatch of ``ops.bk_core``; the off-diagonal product is still formed per call, so
    gradients reach super and sub as through the public op."""
    if "cpp" not in ops.available_backends():
        return Impl("cpp-op", "backend", "C++ op called directly", None, skip=ops.backend_status()["cpp"])
    op = torch.ops.resnet_bk.bk_core_fwd

    def fn(x):
        k = (x["super"] * x["sub"]).view(1, -1)
        return op(x["diag"], k, zri, None, causal)
    return Impl("cpp-op", "backend", "C++ op called directly (torch.ops.resnet_bk.bk_core_fwd on the [B, N] diag "
                "and the (N-1,) off-diagonal product: the kernel, the dispatcher and the registered autograd, "
                "without ops.bk_core's Python checks and dispatch)", fn)


def _bk_case(variant: str) -> OpCase:
    causal = variant == "causal"
    masked = variant == "masked"
    op_name = "bk_core_masked" if masked else "bk_core"

    def call(backend: Optional[str]):
        if masked:
            return lambda x: ops.bk_core_masked(x["diag"], x["super"], x["sub"], x["z"], x["mask"], backend=backend)
        return lambda x: ops.bk_core(x["diag"], x["super"], x["sub"], x["z"], causal=causal, backend=backend)

    def impls(size, dtype, device, inp) -> List[Impl]:
        N = size["N"]
        out = [Impl("reference", "baseline", "reference backend (= the plain-PyTorch pivot loop)", call("reference"),
                    split=True)]
        if masked:
            out += _backend_impls(ops.bk_core_masked, (inp["diag"], inp["super"], inp["sub"], inp["z"], inp["mask"]),
                                  {"causal": causal}, call)
        else:
            out += _backend_impls(ops.bk_core, (inp["diag"], inp["super"], inp["sub"], inp["z"]), {"causal": causal},
                                  call)
        if device.type == "cpu" and not masked:
            z = inp["z"]
            zri = torch.tensor([complex(z).real, complex(z).imag], dtype=dtype, device=device)
            out.append(_cpp_op_impl(causal, zri))
        out += _huge_pages_impl(out, device, 2 * size["B"] * N * _dsize(dtype), call)

        def naive(x):
            y = _naive_continuants(x["diag"], x["super"], x["sub"], x["z"], causal)
            return y * x["mask"] if masked else y

        out.append(Impl("naive", "baseline", "textbook theta/phi continuants, Python loop, autograd", naive,
                        skip=None if N <= NAIVE_MAX_N else
                        f"continuants overflow complex128 past N ~ 700 (N = {N}; ORIGINAL_DESIGN 3.1b)"))
        if causal:
            out.append(Impl("dense", "baseline", "torch.linalg.inv diagonal", None,
                            skip="no one-call dense equivalent of the causal variant (N leading-block inverses)"))
        else:
            def dense(x):
                y = _dense_diag(x["diag"], x["super"], x["sub"], x["z"])
                return y * x["mask"] if masked else y
            work = size["B"] * N ** 3
            out.append(Impl("dense", "baseline", "torch.linalg.inv diagonal (O(B N^3))", dense,
                            skip=None if work <= DENSE_MAX_WORK else
                            f"O(B N^3) dense inverse run only for B*N^3 <= 8*256^3 (seconds per call beyond)"))
        return out

    def bytes_moved(size, dtype, mode) -> int:
        # The minimum traffic: read diag (and mask), write the complex output; backward reads the
        # complex upstream gradient and diag (the pivots are recomputed, never stored), writes grad_diag
        # (and grad_mask). The shared off-diagonal (N-1 values) is negligible.
        B, N = size["B"], size["N"]
        s = _dsize(dtype)
        fwd = B * N * (s + 2 * s + (s if masked else 0))
        bwd = B * N * (2 * s + s + s + (2 * s if masked else 0))
        return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]

    def ref_plan(size, dtype) -> Optional[str]:
        """None: time the reference. Else why it is only used for a row-subset check here."""
        if size["N"] <= REF_LARGE_N:
            return None
        if dtype == torch.float32 and not masked:
            return None
        return (f"reference not timed at N = {size['N']} for this dtype/variant (a Python loop over N: "
                f"tens of seconds per fwd+bwd); correctness checked on the first 2 rows")

    def ref_rows(inp: Inputs, rows: int) -> Inputs:
        sub = dict(inp)
        sub["diag"] = inp["diag"][:rows]
        if masked:
            sub["mask"] = inp["mask"][:rows]
        return sub

    return OpCase(
        name=op_name, variant=variant, group=op_name, unavailable=lambda: None,
        sizes=_bk_sizes, dtypes=_bk_dtypes, make_inputs=_bk_inputs(masked), impls=impls,
        elements=lambda s: s["B"] * s["N"], bytes_moved=bytes_moved,
        leaves=("diag", "mask") if masked else ("diag",), ref_plan=ref_plan, ref_rows=ref_rows,
        baseline_note=("reference = the plain-PyTorch pivot loop a user would write (vectorised over the batch); "
                       "naive = the textbook continuant recursion with autograd; dense = torch.linalg.inv"),
        claims={"goal_ns_per_element": "cpp, B=64 N=4096 float32 forward <= 0.8 ns/element",
                "goal_speedup_vs_reference": "cpp, B=64 N=4096 float32 forward >= 150x the reference",
                "goal_fwd_bwd_over_fwd": "cpp, B=64 N=4096 float32 forward+backward <= 3x forward"}
        if variant == "two-sided" else {},
    )


# ---------------------------------------------------------------------------------------------
# learned_downsample / learned_upsample (the multi-scale pooling ops)

POOL_R = 2
POOL_D = 64


def _pool_sizes(grid: str) -> List[Dict[str, int]]:
    if grid == "smoke":
        return [{"B": 2, "N": 64, "D": 16}]
    if grid == "quick":
        return [{"B": 8, "N": 256, "D": POOL_D}, {"B": 8, "N": 4096, "D": POOL_D}]
    return [{"B": 8, "N": N, "D": POOL_D} for N in (256, 4096, 65536)]


def _down_case() -> OpCase:
    def make(size, dtype, device, gen) -> Inputs:
        B, N, D = size["B"], size["N"], size["D"]
        x = torch.randn(B, N, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
        logits = torch.randn(N // POOL_R, POOL_R, generator=gen, dtype=torch.float64).to(dtype).to(device)
        return {"x": x, "logits": logits}

    def call(backend):
        return lambda i: ops.learned_downsample(i["x"], i["logits"], causal=True, backend=backend)

    def impls(size, dtype, device, inp):
        out = [Impl("reference", "baseline",
                    "reference backend (= the unfused softmax/pad/view/mul/sum a user would write)", call("reference"))]
        out += _backend_impls(ops.learned_downsample, (inp["x"], inp["logits"]), {"causal": True}, call)
        out += _huge_pages_impl(out, device, inp["x"].numel() * _dsize(dtype), call)  # grad_x
        return out

    def bytes_moved(size, dtype, mode):
        # forward reads x, writes (B, N/r, D); backward reads the upstream gradient and x (for the
        # logits' gradient), writes grad_x.
        B, N, D = size["B"], size["N"], size["D"]
        s = _dsize(dtype)
        fwd = B * N * D * s + B * (N // POOL_R) * D * s
        bwd = B * (N // POOL_R) * D * s + 2 * B * N * D * s
        return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]

    return OpCase(
        name="learned_downsample", variant=f"causal,r={POOL_R}", group="learned_downsample",
        unavailable=lambda: None, sizes=_pool_sizes,
        dtypes=lambda g: [torch.float32] if g in ("smoke", "quick") else [torch.float32, torch.float64],
        make_inputs=make, impls=impls, elements=lambda s: s["B"] * s["N"] * s["D"], bytes_moved=bytes_moved,
        leaves=("x", "logits"),
        baseline_note="reference = unfused softmax/pad/view/mul/sum (what a user writes in PyTorch)")


def _up_case() -> OpCase:
    def make(size, dtype, device, gen) -> Inputs:
        B, N, D = size["B"], size["N"], size["D"]
        M = N // POOL_R
        y = torch.randn(B, M, POOL_R * D, generator=gen, dtype=torch.float64).to(dtype).to(device)
        bias = torch.randn(1, POOL_R, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
        res = torch.randn(B, N, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
        scale = torch.tensor(0.5, dtype=dtype, device=device)
        return {"y": y, "bias": bias, "residual": res, "scale": scale}

    def call(backend):
        return lambda i: ops.learned_upsample(i["y"], i["bias"], i["residual"], i["scale"], backend=backend)

    def impls(size, dtype, device, inp):
        out = [Impl("reference", "baseline",
                    "reference backend (= the unfused view/add/mul/add a user would write)", call("reference"))]
        out += _backend_impls(ops.learned_upsample, (inp["y"], inp["bias"], inp["residual"], inp["scale"]), {}, call)
        out += _huge_pages_impl(out, device, inp["residual"].numel() * _dsize(dtype), call)  # out
        return out

    def bytes_moved(size, dtype, mode):
        # forward reads y and the residual, writes the output; backward reads the upstream gradient
        # and y (for the scale's gradient), writes grad_y (grad_residual is the upstream gradient).
        B, N, D = size["B"], size["N"], size["D"]
        s = _dsize(dtype)
        fwd = 3 * B * N * D * s
        bwd = 3 * B * N * D * s
        return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]

    return OpCase(
        name="learned_upsample", variant=f"residual+scale,r={POOL_R}", group="learned_upsample",
        unavailable=lambda: None, sizes=_pool_sizes,
        dtypes=lambda g: [torch.float32] if g in ("smoke", "quick") else [torch.float32, torch.float64],
        make_inputs=make, impls=impls, elements=lambda s: s["B"] * s["N"] * s["D"], bytes_moved=bytes_moved,
        leaves=("y", "bias", "residual", "scale"),
        baseline_note="reference = unfused reshape/add/mul/add (what a user writes in PyTorch)")


# ---------------------------------------------------------------------------------------------
# bk_core_step: the one-token decode step, timed over a decode loop of N = STEP_TOKENS tokens

STEP_TOKENS = 64  # tokens decoded per timed call: time per token = time / STEP_TOKENS


def _step_sizes(grid: str) -> List[Dict[str, int]]:
    if grid == "smoke":
        return [{"B": 1, "N": 8}]
    return [{"B": B, "N": STEP_TOKENS} for B in (1, 16, 256)]


def _step_inputs(size, dtype, device, gen) -> Inputs:
    # diag (T, B): the row of token t is contiguous, as a decode loop produces it; one shared
    # off-diagonal b = c = 1 (the model's H0), one 0-dim coupling per step taken out beforehand
    B, T = size["B"], size["N"]
    diag = (torch.rand(T, B, generator=gen, dtype=torch.float64) * 6 - 5).to(dtype).to(device)
    off = torch.ones(max(T - 1, 1), dtype=dtype, device=device)
    return {"diag": diag, "super": off[: T - 1], "sub": off[: T - 1], "z": 1j, "couplings": off.unbind(0)}


def _decode(backend: Optional[str]):
    """Decodes the T tokens one step at a time: under no_grad (the forward rows) with out= and
    inplace=True into one preallocated (T, B) output and one state (no allocation per step);
    with grad (the backward rows) the differentiable functional step. Returns (B, T)."""
    def fn(x):
        diag, cpl, z = x["diag"], x["couplings"], x["z"]
        T, B = diag.shape
        cdt = torch.complex128 if diag.dtype == torch.float64 else torch.complex64
        if not torch.is_grad_enabled():
            ys = torch.empty(T, B, dtype=cdt, device=diag.device)
            y, state = ops.bk_core_step(diag[0], cpl[0], cpl[0], z, None, backend=backend)
            ys[0].copy_(y)
            for t in range(1, T):
                ops.bk_core_step(diag[t], cpl[t - 1], cpl[t - 1], z, state, out=ys[t], inplace=True, backend=backend)
            return ys.T
        y, state = ops.bk_core_step(diag[0], cpl[0], cpl[0], z, None, backend=backend)
        ys = [y]
        for t in range(1, T):
            y, state = ops.bk_core_step(diag[t], cpl[t - 1], cpl[t - 1], z, state, backend=backend)
            ys.append(y)
        return torch.stack(ys, 1)
    return fn


def _step_case() -> OpCase:
    def impls(size, dtype, device, inp) -> List[Impl]:
        def whole(x):
            return ops.bk_core(x["diag"].T, x["super"], x["sub"], x["z"], causal=True, backend="reference")
        out = [Impl("reference", "baseline", "bk_core(causal=True) of the whole T-token sequence, reference backend "
                    "(the correctness oracle)", whole)]
        B = size["B"]
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        state = torch.ones(B, dtype=cdt, device=device)
        cpl = inp["couplings"][0]
        out += _backend_impls(ops.bk_core_step, (inp["diag"][0], cpl, cpl, inp["z"], state), {}, _decode)
        out.append(Impl("step-reference", "baseline", "the decode loop on the step's reference backend (plain "
                        "PyTorch per step)", _decode("reference")))
        return out

    def bytes_moved(size, dtype, mode) -> int:
        # per token: read diag and the state, write y and the new state
        B, T = size["B"], size["N"]
        s = _dsize(dtype)
        fwd = B * T * (s + 6 * s)
        bwd = B * T * (2 * s + 2 * s + s)
        return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]

    return OpCase(
        name="bk_core_step", variant="decode", group="step", unavailable=lambda: None,
        sizes=_step_sizes, dtypes=lambda g: [torch.float32], make_inputs=_step_inputs, impls=impls,
        elements=lambda s: s["B"] * s["N"], bytes_moved=bytes_moved, leaves=("diag",),
        baseline_note=("one call decodes N tokens step by step (forward rows: no_grad, out= + inplace=True, no "
                       "allocation per step; backward rows: the differentiable step); time per token = time / N; "
                       "checked against bk_core(causal=True) of the same N tokens"),
    )


def op_cases() -> List[OpCase]:
    from .bench_stream import stream_cases
    return ([_bk_case("two-sided"), _bk_case("causal"), _bk_case("masked"), _down_case(), _up_case(), _step_case()]
            + stream_cases())


OP_GROUPS = ("bk_core", "bk_core_masked", "learned_downsample", "learned_upsample", "step", "stream")
