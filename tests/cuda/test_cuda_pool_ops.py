"""CUDA kernels of learned_downsample / learned_upsample (csrc/cuda/pool_*) on a GPU, against the
C++ CPU kernels of the same ops (same schemas) and a float64 PyTorch formula. Skipped without a GPU,
without CUDA kernels in resnet_bk._C, or when the pooling ops are not registered."""
import pytest
import torch

from resnet_bk.ops import _extension


def _has_ops():
    try:
        torch.ops.resnet_bk.learned_downsample_fwd
        torch.ops.resnet_bk.learned_upsample_fwd
        return True
    except (AttributeError, RuntimeError):
        return False


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _extension.HAS_CUDA_KERNELS, reason="resnet_bk._C was built without CUDA kernels"),
    pytest.mark.skipif(not _has_ops(), reason="pooling ops are not registered in this build"),
]

OPS = torch.ops.resnet_bk if _has_ops() else None
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def acc_of(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def rel(got, ref):
    got, ref = got.cpu().double(), ref.cpu().double()
    assert torch.isfinite(got).all()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("B,M,r,D", [(2, 64, 4, 96), (1, 1, 1, 1), (3, 7, 5, 33), (0, 4, 2, 8)])
def test_downsample_cuda_vs_cpu(dtype, causal, B, M, r, D):
    g = torch.Generator().manual_seed(B + M + r + D)
    x = torch.randn(B, M * r, D, generator=g).to(dtype)
    logits = torch.randn(M, r, generator=g).to(acc_of(dtype))
    grad = torch.randn(B, M, D, generator=g).to(dtype)
    cpu_out = OPS.learned_downsample_fwd(x, logits, causal)
    out = OPS.learned_downsample_fwd(x.cuda(), logits.cuda(), causal)
    cpu_g = OPS.learned_downsample_bwd(grad, x, logits, causal, True, True)
    got = OPS.learned_downsample_bwd(grad.cuda(), x.cuda(), logits.cuda(), causal, True, True)
    if B:
        assert rel(out, cpu_out) < TOL[dtype]
        assert rel(got[0], cpu_g[0]) < TOL[dtype]
        assert rel(got[1], cpu_g[1]) < TOL[acc_of(dtype)] * 10
    assert got[0].shape == cpu_g[0].shape and got[1].shape == cpu_g[1].shape
    none = OPS.learned_downsample_bwd(grad.cuda(), x.cuda(), logits.cuda(), causal, False, False)
    assert none[0].shape == (0,) and none[1].shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("bias_shape", ["m-d", "1-d", "m-1", "1-1"])
@pytest.mark.parametrize("with_res,with_scale", [(True, True), (False, True), (False, False)],
                         ids=["res-scale", "scale", "plain"])
def test_upsample_cuda_vs_cpu(dtype, bias_shape, with_res, with_scale):
    B, M, r, D = 4, 33, 3, 40
    g = torch.Generator().manual_seed(7)
    adt = acc_of(dtype)
    Mb = M if bias_shape.startswith("m") else 1
    Db = D if bias_shape.endswith("d") else 1
    y = torch.randn(B, M, r * D, generator=g).to(dtype)
    bias = torch.randn(Mb, r, Db, generator=g).to(adt)
    res = torch.randn(B, M * r, D, generator=g).to(dtype) if with_res else None
    scale = torch.tensor(0.7, dtype=adt) if with_scale else None
    grad = torch.randn(B, M * r, D, generator=g).to(dtype)
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    cpu_out = OPS.learned_upsample_fwd(y, bias, res, scale)
    out = OPS.learned_upsample_fwd(y.cuda(), bias.cuda(), cu(res), cu(scale))
    assert rel(out, cpu_out) < TOL[dtype]
    cpu_g = OPS.learned_upsample_bwd(grad, y, bias, scale, True, True, True)
    got = OPS.learned_upsample_bwd(grad.cuda(), y.cuda(), bias.cuda(), cu(scale), True, True, True)
    assert rel(got[0], cpu_g[0]) < TOL[dtype]
    acc_tol = 1e-5 if adt == torch.float32 else 1e-12
    assert rel(got[1], cpu_g[1]) < acc_tol
    assert rel(got[2], cpu_g[2]) < acc_tol
    for a, b in zip(got, cpu_g):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_pool_cuda_graph_and_determinism():
    B, M, r, D = 2, 16, 4, 64
    x = torch.randn(B, M * r, D, device="cuda")
    logits = torch.randn(M, r, device="cuda")
    grad = torch.randn(B, M, D, device="cuda")
    first = OPS.learned_downsample_bwd(grad, x, logits, True, True, True)
    again = OPS.learned_downsample_bwd(grad, x, logits, True, True, True)
    assert torch.equal(first[1], again[1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OPS.learned_downsample_fwd(x, logits, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.learned_downsample_fwd(x, logits, True)
        gx, gl = OPS.learned_downsample_bwd(grad, x, logits, True, True, True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, OPS.learned_downsample_fwd(x, logits, True))
    assert torch.equal(gl, OPS.learned_downsample_bwd(grad, x, logits, True, True, True)[1])


def test_pool_errors():
    x = torch.randn(2, 8, 3, device="cuda")
    with pytest.raises(RuntimeError, match="logits: expected dtype"):
        OPS.learned_downsample_fwd(x, torch.randn(4, 2, device="cuda", dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="logits: expected a tensor on"):
        OPS.learned_downsample_fwd(x, torch.randn(4, 2), False)
    with pytest.raises(RuntimeError, match="x: expected N = M \\* r"):
        OPS.learned_downsample_fwd(x, torch.randn(3, 2, device="cuda"), False)
