"""The CUDA backend (csrc/cuda: kernels + torch binding) on a GPU, against the float64 reference.

Skipped when there is no GPU or resnet_bk._C was built without CUDA kernels. Covers forward and
backward, two-sided and causal, masked, shared and per-row k, both kernel strategies (forced with
RESNET_BK_CUDA_STRATEGY, read once per process: one subprocess per strategy), float32 and float64, N in {1, 2, 17, 1000, 70000}, B in {1, 3, 64},
non-contiguous inputs, a non-default current stream, CUDA-graph capture and replay, determinism,
and the binding's argument errors.

Oracle: the pure-PyTorch reference in float64 on the CPU; for N = 70,000 the C++ CPU kernel in
float64 (itself held to the reference by tests/ops/bk_core/test_bk_core.py), because the reference's Python
loop over positions is too slow there.
"""
import os
import subprocess
import sys

import pytest
import torch

from resnet_bk import ops
from resnet_bk.ops import _extension
from resnet_bk.ops.bk_core.reference import bk_core_bwd_ref, bk_core_fwd_ref
from helpers import tol

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _extension.HAS_CUDA_KERNELS,
                       reason="resnet_bk._C was built without CUDA kernels (torch without CUDA or no nvcc)"),
]

FWD = lambda *a: torch.ops.resnet_bk.bk_core_fwd(*a)  # noqa: E731
BWD = lambda *a: torch.ops.resnet_bk.bk_core_bwd(*a)  # noqa: E731
# the policy, float32 doubled: the GPU reduces grad_k / grad_z in another order than the reference
TOL = {torch.float64: tol(torch.float64), torch.float32: tol(torch.float32, 2)}
TOL_Z = {torch.float64: tol(torch.float64), torch.float32: tol(torch.float32, 10)}  # grad_z sums B*N rounded terms


# The CUDA binding reads RESNET_BK_CUDA_STRATEGY / RESNET_BK_CUDA_CHUNK once per process: this process
# runs the strategy its environment names (auto when unset); test_every_strategy_in_its_own_process
# runs this file again once per forced strategy and chunk length.
STRATEGY = os.environ.get("RESNET_BK_CUDA_STRATEGY", "auto")
CHUNK = os.environ.get("RESNET_BK_CUDA_CHUNK")
IN_SUBPROCESS = os.environ.get("RESNET_BK_TEST_CUDA_SUBPROCESS") == "1"


@pytest.fixture
def strategy():
    return STRATEGY


