"""Learned sparsity in the BK-Core: a per-position mask says which G_ii to compute; the rest are
filled by a small learned interpolator.

What differs from the original prototype (ORIGINAL_DESIGN.md 1.4 / 3.5):

* The computed positions are EXACT: one ``resnet_bk.ops.bk_core_masked`` call for the whole batch
  returns ``mask * G`` of the true H (the original dropped couplings, which changed every G_ii,
  and applied a position's mask to the whole batch). The kernel still runs the O(N) pivot
  recurrences over every position (G_ii depends on all of H) and skips the combine/output work
  where the mask is 0 (in whole 16-lane blocks), so skipping G_ii alone saves at most that share of
  the op, and the BK-Core is itself a few percent of a layer next to the MoE FFN.
* The real saving therefore comes from around the BK-Core: in ``SparseMoEResNetBKLayer`` (with
  ``skip_ffn=True``, the default) a masked position also skips the MoE FFN, which is most of the
  layer's work; its BK features are interpolated (see the class docstring).
* The importance predictor is ``Linear(d_model, 1)`` (d MACs per token, like ``v_proj``) and the
  interpolator a two-layer 1-D conv over (Re, Im, mask) with 8 hidden channels, causal (left
  padded) when the layer is causal, so that they cost less than what they are meant to save.
* The mask is a hard Gumbel-sigmoid with a straight-through gradient; it is a float tensor and the
  op returns its gradient, so the predictor learns from the task loss and from the sparsity loss.
* ``sparsity_loss`` keeps the graph (the original detached the mask, so its loss had no gradient),
  and the 'adaptive' (Huber) loss uses ``F.huber_loss`` instead of Python branching on a tensor.

Sparsity means the fraction of positions SKIPPED: ``sparsity_ratio = 1 - mask.mean()``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._lazy import lazy_reexports
from .base import (LanguageModel, PerForwardState, ResNetBKBlock, SparseMoELayer, _BKCoreMixin, check_hidden,
                   moe_aux_loss)
from .cache import DecodeCache, cache_slot

if TYPE_CHECKING:
    from ..training.sparsity import AdaptiveSparsityScheduler

# Moved to resnet_bk.training.sparsity; lazy re-export (PEP 562): models never import training.
__getattr__, __dir__ = lazy_reexports(globals(), {"AdaptiveSparsityScheduler": "resnet_bk.training.sparsity"})

__all__ = ["gumbel_sigmoid", "SparseBKCore", "SparseMoEResNetBKLayer", "AdaptiveSparsityScheduler",
           "SparseLanguageModel", "sparsity_loss"]

LOSS_TYPES = ("l2", "l1", "kl", "adaptive")


def gumbel_sigmoid(logits: Tensor, tau: float = 1.0, hard: bool = True, *, noise: bool = True) -> Tensor:
    """Binary-concrete sample: ``sigmoid((logits + L) / tau)`` with L ~ Logistic(0, 1) (the
    difference of two Gumbels). ``hard``: the forward value is the 0/1 threshold at 0.5 and the
    gradient is the soft sample's (straight-through). ``noise=False`` gives the deterministic
    ``logits > 0`` mask (used in eval mode)."""
    if noise:
        u = torch.rand_like(logits)
        # log(u) - log1p(-u) is Logistic(0, 1); u == 0 has probability 2^-24 per element and would
        # give -inf, which the sigmoid maps to an exact 0 (no NaN).
        logits = logits + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / tau)
    if not hard:
        return soft
    hard_mask = (soft > 0.5).to(soft.dtype)
    return hard_mask - soft.detach() + soft


def sparsity_loss(mask: Tensor, target_sparsity: float, loss_type: str = "l2") -> Tensor:
    """Loss pulling the skipped fraction ``1 - mean(mask)`` towards ``target_sparsity``; keeps the
    mask's graph (a 0-dim tensor with gradient when the mask has one).

    'l2': squared error; 'l1': absolute error; 'adaptive': Huber with delta=0.1;
    'kl': KL(Bernoulli(1-target) || Bernoulli(keep rate)) with the keep rate estimated as
    ``(sum(mask) + 0.5) / (numel + 1)`` (Krichevsky-Trofimov), which stays inside (0, 1) when a
    hard mask keeps all or nothing."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(mask, Tensor) or not mask.is_floating_point():
        raise TypeError(f"mask: expected a floating tensor (the straight-through mask), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.numel() == 0:
        raise ValueError("mask: expected a non-empty mask")
    current = 1.0 - mask.float().mean()
    target = torch.tensor(float(target_sparsity), device=mask.device)
    if loss_type == "l2":
        return (current - target) ** 2
    if loss_type == "l1":
        return (current - target).abs()
    if loss_type == "adaptive":
        return F.huber_loss(current, target, delta=0.1)
    keep = (mask.float().sum() + 0.5) / (mask.numel() + 1.0)
    t = 1.0 - float(target_sparsity)  # target keep rate
    kl = keep.new_zeros(())
    if t > 0:
        kl = kl + t * (math.log(t) - torch.log(keep))
    if t < 1:
        kl = kl + (1 - t) * (math.log(1 - t) - torch.log1p(-keep))
    return kl


class SparseBKCore(PerForwardState, _BKCoreMixin, nn.Module):
    """forward(x (B, N, D), v (B, N)) -> (features (B, N, 2), mask (B, N)), as the design's code
    unpacks it; ``return_sparsity_ratio=True`` adds a third value, sparsity_ratio () =
    ``1 - mask.mean()`` (with the mask's gradient), which is also kept after every forward in
    ``last_sparsity_ratio``.

    features are [Re G_ii, Im G_ii] of H = H0 + diag(v) where the mask is 1 (exact) and the
    interpolator's estimate where it is 0. Accepts any 1 <= N <= n_seq.

    Args:
        d_model, n_seq: sizes.
        target_sparsity: fraction of positions to skip that ``sparsity_loss`` aims for.
        tau: Gumbel-sigmoid temperature.
        causal: use the causal BK-Core (``1/d_i``) and a causal interpolator.
        backend: forwarded to ``resnet_bk.ops``.
    """

    _per_forward = ("last_sparsity_ratio",)

    def __init__(self, d_model: int, n_seq: int, target_sparsity: float = 0.5, tau: float = 1.0, *,
                 causal: bool = True, backend: Optional[str] = None, learnable_z: bool = False):
        super().__init__()
        self.last_sparsity_ratio: Optional[Tensor] = None
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        if not 0.0 <= float(target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity: expected a fraction in [0, 1), got {target_sparsity!r}")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau: expected a number > 0, got {tau!r}")
        self.d_model = d_model
        self.target_sparsity = float(target_sparsity)
        self.tau = float(tau)
        self._init_bk(n_seq, causal, backend, learnable_z)
        self.importance_predictor = nn.Linear(d_model, 1)
        # Start with every position computed (bias > 0): the model first learns with exact
        # features and the sparsity loss then turns positions off.
        nn.init.constant_(self.importance_predictor.bias, 2.0)
        # Input channels: Re, Im (zero where skipped) and the mask itself.
        self.interpolator = nn.Sequential(nn.Conv1d(3, 8, kernel_size=3), nn.ReLU(), nn.Conv1d(8, 2, kernel_size=1))

    def _h(self, v: Tensor) -> Tuple[Tensor, Tensor, Tensor, object]:
        N = v.shape[-1]
        he_diag = self.h0_diag_base[:, :N] + v
        sup = self.h0_super_base[:, :N - 1].to(he_diag.dtype)
        sub = self.h0_sub_base[:, :N - 1].to(he_diag.dtype)
        z = self.get_z()
        if he_diag.dtype == torch.float64 and isinstance(z, Tensor):
            z = z.to(torch.complex128)
        return he_diag, sup, sub, z

    def predict_mask(self, x: Tensor) -> Tensor:
        """(B, N) float 0/1 mask with a straight-through gradient (1 = compute G_ii). Training:
        Gumbel sample; eval: ``importance > 0``."""
        logits = self.importance_predictor(x).squeeze(-1).float()
        return gumbel_sigmoid(logits, self.tau, hard=True, noise=self.training)

    def interpolate(self, feats: Tensor, mask: Tensor, slot: Optional[dict] = None) -> Tensor:
        """feats (B, N, 2) zero where skipped, mask (B, N) -> estimates (B, N, 2) for every position;
        position i uses positions <= i only when causal. ``slot`` (incremental decoding): the last
        two positions' inputs before these N are kept there."""
        B, N, _ = feats.shape
        c1, c2 = self.interpolator[0], self.interpolator[2]
        dt = c1.weight.dtype
        inp = torch.cat([feats.to(dt), mask.unsqueeze(-1).to(dt)], dim=-1)  # (B, N, 3)
        if slot is not None:
            prev = slot.get("interp_tail")
            inp = torch.cat([inp.new_zeros(B, 2, 3) if prev is None else prev, inp], 1)
            slot["interp_tail"] = inp[:, inp.shape[1] - 2:]
        else:
            inp = F.pad(inp, (0, 0, 2, 0) if self.causal else (0, 0, 1, 1))    # pad the sequence axis
        # The two convolutions as matmuls over 3-position windows: the same parameters and values
        # as nn.Conv1d, without oneDNN's per-call cost for 3 and 8 channels (~0.1 ms per conv).
        win = inp.unfold(1, 3, 1).reshape(B, N, 9)                          # (B, N, [channel, tap])
        h = F.relu(F.linear(win, c1.weight.reshape(c1.out_channels, -1), c1.bias))
        return F.linear(h, c2.weight.reshape(c2.out_channels, -1), c2.bias).to(feats.dtype)

    def forward(self, x: Tensor, v: Tensor, use_sparse_computation: bool = True, *,
                mask: Optional[Tensor] = None, cache: Optional[DecodeCache] = None,
                return_sparsity_ratio: bool = False):
        """``mask`` (B, N): a mask from ``predict_mask(x)`` already drawn by the caller (the layer
        uses it to skip the FFN too); None draws one here. ``cache`` (a ``DecodeCache``, causal):
        x and v continue the cached sequences. Returns (features, mask), or
        (features, mask, sparsity_ratio) with ``return_sparsity_ratio=True``."""
        check_hidden("x", x, self.d_model, self.n_seq)
        if not isinstance(v, Tensor) or tuple(v.shape) != tuple(x.shape[:2]):
            raise ValueError(f"v: expected shape {tuple(x.shape[:2])} (B, N), got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
        if mask is None:
            mask = self.predict_mask(x)
        elif tuple(mask.shape) != tuple(x.shape[:2]) or not mask.is_floating_point():
            raise ValueError(f"mask: expected a floating (B, N) = {tuple(x.shape[:2])} mask, got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        if cache is not None:
            slot = cache_slot(self, cache, self.causal)
            G, dtype = self._resolvent(v, cache, mask if use_sparse_computation else None)
            feats = torch.view_as_real(G).to(dtype)
            if not use_sparse_computation:
                feats = feats * mask.unsqueeze(-1).to(dtype)
            m = mask.unsqueeze(-1).to(feats.dtype)
            features = feats + (1.0 - m) * self.interpolate(feats, mask, slot)
            return self._result(features, mask, return_sparsity_ratio)
        he_diag, sup, sub, z = self._h(v)
        if use_sparse_computation:
            # One call for the whole batch; the op skips the combine/output work where mask == 0.
            G = ops.bk_core_masked(he_diag, sup, sub, z, mask.to(he_diag.dtype), causal=self.causal,
                                   backend=self.backend)
            feats = torch.view_as_real(G).to(he_diag.dtype)
        else:  # dense reference path: compute every G_ii, then mask (no saving, same values)
            G = ops.bk_core(he_diag, sup, sub, z, causal=self.causal, backend=self.backend)
            feats = torch.view_as_real(G).to(he_diag.dtype) * mask.unsqueeze(-1).to(he_diag.dtype)
        m = mask.unsqueeze(-1).to(feats.dtype)
        # Straight-through blend: exact where computed, interpolated where skipped; both terms carry
        # the mask's gradient to the importance predictor.
        features = feats + (1.0 - m) * self.interpolate(feats, mask)
        return self._result(features, mask, return_sparsity_ratio)

    def _result(self, features: Tensor, mask: Tensor, return_sparsity_ratio: bool):
        ratio = 1.0 - mask.mean()
        self.last_sparsity_ratio = ratio
        if return_sparsity_ratio:
            return features, mask, ratio
        return features, mask

    def sparsity_loss(self, mask: Tensor, loss_type: str = "l2") -> Tensor:
        return sparsity_loss(mask, self.target_sparsity, loss_type)

    def balanced_sparsity_loss(self, mask: Tensor, accuracy_loss: Tensor, sparsity_weight: float = 1.0,
                               accuracy_weight: float = 1.0, loss_type: str = "l2") -> Tuple[Tensor, Dict]:
        """(accuracy_weight * accuracy_loss + sparsity_weight * sparsity_loss, details)."""
        sl = self.sparsity_loss(mask, loss_type)
        total = accuracy_weight * accuracy_loss + sparsity_weight * sl
        return total, {"total_loss": total.detach(), "accuracy_loss": accuracy_loss.detach(),
                       "sparsity_loss": sl.detach(), "sparsity_weight": float(sparsity_weight),
                       "accuracy_weight": float(accuracy_weight),
                       "current_sparsity": (1.0 - mask.detach().float().mean()),
                       "target_sparsity": self.target_sparsity}


class SparseMoEResNetBKLayer(PerForwardState, nn.Module):
    """``MoEResNetBKLayer`` with a learned-sparsity BK-Core.

    forward(x (B, N, D)) -> (B, N, D) = m * ffn + bk_scale * output_proj(features), m the layer's
    0/1 mask (straight-through). With ``skip_ffn=True`` (default) the mask also decides which
    positions the MoE FFN runs on: the FFN is computed only on the kept positions (one gather, one
    scatter), a skipped position's FFN output is 0 and its potential is ``v_proj(0)`` (the bias),
    and its BK features are interpolated. This is where the saving is: the BK-Core cannot skip its
    pivots (every G_ii depends on all of H) and is a few percent of a layer, while the FFN is most
    of it. The mask's gradient from the task comes through ``m * ffn`` at kept positions (and the
    BK/interpolator terms everywhere), as in token-routing models. ``skip_ffn=False`` runs the FFN
    on every position and skips only G_ii (the original design's scope: no measurable saving).
    The mask of the
    last forward is kept WITH its graph in ``last_mask`` so that ``get_sparsity_loss()`` has a
    gradient; ``last_mask_detached`` is the statistics copy.
    """

    _per_forward = ("last_mask", "last_mask_detached", "last_sparsity_ratio")

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1, dropout_p: float = 0.1,
                 target_sparsity: float = 0.5, sparsity_loss_weight: float = 0.01,
                 sparsity_loss_type: str = "adaptive", use_sparse_computation: bool = True, *,
                 tau: float = 1.0, causal: bool = True, backend: Optional[str] = None, skip_ffn: bool = True):
        super().__init__()
        if sparsity_loss_type not in LOSS_TYPES:
            raise ValueError(f"sparsity_loss_type: expected one of {LOSS_TYPES}, got {sparsity_loss_type!r}")
        self.d_model = d_model
        self.n_seq = n_seq
        self.sparsity_loss_weight = float(sparsity_loss_weight)
        self.sparsity_loss_type = sparsity_loss_type
        self.use_sparse_computation = bool(use_sparse_computation)
        self.skip_ffn = bool(skip_ffn)
        self.moe_ffn = SparseMoELayer(d_model, num_experts, top_k, dropout_p)
        self.v_proj = nn.Linear(d_model, 1)
        self.output_proj = nn.Linear(2, d_model)
        self.bk_scale = nn.Parameter(torch.ones(()))
        self.sparse_bk_core = SparseBKCore(d_model, n_seq, target_sparsity, tau, causal=causal, backend=backend)
        self.last_mask: Optional[Tensor] = None
        self.last_mask_detached: Optional[Tensor] = None
        self.last_sparsity_ratio: Optional[Tensor] = None

    @property
    def target_sparsity(self) -> float:
        return self.sparse_bk_core.target_sparsity

    @target_sparsity.setter
    def target_sparsity(self, value: float) -> None:
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"target_sparsity: expected a fraction in [0, 1), got {value!r}")
        self.sparse_bk_core.target_sparsity = float(value)

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq, self.v_proj.weight.dtype)
        if not self.skip_ffn:
            ffn = self.moe_ffn(x)
            v = self.v_proj(ffn).squeeze(-1)
            feats, mask, ratio = self.sparse_bk_core(x, v, self.use_sparse_computation, cache=cache,
                                                     return_sparsity_ratio=True)
            self._keep(mask, ratio)
            return ffn + self.bk_scale * self.output_proj(feats.to(ffn.dtype))
        B, N, D = x.shape
        mask = self.sparse_bk_core.predict_mask(x)  # (B, N) float 0/1, straight-through
        mf = mask.reshape(-1)
        if self.use_sparse_computation:
            idx = (mf > 0.5).nonzero().squeeze(1)  # one host read: the gather size
            m_run = mf.index_select(0, idx).unsqueeze(-1)
            ffn_run = self.moe_ffn(x.reshape(B * N, D).index_select(0, idx)) * m_run.to(x.dtype)
            v_run = self.v_proj(ffn_run).squeeze(-1)
            # Skipped positions: ffn = 0, so v = v_proj(0) = the bias.
            v = self.v_proj.bias.to(v_run.dtype).expand(B * N).index_copy(0, idx, v_run).view(B, N)
        else:  # dense reference: the FFN on every position, then masked (same values, no saving)
            ffn = self.moe_ffn(x) * mask.unsqueeze(-1).to(x.dtype)
            v = self.v_proj(ffn).squeeze(-1)
        feats, mask, ratio = self.sparse_bk_core(x, v, self.use_sparse_computation, mask=mask, cache=cache,
                                                 return_sparsity_ratio=True)
        self._keep(mask, ratio)
        out = self.bk_scale * self.output_proj(feats.to(x.dtype))
        if not self.use_sparse_computation:
            return out + ffn
        return out.reshape(B * N, D).index_add(0, idx, ffn_run.to(out.dtype)).view(B, N, D)

    def _keep(self, mask: Tensor, ratio: Tensor) -> None:
        self.last_mask = mask
        self.last_mask_detached = mask.detach()
        self.last_sparsity_ratio = ratio

    def _need_mask(self) -> Tensor:
        if self.last_mask is None:
            raise RuntimeError("no mask yet: run forward() before asking for the sparsity loss or stats")
        return self.last_mask

    def get_sparsity_loss(self, loss_type: Optional[str] = None) -> Tensor:
        """Unweighted sparsity loss of the last forward's mask (with gradient)."""
        return self.sparse_bk_core.sparsity_loss(self._need_mask(), loss_type or self.sparsity_loss_type)

    def get_balanced_loss(self, accuracy_loss: Tensor, sparsity_weight: Optional[float] = None,
                          accuracy_weight: float = 1.0) -> Tuple[Tensor, Dict]:
        w = self.sparsity_loss_weight if sparsity_weight is None else sparsity_weight
        return self.sparse_bk_core.balanced_sparsity_loss(self._need_mask(), accuracy_loss, w, accuracy_weight,
                                                          self.sparsity_loss_type)

    def get_sparsity_stats(self) -> Dict[str, float]:
        """{sparsity_ratio, num_computed, num_positions, target_sparsity} of the last forward."""
        m = self._need_mask().detach()
        computed = int(m.sum().item())
        return {"sparsity_ratio": 1.0 - computed / m.numel(), "num_computed": computed,
                "num_positions": m.numel(), "target_sparsity": self.target_sparsity}


