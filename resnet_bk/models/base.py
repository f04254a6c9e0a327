"""The base ResNet-BK language model: a top-k MoE feed-forward, a BK-Core sequence mixer, blocks, LM.

Public names and signatures follow the original prototype (``SparseMoELayer``, ``MoEResNetBKLayer``,
``ResNetBKBlock``, ``LanguageModel``); the defects listed in ORIGINAL_DESIGN.md 3.1/3.8 are fixed:

* the router receives gradient (expert outputs are multiplied by their gate probability) and an
  optional Switch-style load-balancing loss is exposed as ``SparseMoELayer.aux_loss``;
* dispatch is vectorised: one sort of the token->expert assignments, one host read of the per-expert
  counts (instead of a ``mask.any()`` per expert), one gather and one scatter;
* H0 is the discrete Laplacian held as shared (1, N-1) off-diagonal buffers that are never expanded
  per batch row, and neither v nor the features are clamped;
* the BK-Core is causal by default (``causal=True``): next-token models must not see the future;
* every module accepts any sequence length ``1 <= N <= n_seq`` (buffers and position embeddings
  are sliced, nothing asserts ``N == n_seq``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .cache import DecodeCache, active_cache, cache_slot, check_cache
from .generation import GenerationMixin

__all__ = [
    "SparseMoELayer", "MoEResNetBKLayer", "ResNetBKBlock", "LanguageModel", "BKMixer",
    "check_tokens", "check_hidden", "check_dtype", "check_token_range",
]


def check_dtype(name: str, x: Tensor, dtype: torch.dtype) -> None:
    """Raise a TypeError naming ``name`` when the floating input x does not have the layer's
    parameter ``dtype`` (outside autocast, which converts the inputs itself)."""
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: expected dtype {dtype} (the layer's parameters; convert the input or the layer "
                        f"with .to(dtype)), got {x.dtype}")


def check_hidden(name: str, x, d_model: int, n_seq: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Validate a hidden-state tensor (B, N, D); raise naming ``name`` with expected vs got.
    ``dtype``: the layer's parameter dtype, which x must have (see ``check_dtype``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, N, {d_model}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name}: expected shape (B, N, {d_model}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got dtype {x.dtype}")
    if n_seq is not None and not (1 <= x.shape[1] <= n_seq):
        raise ValueError(f"{name}: expected a sequence length 1 <= N <= n_seq={n_seq}, got N={x.shape[1]}")
    if dtype is not None:
        check_dtype(name, x, dtype)


def check_token_range(name: str, x: Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming ``name`` when a token id is outside [0, vocab_size) (one host
    read; skipped while torch.compile traces, where it would break the graph, and during CUDA graph
    capture, where a host read is not allowed)."""
    if torch.compiler.is_compiling() or x.numel() == 0 or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: expected token ids in [0, vocab_size={vocab_size}), got {lo if lo < 0 else hi}")