def _run_self(env_extra, k):
    env = {k: v for k, v in os.environ.items() if k not in ("RESNET_BK_CUDA_STRATEGY", "RESNET_BK_CUDA_CHUNK")}
    env.update(env_extra, RESNET_BK_TEST_CUDA_SUBPROCESS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", k],
                          env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.skipif(IN_SUBPROCESS, reason="runs in the parent process only")
@pytest.mark.parametrize("env,k", [
    ({"RESNET_BK_CUDA_STRATEGY": "lanes"}, "vs_reference or long_sequences or public_api or masked_public or "
                                           "deterministic or current_stream or graph"),
    ({"RESNET_BK_CUDA_STRATEGY": "chunked"}, "vs_reference or long_sequences or public_api or masked_public or "
                                             "deterministic or current_stream or graph"),
] + [({"RESNET_BK_CUDA_CHUNK": c}, "forced_chunk") for c in ("1", "5", "64", "999")],
    ids=["lanes", "chunked", "chunk1", "chunk5", "chunk64", "chunk999"])
def test_every_strategy_in_its_own_process(env, k):
    r = _run_self(env, k)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.skipif(IN_SUBPROCESS, reason="runs in the parent process only")
@pytest.mark.parametrize("env,match", [
    ({"RESNET_BK_CUDA_STRATEGY": "fastest"}, "RESNET_BK_CUDA_STRATEGY: expected auto, lanes or chunked"),
    ({"RESNET_BK_CUDA_STRATEGY": "auto", "RESNET_BK_CUDA_CHUNK": "0"}, "RESNET_BK_CUDA_CHUNK: expected a positive integer"),
], ids=["bad-strategy", "bad-chunk"])
def test_bad_strategy_values_raise(env, match):
    code = ("import torch, resnet_bk\n"
            "a = torch.zeros(2, 10, device='cuda'); k = torch.ones(1, 9, device='cuda')\n"
            "zri = torch.tensor([0.0, 1.0], device='cuda')\n"
            "try:\n    torch.ops.resnet_bk.bk_core_fwd(a, k, zri, None, False)\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=300)
    assert "RAISED" in r.stdout and match in r.stdout, r.stdout + r.stderr


def canon(B, N, dtype, shared, masked, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    a = -2.0 + 6.0 * torch.rand(B, N, generator=g, dtype=torch.float64) - 3.0
    kr = 1 if shared else B
    k = (0.5 + torch.rand(kr, N - 1, generator=g, dtype=torch.float64)) * \
        (0.5 + torch.rand(kr, N - 1, generator=g, dtype=torch.float64))
    zri = torch.tensor([0.3, 0.8], dtype=torch.float64)
    mask = None
    if masked:
        mask = (torch.rand(B, N, generator=g) > 0.3).double()
        mask[:, 0] = 0.5
    grad = torch.complex(torch.randn(B, N, generator=g, dtype=torch.float64),
                         torch.randn(B, N, generator=g, dtype=torch.float64))
    cpu = (a, k, zri, mask, grad)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    dev = tuple(None if t is None else t.to(device, cdt if t.is_complex() else dtype) for t in cpu)
    # the oracle sees exactly the (rounded) inputs the kernel sees
    ref = tuple(None if t is None else t.cpu().to(torch.complex128 if t.is_complex() else torch.float64) for t in dev)
    return dev, ref


def oracle(ref, causal, need_mask):
    a, k, zri, mask, grad = ref
    if a.shape[1] > 5000:
        out = FWD(a, k, zri, mask, causal)
        ga, gk, gz, gm = BWD(grad, a, k, zri, mask, causal, need_mask)
        return out, (ga, gk, gz, gm if need_mask else None)
    out = bk_core_fwd_ref(a, k, zri, mask, causal)
    return out, bk_core_bwd_ref(grad, a, k, zri, mask, causal)


def rel(got, ref):
    got = got.cpu()
    got = got.to(torch.complex128) if got.is_complex() else got.double()
    ref = ref.to(got.dtype)
    assert torch.isfinite(torch.view_as_real(got) if got.is_complex() else got).all()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def check_all(dev, ref, causal, dtype):
    a, k, zri, mask, grad = dev
    need_mask = mask is not None
    out = FWD(a, k, zri, mask, causal)
    got = BWD(grad, a, k, zri, mask, causal, need_mask)
    want_out, want = oracle(ref, causal, need_mask)
    assert out.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    assert out.device == a.device and out.shape == a.shape
    assert rel(out, want_out) < TOL[dtype]
    assert got[1].shape == k.shape
    assert got[3].shape == ((a.shape if need_mask else (0,)))
    for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask"), got, want):
        if y is None or y.numel() == 0:
            continue
        assert x.device == a.device, name
        assert rel(x, y) < (TOL_Z if name == "grad_zri" else TOL)[dtype], name


GRID = [(B, N) for N in (1, 2, 17, 1000) for B in (1, 3, 64)]


@pytest.mark.parametrize("B,N", GRID, ids=[f"B{b}-N{n}" for b, n in GRID])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", ["perrow", "shared-masked"])
def test_vs_reference(strategy, B, N, causal, dtype, variant):
    shared = masked = variant == "shared-masked"
    dev, ref = canon(B, N, dtype, shared, masked, seed=B * 7 + N)
    check_all(dev, ref, causal, dtype)


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_long_sequences(strategy, B, causal, dtype):
    dev, ref = canon(B, 70000, dtype, shared=B != 3, masked=B == 3, seed=B)
    check_all(dev, ref, causal, dtype)


@pytest.mark.skipif(CHUNK is None, reason="runs with RESNET_BK_CUDA_CHUNK set (test_every_strategy_in_its_own_process)")
def test_forced_chunk_lengths():
    for causal in (False, True):
        dev, ref = canon(3, 1000, torch.float64, shared=False, masked=True, seed=int(CHUNK))
        check_all(dev, ref, causal, torch.float64)


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_public_api_noncontiguous_and_autograd(strategy, causal):
    B, H, N = 2, 3, 257
    g = torch.Generator().manual_seed(5)
    big = (-2.0 + 3.0 * torch.randn(B, H, 2 * N, generator=g, dtype=torch.float64)).cuda()
    a = big[..., ::2]
    assert not a.is_contiguous()
    b = (0.5 + torch.rand(N - 1, generator=g, dtype=torch.float64)).cuda()
    c = (0.5 + torch.rand(H, 2 * (N - 1), generator=g, dtype=torch.float64)).cuda()[:, 1::2]
    z = torch.tensor(0.2 + 0.9j, dtype=torch.complex128, device="cuda")
    up = torch.randn(B, H, N, dtype=torch.complex128, generator=g).cuda()

    def run(backend):
        ins = [t.detach().clone().requires_grad_() for t in (a, b, c, z)]
        out = ops.bk_core(*ins, causal=causal, backend=backend)
        grads = torch.autograd.grad(out, ins, up)
        return out, grads

    out, grads = run("cuda")
    ref_out, ref_grads = run("reference")
    assert rel(out, ref_out.cpu()) < 1e-10
    for x, y in zip(grads, ref_grads):
        assert rel(x, y.cpu()) < 1e-10


def test_masked_public_api_gets_mask_gradient(strategy):
    B, N = 4, 100
    dev, _ = canon(B, N, torch.float64, shared=False, masked=True, seed=9)
    a = dev[0]
    b = torch.ones(N - 1, dtype=torch.float64, device="cuda")
    mask = dev[3].clone().requires_grad_()
    ref_mask = mask.detach().clone().requires_grad_()
    out = ops.bk_core_masked(a, b, b, 1j, mask, backend="cuda")
    ref = ops.bk_core_masked(a, b, b, 1j, ref_mask, backend="reference")
    up = torch.randn_like(out)
    (gm,) = torch.autograd.grad(out, mask, up)
    (rgm,) = torch.autograd.grad(ref, ref_mask, up)
    assert rel(gm, rgm.cpu()) < 1e-10


class _Deterministic:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.on)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_deterministic(strategy, causal):
    """Two-sided: bitwise reproducible always (row scans). Causal rows over several blocks take the
    decoupled look-back, whose rounding depends on the order the blocks run in: bitwise reproducible
    under torch.use_deterministic_algorithms(True) (the row scans)."""
    dev, _ = canon(3, 5000, torch.float32, shared=True, masked=False, seed=1)
    a, k, zri, mask, grad = dev
    with _Deterministic(causal):
        r1 = BWD(grad, a, k, zri, mask, causal, False)
        r2 = BWD(grad, a, k, zri, mask, causal, False)
        for x, y in zip(r1[:3], r2[:3]):
            assert torch.equal(x, y)
        assert torch.equal(FWD(a, k, zri, mask, causal), FWD(a, k, zri, mask, causal))


@pytest.mark.parametrize("B", [1, 4, 64])
def test_lookback_long_rows(strategy, B):
    """Causal rows of thousands of blocks (a look-back over many blocks running at once, the first
    wave included), run several times: each run within the tolerance of the deterministic plan's
    (row scans) results, forward and backward, float32."""
    N = (1 << 22) // B
    dev, _ = canon(B, N, torch.float32, shared=True, masked=False, seed=B)
    a, k, zri, mask, grad = dev
    with _Deterministic(True):
        want_out = FWD(a, k, zri, mask, True)
        want = BWD(grad, a, k, zri, mask, True, False)
    for _ in range(5):
        out = FWD(a, k, zri, mask, True)
        got = BWD(grad, a, k, zri, mask, True, False)
        assert rel(out, want_out.cpu().to(torch.complex128)) < TOL[torch.float32]
        for name, x, y in zip(("grad_a", "grad_k", "grad_zri"), got[:3], want[:3]):
            assert rel(x, y.cpu().double()) < (TOL_Z if name == "grad_zri" else TOL)[torch.float32], name


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_runs_on_the_current_stream(strategy, causal):
    dev, _ = canon(3, 3000, torch.float32, shared=False, masked=True, seed=2)
    a, k, zri, mask, grad = dev
    want_out = FWD(a, k, zri, mask, causal)
    want = BWD(grad, a, k, zri, mask, causal, True)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # queue a long kernel first so that a launch on the wrong stream would race with it
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            big = big @ big / 64.0
        a2 = a + 0.0 * big[0, 0]
        out = FWD(a2, k, zri, mask, causal)
        got = BWD(grad, a2, k, zri, mask, causal, True)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(out, want_out)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_cuda_graph_capture_and_replay(strategy, causal):
    dev, _ = canon(3, 2000, torch.float32, shared=True, masked=True, seed=3)
    a, k, zri, mask, grad = (t.clone() for t in dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside capture (allocator pools, lazy init)
            FWD(a, k, zri, mask, causal)
            BWD(grad, a, k, zri, mask, causal, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = FWD(a, k, zri, mask, causal)
        grads = BWD(grad, a, k, zri, mask, causal, True)
    dev2, _ = canon(3, 2000, torch.float32, shared=True, masked=True, seed=4)
    for static, new in zip((a, k, zri, mask, grad), dev2):
        static.copy_(new)
    zri.copy_(torch.tensor([0.1, 1.3], device="cuda"))  # z is read on the device: replay sees the new one
    graph.replay()
    torch.cuda.synchronize()
    want_out = FWD(a, k, zri, mask, causal)
    want = BWD(grad, a, k, zri, mask, causal, True)
    assert torch.equal(out, want_out)
    for x, y in zip(grads, want):
        assert torch.equal(x, y)


def _model_step(x, v, h, logits, bias, z):
    """One step of a model that calls every CUDA op through the public API (Python z and scale)."""
    g = ops.bk_core(v, h, h, z)                                    # two-sided, shared off-diagonal
    y = ops.bk_core(v, h, h, z, causal=True)
    m = ops.bk_core_masked(v, h, h, z, v > 0)
    low = ops.learned_downsample(x, logits, causal=True)
    up = ops.learned_upsample(low.repeat(1, 1, 2), bias, residual=x, scale=0.5)
    loss = g.real.sum() + y.imag.sum() + m.abs().sum() + up.square().sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("new_z_in_capture", [False, True], ids=["z-seen", "z-new"])
def test_model_step_capture_after_one_warmup(new_z_in_capture):
    """A training step calling every op (forward and backward, Python z and scale) is captured after
    one warm-up and replays to the eager result: no host-to-device copy inside capture (a Python z
    seen for the first time is filled on the device) and no free of a tensor the graph reads."""
    torch.manual_seed(0)
    B, N, D = 4, 256, 8
    x = torch.randn(B, N, D, device="cuda", requires_grad=True)
    v = (-2.0 + torch.randn(B, N, device="cuda")).requires_grad_()
    h = torch.ones(N - 1, device="cuda")
    logits = torch.zeros(N // 2, 2, device="cuda", requires_grad=True)
    bias = torch.zeros(1, 2, D, device="cuda", requires_grad=True)
    params = (x, v, logits, bias)
    z_warm = 0.25 + 1j
    z_cap = (0.5 + 0.75j) if new_z_in_capture else z_warm
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _model_step(x, v, h, logits, bias, z_warm)  # the one warm-up
    torch.cuda.current_stream().wait_stream(s)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = _model_step(x, v, h, logits, bias, z_cap)
    new = (torch.randn(B, N, D, device="cuda"), -2.0 + torch.randn(B, N, device="cuda"))
    with torch.no_grad():
        x.copy_(new[0])
        v.copy_(new[1])
    graph.replay()
    torch.cuda.synchronize()
    got = [loss.detach().clone()] + [p.grad.detach().clone() for p in params]
    eager = [t.detach().clone().requires_grad_() for t in params]
    want_loss = _model_step(eager[0], eager[1], h, eager[2], eager[3], z_cap)
    torch.testing.assert_close(got[0], want_loss.detach(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got[1:], eager):
        torch.testing.assert_close(g, e.grad, rtol=1e-5, atol=1e-5)


def test_binding_errors():
    dev, _ = canon(2, 10, torch.float32, shared=False, masked=False, seed=0)
    a, k, zri, _, grad = dev
    with pytest.raises(RuntimeError, match="k: expected a CUDA tensor"):
        FWD(a, k.cpu(), zri, None, False)
    with pytest.raises(RuntimeError, match="k: expected shape"):
        FWD(a, k[:, :-1], zri, None, False)
    with pytest.raises(RuntimeError, match="zri: expected shape"):
        FWD(a, k, zri.double(), None, False)
    with pytest.raises(RuntimeError, match="grad: expected"):
        BWD(grad.to(torch.complex128), a, k, zri, None, False, False)


def test_empty_batch():
    a = torch.zeros(0, 5, device="cuda")
    k = torch.zeros(1, 4, device="cuda")
    zri = torch.tensor([0.0, 1.0], device="cuda")
    out = FWD(a, k, zri, None, False)
    assert out.shape == (0, 5)
    ga, gk, gz, gm = BWD(torch.zeros(0, 5, dtype=torch.complex64, device="cuda"), a, k, zri, None, False, False)
    assert ga.shape == (0, 5) and gk.shape == (1, 4) and torch.equal(gz, torch.zeros(2, device="cuda"))


# ---- the carried state (bk_core_fwd_state / bk_core_bwd_state) ------------------------------------

STATE_GRID = [(B, N) for N in (1, 17, 1000, 70000) for B in (1, 3, 64) if B * N <= 200000]


@pytest.mark.parametrize("B,N", STATE_GRID, ids=[f"B{b}-N{n}" for b, n in STATE_GRID])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", ["perrow", "shared-masked"])
def test_state_ops_vs_cpu_kernel(strategy, B, N, dtype, variant):
    """The CUDA state ops == the CPU kernel's in float64 (y, grad a, k, z, mask, mu0); grad k not
    asked for comes back empty."""
    shared = masked = variant == "shared-masked"
    dev, ref = canon(B, N, dtype, shared, masked, seed=B * 5 + N)
    a, k, zri, mask, grad = dev
    g = torch.Generator().manual_seed(N)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    d_in = torch.complex(torch.randn(B, generator=g, dtype=torch.float64),
                         -(0.3 + torch.rand(B, generator=g, dtype=torch.float64))).to(cdt)
    k_in = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    ops_ = torch.ops.resnet_bk
    args = (a, k, zri, mask, d_in.cuda(), k_in.cuda())
    args64 = (*ref[:4], d_in.to(torch.complex128), k_in.double())
    assert rel(ops_.bk_core_fwd_state(*args), ops_.bk_core_fwd_state(*args64)) < TOL[dtype]
    got = ops_.bk_core_bwd_state(grad, *args, masked, True, True)
    want = ops_.bk_core_bwd_state(ref[4], *args64, masked, True, True)
    for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask", "mu0"), got, want):
        assert x.shape == y.shape, name
        if y.numel():
            assert rel(x, y) < (TOL_Z if name == "grad_zri" else TOL)[dtype], name
    lean = ops_.bk_core_bwd_state(grad, *args, False, False, False)
    assert lean[1].numel() == 0 and lean[2].numel() == 0
    assert torch.equal(lean[0], got[0]) and torch.equal(lean[4], got[4])


def test_state_through_the_public_api_with_real_z(strategy):
    """On a CUDA tensor the carried state enters the CUDA kernel itself (no ghost positions, which
    would need Im z != 0): chained chunks == the whole sequence with a real z, values and gradients."""
    g = torch.Generator().manual_seed(3)
    B, N, cut = 3, 40, 17
    diag = (torch.rand(B, N, generator=g, dtype=torch.float64) * 2 + 3).cuda().requires_grad_()
    off = (torch.rand(N - 1, generator=g, dtype=torch.float64) + 0.5).cuda().requires_grad_()
    z = torch.tensor(0.25, dtype=torch.complex128, device="cuda", requires_grad=True)
    whole = ops.bk_core(diag, off, off, z, causal=True)
    y1, d1 = ops.bk_core(diag[:, :cut], off[:cut - 1], off[:cut - 1], z, causal=True, output_final_state=True)
    y2 = ops.bk_core(diag[:, cut:], off[cut - 1:], off[cut - 1:], z, causal=True, initial_state=d1)
    chained = torch.cat([y1, y2], 1)
    tol = ops.tolerance(torch.float64)
    ops.assert_close(chained, whole, tol=tol)
    w = torch.randn(B, N, generator=g, dtype=torch.complex128).cuda()
    gw = torch.autograd.grad((whole * w).real.sum(), [diag, off, z])
    gc = torch.autograd.grad((chained * w).real.sum(), [diag, off, z])
    for x, y in zip(gc, gw):
        ops.assert_close(x, y, tol=tol)


def test_state_binding_errors():
    dev, _ = canon(2, 10, torch.float32, shared=False, masked=False, seed=0)
    a, k, zri, _, grad = dev
    d_in = torch.ones(2, dtype=torch.complex64, device="cuda")
    k_in = torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match="d_in: expected a CUDA tensor"):
        torch.ops.resnet_bk.bk_core_fwd_state(a, k, zri, None, d_in.cpu(), k_in)
    with pytest.raises(RuntimeError, match=r"d_in: expected a ComplexFloat tensor of shape \(2\)"):
        torch.ops.resnet_bk.bk_core_fwd_state(a, k, zri, None, d_in[:1], k_in)
    with pytest.raises(RuntimeError, match="k_in: expected a Float tensor"):
        torch.ops.resnet_bk.bk_core_bwd_state(grad, a, k, zri, None, d_in, k_in.double(), False, True, True)
