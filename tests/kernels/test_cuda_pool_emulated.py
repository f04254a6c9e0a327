"""The CUDA kernels of learned_downsample / learned_upsample (csrc/cuda/pool_cuda.cu), run on the CPU
under the CUDA emulation of tests/kernels/cuda_emu (see test_cuda_emulated.py), against the schema formulas
of csrc/cpu/pool_ops_cpu.cpp written in PyTorch (float64 autograd). All four storage dtypes;
bf16/fp16 go through emulated conversions bit-compatible with torch's.
"""
import ctypes
import zlib

import pytest
import torch

from helpers import tol

from test_cuda_emulated import CXX, build_emulated

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) on PATH")

DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# output rounding of the storage dtype, relative to the largest magnitude
# the op layer's policy, held tighter: pooling is a short softmax-weighted sum (no recursion), so float64 and
# float32 stay within a few roundings (0.01x, 0.2x) and 16-bit outputs within one rounding (0.5x)
TOL = {torch.float64: tol(torch.float64, 0.01), torch.float32: tol(torch.float32, 0.2),
       torch.bfloat16: tol(torch.bfloat16, 0.5), torch.float16: tol(torch.float16, 0.5)}
TOL_ACC = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_emulated(tmp_path_factory, "pool_cuda.cu", "pool_emu_api.cpp")


def P(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def I(v):  # noqa: E743
    return ctypes.c_int64(v)


def acc_of(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def rel(got, ref):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite (unwritten or poisoned) output"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def down_ref(x, logits, causal):
    B, N, D = x.shape
    M, r = logits.shape
    s = r - 1 if causal else 0
    w = torch.softmax(logits, -1)
    xp = torch.nn.functional.pad(x, (0, 0, s, 0))[:, :N]
    return torch.einsum("bmrd,mr->bmd", xp.reshape(B, M, r, D), w)


def up_ref(y, bias, res, scale):
    B, M, RD = y.shape
    Mb, r, Db = bias.shape
    D = RD // r
    v = (y.reshape(B, M, r, D) + bias.reshape(1, Mb, r, Db)).reshape(B, M * r, D)
    sc = 1.0 if scale is None else scale
    return v * sc if res is None else res + sc * v


@pytest.mark.parametrize("dtype", list(DT), ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("B,M,r,D", [(2, 3, 4, 5), (1, 7, 1, 3), (3, 2, 5, 33), (0, 2, 3, 4)])
def test_downsample(lib, dtype, causal, B, M, r, D):
    g = torch.Generator().manual_seed(B * 100 + M * 10 + r)
    x = torch.randn(B, M * r, D, generator=g).to(dtype)
    logits = torch.randn(M, r, generator=g, dtype=torch.float64).to(acc_of(dtype))
    grad = torch.randn(B, M, D, generator=g).to(dtype)
    out = torch.full((B, M, D), float("nan"), dtype=dtype)
    assert lib.pool_emu_down_fwd(DT[dtype], P(x), P(logits), P(out), I(B), I(M), I(r), I(D), causal) == 0
    xr = x.double().requires_grad_()
    lr = logits.double().requires_grad_()
    ref = down_ref(xr, lr, causal)
    if B:
        assert rel(out, ref.detach()) < TOL[dtype]
    gx = torch.full((B, M * r, D), float("nan"), dtype=dtype)
    gl = torch.full((M, r), float("nan"), dtype=acc_of(dtype))
    assert lib.pool_emu_down_bwd(DT[dtype], P(grad), P(x), P(logits), P(gx), P(gl), I(B), I(M), I(r), I(D),
                                 causal) == 0
    wx, wl = torch.autograd.grad(ref, (xr, lr), grad.double())
    if B:
        assert rel(gx, wx) < TOL[dtype]
        assert rel(gl, wl) < TOL_ACC[dtype]
    else:
        assert torch.equal(gl, torch.zeros_like(gl))


@pytest.mark.parametrize("dtype", list(DT), ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("bias_shape", ["m-d", "1-d", "m-1", "1-1"])
@pytest.mark.parametrize("with_res,with_scale", [(True, True), (False, True), (False, False), (True, False)],
                         ids=["res-scale", "scale", "plain", "res"])
def test_upsample(lib, dtype, bias_shape, with_res, with_scale):
    B, M, r, D = 3, 4, 2, 5
    # a seed fixed across processes (str hashes are randomised per process)
    g = torch.Generator().manual_seed(zlib.crc32(repr((bias_shape, with_res, with_scale)).encode()) % 1000)
    adt = acc_of(dtype)
    Mb = M if bias_shape.startswith("m") else 1
    Db = D if bias_shape.endswith("d") else 1
    y = torch.randn(B, M, r * D, generator=g).to(dtype)
    bias = torch.randn(Mb, r, Db, generator=g, dtype=torch.float64).to(adt)
    res = torch.randn(B, M * r, D, generator=g).to(dtype) if with_res else None
    scale = torch.tensor(0.7, dtype=adt) if with_scale else None
    grad = torch.randn(B, M * r, D, generator=g).to(dtype)
    out = torch.full((B, M * r, D), float("nan"), dtype=dtype)
    assert lib.pool_emu_up_fwd(DT[dtype], P(y), P(bias), P(res), P(scale), P(out), I(B), I(M), I(r), I(D), I(Mb),
                               I(Db)) == 0
    yr, br = y.double().requires_grad_(), bias.double().requires_grad_()
    sr = torch.tensor(0.7 if with_scale else 1.0, dtype=torch.float64, requires_grad=True)
    ref = up_ref(yr, br, None if res is None else res.double(), sr)
    assert rel(out, ref.detach()) < TOL[dtype]
    gy = torch.full_like(y, float("nan"))
    gb = torch.full_like(bias, float("nan"))
    gs = torch.full((), float("nan"), dtype=adt)
    assert lib.pool_emu_up_bwd(DT[dtype], P(grad), P(y), P(bias), P(scale), P(gy), P(gb), P(gs), I(B), I(M), I(r),
                               I(D), I(Mb), I(Db)) == 0
    wy, wb, ws = torch.autograd.grad(ref, (yr, br, sr), grad.double())
    assert rel(gy, wy) < TOL[dtype]
    assert rel(gb, wb) < TOL_ACC[dtype]
    # grad scale is a sum of B*M*r*D products that may cancel: its rounding is relative to the sum
    # of their magnitudes, not to the (possibly small) result
    mag = (grad.double() * up_ref(y.double(), bias.double(), None, None)).abs().sum()
    assert torch.isfinite(gs) and abs(gs.double() - ws).item() <= TOL_ACC[dtype] * mag.item()
