"""The CUDA BK-Core kernels (csrc/cuda/bk_core_cuda.cu), run on the CPU under an emulation of the
CUDA execution model (tests/cuda_emu/emu.h: each block's threads are real concurrent threads with
a real barrier), against the pure-PyTorch reference.

This checks, without a GPU, everything in the kernels that is not GPU hardware: lane geometry,
shared-memory tiling and padding, the plans (whole rows per block, rows over several blocks,
with their Moebius and affine scans for the carries), the mask, shared/per-row k, grad_z's
deterministic reduction and that every scratch cell read was written (the workspace is NaN-filled).
What it cannot check: the torch binding (tests/cuda/test_cuda_ops.py on a GPU), real memory-model
races beyond what concurrent threads expose, and speed.

The .cu file is compiled unchanged except that each `kernel<<<grid, block, 0, stream>>>(args)`
launch is rewritten into a call of the emulator.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess

import pytest
import torch

from resnet_bk.ops.bk_core.reference import bk_core_bwd_ref, bk_core_fwd_ref
from helpers import tol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU = os.path.join(ROOT, "tests", "kernels", "cuda_emu")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) on PATH")

STRATEGY = {"auto": 0, "lanes": 1, "chunked": 2}


def _split_top(s, sep=","):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def rewrite_launches(src: str) -> str:
    """`name<<<grid, block, smem, stream>>>(args);` -> `bk_emu::launch(grid, block, [&] { name(args); });`"""
    out, pos, count = [], 0, 0
    pat = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<")
    while True:
        m = pat.search(src, pos)
        if not m:
            out.append(src[pos:])
            break
        cfg_end = src.index(">>>", m.end())
        cfg = _split_top(src[m.end():cfg_end])
        assert len(cfg) in (2, 3, 4), cfg
        i = cfg_end + 3
        assert src[i] == "(", src[i:i + 20]
        depth, j = 0, i
        while True:
            if src[j] == "(":
                depth += 1
            elif src[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        args = src[i + 1:j]
        assert src[j + 1] == ";", src[j:j + 10]
        out.append(src[pos:m.start()])
        name = m.group(1).split("<")[0]
        out.append(f"bk_emu::launch(unsigned({cfg[0]}), unsigned({cfg[1]}), [&]() {{ {m.group(1)}({args}); }}, "
                   f"\"{name}\");")
        pos = j + 2
        count += 1
    assert count > 0, "no kernel launch found to rewrite"
    return "".join(out)


def build_emulated(tmp_path_factory, cu_name, api_name):
    """Compiles csrc/cuda/<cu_name> (launches rewritten) + tests/cuda_emu/<api_name> into a shared library."""
    cu = os.path.join(ROOT, "csrc", "cuda", cu_name)
    with open(cu) as f:
        src = rewrite_launches(f.read())
    api_path = os.path.join(EMU, api_name)
    with open(api_path) as f:
        api = f.read()
    extra = "".join(open(os.path.join(EMU, n)).read() for n in sorted(os.listdir(EMU)) if n.endswith(".h"))
    key = hashlib.sha256((src + api + extra).encode()).hexdigest()[:16]
    d = tmp_path_factory.mktemp("cuda_emu")
    unit = d / (cu_name + ".emu.cpp")
    # #line keeps compiler messages pointing at the real files
    unit.write_text(f'#line 1 "{cu}"\n' + src + f'\n#line 1 "{api_path}"\n' + api)
    lib = d / f"{cu_name}_{key}.so"
    cmd = [CXX, "-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unused-function",
           "-I", EMU, "-I", os.path.join(ROOT, "csrc", "cuda"), "-include", os.path.join(EMU, "emu.h"),
           str(unit), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.join(ROOT, "csrc", "cuda"))
    assert r.returncode == 0, f"emulation build failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulated(tmp_path_factory, "bk_core_cuda.cu", "bk_core_emu_api.cpp")


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None and t.numel() else ctypes.c_void_p(0)


def _state_ptrs(d_in, k_in):
    """A carried state (d_in (B,) complex, k_in (B,) real) as the kernels' pointers ((B, 2) real)."""
    assert (d_in is None) == (k_in is None)
    if d_in is None:
        return None, None
    return torch.view_as_real(d_in.resolve_conj()).contiguous(), k_in.contiguous()


