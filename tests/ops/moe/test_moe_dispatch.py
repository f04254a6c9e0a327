"""``ops.moe_dispatch`` (the top-k MoE dispatch as one traceable custom op, what SparseMoELayer runs
under torch.compile / torch.export): gradients by finite differences (an idle expert included),
opcheck (fake tensors, AOTAutograd), the same values and gradients as the layer's eager dispatch,
dropout, and bad arguments."""
import pytest
import torch

from resnet_bk import ops
from resnet_bk.models.base import SparseMoELayer
from resnet_bk.ops.moe.dispatch import _moe_dispatch_op

T, D, H, E = 7, 5, 6, 3


def _args(k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, dtype=dtype, generator=g).requires_grad_()
    top_p = torch.rand(T, k, dtype=dtype, generator=g).requires_grad_()
    # expert 2 gets no token; rows hold distinct experts
    top_i = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1], [1, 0]])[:, :k].contiguous()
    ws = [[torch.randn(*s, dtype=dtype, generator=g).requires_grad_() for _ in range(E)]
          for s in ((H, D), (H,), (D, H), (D,))]
    return x, top_p, top_i, ws


@pytest.mark.parametrize("k", [1, 2])
def test_gradcheck_with_an_idle_expert(k):
    x, top_p, top_i, (w1, b1, w2, b2) = _args(k)

    def f(x, top_p, *w):
        return ops.moe_dispatch(x, top_p, top_i, w[0:E], w[E:2 * E], w[2 * E:3 * E], w[3 * E:])
    assert torch.autograd.gradcheck(f, (x, top_p, *w1, *b1, *w2, *b2))
    out = f(x, top_p, *w1, *b1, *w2, *b2)
    grads = torch.autograd.grad(out.sum(), w1 + b1)
    assert float(grads[2].abs().max()) == 0 and float(grads[E + 2].abs().max()) == 0  # idle expert: zero


@pytest.mark.parametrize("k", [1, 2])
def test_opcheck(k):
    x, top_p, top_i, (w1, b1, w2, b2) = _args(k)
    torch.library.opcheck(_moe_dispatch_op, (x, top_p, top_i, w1, b1, w2, b2, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_equals_the_layers_eager_dispatch(top_k, dtype):
    torch.manual_seed(0)
    m = SparseMoELayer(8, 4, top_k, 0.0).to(dtype)
    x = torch.randn(40, 8, dtype=dtype, requires_grad=True)
    probs_t = torch.softmax(m._router_logits_t(x).float(), 0)
    if top_k == 1:
        tp, ti = probs_t.max(0)
        ref = m._sorted_dispatch(x, tp, ti)
        tp, ti = tp.unsqueeze(1), ti.unsqueeze(1)
    else:
        tp, ti = (t.t() for t in probs_t.topk(top_k, 0))
        ref = m._sorted_dispatch(x, tp, ti)
    got = m._traced_dispatch(x, tp, ti)
    ops.assert_close(got, ref)
    params = [x] + list(m.parameters())
    g_got = torch.autograd.grad(got.square().sum(), params, retain_graph=True)
    for a, b in zip(g_got, torch.autograd.grad(ref.square().sum(), params)):
        ops.assert_close(a, b)


def test_dropout_scales_kept_units_and_backward_uses_the_same_mask():
    x, top_p, top_i, (w1, b1, w2, b2) = _args(1)
    torch.manual_seed(3)
    out, h, y, mask = _moe_dispatch_op(x, top_p, top_i, w1, b1, w2, b2, 0.5)
    assert set(mask.unique().tolist()) <= {0.0, 2.0} and mask.shape == h.shape
    (g_out,) = torch.autograd.grad(out.sum(), [x])
    # the same forward with the recorded mask applied by hand
    order = torch.argsort(top_i.reshape(-1), stable=True)
    counts = torch.bincount(top_i.reshape(-1), minlength=E).tolist()
    xs = x.index_select(0, order)
    gate = top_p.reshape(-1).index_select(0, order)
    rows = []
    for e, (xe, me) in enumerate(zip(xs.split(counts), mask.split(counts))):
        rows.append(torch.addmm(b2[e], torch.addmm(b1[e], xe, w1[e].t()).relu() * me, w2[e].t()))
    ref = torch.zeros_like(out).index_add(0, order, torch.cat(rows) * gate.unsqueeze(-1))
    ops.assert_close(out, ref)
    ops.assert_close(g_out, torch.autograd.grad(ref.sum(), [x])[0])


def test_bad_arguments_name_the_argument():
    x, top_p, top_i, (w1, b1, w2, b2) = _args(1)
    with pytest.raises(ValueError, match="top_i"):
        ops.moe_dispatch(x, top_p, top_i.int(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="top_p"):
        ops.moe_dispatch(x, top_p[:3], top_i, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w2\[1\]"):
        ops.moe_dispatch(x, top_p, top_i, w1, b1, [w2[0], w2[1].t(), w2[2]], b2)
    with pytest.raises(TypeError, match=r"b1\[0\]"):
        ops.moe_dispatch(x, top_p, top_i, w1, [b1[0].float()] + b1[1:], w2, b2)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.moe_dispatch(x, top_p, top_i, w1, b1, w2, b2, dropout_p=1.0)