def check_tokens(name: str, x, n_seq: int, vocab_size: Optional[int] = None) -> None:
    """Validate token ids (B, N) integer with ``1 <= N <= n_seq`` (and in [0, vocab_size) when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a (B, N) integer torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
        raise TypeError(f"{name}: expected integer token ids of dtype torch.int64 or torch.int32, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape (B, N), got {tuple(x.shape)}")
    if not (1 <= x.shape[1] <= n_seq):
        raise ValueError(f"{name}: expected a sequence length 1 <= N <= n_seq={n_seq}, got N={x.shape[1]}")
    if vocab_size is not None:
        check_token_range(name, x, vocab_size)


def check_positive_ints(**values) -> None:
    """Raises ValueError naming the first argument that is not a positive int."""
    for name, val in values.items():
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")

def _plain_module(m: nn.Module, cls: type) -> bool:
    """True when ``m`` is exactly ``cls`` with no hooks of its own and no global module hooks, so
    that calling its functional form is the same as calling it."""
    return (type(m) is cls and not m._forward_hooks and not m._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


def _is_plain_expert(expert: nn.Module) -> bool:
    """The expert is exactly ``Sequential(Linear, ReLU, Dropout, Linear)`` with no hooks."""
    if not (_plain_module(expert, nn.Sequential) and len(expert) == 4):
        return False
    lin1, relu, drop, lin2 = expert
    return (_plain_module(lin1, nn.Linear) and _plain_module(relu, nn.ReLU) and _plain_module(drop, nn.Dropout)
            and _plain_module(lin2, nn.Linear))


def _expert_forward(expert: nn.Module, x: Tensor, plain: Optional[bool] = None) -> Tensor:
    """``expert(x)`` for an expert ``Sequential(Linear, ReLU, Dropout, Linear)``, as two addmm and an
    in-place ReLU when it has exactly that structure and no hooks (skips four module calls per
    expert, and the ReLU's separate output; the result is then a fresh tensor), else as a module
    call. ``plain``: ``_is_plain_expert(expert)`` when the caller has it already."""
    if _is_plain_expert(expert) if plain is None else plain:
        lin1, drop, lin2 = expert[0], expert[2], expert[3]
        # In place on the Linear's fresh output: addmm's backward does not read its output.
        h = F.linear(x, lin1.weight, lin1.bias).relu_()
        if drop.training and drop.p > 0:
            h = F.dropout(h, drop.p, True, drop.inplace)
        return F.linear(h, lin2.weight, lin2.bias)
    return expert(x)


class PerForwardState:
    """Mixin for modules that keep tensors of their last forward (with its autograd graph) in the
    attributes named by ``_per_forward``: copy.deepcopy (which refuses non-leaf tensors) and pickle
    get the module with those attributes set to None, as before any forward."""

    _per_forward: Tuple[str, ...] = ()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(dict.fromkeys(self._per_forward))
        return state


class SparseMoELayer(PerForwardState, nn.Module):
    """Top-k mixture of experts FFN. Each expert is ``Linear(d,2d)-ReLU-Dropout-Linear(2d,d)``.

    forward(x (..., D)) -> (..., D). Each token goes to its ``top_k`` experts; the expert outputs are
    weighted by the router's softmax probability of that expert (Switch/GShard style, not
    renormalised), which is what gives the router a gradient. ``top_k >= num_experts`` is the dense
    softmax mixture.

    After each forward, ``aux_loss`` holds the Switch load-balancing loss
    ``E * sum_e f_e * P_e`` (f_e: fraction of tokens whose first choice is e, P_e: mean router
    probability of e); it equals 1 for a perfectly balanced router. Add ``coef * aux_loss`` to the
    training loss to use it. ``tokens_processed`` counts tokens routed through this layer (an int,
    read from a non-persistent int64 buffer that each forward increments by the token count from the
    shape: no device sync, and under torch.compile a graph op rather than a guarded Python integer)
    so callers can measure skipped work.

    Dispatch: eager, tokens are sorted by expert and each expert runs on its tokens only (one host
    read of the per-expert counts). While torch.compile or torch.export traces, where that host read
    would be a data-dependent shape, ``_traced_dispatch`` runs the same sorted dispatch as one
    custom op, ``ops.moe_dispatch`` (experts other than Linear-ReLU-Dropout-Linear run on every
    token, masked: ``_dense_dispatch``); the values are the eager dispatch's. In
    training every expert's parameters take part in the autograd graph even when no token chose
    it (its gradient is then zero), so DistributedDataParallel needs no
    ``find_unused_parameters=True`` when an expert goes idle on a rank.
    """

    _per_forward = ("aux_loss",)

    def __init__(self, d_model: int, num_experts: int = 4, top_k: int = 1, dropout_p: float = 0.1):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
        if not (0.0 <= float(dropout_p) < 1.0):
            raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList([
            nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Dropout(dropout_p),
                          nn.Linear(2 * d_model, d_model))
            for _ in range(num_experts)])
        self.gating_network = nn.Linear(d_model, num_experts)
        self.aux_loss: Optional[Tensor] = None
        self.register_buffer("_tokens_seen", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def tokens_processed(self) -> int:
        return int(self._tokens_seen)

    @tokens_processed.setter
    def tokens_processed(self, value: int) -> None:
        self._tokens_seen.fill_(int(value))

    def _traced_dispatch(self, xf: Tensor, top_p: Tensor, top_i: Tensor) -> Tensor:
        """The top-k dispatch with no data-dependent shape while tracing (torch.compile /
        torch.export): xf (T, D); top_p, top_i (T, k), the chosen probabilities and experts. Plain
        experts (Linear-ReLU-Dropout-Linear with biases, one dropout p): ``ops.moe_dispatch``, the
        eager sorted dispatch as one custom op (its host read of the counts happens when it runs,
        not while tracing). Other experts, or under autocast: ``_dense_dispatch``."""
        experts = list(self.experts)
        plain = all(_is_plain_expert(e) and e[0].bias is not None and e[3].bias is not None for e in experts)
        drops = {e[2].p if e[2].training else 0.0 for e in experts} if plain else set()
        # Under autocast the experts' Linears run in the autocast dtype: the dense form calls them
        # as eager does (the op would compute in the inputs' dtype).
        if len(drops) != 1 or torch.is_autocast_enabled(xf.device.type):
            return self._dense_dispatch(xf, top_p, top_i)
        return ops.moe_dispatch(xf, top_p, top_i, [e[0].weight for e in experts], [e[0].bias for e in experts],
                                [e[3].weight for e in experts], [e[3].bias for e in experts], drops.pop())

    def _dense_dispatch(self, xf: Tensor, top_p: Tensor, top_i: Tensor) -> Tensor:
        """The traced dispatch for experts of any structure: every expert runs on all T tokens of
        xf (T, D); token t gets the sum over its experts e, in expert order, of
        expert_e(x_t) * p_e(t), with exact zeros (torch.where) for the experts t did not choose
        (num_experts/top_k times the eager expert FLOPs)."""
        out = None
        for e, expert in enumerate(self.experts):
            sel = top_i == e  # (T, k): at most one True per row (top-k indices are distinct)
            g = torch.where(sel, top_p, 0).sum(dim=1)  # the one chosen probability, or 0
            y = _expert_forward(expert, xf)
            y = torch.where(sel.any(dim=1).unsqueeze(-1), y * g.to(y.dtype).unsqueeze(-1), 0)
            out = y if out is None else out + y
        return out

    def _router_logits_t(self, xf: Tensor) -> Tensor:
        """Router logits transposed, (E, T), for xf (T, D)."""
        g = self.gating_network
        if _plain_module(g, nn.Linear) and g.bias is not None:
            return torch.addmm(g.bias.unsqueeze(1), g.weight, xf.t())
        return g(xf).t()  # a replaced or hooked router module is called as a module

    def _top1_inference_op(self, xf: Tensor) -> Optional[Tensor]:
        """The no-grad top-1 forward as one ``ops.moe_top1_inference`` call (routing and grouping in
        C++: ~8 Python-dispatched ops per expert fewer), when the op takes these tensors and every
        expert is exactly Linear-ReLU-Dropout-Linear with no hooks and the router a plain Linear;
        the same values as the path below. Else None."""
        if (torch.is_autocast_enabled(xf.device.type) or not ops.moe_top1_fast_ok(xf) or not xf.is_contiguous()):
            return None
        weights = self._top1_plain_weights(xf.dtype)
        return None if weights is None else ops.moe_top1_inference(xf, *weights)

    def _top1_plain_weights(self, dtype: torch.dtype) -> Optional[tuple]:
        """(router weight, router bias, w1, b1, w2, b2) when the router is a plain Linear with a bias and
        every expert is exactly Linear-ReLU-Dropout-Linear (dropout inactive) with no hooks, all of
        ``dtype``: then the functional top-1 forward on these tensors is the module's. Else None."""
        g = self.gating_network
        if not _plain_module(g, nn.Linear) or g.bias is None or g.weight.dtype != dtype:
            return None
        w1, b1, w2, b2 = [], [], [], []
        # The checks of _is_plain_expert on the modules' own dicts (Module.__getattr__ and
        # Sequential.__iter__ cost ~1 us per access, and a decode step makes ~20 per expert).
        for e in self.experts._modules.values():
            if type(e) is not nn.Sequential or e._forward_hooks or e._forward_pre_hooks or len(e._modules) != 4:
                return None
            lin1, relu, drop, lin2 = e._modules.values()
            for sub, cls in ((lin1, nn.Linear), (relu, nn.ReLU), (drop, nn.Dropout), (lin2, nn.Linear)):
                if type(sub) is not cls or sub._forward_hooks or sub._forward_pre_hooks:
                    return None
            p1, p2 = lin1._parameters, lin2._parameters
            w, b, w_, b_ = p1["weight"], p1["bias"], p2["weight"], p2["bias"]
            if (drop.training and drop.p > 0) or b is None or b_ is None or w.dtype != dtype or w_.dtype != dtype:
                return None
            w1.append(w), b1.append(b), w2.append(w_), b2.append(b_)
        gp = g._parameters
        return gp["weight"], gp["bias"], w1, b1, w2, b2

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        if isinstance(getattr(self.gating_network, "weight", None), Tensor):
            check_dtype("x", x, self.gating_network.weight.dtype)
        shape = x.shape
        xf = x.reshape(-1, self.d_model)
        T = xf.shape[0]
        self._tokens_seen.add_(T)
        if type(T) is int and T == 0:  # (a traced data-dependent T is a SymInt: no guard on it)
            self.aux_loss = None
            return x.new_zeros(shape)
        E = self.num_experts
        tracing = torch.compiler.is_compiling()
        if self.top_k == 1 and E > 1 and not torch.is_grad_enabled():
            out = self._top1_inference_op(xf)
            if out is not None:
                self.aux_loss = None
                return out.reshape(shape)
        # Router in float32 so the softmax is not computed in bf16 under autocast. The router runs
        # transposed, logits (E, T) = W x^T + b: a (T, D) x (D, E) GEMM with E ~ 4 output columns is
        # 2-3x slower on CPU than the (E, D) x (D, T) one, and the softmax over the E experts then
        # runs along dim 0, i.e. elementwise over E contiguous rows of T (aten's softmax over a last
        # dimension of size ~4 is ~4x slower: it vectorises along that tiny dimension).
        logits_t = self._router_logits_t(xf).float()  # (E, T)
        ex = (logits_t - logits_t.amax(dim=0, keepdim=True)).exp()
        probs_t = ex / ex.sum(dim=0, keepdim=True)  # (E, T)
        if self.top_k >= E:
            out = None
            for e, expert in enumerate(self.experts):
                y = _expert_forward(expert, xf) * probs_t[e].unsqueeze(-1).to(xf.dtype)
                out = y if out is None else out + y
            first = probs_t.argmax(dim=0)
        else:
            k = self.top_k
            if k == 1:
                top_p, top_i = probs_t.max(dim=0)  # (T,)
            else:
                top_p, top_i = probs_t.topk(k, dim=0)  # (k, T)
                top_p, top_i = top_p.t(), top_i.t()  # (T, k)
            if tracing:
                out = self._traced_dispatch(xf, top_p.reshape(T, k), top_i.reshape(T, k))
            else:
                out = self._sorted_dispatch(xf, top_p, top_i)
            first = top_i[:, 0] if k > 1 else top_i
        if (self.training or torch.is_grad_enabled()) and not torch.compiler.is_exporting():
            # (not while torch.export traces: an exported program has no attribute to hand it back in)
            if tracing:  # bincount's output size depends on the data
                counts_first = (first.unsqueeze(0) == torch.arange(E, device=first.device).unsqueeze(1)).sum(dim=1)
            else:
                counts_first = torch.bincount(first, minlength=E)
            frac = counts_first.to(probs_t.dtype) / T
            self.aux_loss = E * (frac * probs_t.mean(dim=1)).sum()
        else:  # inference (or export): nothing will read a balance loss
            self.aux_loss = None
        return out.reshape(shape)

    def _sorted_dispatch(self, xf: Tensor, top_p: Tensor, top_i: Tensor) -> Tensor:
        """The eager top-k dispatch: assignments sorted by expert, each expert on its own tokens."""
        T, k = xf.shape[0], self.top_k
        flat_e = top_i.reshape(-1)  # (T*k,) expert of each assignment
        order = torch.argsort(flat_e, stable=True)
        # One host read for all experts (segment sizes), instead of one .any() sync per expert.
        counts: List[int] = torch.bincount(flat_e, minlength=self.num_experts).tolist()
        token_of = order if k == 1 else torch.div(order, k, rounding_mode="floor")
        xs = xf.index_select(0, token_of)
        gate = top_p.reshape(-1).index_select(0, order)
        if k == 1 and not torch.is_grad_enabled():
            # Inference: each expert's output is scaled in place and written straight to its
            # tokens' rows (top-1 assignments are a permutation of the tokens), with no
            # concatenation of the expert outputs and no inverse permutation.
            out = None
            for e, (chunk, tok, g) in enumerate(zip(xs.split(counts), order.split(counts), gate.split(counts))):
                if counts[e] == 0:
                    continue
                expert = self.experts[e]
                plain = _is_plain_expert(expert)
                y = _expert_forward(expert, chunk, plain)
                g = g.unsqueeze(-1).to(y.dtype)
                # In place only on a fresh output (a custom expert may return a view of x).
                y = y.mul_(g) if plain else y * g
                if out is None:
                    out = y.new_empty(T, y.shape[-1])
                out.index_copy_(0, tok, y)
        else:
            # An expert with no tokens still runs (on 0 rows) when its output needs a gradient:
            # its parameters then take part in the graph (zero gradient), which DDP's default
            # find_unused_parameters=False requires on every rank.
            grad = torch.is_grad_enabled()
            ys = [_expert_forward(self.experts[e], chunk) for e, chunk in enumerate(xs.split(counts))
                  if counts[e] > 0 or grad]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)
            y = y * gate.to(y.dtype).unsqueeze(-1)
            if k == 1:
                # Top-1 assignments are a permutation of the tokens: undo it with one gather
                # (cheaper than a zero fill plus a scatter-add).
                inv = torch.empty_like(order).index_copy_(0, order, torch.arange(T, device=order.device))
                out = y.index_select(0, inv)
            else:
                out = y.new_zeros(T, self.d_model).index_add(0, token_of, y)
        return out


