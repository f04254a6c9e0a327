"""Learnable position bucketing with landmarks (a drop-in replacement for HyLoRADA's
``LearnableBucketLandmark``).

Each position of a sequence of length S is softly assigned to one of ``num_buckets`` buckets whose
boundaries are learned. A bucket picks a mixture of ``num_landmarks`` learned vectors (its
``position_gates`` row), a content gate adds a per-token term, and the resulting context is added
to the hidden states::

    out = h + scale * dropout(softmax(W_bucket(S) @ position_gates + content_gate(h)) @ landmarks)

What differs from the original (see ORIGINAL_DESIGN.md 3.9):

* positions are normalised by the sequence length actually used, ``p_i = (i + 0.5) / S``, not by
  ``max_positions``, so every bucket is reachable at any S (at S=1024 with ``max_positions=32768``
  the original put every position in bucket 0);
* the temperature is in units of the (uniform) bucket width, ``t = temperature / num_buckets``;
  with the default 0.25 a position's weight sits on about two buckets (effective count 1/sum(w^2)
  = 1.8 at S=1024, peak weight 0.67 on average) instead of sixteen;
* the boundaries are the cumulative sum of ``softmax(bucket_width_logits)``: sorted and strictly
  inside (0, 1) by construction, differentiable, and part of the ``state_dict`` (an old
  ``bucket_boundaries`` entry is converted on load);
* the telescoping bucket weights are one ``diff``, not a Python loop.

The fixed-bucket baseline the design compares against is ``PositionAdaptiveLandmark`` (HyLoRADA's
position-adaptive landmarks: hard buckets with fixed logarithmic, or uniform, spacing; no boundary
parameters; the same landmarks, gates and forward). ``HyLoRADAConfig`` chooses between the two
(``landmark_bucketing="fixed"`` or ``"learnable"``, the design's config option) and builds or
attaches the landmark.

Causality: the output at position i depends on h_i, on i and on the normalising length S only, not
on other tokens' content. Because the normalising length is S, incremental decoding must pass the
intended total length as ``length=`` so that a position keeps its bucket as the sequence grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .cache import current_cache

__all__ = ["LearnableBucketLandmark", "PositionAdaptiveLandmark", "HyLoRADAConfig", "attach_bucket_landmark",
           "BucketLandmarkHandle"]


class _BucketLandmarkBase(nn.Module):
    """What both bucketings share: the forward over ``bucket_weights`` (given by the subclass),
    ``landmarks``, ``position_gates``, ``content_gate``, ``scale`` and ``dropout``."""

    def forward(self, hidden_states: Tensor, *, length: Optional[int] = None, offset: int = 0) -> Tensor:
        """hidden_states (B, S, H) -> (B, S, H) at positions offset..offset+S-1. ``length``: the
        normalising length for incremental decoding (default offset + S)."""
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3:
            raise ValueError("hidden_states: expected a (B, S, H) tensor, got "
                             f"{tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__}")
        B, S, H = hidden_states.shape
        if H != self.hidden_size:
            raise ValueError(f"hidden_states: expected last dimension hidden_size={self.hidden_size}, got {H}")
        if S > self.max_positions:
            raise ValueError(f"hidden_states: sequence length {S} exceeds max_positions={self.max_positions}")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states: expected a floating dtype, got {hidden_states.dtype}")
        if S == 0:
            return hidden_states
        w = self.bucket_weights(S, length=length, offset=offset, device=hidden_states.device,
                                dtype=self.position_gates.dtype)                       # (S, nb)
        pos_logits = w @ self.position_gates                                          # (S, L)
        logits = pos_logits.to(hidden_states.dtype) + self.content_gate(hidden_states)
        attn = torch.softmax(logits, dim=-1)                                          # (B, S, L)
        context = attn @ self.landmarks.to(hidden_states.dtype)                       # (B, S, H)
        return hidden_states + self.scale.to(hidden_states.dtype) * self.dropout(context)


def _check_positions(offset, seq_len: int, length, max_positions: int) -> int:
    """The normalising length (default offset + seq_len), checked; raises naming offset / length."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
    end = offset + seq_len
    norm = end if length is None else length
    if not isinstance(norm, int) or norm < end or norm > max_positions:
        raise ValueError(f"length: expected an int in [{end}, max_positions={max_positions}], got {norm!r}")
    return norm