def emu_forward(lib, a, k, zri, mask, causal, strategy="auto", chunk=0, sms=1, threads=0, d_in=None, k_in=None):
    B, N = a.shape
    dr, kr = _state_ptrs(d_in, k_in)
    out = torch.full((B, N, 2), float("nan"), dtype=a.dtype)
    plan = (ctypes.c_int64 * 6)()
    fn = getattr(lib, f"bk_emu_forward_{'f64' if a.dtype == torch.float64 else 'f32'}")
    ks = 0 if k.shape[0] == 1 else k.shape[1]
    rc = fn(_ptr(a), _ptr(k), ctypes.c_int64(ks), _ptr(zri), _ptr(mask), ctypes.c_int64(B), ctypes.c_int64(N),
            ctypes.c_int(int(causal)), _ptr(dr), _ptr(kr), _ptr(out), ctypes.c_int(STRATEGY[strategy]),
            ctypes.c_int64(chunk),
            ctypes.c_int(sms), ctypes.c_int(threads), plan)
    assert rc == 0
    return torch.view_as_complex(out), tuple(plan)


def emu_backward(lib, grad, a, k, zri, mask, causal, need_mask_grad, strategy="auto", chunk=0, sms=1, threads=0,
                 need_k_grad=True, d_in=None, k_in=None):
    """((grad_a, grad_k, grad_z, grad_mask), plan); grad_k is None when not asked for (the kernel gets
    a null pointer), grad_mask None without need_mask_grad. With a carried state (d_in, k_in) the
    grads end with mu0 (B,) complex, mu at each row's position 0."""
    B, N = a.shape
    nan = float("nan")
    dr, kr = _state_ptrs(d_in, k_in)
    gr = torch.view_as_real(grad.resolve_conj()).contiguous()
    ga = torch.full((B, N), nan, dtype=a.dtype)
    gk = torch.full((B, N - 1), nan, dtype=a.dtype) if need_k_grad else None
    gz = torch.full((2,), nan, dtype=a.dtype)
    gm = torch.full((B, N), nan, dtype=a.dtype) if need_mask_grad else None
    mu0 = torch.full((B, 2), nan, dtype=a.dtype) if d_in is not None else None
    plan = (ctypes.c_int64 * 6)()
    fn = getattr(lib, f"bk_emu_backward_{'f64' if a.dtype == torch.float64 else 'f32'}")
    ks = 0 if k.shape[0] == 1 else k.shape[1]
    rc = fn(_ptr(a), _ptr(k), ctypes.c_int64(ks), _ptr(zri), _ptr(mask), ctypes.c_int64(B), ctypes.c_int64(N),
            ctypes.c_int(int(causal)), _ptr(dr), _ptr(kr), _ptr(gr), _ptr(ga), _ptr(gk), _ptr(gz), _ptr(gm),
            _ptr(mu0), ctypes.c_int(STRATEGY[strategy]), ctypes.c_int64(chunk), ctypes.c_int(sms),
            ctypes.c_int(threads), plan)
    assert rc == 0
    if gk is not None and k.shape[0] == 1 and B != 1:
        gk = gk.sum(0, keepdim=True)
    if mu0 is not None:
        return (ga, gk, gz, gm, torch.view_as_complex(mu0)), tuple(plan)
    return (ga, gk, gz, gm), tuple(plan)


def make_canon(B, N, dtype, shared, masked, seed):
    g = torch.Generator().manual_seed(seed)
    a = (-2.0 + 6.0 * torch.rand(B, N, generator=g, dtype=torch.float64) - 3.0).to(dtype)
    k = ((0.5 + torch.rand(1 if shared else B, max(N - 1, 0), generator=g, dtype=torch.float64))
         * (0.5 + torch.rand(1 if shared else B, max(N - 1, 0), generator=g, dtype=torch.float64))).to(dtype)
    zri = torch.tensor([0.3, 0.8], dtype=dtype)
    mask = None
    if masked:
        mask = (torch.rand(B, N, generator=g) > 0.3).to(dtype)
        mask[:, 0] = 0.5  # a straight-through value, not only 0/1
    grad = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype) \
        + 1j * torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    return a, k, zri, mask, grad


def rel(got, ref):
    got, ref = got.to(torch.complex128), ref.to(torch.complex128)
    assert torch.isfinite(torch.view_as_real(got)).all(), "non-finite (unwritten or poisoned) output"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