class _BKCoreMixin:
    """Shared H0 = discrete Laplacian buffers and the BK-Core call (v -> features).

    Buffers: ``h0_diag_base`` (1, n_seq) = -2, ``h0_super_base`` / ``h0_sub_base`` (1, n_seq-1) = 1
    (the original names and shapes, so original state dicts load). They are sliced to the input's
    length and broadcast by the op; they are never expanded per batch row.
    z is ``1j`` (buffer ``z``) or, with ``learnable_z=True``, ``z_real + 1j*exp(z_log_imag)``
    (Im z > 0 by construction, which keeps the resolvent away from H's real spectrum).
    The buffer z stays complex under ``.to(dtype)``, ``.half()``, ``.double()``, ... (see ``_apply``).
    """

    def _init_bk(self, n_seq: int, causal: bool, backend: Optional[str], learnable_z: bool) -> None:
        if not isinstance(n_seq, int) or n_seq < 1:
            raise ValueError(f"n_seq: expected a positive int, got {n_seq!r}")
        self.n_seq = n_seq
        self.causal = bool(causal)
        self.backend = backend
        self.register_buffer("h0_diag_base", torch.full((1, n_seq), -2.0))
        self.register_buffer("h0_super_base", torch.ones(1, max(n_seq - 1, 0)))
        self.register_buffer("h0_sub_base", torch.ones(1, max(n_seq - 1, 0)))
        self.learnable_z = bool(learnable_z)
        if self.learnable_z:
            self.z_real = nn.Parameter(torch.zeros(()))
            self.z_log_imag = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("z", torch.tensor(1j, dtype=torch.complex64))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the complex buffer z to the real dtype (1j -> 0). z goes through
        # fn as its real view [Re, Im] instead: it follows the device and the precision (a float64
        # model gets complex128; half/bf16 keep complex64, the op computes those in float32).
        z = self._buffers.get("z")
        if z is None or not z.is_complex():
            return super()._apply(fn, recurse)
        self._buffers["z"] = torch.view_as_real(z)
        try:
            super()._apply(fn, recurse)
            zr = self._buffers["z"]
        finally:
            self._buffers["z"] = z  # kept if fn raised
        if zr.dtype not in (torch.float32, torch.float64):
            zr = torch.view_as_real(z.to(zr.device, torch.complex64))
        self._buffers["z"] = torch.view_as_complex(zr.contiguous())
        return self

    def get_z(self):
        if self.learnable_z:
            return torch.complex(self.z_real.float(), torch.exp(self.z_log_imag.float()))
        return self.z

    def _decode_step(self, v: Tensor, slot: dict) -> Tuple[Tensor, torch.dtype]:
        """One cached position (v (B,), the slot holding the previous pivot): the decode step,
        d_t = (a_t - z) - k / d_{t-1}, y_t = 1 / d_t, as one op. Returns (y (B,), H's dtype)."""
        p, b = slot["pos"], self._buffers
        he = b["h0_diag_base"][0, p] + v
        sup, sub = b["h0_super_base"][0, p - 1], b["h0_sub_base"][0, p - 1]
        if he.dtype == torch.float64:
            sup, sub = sup.double(), sub.double()
        z = self.get_z()
        if he.dtype == torch.float64 and isinstance(z, Tensor):
            z = z.to(torch.complex128)
        y, slot["d"] = ops.bk_core_step(he, sup, sub, z, slot["d"], backend=self.backend)
        slot["pos"] = p + 1
        return y, he.dtype

    def bk_features(self, v: Tensor, cache=None) -> Tensor:
        """v (B, N) potential -> (B, N, 2) [Re G_ii, Im G_ii] of H = H0 + diag(v), in the dtype
        of H's diagonal (v promoted with the float32 buffers).

        ``cache`` (a ``DecodeCache``, causal only): v holds the next N positions of the sequences
        this module has seen so far; the pivot of the last one is carried in the cache's slot."""
        G, dtype = self._resolvent(v, cache)
        # The op computes bf16/fp16 in float32; hand the features back in the diagonal's dtype.
        return torch.view_as_real(G).to(dtype)

    def _resolvent(self, v: Tensor, cache=None, mask: Optional[Tensor] = None) -> Tuple[Tensor, torch.dtype]:
        """(G (B, N) complex of H0 + diag(v), times ``mask`` when given, and H's diagonal dtype);
        with ``cache`` the positions continue from this module's slot (see ``bk_features``)."""
        slot = cache_slot(self, cache, self.causal)
        p = 0 if slot is None else slot["pos"]
        N = v.shape[-1]
        if slot is not None and N == 1 and mask is None and p < self.n_seq and slot.get("d") is not None:
            y, dtype = self._decode_step(v[:, 0], slot)
            return y[:, None], dtype
        if p + N > self.n_seq:
            if slot is None:
                raise ValueError(f"v: expected a sequence length <= n_seq={self.n_seq}, got N={N}")
            raise ValueError(f"v: the cache is at position {p} of this layer and {N} more positions reach "
                             f"{p + N}, past n_seq={self.n_seq}")
        base = self.h0_diag_base[:, p:p + N]
        he_diag = base + v
        state = None if slot is None else slot.get("d")
        lo = p - 1 if state is not None else p  # with a state, entry 0 couples position p - 1 to p
        sup = self.h0_super_base[:, lo:p + N - 1]
        sub = self.h0_sub_base[:, lo:p + N - 1]
        if he_diag.dtype == torch.float64:
            sup, sub = sup.double(), sub.double()
        elif sup.dtype == torch.float64:
            sup, sub = sup.float(), sub.float()
        z = self.get_z()
        if he_diag.dtype == torch.float64 and isinstance(z, Tensor):
            z = z.to(torch.complex128)
        kw = dict(causal=self.causal, backend=self.backend)
        if slot is not None:
            kw.update(initial_state=state, output_final_state=True)
        if mask is None:
            G = ops.bk_core(he_diag, sup, sub, z, **kw)
        else:
            G = ops.bk_core_masked(he_diag, sup, sub, z, mask.to(he_diag.dtype), **kw)
        if slot is not None:
            G, slot["d"] = G
            slot["pos"] = p + N
        return G, he_diag.dtype


