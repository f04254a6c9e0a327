"""Multi-scale ResNet-BK layers: the expensive MoE FFN runs at low resolution, only cheap work at full.

The original multi-scale layer ran a full-resolution BK layer *in addition* to a half-resolution one
(1.5x the work; the hierarchical U-Net 2.25x; ORIGINAL_DESIGN.md 3.4). Here the work per full-resolution
token is, in multiply-adds (D = d_model; a plain ``MoEResNetBKLayer`` with top-1 is about 4 D^2):

* ``MultiScaleResNetBKLayer`` (factor r=2): MoE FFN + BK at N/2 (2 D^2), an up-projection
  ``Linear(D, r*D)`` at N/2 (D^2), and at full resolution only a ``BKMixer`` (a D->1 projection, the
  O(N) BK-Core, a 2->D projection): about 3 D^2 in all.
* ``HierarchicalMultiScaleLayer`` (N -> N/2 -> N/4 -> N/2 -> N with skips): MoE FFN + BK at N/4 (D^2),
  up-projections at N/4 and N/2 (1.5 D^2), cheap BK mixers at N/2 and N: about 2.5 D^2.

Per-call work kept small (the layers are meant to save wall-clock time, not only multiply-adds): a
``LearnedUpsampling`` without residual folds its per-phase bias into the Linear's bias, so the split into
tokens is a free view; with a residual (the U-Net skip) it is one ``ops.learned_upsample`` pass. Every
"base + bk_scale * output_proj(features)" combine is one ``addmm`` over [Re G, Im G, 1], in place under
no_grad (``_project_add``).

Resampling uses ``resnet_bk.ops.learned_downsample`` / ``learned_upsample``. Causality (``causal=True``,
the default): the downsample uses the op's causal window (group j pools positions [j*r-r+1, j*r], the
Hourglass shift), the low-resolution layers are causal along their own axis, and the upsample writes
low-resolution entry j back to positions j*r .. j*r+r-1, so every output t depends on inputs <= t only.

Any length 1 <= N <= n_seq is accepted: the sequence is right-padded with zeros to a multiple of the
total downsampling factor and the output is cut back to N. With ``causal=True`` the padding cannot
reach the real positions (it lies after them); with ``causal=False`` it enters the last group's pool.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .base import BKMixer, MoEResNetBKLayer, check_dtype, check_hidden
from .cache import DecodeCache, cache_slot

__all__ = ["LearnedDownsampling", "LearnedUpsampling", "MultiScaleResNetBKLayer",
           "HierarchicalMultiScaleLayer", "MultiScaleResNetBKBlock", "count_flops_multi_scale"]


def _project_add(base: Tensor, feats: Tensor, proj: nn.Linear, scale: Tensor) -> Tensor:
    """``base + scale * proj(feats)`` for base (B, N, D), feats (B, N, 2) [Re G, Im G], ``proj`` a
    Linear(2, D): the projection, its bias, the scale and the add as one ``addmm`` of [Re, Im, 1]
    (B*N, 3) and a (3, D) matrix, one pass over the (B, N, D) output instead of four (the same
    parameters; the same value up to float rounding order)."""
    B, N, D = base.shape
    f3 = torch.cat([feats, feats.new_ones(B, N, 1)], dim=-1).reshape(B * N, 3)
    m3 = (scale * torch.cat([proj.weight.t(), proj.bias.unsqueeze(0)], dim=0)).to(f3.dtype)  # (3, D)
    base2 = base.reshape(B * N, D)
    if not torch.is_grad_enabled() and base2.is_contiguous() and base2.dtype == f3.dtype:
        # Inference: accumulate into base's own memory (callers pass a fresh intermediate that is
        # not read again; features were already taken from it), which saves addmm's copy of base
        # into a new output. Not with grad: autograd may have saved base (e.g. for v_proj).
        return base2.addmm_(f3, m3).view(B, N, D)
    return torch.addmm(base2, f3, m3).view(B, N, D)


def _add_mixer(mixer: BKMixer, base: Tensor, h: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
    """``base + mixer(h)`` (all (B, N, D)) through ``_project_add``."""
    feats = mixer.bk_features(mixer.v_proj(h).squeeze(-1), cache)  # (B, N, 2)
    return _project_add(base, feats, mixer.output_proj, mixer.bk_scale)


def _moe_bk(layer: MoEResNetBKLayer, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
    """``layer(x)`` for a low-resolution ``MoEResNetBKLayer`` (x (B, M, D), already checked by the
    caller), with its ffn + bk_scale * output_proj(features) combine through ``_project_add``."""
    ffn, v = layer.ffn_and_potential(x)
    return _project_add(ffn, layer.bk_features(v, cache), layer.output_proj, layer.bk_scale)


# ---- incremental decoding (a DecodeCache): the resampling as streams ---------------------------
# A causal downsample's group j pools positions [j r - r + 1, j r], so it completes when position
# j r arrives; the upsample writes group j's vectors to positions j r .. j r + r - 1. A stream keeps
# the last r - 1 inputs (the window's tail) and the vectors of the group in progress: O(r D) per
# sequence, whatever the context.

def _stream_down(down: "LearnedDownsampling", x: Tensor, slot: dict, key: str) -> Tensor:
    """The low-resolution entries that the next n positions x (B, n, D) complete: (B, J, D)."""
    if not down.causal:
        raise ValueError("cache: a two-sided (causal=False) downsample pools later positions; it cannot decode "
                         "incrementally")
    r = down.factor
    B, n, D = x.shape
    p = slot.get(key + "_pos", 0)
    tail = slot.get(key + "_tail")
    if tail is None:
        tail = x.new_zeros(B, r - 1, D)  # the causal window's zero padding before position 0
    xx = torch.cat([tail, x], 1)  # positions p - r + 1 .. p + n - 1
    slot[key + "_tail"] = xx[:, xx.shape[1] - (r - 1):]
    slot[key + "_pos"] = p + n
    j0, j1 = -(-p // r), (p + n - 1) // r
    if j1 < j0:
        return x.new_empty(B, 0, D)
    if j1 >= down.pool_logits.shape[0]:
        raise ValueError(f"x: position {j1 * r} is past this downsample's n_seq={down.n_seq}")
    # window of group j: xx[j r - p : j r - p + r]
    win = xx[:, j0 * r - p: j1 * r - p + r].unflatten(1, (j1 - j0 + 1, r))  # (B, J, r, D)
    logits = down.pool_logits[j0:j1 + 1]
    if x.dtype == torch.float64:
        logits = logits.double()
    w = logits.softmax(-1).to(x.dtype)  # (J, r)
    return (win * w[None, :, :, None]).sum(2)


def _stream_up(up: "LearnedUpsampling", low: Tensor, n: int, slot: dict, key: str) -> Tensor:
    """The upsampled vectors (B, n, D) of the next n positions, from the low-resolution entries
    ``low`` (B, J, D) they complete (group j covers positions j r .. j r + r - 1) and the group in
    progress (kept in the slot)."""
    r = up.factor
    p = slot.get(key + "_pos", 0)
    slot[key + "_pos"] = p + n
    parts = []
    k = min(n, (-p) % r)  # positions p .. p + k - 1 belong to the group in progress
    if k:
        held = slot[key + "_held"]
        off = p % r
        parts.append(held[:, off:off + k])
    if n > k:
        new = up(low)  # (B, J r, D), starting at position p + k
        parts.append(new[:, : n - k])
        slot[key + "_held"] = new[:, new.shape[1] - r:]
    return torch.cat(parts, 1)  # a fresh tensor (callers may update it in place)


def _pad_to(x: Tensor, multiple: int) -> Tensor:
    N = x.shape[1]
    Np = -(-N // multiple) * multiple
    return x if Np == N else F.pad(x, (0, 0, 0, Np - N))


class LearnedDownsampling(nn.Module):
    """(B, N, D) -> (B, ceil(N/factor), D): softmax-weighted pooling of groups of ``factor`` positions,
    position-specific logits ``pool_logits`` (ceil(n_seq/factor), factor), zero-initialised (mean pool).
    ``causal=True`` uses the op's causal window (see ``resnet_bk.ops.learned_downsample``)."""

    def __init__(self, d_model: int, n_seq: int, factor: int = 2, *, causal: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor: expected a positive int, got {factor!r}")
        self.d_model, self.n_seq, self.factor = d_model, n_seq, factor
        self.causal, self.backend = bool(causal), backend
        self.pool_logits = nn.Parameter(torch.zeros(-(-n_seq // factor), factor))

    def forward(self, x: Tensor) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq)
        x = _pad_to(x, self.factor)
        M = x.shape[1] // self.factor
        logits = self.pool_logits[:M]
        if x.dtype == torch.float64:
            logits = logits.double()
        return ops.learned_downsample(x, logits, causal=self.causal, backend=self.backend)


class LearnedUpsampling(nn.Module):
    """(B, M, D) -> (B, M*factor, D): ``Linear(D, factor*D)`` splits each low-resolution vector into
    ``factor`` tokens, plus a per-phase ``position_bias`` (1, factor, D); ``residual`` (B, M*factor, D)
    is added in the same pass. Here ``n_seq`` is the low-resolution length (as in the original).
    ``forward(y, residual=None, out_len=None)`` cuts the output to ``out_len`` positions when given."""

    def __init__(self, d_model: int, n_seq: int, factor: int = 2, *, backend: Optional[str] = None):
        super().__init__()
        self.d_model, self.n_seq, self.factor, self.backend = d_model, n_seq, factor, backend
        self.upsample_transform = nn.Linear(d_model, factor * d_model)
        self.position_bias = nn.Parameter(torch.zeros(1, factor, d_model))

    def forward(self, y: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        check_hidden("y", y, self.d_model, self.n_seq, self.upsample_transform.weight.dtype)
        if residual is None:
            # Without a residual, the per-phase bias is a constant added to the Linear's output
            # (entry k*D + d of each low-resolution vector): fold it into the Linear's bias, and the
            # split into factor tokens is a free view of the (B, M, factor*D) result (the same
            # value as ops.learned_upsample(z, position_bias), without its extra pass).
            B, M, _ = y.shape
            lin = self.upsample_transform
            bias = lin.bias + self.position_bias.reshape(-1).to(lin.bias.dtype)
            return F.linear(y, lin.weight, bias).view(B, M * self.factor, self.d_model)
        z = self.upsample_transform(y)
        bias = self.position_bias.double() if z.dtype == torch.float64 else self.position_bias.float()
        if residual is not None and residual.dtype != z.dtype:
            residual = residual.to(z.dtype)
        return ops.learned_upsample(z, bias, residual=residual, backend=self.backend)


class MultiScaleResNetBKLayer(nn.Module):
    """x (B, N, D) -> (B, N, D): u = up(MoE-BK_{N/r}(down(x))); out = u + BKMixer_N(x + u).

    The MoE FFN and its BK-Core run at N/r; at full resolution only the cheap ``BKMixer`` runs.
    """

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, *, factor: int = 2, causal: bool = True,
                 backend: Optional[str] = None, learnable_z: bool = False):
        super().__init__()
        self.d_model, self.n_seq, self.factor = d_model, n_seq, factor
        n_low = -(-n_seq // factor)
        self.down = LearnedDownsampling(d_model, n_seq, factor, causal=causal, backend=backend)
        self.low_layer = MoEResNetBKLayer(d_model, n_low, num_experts, top_k, dropout_p, causal=causal,
                                          backend=backend, learnable_z=learnable_z)
        self.up = LearnedUpsampling(d_model, n_low, factor, backend=backend)
        self.full_mixer = BKMixer(d_model, n_seq, causal=causal, backend=backend, learnable_z=learnable_z)

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq, self.full_mixer.v_proj.weight.dtype)
        N = x.shape[1]
        if cache is not None:
            slot = cache_slot(self, cache, self.down.causal)
            low = _stream_down(self.down, x, slot, "down")
            if low.shape[1]:
                low = _moe_bk(self.low_layer, low, cache)
            u = _stream_up(self.up, low, N, slot, "up")
            return _add_mixer(self.full_mixer, u, x + u, cache)
        u = self.up(_moe_bk(self.low_layer, self.down(x)))[:, :N]
        return _add_mixer(self.full_mixer, u, x + u)


class HierarchicalMultiScaleLayer(nn.Module):
    """U-Net mode, x (B, N, D) -> (B, N, D):

        d1 = down1(x) (N/2);  d2 = down2(d1) (N/4);  b = MoE-BK_{N/4}(d2)
        u1 = up1(b) + d1;  u1 = u1 + BKMixer_{N/2}(u1)          (skip from the N/2 encoder level)
        u2 = up2(u1) (N);  out = u2 + BKMixer_N(x + u2)         (skip from the input)

    Only the N/4 level runs the MoE FFN; the other levels run cheap BK mixers.
    """

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, *, causal: bool = True, backend: Optional[str] = None,
                 learnable_z: bool = False):
        super().__init__()
        self.d_model, self.n_seq = d_model, n_seq
        n4 = -(-n_seq // 4)
        n2 = 2 * n4  # the middle level runs at ceil(N/2) padded to even, up to 2*ceil(n_seq/4)
        self.down1 = LearnedDownsampling(d_model, n_seq, 2, causal=causal, backend=backend)
        self.down2 = LearnedDownsampling(d_model, n2, 2, causal=causal, backend=backend)
        self.bottleneck = MoEResNetBKLayer(d_model, n4, num_experts, top_k, dropout_p, causal=causal,
                                           backend=backend, learnable_z=learnable_z)
        self.up1 = LearnedUpsampling(d_model, n4, 2, backend=backend)
        self.mid_mixer = BKMixer(d_model, n2, causal=causal, backend=backend, learnable_z=learnable_z)
        self.up2 = LearnedUpsampling(d_model, n2, 2, backend=backend)
        self.full_mixer = BKMixer(d_model, n_seq, causal=causal, backend=backend, learnable_z=learnable_z)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The middle level used to be sized ceil(n_seq/2), odd when n_seq % 4 is 1 or 2: mid_mixer's
        # H0 buffers (constants) then had one entry less; take this module's.
        for name, buf in self.mid_mixer.named_buffers():
            key = f"{prefix}mid_mixer.{name}"
            if name.startswith("h0_") and key in state_dict and state_dict[key].shape[-1] == buf.shape[-1] - 1:
                state_dict[key] = buf
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def _forward_cached(self, x: Tensor, cache: DecodeCache) -> Tensor:
        """The levels as streams: the N/2 level consumes the entries of down1 as they complete,
        the N/4 level those of down2."""
        slot = cache_slot(self, cache, self.down1.causal)
        d1 = _stream_down(self.down1, x, slot, "down1")  # (B, J1, D) new N/2 entries
        J1 = d1.shape[1]
        u1 = d1
        if J1:
            d2 = _stream_down(self.down2, d1, slot, "down2")
            if d2.shape[1]:
                d2 = _moe_bk(self.bottleneck, d2, cache)
            u1 = _stream_up(self.up1, d2, J1, slot, "up1") + d1
            u1 = _add_mixer(self.mid_mixer, u1, u1, cache)
        u2 = _stream_up(self.up2, u1, x.shape[1], slot, "up2")
        return _add_mixer(self.full_mixer, u2, x + u2, cache)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq, self.full_mixer.v_proj.weight.dtype)
        if cache is not None:
            return self._forward_cached(x, cache)
        N = x.shape[1]
        d1 = self.down1(x)  # (B, ceil(N/2), D)
        d1 = _pad_to(d1, 2)
        d2 = self.down2(d1)
        u1 = self.up1(_moe_bk(self.bottleneck, d2), residual=d1)
        u1 = _add_mixer(self.mid_mixer, u1, u1)
        u2 = self.up2(u1)[:, :N]
        return _add_mixer(self.full_mixer, u2, x + u2)


class MultiScaleResNetBKBlock(nn.Module):
    """Pre-norm residual block: x + layer(LayerNorm(x)), the layer multi-scale or hierarchical."""

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, hierarchical: bool = False, *,
                 top_k: int = 1, dropout_p: float = 0.1, causal: bool = True,
                 backend: Optional[str] = None, learnable_z: bool = False):
        super().__init__()
        self.d_model, self.n_seq, self.hierarchical = d_model, n_seq, bool(hierarchical)
        self.layer_norm = nn.LayerNorm(d_model)
        cls = HierarchicalMultiScaleLayer if hierarchical else MultiScaleResNetBKLayer
        self.layer = cls(d_model, n_seq, num_experts, top_k, dropout_p, causal=causal, backend=backend,
                         learnable_z=learnable_z)

    supports_cache = True  # forward(..., cache=DecodeCache) decodes incrementally (causal)

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_dtype("x", x, self.layer_norm.weight.dtype)
        if cache is None:
            return x + self.layer(self.layer_norm(x))
        return x + self.layer(self.layer_norm(x), cache=cache)


def count_flops_multi_scale(d_model: int, n_seq: int, num_experts: int = 4, hierarchical: bool = False) -> dict:
    """Analytic multiply-add counts per sequence (top-1 MoE, BK-Core counted as ~20 N real ops).

    Returns {standard_flops, multi_scale_flops, speedup, breakdown}; a model, not a measurement
    (see the training entry point / benchmarks for measured times)."""
    D, N, E = d_model, n_seq, num_experts

    def moe_bk(n):
        return n * (D * E + 4 * D * D + D + 2 * D) + 20 * n

    def mixer(n):
        return n * (D + 2 * D) + 20 * n

    def up(n_low, r=2):
        return n_low * r * D * D + n_low * r * D

    def down(n):
        return n * D

    standard = moe_bk(N)
    if hierarchical:
        n2, n4 = math.ceil(N / 2), math.ceil(N / 4)
        parts = {"down": down(N) + down(n2), "moe_bk_quarter": moe_bk(n4), "up": up(n4) + up(n2),
                 "mixers": mixer(n2) + mixer(N)}
    else:
        n2 = math.ceil(N / 2)
        parts = {"down": down(N), "moe_bk_half": moe_bk(n2), "up": up(n2), "mixer": mixer(N)}
    total = sum(parts.values())
    return {"standard_flops": standard, "multi_scale_flops": total, "speedup": standard / total,
            "breakdown": parts}
