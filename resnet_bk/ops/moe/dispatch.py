"""The top-k MoE expert dispatch as one traceable op: ``moe_dispatch`` (``torch.ops.resnet_bk.moe_dispatch``).

    out = moe_dispatch(x, top_p, top_i, w1, b1, w2, b2, dropout_p=0.0)   # x (T, D) -> (T, D_out)

Token t goes to the experts ``top_i[t]`` (k distinct ids per row) with gates ``top_p[t]``; expert e is
``Linear(D, H) -> ReLU -> Dropout(dropout_p) -> Linear(H, D_out)`` (weights ``w1[e]`` (H, D), ``b1[e]``
(H,), ``w2[e]`` (D_out, H), ``b2[e]`` (D_out,)); ``out[t] = sum_j gate_j * expert_{top_i[t, j]}(x_t)``.

Why an op: the dispatch sorts the assignments by expert and runs each expert on its own segment,
which needs the per-expert counts on the host (one ``bincount(...).tolist()``). Inside
``torch.compile`` / ``torch.export`` that read is a data-dependent shape (``fullgraph=True`` and
export fail, plain compile breaks the graph). As a registered custom op with a fake (meta)
implementation of static output shapes it is a single node of the graph: the host read happens
when the op runs, never while tracing. The computation is the one ``SparseMoELayer`` runs eagerly
(the same sort, ``addmm`` per expert, gate product and combine: the same values), and the backward
is written out (no recomputation): gradients for x, the gates (the router's gradient) and every
expert weight, an expert with no token getting exact zeros.

Extra outputs (for the backward; callers use ``[0]``): the ReLU outputs ``h`` (T*k, H) and the
expert outputs before the gate ``y`` (T*k, D_out), in sorted order, and the dropout multiplier
(T*k, H) (empty without dropout).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["moe_dispatch"]


def _plan(top_i: Tensor, E: int):
    """(order, token_of, counts): the assignments sorted by expert (stable), the token of each sorted
    assignment, and the per-expert counts on the host."""
    k = top_i.shape[1]
    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    counts: List[int] = torch.bincount(flat_e, minlength=E).tolist()
    token_of = order if k == 1 else torch.div(order, k, rounding_mode="floor")
    return order, token_of, counts


@torch.library.custom_op("resnet_bk::moe_dispatch", mutates_args=())
def _moe_dispatch_op(x: Tensor, top_p: Tensor, top_i: Tensor, w1: List[Tensor], b1: List[Tensor],
                     w2: List[Tensor], b2: List[Tensor], dropout_p: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    T = x.shape[0]
    order, token_of, counts = _plan(top_i, len(w1))
    xs = x.index_select(0, token_of)
    gate = top_p.reshape(-1).index_select(0, order).to(x.dtype)
    hs, ys, ms = [], [], []
    for e, chunk in enumerate(xs.split(counts)):
        h = torch.addmm(b1[e], chunk, w1[e].t()).relu_()
        hd = h
        if dropout_p > 0:
            m = torch.empty_like(h).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
            ms.append(m)
            hd = h * m
        hs.append(h)
        ys.append(torch.addmm(b2[e], hd, w2[e].t()))
    h, y = torch.cat(hs), torch.cat(ys)
    mask = torch.cat(ms) if ms else x.new_empty(0)
    yg = y * gate.unsqueeze(-1)
    if top_i.shape[1] == 1:  # top-1 assignments are a permutation of the tokens
        out = torch.empty_like(yg).index_copy_(0, order, yg)
    else:
        out = y.new_zeros(T, y.shape[1]).index_add_(0, token_of, yg)
    return out, h, y, mask


@_moe_dispatch_op.register_fake
def _(x, top_p, top_i, w1, b1, w2, b2, dropout_p):
    A, H, Do = top_i.numel(), w1[0].shape[0], w2[0].shape[0]
    return (x.new_empty(x.shape[0], Do), x.new_empty(A, H), x.new_empty(A, Do),
            x.new_empty(A, H) if dropout_p > 0 else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, top_p, top_i, w1, b1, w2, b2, dropout_p = inputs
    _, h, y, mask = output
    ctx.dropout_p = dropout_p
    ctx.n = len(w1)
    ctx.save_for_backward(x, top_p, top_i, h, y, mask, *w1, *w2)
    ctx.mark_non_differentiable(h, y, mask)


@torch.library.custom_op("resnet_bk::moe_dispatch_backward", mutates_args=())
def _moe_dispatch_backward_op(gout: Tensor, x: Tensor, top_p: Tensor, top_i: Tensor, h: Tensor, y: Tensor,
                              mask: Tensor, w1: List[Tensor], w2: List[Tensor], dropout_p: float
                              ) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Gradients of ``moe_dispatch``'s first output for x, top_p, w1, b1, w2, b2 (an op of its own:
    it reads the counts on the host too, which AOTAutograd must not trace)."""
    E = len(w1)
    T, k = top_i.shape
    order, token_of, counts = _plan(top_i, E)
    gate = top_p.reshape(-1).index_select(0, order).to(x.dtype)
    gys = gout.index_select(0, token_of)  # (A, D_out): d loss / d (gate * y), sorted order
    g_gate = (gys * y).sum(dim=1).to(top_p.dtype)
    g_top_p = g_gate.new_zeros(T * k).index_copy_(0, order, g_gate).view(T, k)
    gy = gys * gate.unsqueeze(-1)
    xs = x.index_select(0, token_of)
    hd = h * mask if dropout_p > 0 else h
    masks = mask.split(counts) if dropout_p > 0 else [None] * E
    gw1, gb1, gw2, gb2, gxs = [], [], [], [], []
    for e, (gy_e, h_e, hd_e, x_e, m_e) in enumerate(zip(gy.split(counts), h.split(counts), hd.split(counts),
                                                        xs.split(counts), masks)):
        gw2.append(gy_e.t() @ hd_e)
        gb2.append(gy_e.sum(dim=0))
        gh = gy_e @ w2[e]
        if m_e is not None:
            gh = gh * m_e
        gh = torch.ops.aten.threshold_backward(gh, h_e, 0)  # ReLU's backward (h_e is its output)
        gw1.append(gh.t() @ x_e)
        gb1.append(gh.sum(dim=0))
        gxs.append(gh @ w1[e])
    gxs = torch.cat(gxs)
    if k == 1:  # top-1 assignments are a permutation of the tokens
        gx = torch.empty_like(gxs).index_copy_(0, order, gxs)
    else:
        gx = x.new_zeros(x.shape).index_add_(0, token_of, gxs)
    return gx, g_top_p, gw1, gb1, gw2, gb2