class MoEResNetBKLayer(_BKCoreMixin, nn.Module):
    """MoE FFN -> potential v -> BK-Core (H0 + diag(v), z) -> features (Re, Im) -> projection.

    forward(x (B, N, D)) -> (B, N, D) = ffn + bk_scale * output_proj(features), for 1 <= N <= n_seq.
    ``causal=True`` (default) uses the causal BK-Core, whose output at i sees positions <= i only.
    ``backend`` is passed to ``resnet_bk.ops.bk_core`` (None: automatic).

    The layer is split into a per-token part (``ffn_and_potential``) and the sequence mixer
    (``bk_features`` + ``mix_output``) so that adaptive-computation code can run the per-token
    part on a subset of tokens.
    """

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, *, causal: bool = True, backend: Optional[str] = None,
                 learnable_z: bool = False):
        super().__init__()
        self.d_model = d_model
        self.moe_ffn = SparseMoELayer(d_model, num_experts, top_k, dropout_p)
        self.v_proj = nn.Linear(d_model, 1)
        self.output_proj = nn.Linear(2, d_model)
        self.bk_scale = nn.Parameter(torch.ones(()))
        self._init_bk(n_seq, causal, backend, learnable_z)

    def ffn_and_potential(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-token part: x (..., D) -> (ffn (..., D), v (...))."""
        ffn = self.moe_ffn(x)
        return ffn, self.v_proj(ffn).squeeze(-1)

    def mix_output(self, ffn: Tensor, feats: Tensor) -> Tensor:
        """Per-token combine: ffn (..., D), feats (..., 2) -> (..., D)."""
        return ffn + self.bk_scale * self.output_proj(feats)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq, self.v_proj.weight.dtype)
        ffn, v = self.ffn_and_potential(x)
        return self.mix_output(ffn, self.bk_features(v, cache))

    def _fused_block_step(self, ln: nn.LayerNorm, h: Tensor, slot: dict, p: int) -> Optional[Tensor]:
        """The decode step of the block ``h + self(ln(h))`` at position p as one
        ``ops.moe_bk_block_step`` call (h (B, D) -> (B, D)), advancing ``slot``, when this layer is
        the standard one (top-1 MoE of plain experts, plain projections, no forced backend, one dtype)
        and p continues the slot's pivot; the caller has checked the modules' plainness and that the
        op may run (``ops.block_step_fast_ok``). Else None (nothing changed)."""
        moe, mods, buf = self.moe_ffn, self._modules, self._buffers
        dtype = h.dtype
        if (moe.top_k != 1 or moe.num_experts < 2 or self.backend not in (None, "cpp") or slot["d"] is None
                or slot["pos"] != p or not self.causal):
            return None
        z = self.get_z()
        if not isinstance(z, Tensor) or not (z.dtype == torch.complex64 or dtype == torch.float64):
            return None
        h0 = buf["h0_diag_base"], buf["h0_super_base"], buf["h0_sub_base"]
        if any(t.dtype != torch.float32 and t.dtype != dtype for t in h0) or p >= h0[0].shape[-1]:
            return None
        weights = moe._top1_plain_weights(dtype)
        if weights is None:
            return None
        lp, vp, op = ln._parameters, mods["v_proj"]._parameters, mods["output_proj"]._parameters
        scale = self._parameters["bk_scale"]
        if (len(ln.normalized_shape) != 1 or lp["bias"] is None or vp["bias"] is None or op["bias"] is None
                or scale.dtype != dtype or op["weight"].dtype != dtype):
            return None
        out, slot["d"] = torch.ops.resnet_bk.moe_bk_block_step(
            h, lp["weight"], lp["bias"], ln.eps, *weights, vp["weight"], vp["bias"], *h0, p, z, slot["d"], scale,
            op["weight"], op["bias"])
        slot["pos"] = p + 1
        moe._tokens_seen.add_(h.shape[0])
        moe.aux_loss = None
        return out


class BKMixer(_BKCoreMixin, nn.Module):
    """The cheap part of a BK layer alone: x (B, N, D) -> bk_scale * output_proj(BK(H0 + v_proj(x))).

    Costs O(N D) per sequence (one D->1 and one 2->D projection plus the O(N) BK-Core); used at full
    resolution by the multi-scale layers, where the expensive MoE FFN runs at low resolution.
    """

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def __init__(self, d_model: int, n_seq: int, *, causal: bool = True, backend: Optional[str] = None,
                 learnable_z: bool = False):
        super().__init__()
        self.d_model = d_model
        self.v_proj = nn.Linear(d_model, 1)
        self.output_proj = nn.Linear(2, d_model)
        self.bk_scale = nn.Parameter(torch.ones(()))
        self._init_bk(n_seq, causal, backend, learnable_z)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq, self.v_proj.weight.dtype)
        feats = self.bk_features(self.v_proj(x).squeeze(-1), cache)
        return self.bk_scale * self.output_proj(feats)


class ResNetBKBlock(nn.Module):
    """Pre-norm residual block: forward(x (B, N, D)) -> x + bk_layer(LayerNorm(x)).

    ``bk_layer`` may be given to substitute another layer with the same (B, N, D) -> (B, N, D)
    contract (e.g. the learned-sparsity layer); otherwise a ``MoEResNetBKLayer`` is built.
    """

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, *, causal: bool = True, backend: Optional[str] = None,
                 learnable_z: bool = False, bk_layer: Optional[nn.Module] = None):
        super().__init__()
        self.d_model = d_model
        self.n_seq = n_seq
        self.layer_norm = nn.LayerNorm(d_model)
        self.bk_layer = bk_layer if bk_layer is not None else MoEResNetBKLayer(
            d_model, n_seq, num_experts, top_k, dropout_p, causal=causal, backend=backend,
            learnable_z=learnable_z)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_dtype("x", x, self.layer_norm.weight.dtype)
        if cache is None:
            return x + self.bk_layer(self.layer_norm(x))
        return x + call_with_cache(self.bk_layer, cache, self.layer_norm(x))


def moe_aux_loss(module: nn.Module) -> Optional[Tensor]:
    """Sum of the load-balancing losses of every ``SparseMoELayer`` under ``module`` from its last
    forward (None when there is none)."""
    total = None
    for m in module.modules():
        if isinstance(m, SparseMoELayer) and m.aux_loss is not None:
            total = m.aux_loss if total is None else total + m.aux_loss
    return total


def init_lm_trunk(m: nn.Module, vocab_size: int, d_model: int, n_layers: int, n_seq: int, causal: bool,
                  moe_aux_weight: float, block_factory: Callable[[int], nn.Module]) -> None:
    """What every language model here shares, with the same names and creation order (so the
    same state_dict keys and initialisation): sizes, token and position embeddings, the blocks
    (``block_factory(i)``), the final LayerNorm and the lm_head."""
    check_positive_ints(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_seq=n_seq)
    m.vocab_size = vocab_size
    m.d_model = d_model
    m.n_layers = n_layers
    m.n_seq = n_seq
    m.causal = bool(causal)
    m.moe_aux_weight = float(moe_aux_weight)
    m.token_embedding = nn.Embedding(vocab_size, d_model)
    m.position_embedding = nn.Embedding(n_seq, d_model)
    m.blocks = nn.ModuleList([block_factory(i) for i in range(n_layers)])
    m.layer_norm_final = nn.LayerNorm(d_model)
    m.lm_head = nn.Linear(d_model, vocab_size)


def embed_tokens(m: nn.Module, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
    """Token + position embedding of x (B, N) long, checked against m's n_seq and vocab_size; with
    a ``cache`` the positions continue from the cache's."""
    check_tokens("x", x, m.n_seq, m.vocab_size)
    p = 0
    if cache is not None:
        check_cache(m, cache, x, m.n_seq)
        p = cache.position
    return m.token_embedding(x) + m.position_embedding(torch.arange(p, p + x.shape[1], device=x.device))


def call_with_cache(module: nn.Module, cache: DecodeCache, *args):
    """``module(*args, cache=cache)``, with a clear error when the module cannot stream."""
    if not getattr(module, "supports_cache", False):
        raise TypeError(f"cache: {type(module).__name__} does not support incremental decoding (it has no "
                        f"supports_cache = True and forward(..., cache=...)); call the model without a cache")
    return module(*args, cache=cache)


class LanguageModel(GenerationMixin, nn.Module):
    """Token + learned position embedding -> n_layers blocks -> LayerNorm -> lm_head.

    forward(x (B, N) long, 1 <= N <= n_seq) -> logits (B, N, vocab_size). Causal by default:
    logits at position t depend on tokens <= t only. ``block_factory(i)`` may build block i
    (default: ``ResNetBKBlock``); it must map (B, N, D) -> (B, N, D).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 4, n_seq: int = 128,
                 num_experts: int = 4, top_k: int = 1, dropout_p: float = 0.1, *, causal: bool = True,
                 backend: Optional[str] = None, learnable_z: bool = False,
                 block_factory: Optional[Callable[[int], nn.Module]] = None,
                 moe_aux_weight: float = 0.01):
        super().__init__()
        if block_factory is None:
            def block_factory(i: int) -> nn.Module:
                return ResNetBKBlock(d_model, n_seq, num_experts, top_k, dropout_p, causal=causal,
                                     backend=backend, learnable_z=learnable_z)
        init_lm_trunk(self, vocab_size, d_model, n_layers, n_seq, causal, moe_aux_weight, block_factory)

    def embed(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        return embed_tokens(self, x, cache)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        """x (B, N) -> logits (B, N, V). ``cache`` (from ``init_cache``): x continues the cached
        sequences (prefill or decode) and the cache advances in place."""
        if cache is not None and x.shape[1] == 1:
            out = self._decode_step_plain(x, cache)
            if out is not None:
                return out
        if cache is None:
            h = self.embed(x)
            for block in self.blocks:
                h = block(h)
            return self.lm_head(self.layer_norm_final(h))
        with active_cache(cache):
            h = self.embed(x, cache)
            for block in self.blocks:
                h = call_with_cache(block, cache, h)
            logits = self.lm_head(self.layer_norm_final(h))
        cache.position += x.shape[1]
        return logits

    def _decode_step_plain(self, x: Tensor, cache: DecodeCache) -> Optional[Tensor]:
        """A cached one-token step of a model built from the standard modules, with no hooks, under
        no_grad in eval: the same functional calls the modules make (the same values), without
        their wrappers and per-layer checks (a decode step is mostly such overhead at batch 1).
        None when any of that does not hold: the caller then takes the general path."""
        if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling() or \
                torch.is_autocast_enabled(x.device.type):
            return None
        tok, pos, lnf, head = self.token_embedding, self.position_embedding, self.layer_norm_final, self.lm_head
        if not (_plain_module(self, LanguageModel) and _plain_module(tok, nn.Embedding) and tok.max_norm is None
                and _plain_module(pos, nn.Embedding) and pos.max_norm is None and _plain_module(lnf, nn.LayerNorm)
                and _plain_module(head, nn.Linear)):
            return None
        dtype = tok.weight.dtype
        layers = []
        for block in self.blocks:
            if not _plain_module(block, ResNetBKBlock):
                return None
            L, ln = block.bk_layer, block.layer_norm
            if not (_plain_module(L, MoEResNetBKLayer) and _plain_module(ln, nn.LayerNorm)
                    and _plain_module(L.moe_ffn, SparseMoELayer) and _plain_module(L.v_proj, nn.Linear)
                    and _plain_module(L.output_proj, nn.Linear) and ln.weight is not None
                    and ln.weight.dtype == dtype and L.v_proj.weight.dtype == dtype):
                return None
            layers.append((ln, L))
        check_tokens("x", x, self.n_seq, self.vocab_size)
        check_cache(self, cache, x, self.n_seq)
        p = cache.position
        h = F.embedding(x, tok._parameters["weight"]) + pos._parameters["weight"][p]
        fused = ops.block_step_fast_ok(h[:, 0])
        for ln, L in layers:
            if fused:
                h2 = L._fused_block_step(ln, h[:, 0], cache.slot(L), p)
                if h2 is not None:
                    h = h2[:, None]
                    continue
            lp, mods = ln._parameters, L._modules
            xn = F.layer_norm(h, ln.normalized_shape, lp["weight"], lp["bias"], ln.eps)
            ffn = mods["moe_ffn"].forward(xn)
            vp, op = mods["v_proj"]._parameters, mods["output_proj"]._parameters
            v = F.linear(ffn, vp["weight"], vp["bias"])
            slot = cache.slot(L)
            if slot["d"] is None or slot["pos"] != p:  # not a plain continuation: the general path
                feats = L.bk_features(v.squeeze(-1), cache)
            else:  # the decode step of bk_features (the same values)
                y, dtype = L._decode_step(v[:, 0, 0], slot)
                feats = torch.view_as_real(y).to(dtype)[:, None]
            h = h + (ffn + L._parameters["bk_scale"] * F.linear(feats, op["weight"], op["bias"]))
        lp, hp = lnf._parameters, head._parameters
        logits = F.linear(F.layer_norm(h, lnf.normalized_shape, lp["weight"], lp["bias"], lnf.eps), hp["weight"], hp["bias"])
        cache.position += 1
        return logits

    def training_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, dict]:
        """Next-token loss used by ``resnet_bk.training.train``: CE(logits, y) plus
        ``moe_aux_weight`` times the MoE load-balancing loss. Returns (loss, float metrics)."""
        logits = self(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = moe_aux_loss(self)
        loss = ce if aux is None or self.moe_aux_weight == 0 else ce + self.moe_aux_weight * aux
        return loss, {"ce_loss": ce.detach()}