class SparseLanguageModel(LanguageModel):
    """``LanguageModel`` whose blocks use ``SparseMoEResNetBKLayer``. forward(x (B, N)) -> (B, N, V).

    ``training_loss(x, y)`` = CE + moe_aux_weight * MoE balance + sum over layers of
    ``sparsity_loss_weight * get_sparsity_loss()``.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 4, n_seq: int = 128,
                 num_experts: int = 4, top_k: int = 1, dropout_p: float = 0.1, *, target_sparsity: float = 0.5,
                 sparsity_loss_weight: float = 0.01, sparsity_loss_type: str = "adaptive",
                 use_sparse_computation: bool = True, tau: float = 1.0, causal: bool = True,
                 backend: Optional[str] = None, moe_aux_weight: float = 0.01, skip_ffn: bool = True):
        def block(i: int) -> nn.Module:
            layer = SparseMoEResNetBKLayer(d_model, n_seq, num_experts, top_k, dropout_p, target_sparsity,
                                           sparsity_loss_weight, sparsity_loss_type, use_sparse_computation,
                                           tau=tau, causal=causal, backend=backend, skip_ffn=skip_ffn)
            return ResNetBKBlock(d_model, n_seq, bk_layer=layer)
        super().__init__(vocab_size, d_model, n_layers, n_seq, num_experts, top_k, dropout_p, causal=causal,
                         backend=backend, block_factory=block, moe_aux_weight=moe_aux_weight)

    def sparse_layers(self):
        return [m for m in self.modules() if isinstance(m, SparseMoEResNetBKLayer)]

    def training_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, dict]:
        logits = self(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce
        aux = moe_aux_loss(self)
        if aux is not None and self.moe_aux_weight != 0:
            loss = loss + self.moe_aux_weight * aux
        layers = self.sparse_layers()
        for layer in layers:
            loss = loss + layer.sparsity_loss_weight * layer.get_sparsity_loss()
        sparsity = torch.stack([l.last_sparsity_ratio.detach() for l in layers]).mean()
        return loss, {"ce_loss": ce.detach(), "sparsity": sparsity}
