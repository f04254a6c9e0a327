"""The top-1 MoE op (``ops.moe_top1_inference``) equals ``SparseMoELayer``'s own path, the layer
takes the op only when it may, its functional experts equal the module calls, and bad arguments
raise."""
import pytest
import torch

from resnet_bk import ops
from resnet_bk.models.base import SparseMoELayer

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="compiled extension not built")


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_functional_experts_match_module_calls(top_k):
    """Experts run as functional addmm + in-place ReLU; a hook on an expert makes the layer call the
    modules, which must give the same output and gradients (train mode with dropout 0, and eval)."""
    torch.manual_seed(0)
    moe = SparseMoELayer(16, num_experts=4, top_k=top_k, dropout_p=0.0).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    params = [x] + list(moe.parameters())
    outs = []
    for hooked in (False, True):
        hs = [e.register_forward_hook(lambda m, i, o: None) for e in moe.experts] if hooked else []
        y = moe(x)
        gr = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
                                 + moe.aux_loss, params, allow_unused=True)
        with torch.no_grad():
            moe.eval()
            ye = moe(x)
            moe.train()
        outs.append((y, gr, ye))
        for h in hs:
            h.remove()
    (y0, g0, e0), (y1, g1, e1) = outs
    torch.testing.assert_close(y0, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e0, e1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g0, g1):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _moe_args(moe):
    ex = moe.experts
    return (moe.gating_network.weight, moe.gating_network.bias, [e[0].weight for e in ex], [e[0].bias for e in ex],
            [e[3].weight for e in ex], [e[3].bias for e in ex])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 5, 300])
def test_moe_top1_op_matches_module_path(dtype, T):
    """ops.moe_top1_inference (cpp and reference) equals SparseMoELayer's own no-grad path (taken
    when an expert has a hook), and the layer uses the op in eval mode under no_grad."""
    torch.manual_seed(T)
    moe = SparseMoELayer(16, num_experts=4, top_k=1).to(dtype).eval()
    x = torch.randn(T, 16, dtype=dtype)
    with torch.no_grad():
        cpp = ops.moe_top1_inference(x, *_moe_args(moe), backend="cpp")
        ref = ops.moe_top1_inference(x, *_moe_args(moe), backend="reference")
        fast = moe(x)
        hooks = [moe.experts[0].register_forward_hook(lambda m, i, o: None)]
        module = moe(x)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(cpp, module, rtol=0, atol=0)
    torch.testing.assert_close(fast, module, rtol=0, atol=0)
    torch.testing.assert_close(ref, module, rtol=0, atol=0)


def test_moe_layer_takes_the_op_only_when_it_may(monkeypatch):
    calls = []
    real = ops.moe_top1_inference
    monkeypatch.setattr(ops, "moe_top1_inference", lambda *a, **k: calls.append(1) or real(*a, **k))
    moe = SparseMoELayer(8, num_experts=3, top_k=1).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        moe(x)
    assert len(calls) == 1
    moe(x)  # grad mode: the module's differentiable path
    moe.train()
    with torch.no_grad():
        moe(x)  # dropout active
    moe.eval()
    monkeypatch.setenv("RESNET_BK_BACKEND", "reference")
    with torch.no_grad():
        moe(x)  # a backend forced by the environment: the module's path
    assert len(calls) == 1
    assert SparseMoELayer(8, num_experts=3, top_k=2).eval()(x).shape == x.shape


def test_moe_op_errors():
    moe = SparseMoELayer(8, num_experts=3, top_k=1)
    rw, rb, w1, b1, w2, b2 = _moe_args(moe)
    x = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.moe_top1_inference(x, rw, rb, w1, b1, w2, b2)  # parameters require grad, grad mode on
    with torch.no_grad():
        bad_b2 = [b2[0], b2[1][:3], b2[2]]
        # the general path (any backend but the fast one) validates in Python ...
        with pytest.raises(ValueError, match="w1"):
            ops.moe_top1_inference(x, rw, rb, w1[:2], b1, w2, b2, backend="reference")
        with pytest.raises(ValueError, match=r"b2\[1\]"):
            ops.moe_top1_inference(x, rw, rb, w1, b1, w2, bad_b2, backend="reference")
        with pytest.raises(ValueError, match="router_weight"):
            ops.moe_top1_inference(x, rw[:, :4], rb, w1, b1, w2, b2, backend="reference")
        with pytest.raises(TypeError, match="router_bias"):
            ops.moe_top1_inference(x, rw, rb.double(), w1, b1, w2, b2, backend="reference")
        # ... and the fast path's kernel names the argument too
        with pytest.raises(RuntimeError, match="w1: expected 3 tensors"):
            ops.moe_top1_inference(x, rw, rb, w1[:2], b1, w2, b2)
        with pytest.raises(RuntimeError, match="b2: expected shape"):
            ops.moe_top1_inference(x, rw, rb, w1, b1, w2, bad_b2)
        with pytest.raises(RuntimeError, match="router_w: expected shape"):
            ops.moe_top1_inference(x, rw[:, :4], rb, w1, b1, w2, b2)
        with pytest.raises(RuntimeError, match="router: expected dtype"):
            ops.moe_top1_inference(x, rw, rb.double(), w1, b1, w2, b2)
        with pytest.raises(ops.BackendUnavailableError, match="moe_top1_inference"):
            ops.moe_top1_inference(x, rw, rb, w1, b1, w2, b2, backend="cuda")
        assert ops.moe_top1_inference(x[:0], rw, rb, w1, b1, w2, b2).shape == (0, 8)