@_moe_dispatch_backward_op.register_fake
def _(gout, x, top_p, top_i, h, y, mask, w1, w2, dropout_p):
    return (torch.empty_like(x), torch.empty_like(top_p), [torch.empty_like(w) for w in w1],
            [w.new_empty(w.shape[0]) for w in w1], [torch.empty_like(w) for w in w2],
            [w.new_empty(w.shape[0]) for w in w2])


def _backward(ctx, gout, _gh, _gy, _gm):
    x, top_p, top_i, h, y, mask, *ws = ctx.saved_tensors
    E = ctx.n
    gx, g_top_p, gw1, gb1, gw2, gb2 = _moe_dispatch_backward_op(gout, x, top_p, top_i, h, y, mask, list(ws[:E]),
                                                                list(ws[E:]), ctx.dropout_p)
    return gx, g_top_p, None, gw1, gb1, gw2, gb2, None


_moe_dispatch_op.register_autograd(_backward, setup_context=_setup_context)


def moe_dispatch(x: Tensor, top_p: Tensor, top_i: Tensor, w1: Sequence[Tensor], b1: Sequence[Tensor],
                 w2: Sequence[Tensor], b2: Sequence[Tensor], dropout_p: float = 0.0) -> Tensor:
    """The top-k MoE FFN (see the module doc): x (T, D), top_p (T, k) floating, top_i (T, k) int64
    expert ids -> (T, D_out). Differentiable in x, top_p and the weights."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating tensor of shape (T, D), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    T, D = x.shape
    if not isinstance(top_i, Tensor) or top_i.dim() != 2 or top_i.shape[0] != T or top_i.dtype != torch.int64:
        raise ValueError(f"top_i: expected an int64 tensor of shape ({T}, k), got "
                         f"{(tuple(top_i.shape), top_i.dtype) if isinstance(top_i, Tensor) else type(top_i).__name__}")
    if not isinstance(top_p, Tensor) or tuple(top_p.shape) != tuple(top_i.shape) or not top_p.is_floating_point():
        raise ValueError(f"top_p: expected a floating tensor of shape {tuple(top_i.shape)} (top_i's), got "
                         f"{tuple(top_p.shape) if isinstance(top_p, Tensor) else type(top_p).__name__}")
    E = len(w1)
    if E < 1 or not (len(b1) == len(w2) == len(b2) == E):
        raise ValueError(f"w1, b1, w2, b2: expected one tensor per expert each, got lengths "
                         f"{len(w1)}, {len(b1)}, {len(w2)}, {len(b2)}")
    H, Do = w1[0].shape[0], w2[0].shape[0]
    want = {"w1": (H, D), "b1": (H,), "w2": (Do, H), "b2": (Do,)}
    for name, l in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        for e, t in enumerate(l):
            if not isinstance(t, Tensor) or tuple(t.shape) != want[name]:
                raise ValueError(f"{name}[{e}]: expected shape {want[name]}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.dtype != x.dtype or t.device != x.device:
                raise TypeError(f"{name}[{e}]: expected dtype {x.dtype} on {x.device} (x's), got {t.dtype} on {t.device}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return _moe_dispatch_op(x, top_p, top_i, list(w1), list(b1), list(w2), list(b2), float(dropout_p))[0]