# the op layer's policy: float64 held 10x tighter (the emulated kernel does the reference's float64
# arithmetic in another order only), float32 doubled (the GPU kernels' chunked scans round differently)
TOL = {torch.float64: tol(torch.float64, 0.1), torch.float32: tol(torch.float32, 2)}

# (B, N, strategy, chunk): lanes with partial blocks, auto-chunked, forced chunk lengths that do
# and do not divide N, chunk length 1, and a chunk length crossing the tile size.
CASES = [
    (1, 1, "lanes", 0), (3, 1, "chunked", 0), (1, 2, "chunked", 0), (3, 2, "lanes", 0),
    (3, 17, "lanes", 0), (3, 17, "chunked", 0), (2, 17, "chunked", 1), (65, 33, "lanes", 0),
    (2, 300, "auto", 0), (3, 301, "chunked", 37), (1, 700, "chunked", 64), (5, 130, "chunked", 9),
]


@pytest.mark.parametrize("B,N,strategy,chunk", CASES, ids=[f"B{b}-N{n}-{s}{c or ''}" for b, n, s, c in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_forward_backward(emu, B, N, strategy, chunk, causal, dtype):
    seed = B * 1000 + N + 7 * causal
    for shared, masked in ((False, False), (True, True)):
        a, k, zri, mask, grad = make_canon(B, N, dtype, shared, masked, seed)
        out, plan = emu_forward(emu, a, k, zri, mask, causal, strategy, chunk)
        # plan: S, T, segs, rpb, cb, blocks
        if strategy == "lanes":
            assert plan[0] == 8
        elif chunk:
            assert plan[0] == min(chunk, 8), plan
        ref = bk_core_fwd_ref(a.double(), k.double(), zri.double(), None if mask is None else mask.double(), causal)
        assert rel(out, ref) < TOL[dtype]
        grads, plan_b = emu_backward(emu, grad, a, k, zri, mask, causal, masked, strategy, chunk)
        assert plan_b == plan
        want = bk_core_bwd_ref(grad.to(torch.complex128), a.double(), k.double(), zri.double(),
                               None if mask is None else mask.double(), causal)
        for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask"), grads, want):
            if y is None or y.numel() == 0:
                continue
            assert x.shape == y.shape, name
            assert rel(x, y) < TOL[dtype], name


def test_emulated_deterministic_and_long(emu):
    """Chunked float32 at N = 20,000 (one sequence) stays within 1e-5 of float64; two runs agree bitwise."""
    a, k, zri, _, grad = make_canon(1, 20000, torch.float32, True, False, 3)
    outs = [emu_forward(emu, a, k, zri, None, False, "auto", 0, sms=4) for _ in range(2)]
    assert outs[0][1][4] > 1  # several blocks per row
    assert torch.equal(outs[0][0], outs[1][0])
    ref = bk_core_fwd_ref(a.double(), k.double(), zri.double(), None, False)
    assert rel(outs[0][0], ref) < 1e-5
    g1 = emu_backward(emu, grad, a, k, zri, None, False, False, "auto", 0, sms=4)[0]
    g2 = emu_backward(emu, grad, a, k, zri, None, False, False, "auto", 0, sms=4)[0]
    for x, y in zip(g1[:3], g2[:3]):
        assert torch.equal(x, y)
    want = bk_core_bwd_ref(grad.to(torch.complex128), a.double(), k.double(), zri.double(), None, False)
    for x, y in zip(g1[:3], want[:3]):
        assert rel(x, y) < 1e-5


def test_emulated_empty_batch(emu):
    a = torch.zeros(0, 5, dtype=torch.float64)
    k = torch.zeros(1, 4, dtype=torch.float64)
    zri = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads, _ = emu_backward(emu, torch.zeros(0, 5, dtype=torch.complex128), a, k, zri, None, False, False)
    assert torch.equal(grads[2], torch.zeros(2, dtype=torch.float64))


class _EmuBK(torch.autograd.Function):
    """The emulated CUDA kernels as an autograd function of the canonical arguments (forced to the
    chunked strategy, so the carries between chunks are exercised too)."""

    @staticmethod
    def forward(ctx, lib, a, k, zri, mask, causal):
        ctx.lib, ctx.causal = lib, causal
        ctx.save_for_backward(a, k, zri, mask)
        return emu_forward(lib, a, k, zri, mask, causal, "chunked", 5)[0]

    @staticmethod
    def backward(ctx, grad):
        a, k, zri, mask = ctx.saved_tensors
        (ga, gk, gz, gm), _ = emu_backward(ctx.lib, grad, a, k, zri, mask, ctx.causal, mask is not None,
                                           "chunked", 5)
        return None, ga, gk, gz, gm, None


def test_emulated_streaming(emu, monkeypatch):
    """The streaming forms (carried state, packed sequences) on the CUDA kernels: the op layer's
    ghost positions and zeroed boundary couplings become ordinary canonical calls, here run on the
    emulated kernels: chained chunks == the whole sequence, packed == each sequence alone, values
    and gradients."""
    from resnet_bk import ops
    from resnet_bk.ops.bk_core import stream

    calls = []

    def dispatch(a, k, zri, mask, causal, backend):
        calls.append(a.shape)
        return _EmuBK.apply(emu, a, k, zri, mask, causal)

    monkeypatch.setattr(stream, "_dispatch", dispatch)
    g = torch.Generator().manual_seed(3)
    B, N, z = 2, 23, 0.3 + 0.8j
    a = torch.randn(B, N, generator=g, dtype=torch.float64)
    b = 0.5 + torch.rand(N - 1, generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(N - 1, generator=g, dtype=torch.float64)
    w = torch.randn(B, N, generator=g, dtype=torch.complex128)
    res = []
    for chain in (False, True):
        aa = a.clone().requires_grad_(True)
        if chain:
            ys, st = [], None
            for lo, hi in ((0, 1), (1, 9), (9, 10), (10, N)):
                kw = dict(initial_state=st) if st is not None else {}
                sl = slice(lo - 1, hi - 1) if st is not None else slice(lo, hi - 1)
                y, st = ops.bk_core(aa[:, lo:hi], b[sl], c[sl], z, causal=True, output_final_state=True, **kw)
                ys.append(y)
            y = torch.cat(ys, 1)
        else:
            y = ops.bk_core_ref(aa, b, c, z, causal=True)
        (y * w).real.sum().backward()
        res.append((y.detach(), aa.grad))
    assert calls, "the emulated kernels were not used"
    assert rel(res[1][0], res[0][0]) < 1e-12 and rel(res[1][1], res[0][1]) < 1e-11
    # packed sequences, two-sided and causal, one of them empty and one of length 1
    lengths = [6, 0, 1, 9]
    T = sum(lengths)
    cu = torch.tensor([0, 6, 6, 7, 16], dtype=torch.int32)
    pa = torch.randn(T, generator=g, dtype=torch.float64)
    pk = 0.5 + torch.rand(T - 1, generator=g, dtype=torch.float64)
    for causal in (False, True):
        got = ops.bk_core(pa, pk, torch.ones_like(pk), z, causal=causal, cu_seqlens=cu)
        want = ops.bk_core_ref(pa, pk, torch.ones_like(pk), z, causal=causal, cu_seqlens=cu)
        assert rel(got, want) < 1e-12


# ---- the decode step (csrc/cuda/bk_step_cuda.cu) --------------------------------------------------

@pytest.fixture(scope="module")
def emu_step(tmp_path_factory):
    return build_emulated(tmp_path_factory, "bk_step_cuda.cu", "bk_step_emu_api.cpp")


def emu_step_call(lib, a, b, c, zri, state, inplace=False):
    """The step kernel on flat canonical arguments; outputs NaN-filled first (an unwritten entry
    fails). inplace: d is written into state."""
    n = a.numel()
    y = torch.full((n, 2), float("nan"), dtype=a.dtype)
    if inplace:
        d = torch.view_as_real(state)
    else:
        d = torch.full((n, 2), float("nan"), dtype=a.dtype)
    s = None if state is None else torch.view_as_real(state)
    fn = getattr(lib, f"bk_emu_step_{'f64' if a.dtype == torch.float64 else 'f32'}")
    rc = fn(_ptr(a), _ptr(b), ctypes.c_int64(0 if b.numel() == 1 else 1), _ptr(c),
            ctypes.c_int64(0 if c.numel() == 1 else 1), _ptr(zri), _ptr(s), _ptr(y), _ptr(d), ctypes.c_int64(n))
    assert rc == 0
    return torch.view_as_complex(y), (state if inplace else torch.view_as_complex(d))


@pytest.mark.parametrize("n", [0, 1, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_step(emu_step, n, dtype):
    """One step over n sequences (partial last block of 128 threads), shared and per-row couplings,
    without a state, with one, and in place; a decoded sequence equals the causal bk_core."""
    from resnet_bk.ops.bk_core.step import step_reference
    g = torch.Generator().manual_seed(n)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    a = (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 5).to(dtype)
    zri = torch.tensor([0.3, 0.8], dtype=dtype)
    state = (torch.randn(n, generator=g, dtype=torch.complex128) + 2).to(cdt)
    for shared in (False, True):
        m = 1 if shared else n
        b = (0.5 + torch.rand(m, generator=g, dtype=torch.float64)).to(dtype)
        c = (0.5 + torch.rand(m, generator=g, dtype=torch.float64)).to(dtype)
        bb, cc = (b.reshape(()), c.reshape(())) if shared else (b, c)
        for st in (None, state):
            y, d = emu_step_call(emu_step, a, b, c, zri, st)
            ry, rd = step_reference(a.double(), bb.double(), cc.double(), zri.double(),
                                    None if st is None else st.to(torch.complex128))
            if n:
                assert rel(y, ry) < TOL[dtype] and rel(d, rd) < TOL[dtype]
        s2 = state.clone()
        y, d = emu_step_call(emu_step, a, b, c, zri, s2, inplace=True)
        ry, rd = step_reference(a.double(), bb.double(), cc.double(), zri.double(), state.to(torch.complex128))
        if n:
            assert d is s2 and rel(s2, rd) < TOL[dtype] and rel(y, ry) < TOL[dtype]


def test_emulated_step_decodes_the_causal_sequence(emu_step):
    a, k, zri, _, _ = make_canon(5, 40, torch.float64, False, False, 11)
    b, c = k, torch.ones_like(k)  # the kernel multiplies b * c: k itself as b, c = 1
    state = None
    ys = []
    for t in range(40):
        j = max(t - 1, 0)
        y, state = emu_step_call(emu_step, a[:, t].contiguous(), b[:, j].contiguous(), c[:, j].contiguous(), zri,
                                 state)
        ys.append(y)
    ref = bk_core_fwd_ref(a, k, zri, None, True)
    assert rel(torch.stack(ys, 1), ref) < 1e-12


# Geometries forced small (positions per thread S, threads per block T) so that tiny N
# exercises every carry path: whole rows per block (several, one, a partial last block), rows over
# several blocks (block maps + per-row scan), a row scan whose threads compose runs of several block
# maps (cb > 256), one-position segments, and odd N (row starts not 16-byte aligned: scalar
# heads and tails around the vector loads and stores).
GEOMS = [(9, 5, 2, 32), (7, 9, 2, 8), (5, 37, 8, 4), (3, 100, 3, 4), (2, 513, 1, 1), (1, 1200, 2, 2),
         (4, 64, 8, 128), (3, 1, 1, 4)]


@pytest.mark.parametrize("B,N,S,T", GEOMS, ids=[f"B{b}-N{n}-S{s}-T{t}" for b, n, s, t in GEOMS])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_forward_geometries(emu, B, N, S, T, causal, dtype):
    for shared, masked in ((False, False), (True, True)):
        a, k, zri, mask, grad = make_canon(B, N, dtype, shared, masked, B * 31 + N + S)
        out, plan = emu_forward(emu, a, k, zri, mask, causal, "chunked", S, threads=T)
        assert plan[0] == min(S, 8) and plan[1] == T
        segs = -(-N // plan[0])
        assert plan[4] == (1 if segs <= T else -(-segs // T)), plan
        md = None if mask is None else mask.double()
        ref = bk_core_fwd_ref(a.double(), k.double(), zri.double(), md, causal)
        assert rel(out, ref) < TOL[dtype]
        grads, _ = emu_backward(emu, grad, a, k, zri, mask, causal, masked, "chunked", S, threads=T)
        want = bk_core_bwd_ref(grad.to(torch.complex128), a.double(), k.double(), zri.double(), md, causal)
        for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask"), grads, want):
            if y is None or y.numel() == 0:
                continue
            assert rel(x, y) < TOL[dtype], name


# ---- grad k not asked for: not written (a null pointer), grad a and grad z unchanged -------------

@pytest.mark.parametrize("B,N,S,T", [(3, 100, 3, 4), (5, 37, 8, 4)], ids=["multi-block", "rows-per-block"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_emulated_backward_without_grad_k(emu, B, N, S, T, causal):
    a, k, zri, mask, grad = make_canon(B, N, torch.float64, False, True, B + N)
    full, _ = emu_backward(emu, grad, a, k, zri, mask, causal, True, "chunked", S, threads=T)
    lean, _ = emu_backward(emu, grad, a, k, zri, mask, causal, True, "chunked", S, threads=T, need_k_grad=False)
    assert lean[1] is None and full[1] is not None
    for i in (0, 2, 3):  # grad a, grad z, grad mask: bitwise the same
        assert torch.equal(lean[i], full[i]), i


# ---- a carried state (causal): the CUDA kernels against the CPU kernel's state ops ---------------

HAS_STATE_CPU = hasattr(torch.ops, "resnet_bk") and hasattr(torch.ops.resnet_bk, "bk_core_fwd_state")


def make_state(B, dtype, seed):
    """d_in (B,) complex (Im < 0, as the pivots of Im z > 0), k_in (B,) real of both signs."""
    g = torch.Generator().manual_seed(seed)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    d_in = torch.complex(torch.randn(B, generator=g, dtype=torch.float64) * 2,
                         -(0.3 + torch.rand(B, generator=g, dtype=torch.float64))).to(cdt)
    k_in = ((torch.rand(B, generator=g, dtype=torch.float64) - 0.3) * 2).to(dtype)
    return d_in, k_in


# (B, N, S, T): whole rows per block (several, partial last block), rows over several blocks (a row's
# first block starts from the state, through the per-row scan), a row scan with runs (cb > 256),
# N = 1 (the state's coupling only), B = 64 with several rows per block and over several blocks.
# The emulation runs each block's threads as OS threads: the cases with many blocks are slow.
STATE_GEOMS = [(1, 1, 1, 4), (1, 37, 2, 4), (3, 17, 8, 32), (64, 5, 1, 32)]
STATE_GEOMS_SLOW = [(1, 1200, 2, 2), (3, 100, 3, 4), (3, 301, 8, 128), (64, 24, 8, 2)]
_STATE_PARAMS = [pytest.param(*g, id=f"B{g[0]}-N{g[1]}-S{g[2]}-T{g[3]}") for g in STATE_GEOMS] + [
    pytest.param(*g, id=f"B{g[0]}-N{g[1]}-S{g[2]}-T{g[3]}", marks=pytest.mark.slow) for g in STATE_GEOMS_SLOW]


@pytest.mark.skipif(not HAS_STATE_CPU, reason="resnet_bk._C without the CPU state ops")
@pytest.mark.parametrize("B,N,S,T", _STATE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_carried_state(emu, B, N, S, T, dtype):
    """bk_core_fwd_state / bk_core_bwd_state on the emulated CUDA kernels (the state entering each row's
    first block) == the CPU kernel's ops: y, grad a, grad k, grad z, grad mask and mu0."""
    ops = torch.ops.resnet_bk
    for shared, masked in ((False, False), (True, False), (False, True), (True, True)):
        seed = B * 131 + N + S * 7 + 2 * shared + masked
        a, k, zri, mask, grad = make_canon(B, N, dtype, shared, masked, seed)
        d_in, k_in = make_state(B, dtype, seed)
        out, plan = emu_forward(emu, a, k, zri, mask, True, "chunked", S, threads=T, d_in=d_in, k_in=k_in)
        assert plan[0] == min(S, 8) and plan[1] == T
        md = None if mask is None else mask.double()
        c128 = torch.complex128
        args64 = (a.double(), k.double(), zri.double(), md, d_in.to(c128), k_in.double())
        ref = ops.bk_core_fwd_state(*args64)
        assert rel(out, ref) < TOL[dtype], (shared, masked)
        # the state matters: a fresh start differs
        assert rel(emu_forward(emu, a, k, zri, mask, True, "chunked", S, threads=T)[0], ref) > 10 * TOL[dtype]
        grads, _ = emu_backward(emu, grad, a, k, zri, mask, True, masked, "chunked", S, threads=T,
                                d_in=d_in, k_in=k_in)
        want = ops.bk_core_bwd_state(grad.to(c128), *args64, masked, True, True)
        for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask", "mu0"), grads, want):
            if y.numel() == 0:  # no mask gradient asked for; grad k of N = 1
                assert x is None or x.numel() == 0, name
                continue
            assert x.shape == y.shape, name
            assert rel(x, y) < TOL[dtype], (name, shared, masked)


class _Sched:
    """Runs the emulated launches of the block with `resident` blocks at once (OS threads) in an order
    shuffled by `seed` (emu.h Sched), and/or with Plan::deterministic; restores the defaults."""

    def __init__(self, lib, resident=1, seed=0, deterministic=False):
        self.lib, self.resident, self.seed, self.det = lib, resident, seed, deterministic

    def __enter__(self):
        self.lib.bk_emu_set_sched(ctypes.c_int(self.resident), ctypes.c_uint(self.seed))
        self.lib.bk_emu_set_deterministic(ctypes.c_int(int(self.det)))
        return self

    def __exit__(self, *exc):
        self.lib.bk_emu_set_sched(ctypes.c_int(1), ctypes.c_uint(0))
        self.lib.bk_emu_set_deterministic(ctypes.c_int(0))


def acquired(lib, value, reset=True):
    """How often the look-back's acquire loads read `value` (0 empty, 1 aggregate, 2 inclusive)."""
    lib.bk_emu_acquired.restype = ctypes.c_uint64
    return int(lib.bk_emu_acquired(ctypes.c_int(value), ctypes.c_int(int(reset))))


# (B, N, S, T): causal rows over 6..50 blocks, with tiny blocks so that many run at once: windows of
# 2 and 4 predecessors (many rounds), rows of several blocks as a batch of 8, and windows of 32
LOOKBACK_GEOMS = [(1, 190, 2, 4), (2, 96, 1, 4), (8, 60, 2, 2), (1, 1600, 1, 32)]


@pytest.mark.skipif(not HAS_STATE_CPU, reason="resnet_bk._C without the CPU state ops")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_lookback_concurrent_blocks(emu, dtype):
    """Causal rows over several blocks take their carries by a decoupled look-back (a ticket per
    block, published maps and values). With 4 blocks running at once in shuffled orders, the forward
    and backward (with and without a carried state, mask, per-row couplings) match the reference,
    and the look-back's aggregate path (a predecessor still running: compose its map, look further)
    is taken, not only the inclusive one. With Plan::deterministic the row scan is used instead:
    every schedule gives bitwise the same results."""
    ops = torch.ops.resnet_bk
    c128 = torch.complex128
    acquired(emu, 1)
    for gi, (B, N, S, T) in enumerate(LOOKBACK_GEOMS):
        for shared, masked, state in ((True, False, False), (False, True, True)):
            seed = 17 * gi + 2 * shared + masked
            a, k, zri, mask, grad = make_canon(B, N, dtype, shared, masked, seed)
            st = dict(zip(("d_in", "k_in"), make_state(B, dtype, seed))) if state else {}
            md = None if mask is None else mask.double()
            if state:
                args64 = (a.double(), k.double(), zri.double(), md, st["d_in"].to(c128), st["k_in"].double())
                ref = ops.bk_core_fwd_state(*args64)
                want = ops.bk_core_bwd_state(grad.to(c128), *args64, masked, True, True)
            else:
                ref = bk_core_fwd_ref(a.double(), k.double(), zri.double(), md, True)
                want = bk_core_bwd_ref(grad.to(c128), a.double(), k.double(), zri.double(), md, True)
            det = []
            for run_seed in (1, 2, 3):
                for deterministic in (False, True):
                    with _Sched(emu, resident=4, seed=run_seed + 10 * gi, deterministic=deterministic):
                        out, plan = emu_forward(emu, a, k, zri, mask, True, "chunked", S, threads=T, **st)
                        grads, _ = emu_backward(emu, grad, a, k, zri, mask, True, masked, "chunked", S,
                                                threads=T, **st)
                    assert plan[4] >= 6, plan  # several blocks per row
                    assert rel(out, ref) < TOL[dtype], (B, N, run_seed, deterministic)
                    for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask", "mu0"), grads, want):
                        if y is None or y.numel() == 0:
                            continue
                        assert rel(x, y) < TOL[dtype], (name, B, N, run_seed, deterministic)
                    if deterministic:
                        det.append([out] + [x for x in grads if x is not None])
            for other in det[1:]:
                for x, y in zip(det[0], other):
                    assert torch.equal(x, y), "deterministic plan: results depend on the schedule"
    # the look-back saw predecessors that had published their map only (and waited for some)
    assert acquired(emu, 1) > 0
    assert acquired(emu, 2) > 0


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal-deterministic"])
def test_emulated_blocks_in_any_order(emu, causal):
    """Kernels without a look-back must not depend on the order or concurrency of their blocks: run
    with 3 blocks at once in shuffled orders, whole rows and rows over several blocks, forward and
    backward give bitwise the serial run's results (causal: under Plan::deterministic)."""
    for B, N, S, T in ((23, 12, 2, 32), (2, 300, 2, 8)):
        a, k, zri, mask, grad = make_canon(B, N, torch.float32, False, True, B + N)
        runs = []
        for resident, seed in ((1, 0), (3, 5), (3, 6)):
            with _Sched(emu, resident=resident, seed=seed, deterministic=True):
                out, plan = emu_forward(emu, a, k, zri, mask, causal, "chunked", S, threads=T)
                grads, _ = emu_backward(emu, grad, a, k, zri, mask, causal, True, "chunked", S, threads=T)
            runs.append([out] + list(grads))
        assert (plan[4] > 1) == (N == 300), plan
        for other in runs[1:]:
            for x, y in zip(runs[0], other):
                assert torch.equal(x, y)


def test_emulated_state_argument_errors(emu):
    """The launchers refuse a state on the two-sided op and half a state (d_in without k_in)."""
    a, k, zri, _, _ = make_canon(2, 9, torch.float64, False, False, 1)
    d_in, k_in = make_state(2, torch.float64, 1)
    dr = torch.view_as_real(d_in).contiguous()
    out = torch.empty(2, 9, 2, dtype=torch.float64)
    plan = (ctypes.c_int64 * 6)()
    for causal, din, kin in ((False, dr, k_in), (True, dr, None), (True, None, k_in)):
        rc = emu.bk_emu_forward_f64(_ptr(a), _ptr(k), ctypes.c_int64(8), _ptr(zri), _ptr(None), ctypes.c_int64(2),
                                    ctypes.c_int64(9), ctypes.c_int(int(causal)), _ptr(din), _ptr(kin), _ptr(out),
                                    ctypes.c_int(0), ctypes.c_int64(0), ctypes.c_int(1), ctypes.c_int(0), plan)
        assert rc != 0, (causal, din is None, kin is None)


_DEFAULTS_PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <new>
#include "bk_core_cuda.h"
// The bindings fill `bk_cuda::Problem<T> p;` / `Grads<T> g;` field by field: a field they leave out
// (no mask, no carried state, no grad k, no mu0) must be nullptr, as the kernels test it. With plain
// pointers (the GPU build), default-initialise over memory full of 0xff and look.
int main() {
  int bad = 0;
  {
    alignas(bk_cuda::Problem<float>) unsigned char buf[sizeof(bk_cuda::Problem<float>)];
    std::memset(buf, 0xff, sizeof buf);
    auto* p = new (buf) bk_cuda::Problem<float>;
    const void* ptrs[] = {p->a, p->k, p->zri, p->mask, p->d_in, p->k_in};
    for (const void* q : ptrs) bad += q != nullptr;
  }
  {
    alignas(bk_cuda::Grads<double>) unsigned char buf[sizeof(bk_cuda::Grads<double>)];
    std::memset(buf, 0xff, sizeof buf);
    auto* g = new (buf) bk_cuda::Grads<double>;
    const void* ptrs[] = {g->grad, g->grad_a, g->grad_k, g->grad_zri, g->grad_mask, g->mu0};
    for (const void* q : ptrs) bad += q != nullptr;
  }
  std::printf("%d\n", bad);
  return bad;
}
"""


def test_launcher_structs_default_to_null_pointers(tmp_path):
    """Problem / Grads as the GPU build sees them (plain pointers, no emulation): a default-initialised
    struct has every pointer null, so an optional input or output a binding does not set (the mask,
    a carried state, grad k, mu0) is absent, not an indeterminate address the kernel would follow."""
    src = tmp_path / "defaults.cpp"
    src.write_text(_DEFAULTS_PROGRAM)
    exe = tmp_path / "defaults"
    r = subprocess.run([CXX, "-std=c++20", "-O0", "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", EMU, str(src),
                        "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, f"{out.stdout.strip()} pointer members are not null after default initialisation"