class PositionAdaptiveLandmark(_BucketLandmarkBase):
    """The fixed-bucket baseline (HyLoRADA's position-adaptive landmarks): each position belongs to
    exactly one bucket (hard assignment) with fixed boundaries, and there are no boundary
    parameters; otherwise the same landmarks, gates and forward as ``LearnableBucketLandmark``.

    Boundaries for a normalising length S (the sequence length by default, like the learnable one,
    so every bucket is reachable): ``spacing="log"`` (the design's "fixed logarithmic position
    bucketing"): ``(S + 1) ** (k / num_buckets) - 1``, k = 1 .. num_buckets-1, narrow buckets at
    the start; ``spacing="uniform"``: ``S * k / num_buckets``. Position i (centre i + 0.5) goes to
    the bucket whose interval contains it.
    """

    SPACINGS = ("log", "uniform")

    def __init__(self, hidden_size: int, num_landmarks: int = 8, max_positions: int = 32768,
                 num_buckets: int = 32, dropout: float = 0.0, *, spacing: str = "log"):
        super().__init__()
        for name, val, lo in (("hidden_size", hidden_size, 1), ("num_landmarks", num_landmarks, 1),
                              ("max_positions", max_positions, 1), ("num_buckets", num_buckets, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {val!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if spacing not in self.SPACINGS:
            raise ValueError(f"spacing: expected one of {self.SPACINGS}, got {spacing!r}")
        self.hidden_size = hidden_size
        self.num_landmarks = num_landmarks
        self.max_positions = max_positions
        self.num_buckets = num_buckets
        self.spacing = spacing
        self.landmarks = nn.Parameter(torch.randn(num_landmarks, hidden_size) * 0.02)
        self.position_gates = nn.Parameter(torch.randn(num_buckets, num_landmarks) * 0.02)
        self.content_gate = nn.Linear(hidden_size, num_landmarks, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.dropout = nn.Dropout(dropout)

    def get_boundaries(self, seq_len: Optional[int] = None) -> Tensor:
        """(num_buckets-1,) float64 boundaries in positions for ``seq_len`` tokens (default max_positions)."""
        n = self.max_positions if seq_len is None else int(seq_len)
        k = torch.arange(1, self.num_buckets, dtype=torch.float64) / self.num_buckets
        if self.spacing == "log":
            return torch.pow(float(n + 1), k) - 1.0
        return k * n

    def bucket_index(self, seq_len: int, *, length: Optional[int] = None, offset: int = 0, device=None) -> Tensor:
        """(seq_len,) long bucket of each position offset..offset+seq_len-1."""
        norm = _check_positions(offset, seq_len, length, self.max_positions)
        centres = torch.arange(offset, offset + seq_len, dtype=torch.float64) + 0.5
        return torch.searchsorted(self.get_boundaries(norm), centres, right=True).to(device)

    def bucket_weights(self, seq_len: int, *, length: Optional[int] = None, offset: int = 0,
                       device=None, dtype=None) -> Tensor:
        """(seq_len, num_buckets) one-hot bucket assignment of positions offset..offset+seq_len-1."""
        device = self.position_gates.device if device is None else device
        dtype = self.position_gates.dtype if dtype is None else dtype
        idx = self.bucket_index(seq_len, length=length, offset=offset, device=device)
        return torch.nn.functional.one_hot(idx, self.num_buckets).to(dtype)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_landmarks={self.num_landmarks}, "
                f"num_buckets={self.num_buckets}, max_positions={self.max_positions}, spacing={self.spacing!r}")


class LearnableBucketLandmark(_BucketLandmarkBase):
    """Learnable soft position buckets mixing learned landmark vectors into the hidden states.

    Args:
        hidden_size: H, the last dimension of the hidden states.
        num_landmarks: L, number of landmark vectors.
        max_positions: the longest sequence accepted; also the length ``get_learned_boundaries``
            expresses boundaries in by default (positions are NOT normalised by it).
        num_buckets: number of position buckets (>= 1).
        dropout: dropout on the context before it is added.
        temperature: softness of the bucket edges in bucket widths (> 0).
    """

    def __init__(self, hidden_size: int, num_landmarks: int = 8, max_positions: int = 32768,
                 num_buckets: int = 32, dropout: float = 0.0, *, temperature: float = 0.25):
        super().__init__()
        for name, val, lo in (("hidden_size", hidden_size, 1), ("num_landmarks", num_landmarks, 1),
                              ("max_positions", max_positions, 1), ("num_buckets", num_buckets, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {val!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.hidden_size = hidden_size
        self.num_landmarks = num_landmarks
        self.max_positions = max_positions
        self.num_buckets = num_buckets
        self.temperature = float(temperature)

        self.landmarks = nn.Parameter(torch.randn(num_landmarks, hidden_size) * 0.02)
        # Equal logits -> equal widths -> the original's uniform initial boundaries.
        self.bucket_width_logits = nn.Parameter(torch.zeros(num_buckets))
        self.position_gates = nn.Parameter(torch.randn(num_buckets, num_landmarks) * 0.02)
        self.content_gate = nn.Linear(hidden_size, num_landmarks, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.dropout = nn.Dropout(dropout)
        self._register_load_state_dict_pre_hook(self._convert_old_boundaries)

    # -- boundaries -------------------------------------------------------------------------
    @property
    def bucket_boundaries(self) -> Tensor:
        """(num_buckets-1,) sorted interior boundaries in (0, 1), as fractions of the sequence."""
        widths = torch.softmax(self.bucket_width_logits, dim=0)
        return torch.cumsum(widths, dim=0)[:-1]

    def get_learned_boundaries(self, seq_len: Optional[int] = None) -> Tensor:
        """(num_buckets-1,) boundaries in positions for a sequence of ``seq_len`` tokens
        (default ``max_positions``, as the original reported them); detached."""
        n = self.max_positions if seq_len is None else int(seq_len)
        return self.bucket_boundaries.detach() * n

    def _convert_old_boundaries(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                unexpected_keys, error_msgs):
        """Load a HyLoRADA ``bucket_boundaries`` entry by converting it to width logits."""
        old = prefix + "bucket_boundaries"
        new = prefix + "bucket_width_logits"
        if old not in state_dict or new in state_dict:
            return
        b = state_dict.pop(old).detach().to(torch.float64).flatten()
        if b.numel() != self.num_buckets - 1:
            raise ValueError(f"{old}: expected {self.num_buckets - 1} boundaries, got {b.numel()}")
        # The original sorted its boundaries at use, so the sorted set is what it computed with.
        edges = torch.cat([b.new_zeros(1), torch.sort(b).values, b.new_ones(1)])
        widths = torch.diff(edges)
        if not bool((widths > 0).all()):
            raise ValueError(f"{old}: boundaries must be distinct and strictly inside (0, 1) to be "
                             f"represented as bucket widths, got {b.tolist()}")
        state_dict[new] = torch.log(widths).to(self.bucket_width_logits.dtype)

    # -- forward ----------------------------------------------------------------------------
    def bucket_weights(self, seq_len: int, *, length: Optional[int] = None, offset: int = 0,
                       device=None, dtype=None) -> Tensor:
        """(seq_len, num_buckets) soft bucket assignment of positions offset..offset+seq_len-1; rows
        sum to 1.

        ``length`` is the normalising length (default ``offset + seq_len``)."""
        norm = _check_positions(offset, seq_len, length, self.max_positions)
        end = offset + seq_len
        device = self.bucket_width_logits.device if device is None else device
        dtype = self.bucket_width_logits.dtype if dtype is None else dtype
        p = (torch.arange(offset, end, device=device, dtype=dtype) + 0.5) / norm     # (S,)
        b = self.bucket_boundaries.to(dtype)                                          # (nb-1,)
        t = self.temperature / self.num_buckets
        s = torch.sigmoid((p[:, None] - b[None, :]) / t)                              # (S, nb-1)
        # P(bucket k) = s_{k-1} - s_k with s_{-1} = 1 and s_{nb-1} = 0 (boundaries are sorted, so
        # s is non-increasing in k and every weight is >= 0).
        ones = torch.ones(seq_len, 1, device=device, dtype=dtype)
        return -torch.diff(torch.cat([ones, s, torch.zeros_like(ones)], dim=1), dim=1)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_landmarks={self.num_landmarks}, "
                f"num_buckets={self.num_buckets}, max_positions={self.max_positions}, "
                f"temperature={self.temperature}")


# -- drop-in attachment ------------------------------------------------------------------------
_ATTR = "bucket_landmark"


class BucketLandmarkHandle:
    """Returned by :func:`attach_bucket_landmark`; ``remove()`` detaches the landmark and restores
    the module exactly (its outputs, its submodules and its ``state_dict`` keys). Usable as a
    context manager."""

    def __init__(self, module: nn.Module, landmark: _BucketLandmarkBase, hook):
        self.module = module
        self.landmark = landmark
        self._hook = hook
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        self._hook.remove()
        if self.module._modules.get(_ATTR) is self.landmark:
            del self.module._modules[_ATTR]
        if self.module.__dict__.get("_bucket_landmark_handle") is self:
            del self.module.__dict__["_bucket_landmark_handle"]
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _apply_landmark(module: nn.Module, inputs, output):
    landmark = module._modules[_ATTR]
    apply = landmark
    cache = current_cache()
    if cache is not None:
        # A cached (incremental) forward of a resnet_bk model: the output holds the positions after
        # those this landmark has seen, normalised by the cache's total length.
        if cache.length is None:
            raise ValueError("cache: a LearnableBucketLandmark normalises positions by the sequence's total length; "
                             "make the cache with model.init_cache(batch_size, length=TOTAL)")
        slot = cache.slot(landmark)

        def apply(h):
            out = landmark(h, length=cache.length, offset=slot["pos"])
            slot["pos"] += h.shape[1]
            return out
    if isinstance(output, Tensor):
        return apply(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        # Hugging Face style blocks return (hidden_states, *extras).
        return (apply(output[0]),) + tuple(output[1:])
    raise TypeError(f"attach_bucket_landmark: the module's output must be a (B, S, H) tensor or a "
                    f"tuple starting with one, got {type(output).__name__}")


def attach_bucket_landmark(module: nn.Module, landmark: _BucketLandmarkBase) -> BucketLandmarkHandle:
    """Apply ``landmark`` to ``module``'s output through a forward hook (e.g. on GPT-2's
    ``transformer.ln_f``) and register it as the submodule ``bucket_landmark`` so that the host
    model's ``parameters()`` and ``state_dict()`` include it.

    Idempotent: attaching the same landmark again returns the existing handle and does not apply
    it twice. Attaching a different landmark while one is attached raises RuntimeError.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(landmark, _BucketLandmarkBase):
        raise TypeError(f"landmark: expected a LearnableBucketLandmark or PositionAdaptiveLandmark, got "
                        f"{type(landmark).__name__}")
    existing = getattr(module, "_bucket_landmark_handle", None)
    if existing is not None and not existing.removed:
        if existing.landmark is landmark:
            return existing
        raise RuntimeError("attach_bucket_landmark: a different LearnableBucketLandmark is already "
                           "attached to this module; call its handle's remove() first")
    if _ATTR in module._modules:
        raise RuntimeError(f"attach_bucket_landmark: module already has a submodule named {_ATTR!r}")
    module.add_module(_ATTR, landmark)
    hook = module.register_forward_hook(_apply_landmark)
    handle = BucketLandmarkHandle(module, landmark, hook)
    # Stored in __dict__ directly (not a Module attribute) so it is not part of the state.
    object.__setattr__(module, "_bucket_landmark_handle", handle)
    return handle


# -- configuration ------------------------------------------------------------------------------
@dataclass
class HyLoRADAConfig:
    """The landmark part of HyLoRADA's configuration (seeds/004, "Option 1: Add to Config").

    ``landmark_bucketing``: ``"fixed"`` (the baseline, ``PositionAdaptiveLandmark`` with
    ``fixed_bucket_spacing``) or ``"learnable"`` (``LearnableBucketLandmark`` with
    ``bucket_temperature``). The other fields are the landmark's constructor arguments.
    ``build_landmark(hidden_size)`` makes the module; ``attach(module, hidden_size)`` makes it and
    applies it to ``module``'s output (``attach_bucket_landmark``), returning the handle.
    """
    num_landmarks: int = 8
    num_buckets: int = 32
    max_positions: int = 32768
    landmark_dropout: float = 0.0
    landmark_bucketing: str = "fixed"
    fixed_bucket_spacing: str = "log"
    bucket_temperature: float = 0.25

    BUCKETINGS = ("fixed", "learnable")

    def __post_init__(self):
        if self.landmark_bucketing not in self.BUCKETINGS:
            raise ValueError(f"landmark_bucketing: expected one of {self.BUCKETINGS}, got {self.landmark_bucketing!r}")
        if self.fixed_bucket_spacing not in PositionAdaptiveLandmark.SPACINGS:
            raise ValueError(f"fixed_bucket_spacing: expected one of {PositionAdaptiveLandmark.SPACINGS}, got "
                             f"{self.fixed_bucket_spacing!r}")
        for name in ("num_landmarks", "num_buckets", "max_positions"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
        if not (0.0 <= float(self.landmark_dropout) < 1.0):
            raise ValueError(f"landmark_dropout: expected a probability in [0, 1), got {self.landmark_dropout!r}")
        t = self.bucket_temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"bucket_temperature: expected a finite number > 0, got {t!r}")

    def build_landmark(self, hidden_size: int) -> _BucketLandmarkBase:
        if self.landmark_bucketing == "learnable":
            return LearnableBucketLandmark(hidden_size, self.num_landmarks, self.max_positions, self.num_buckets,
                                           self.landmark_dropout, temperature=self.bucket_temperature)
        return PositionAdaptiveLandmark(hidden_size, self.num_landmarks, self.max_positions, self.num_buckets,
                                        self.landmark_dropout, spacing=self.fixed_bucket_spacing)

    def attach(self, module: nn.Module, hidden_size: int) -> BucketLandmarkHandle:
        return attach_bucket_landmark(module, self.build_landmark(hidden_size))
