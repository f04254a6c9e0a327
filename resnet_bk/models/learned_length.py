"""Learned sequence length: a small predictor picks, per sequence, how many leading positions the
base model runs on; sequences are grouped by predicted length and each group runs truncated.

What differs from the original prototype (ORIGINAL_DESIGN.md 1.5 / 3.6):

* Shorter predictions really run shorter: the batch is split into groups of predicted length and
  the base model (which accepts any N <= n_seq) runs once per group on ``x[group, :L]``, L the
  group's longest predicted length. With a causal base model at most ``max_groups`` (default 2)
  groups are formed, chosen to minimise the tokens run: each base-model call has a fixed cost
  (kernel launches, MoE routing, autograd bookkeeping) that eight small calls would pay eight
  times. A sequence predicted shorter than its group's L has positions run that it does not use;
  causality makes its used positions independent of them, so the result does not depend on the
  grouping. ``max_groups=None`` (or a non-causal base) gives one group per distinct length. No
  module state is mutated.
* Positions at or past a sequence's predicted length are not used (and not run unless they share a
  group's rectangle). Their logits are zeros, i.e. the
  uniform distribution, a finite documented placeholder (never a copy of the last position). In
  ``compute_loss`` they are scored as such, so each dropped real token costs exactly log(V) nats;
  padding (target == ``ignore_index``) costs nothing. The reported cross-entropy and perplexity are
  therefore over ALL real target tokens and directly comparable with the full-length model.
* The predictor learns from the expected cost of its choice under its softmax over the bins,
  differentiated exactly (no sampling noise): (1) the real targets each bin would drop (counted
  from the targets) times the cost of dropping one, log(V) minus the batch's mean cross-entropy
  (the one estimate: what a dropped token would have cost if run); (2) the length penalty
  ``length_penalty * E_p[L] / max_seq_len``. A causal base model's run positions do not depend on
  the length, so these are the whole effect of the choice on the loss. (A REINFORCE estimate on
  per-sequence losses, used before, is dominated by how hard each text is: at d_model 256 its
  predictor reached a token ratio of 1.23 in 150 steps where this one reaches 1.59.) Training
  samples the length from the predictor's distribution; eval takes the argmax.
* The speedup figures are measured, not estimated from an average: ``speedup_estimate`` /
  ``avg_speedup`` are the ratio of tokens a full-length forward would process to tokens actually
  processed (labelled as such), and ``LearnedSequenceLengthTrainer.evaluate(measure_time=True)``
  adds the wall-clock ratio of a full-length forward to the adaptive forward on the same batches.
* Statistics accumulate over every call since ``reset_length_statistics()`` (not the last batch).
* Traced (torch.export, torch.compile), the group plan (a host read of the lengths) is replaced by
  one base-model call per bin length on the rows that chose it, a data-dependent batch (see
  ``_forward_traced``): same logits, no more tokens run than eager.

Causality: the predictor mean-pools the whole input's token embeddings, so the chosen length depends
on the whole sequence (that is the point: it sees where the content ends). Logits at a run position
t still depend on tokens <= t only when the base model is causal.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._lazy import lazy_reexports
from .base import check_positive_ints, check_token_range, moe_aux_loss

if TYPE_CHECKING:
    from ..training.learned_length import LearnedSequenceLengthTrainer

# Moved to resnet_bk.training.learned_length; lazy re-export (PEP 562): models never import training.
__getattr__, __dir__ = lazy_reexports(globals(), {"LearnedSequenceLengthTrainer": "resnet_bk.training.learned_length"})

__all__ = ["SequenceLengthPredictor", "AdaptiveSequenceLengthWrapper", "LearnedSequenceLengthTrainer",
           "default_length_bins", "check_length_bins"]


def _logits_of(out) -> Tensor:
    """Base models may return logits or a tuple starting with them (ACT)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"base_model output: expected logits (B, N, V) or a tuple starting with them, got {type(out).__name__}")


def default_length_bins(max_seq_len: int, num_length_bins: int) -> Tensor:
    """The documented default bins: ``round(linspace(max_seq_len/num_length_bins, max_seq_len,
    num_length_bins))`` as a (num_length_bins,) long tensor (8 bins of 128: 16, 32, ..., 128)."""
    check_positive_ints(max_seq_len=max_seq_len, num_length_bins=num_length_bins)
    if num_length_bins > max_seq_len:
        raise ValueError(f"num_length_bins: expected <= max_seq_len={max_seq_len}, got {num_length_bins}")
    return torch.linspace(max_seq_len / num_length_bins, max_seq_len, num_length_bins).round().long()


def check_length_bins(name: str, bins, max_seq_len: int) -> Tensor:
    """``bins`` as a (K,) long tensor, checked: 1-D, non-empty, integer values strictly increasing
    in [1, max_seq_len]; raises naming ``name`` with expected vs got."""
    t = bins if isinstance(bins, Tensor) else torch.as_tensor(bins)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of lengths, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if not (t.is_floating_point() and bool((t == t.round()).all())):
            raise TypeError(f"{name}: expected integer lengths, got dtype {t.dtype} {t.tolist()}")
    t = t.detach().to(torch.long)
    vals = t.tolist()
    if vals[0] < 1 or vals[-1] > max_seq_len or any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name}: expected strictly increasing lengths in [1, max_seq_len={max_seq_len}], got {vals}")
    return t


class SequenceLengthPredictor(nn.Module):
    """Predict a length bin per sequence from its mean-pooled embeddings.

    Bins: by default ``round(linspace(max_seq_len/num_length_bins, max_seq_len, num_length_bins))``
    (defaults: 16, 32, ..., 128), or the given ``length_bins``; buffer ``length_bins`` (K,) long.
    Network: mean-pool -> Linear(d, d/2) -> ReLU -> Dropout(0.1) -> Linear(d/2, K); the last layer
    (``net[-1]``) always has one output per bin.

    Custom bins (the design's customisation) work after construction too::

        pred.length_bins = torch.tensor([8, 16, 32, 64, 128])   # the head is resized to 5 outputs
        pred.num_length_bins = 5                                 # consistent: nothing to do

    Assigning ``length_bins`` checks the values (strictly increasing integers in [1, max_seq_len])
    and, when the count changes, replaces the output layer with a freshly initialised one of the new
    size (on the old one's device and dtype; make the optimizer after customising). Assigning a
    different ``num_length_bins`` sets the default evenly spaced bins of that count (and resizes the
    head). ``load_state_dict`` adopts the bins stored in the state dict, so a customised predictor
    loads into a default-built one.

    forward(x_emb (B, N, D), return_distribution=False) -> lengths (B,) long [, probs (B, K)].
    Training mode samples the bin from the softmax; eval mode takes the argmax.
    """

    def __init__(self, d_model: int, max_seq_len: int = 128, num_length_bins: int = 8, *, length_bins=None):
        super().__init__()
        check_positive_ints(d_model=d_model, max_seq_len=max_seq_len, num_length_bins=num_length_bins)
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        if length_bins is None:
            bins = default_length_bins(max_seq_len, num_length_bins)
        else:
            bins = check_length_bins("length_bins", length_bins, max_seq_len)
        hidden = max(1, d_model // 2)
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, bins.numel()))
        self.register_buffer("length_bins", bins)
        # Bumped whenever the bins change (the wrapper's statistics are per bin).
        self.bins_version = 0
        # The bins as Python ints: a traced forward (torch.export / torch.compile) sizes its
        # base-model calls with them (it cannot read the buffer's values).
        self.length_bins_host: Tuple[int, ...] = tuple(bins.tolist())
        self._register_load_state_dict_pre_hook(self._adopt_state_dict_bins)

    def __setattr__(self, name, value):
        if name == "length_bins" and "length_bins" in self.__dict__.get("_buffers", {}):
            self._set_bins(check_length_bins("length_bins", value, self.max_seq_len))
        elif name == "num_length_bins":
            check_positive_ints(num_length_bins=value)
            if value != self.length_bins.numel():
                self._set_bins(default_length_bins(self.max_seq_len, value))
        else:
            super().__setattr__(name, value)

    @property
    def num_length_bins(self) -> int:
        return self.length_bins.numel()

    def _set_bins(self, bins: Tensor) -> None:
        old = self._buffers["length_bins"]
        head = self.net[-1]
        if isinstance(head, nn.Linear) and head.out_features != bins.numel():
            new_head = nn.Linear(head.in_features, bins.numel(), bias=head.bias is not None)
            self.net[-1] = new_head.to(device=head.weight.device, dtype=head.weight.dtype)
        self._buffers["length_bins"] = bins.to(old.device)
        self.length_bins_host = tuple(bins.tolist())
        self.bins_version += 1

    def _adopt_state_dict_bins(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                               error_msgs):
        bins = state_dict.get(prefix + "length_bins")
        if isinstance(bins, Tensor) and (bins.shape != self.length_bins.shape or not torch.equal(bins.cpu(), self.length_bins.cpu())):
            self._set_bins(check_length_bins(prefix + "length_bins", bins, self.max_seq_len))

    def bin_logits(self, x_emb: Tensor) -> Tensor:
        """x_emb (B, N, D) -> (B, K) unnormalised log-probabilities, K = len(length_bins)."""
        if not isinstance(x_emb, Tensor) or x_emb.dim() != 3 or x_emb.shape[-1] != self.d_model:
            raise ValueError(f"x_emb: expected shape (B, N, {self.d_model}), got "
                             f"{tuple(x_emb.shape) if isinstance(x_emb, Tensor) else type(x_emb).__name__}")
        logits = self.net(x_emb.mean(dim=1)).float()
        K = self.length_bins.numel()
        if logits.shape[-1] != K:
            raise ValueError(f"length_predictor.net: expected {K} outputs (one per length bin, length_bins="
                             f"{self.length_bins.tolist()}), got {logits.shape[-1]}; assign length_bins / "
                             f"num_length_bins to resize the head, or give the replaced head {K} outputs")
        return logits

    def choose(self, logits: Tensor) -> Tensor:
        """(B, K) logits -> (B,) chosen bin index (sampled in training, argmax in eval)."""
        if self.training:
            return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)
        return logits.argmax(dim=-1)

    def forward(self, x_emb: Tensor, return_distribution: bool = False):
        logits = self.bin_logits(x_emb)
        lengths = self.length_bins[self.choose(logits)]
        if return_distribution:
            return lengths, torch.softmax(logits, dim=-1)
        return lengths


class AdaptiveSequenceLengthWrapper(nn.Module):
    """Run ``base_model`` on each sequence truncated to its predicted length.

    ``base_model``: maps tokens (b, L) -> logits (b, L, V) for any 1 <= L <= its n_seq, and has a
    ``token_embedding`` (nn.Embedding) that the predictor reads (detached: the length cost does
    not flow into the embeddings).

    forward(x (B, N) long, use_adaptive_length=True) -> (logits (B, N, V), length_info). With
    ``use_adaptive_length=False`` every sequence runs at full length (same return type).
    Logits at positions >= the sequence's length are zeros (uniform placeholder; see module doc).

    length_info: predicted_lengths (B,) long, length_probs (B, bins), log_prob (B,) (with grad),
    bin_log_probs (B, bins) (with grad), bin_lengths (bins,), expected_length (B,) (with grad), avg_predicted_length, max_predicted_length, original_length,
    tokens_processed (positions the base model ran, group rectangles included), tokens_total,
    num_groups (base-model calls), speedup_estimate (= tokens_total/tokens_processed: a token ratio,
    not a time). ``max_groups``: see the module doc.

    ``length_bins``: custom bins (as for ``SequenceLengthPredictor``; ``num_length_bins`` then
    follows them). The predictor may also be replaced (``wrapper.length_predictor = custom``); the
    interface a predictor must have:

    * required: ``forward(x_emb (B, N, D), return_distribution=False)``; with
      ``return_distribution=True`` it returns ``(lengths (B,) integer, probs (B, K))``: the chosen
      length of each sequence (sampled or argmax, as the predictor decides) and its distribution
      over K bins, with gradient for the predictor to learn from the length cost;
    * optional: ``length_bins`` (K,) integer, the length of each bin (default: the documented
      evenly spaced bins for K, ``round(linspace(max_seq_len/K, max_seq_len, K))``); every returned
      length must be one of the bins;
    * optional: ``bin_logits(x_emb) -> (B, K)`` and ``choose(logits) -> (B,)`` bin indices (what
      ``SequenceLengthPredictor`` has); when both exist they are used instead of ``forward``.

    A predictor that breaks the interface raises a ValueError/TypeError naming
    ``length_predictor`` and what it returned.
    """

    def __init__(self, base_model: nn.Module, max_seq_len: int = 128, num_length_bins: int = 8,
                 length_penalty: float = 0.01, *, ignore_index: int = -100, max_groups: Optional[int] = 2,
                 length_bins=None):
        super().__init__()
        emb = getattr(base_model, "token_embedding", None)
        if not isinstance(emb, nn.Embedding):
            raise TypeError("base_model: expected a model with a token_embedding (nn.Embedding) for the "
                            f"length predictor to read, got {type(base_model).__name__} without one")
        n_seq = getattr(base_model, "n_seq", None)
        if isinstance(n_seq, int) and max_seq_len > n_seq:
            raise ValueError(f"max_seq_len: expected <= base_model.n_seq={n_seq}, got {max_seq_len}")
        if float(length_penalty) < 0:
            raise ValueError(f"length_penalty: expected >= 0, got {length_penalty!r}")
        self.base_model = base_model
        self.max_seq_len = max_seq_len
        self.length_penalty = float(length_penalty)
        self.ignore_index = ignore_index
        if max_groups is not None and (not isinstance(max_groups, int) or max_groups < 1):
            raise ValueError(f"max_groups: expected a positive int or None, got {max_groups!r}")
        self.max_groups = max_groups
        self.length_predictor = SequenceLengthPredictor(emb.embedding_dim, max_seq_len, num_length_bins,
                                                        length_bins=length_bins)
        self.reset_length_statistics()

    # -- statistics ------------------------------------------------------------------------------
    def _bins(self, K: Optional[int] = None) -> Tuple[Optional[Tensor], object]:
        """(bins (K,) long or None, key): the predictor's ``length_bins`` (checked, unless it is a
        ``SequenceLengthPredictor``, whose setter checks them), else the default spacing for K
        (``K`` or its ``num_length_bins``). ``key`` changes when the bins do (statistics are per bin)."""
        pred = self.length_predictor
        if isinstance(pred, SequenceLengthPredictor):
            return pred.length_bins, (id(pred), pred.bins_version)
        if K is not None and torch.compiler.is_compiling():
            host = self._host_bins(K)
            return torch.tensor(host, dtype=torch.long), (id(pred), host)
        bins = getattr(pred, "length_bins", None)
        if bins is not None:
            bins = check_length_bins("length_predictor.length_bins", bins, self.max_seq_len)
        else:
            K = getattr(pred, "num_length_bins", None) if K is None else K
            if not isinstance(K, int):
                return None, (id(pred), None)
            bins = default_length_bins(self.max_seq_len, K)
        return bins, (id(pred), tuple(bins.tolist()))

    def reset_length_statistics(self, bins: Optional[Tensor] = None, key: object = None) -> None:
        if bins is None:
            bins, key = self._bins()
            if bins is None:
                bins = torch.zeros(0, dtype=torch.long)
        self._stats_key = key
        self._stats_bins = bins.detach().cpu()
        self._bin_counts = torch.zeros(bins.numel(), dtype=torch.long)
        self._sum_lengths = 0
        self._num_predictions = 0
        self._tokens_processed = 0
        self._tokens_total = 0

    def get_length_statistics(self) -> Dict:
        """Accumulated over every adaptive forward since the last reset."""
        n = self._num_predictions
        dist = (self._bin_counts.double() / n * 100.0).tolist() if n else [0.0] * len(self._bin_counts)
        return {"avg_predicted_length": self._sum_lengths / n if n else 0.0,
                "length_distribution": dist,
                "length_bins": self._stats_bins.tolist(),
                "avg_speedup": self._tokens_total / self._tokens_processed if self._tokens_processed else 1.0,
                "speedup_kind": "tokens_total / tokens_processed (not wall-clock)",
                "total_predictions": n,
                "tokens_processed": self._tokens_processed,
                "tokens_total": self._tokens_total}

    # -- forward -------------------------------------------------------------------------------
    def _check_x(self, x) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"x: expected token ids of shape (B, N), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
            raise TypeError(f"x: expected integer token ids of dtype torch.int64 or torch.int32, got dtype {x.dtype}")
        if not 1 <= x.shape[1] <= self.max_seq_len:
            raise ValueError(f"x: expected a sequence length 1 <= N <= max_seq_len={self.max_seq_len}, got N={x.shape[1]}")
        emb = getattr(self.base_model, "token_embedding", None)
        if isinstance(emb, nn.Embedding):
            check_token_range("x", x, emb.num_embeddings)

    def forward(self, x: Tensor, use_adaptive_length: bool = True, cache=None) -> Tuple[Tensor, Dict]:
        if cache is not None:
            raise ValueError("cache: AdaptiveSequenceLengthWrapper cannot decode incrementally: its length predictor "
                             "reads the whole row before any token is computed; decode with its base_model "
                             "(base_model.init_cache / base_model.generate)")
        self._check_x(x)
        B, N = x.shape
        if not use_adaptive_length:
            logits = _logits_of(self.base_model(x))
            full = torch.full((B,), N, dtype=torch.long, device=x.device)
            return logits, {"predicted_lengths": full, "avg_predicted_length": float(N),
                            "max_predicted_length": N, "original_length": N, "tokens_processed": B * N,
                            "tokens_total": B * N, "num_groups": 1, "speedup_estimate": 1.0}
        with torch.no_grad():
            emb = self.base_model.token_embedding(x)
        choice, probs, log_probs, bins, key = self._predict(emb)                # (B,), (B, K) x2, (K,)
        if torch.compiler.is_compiling():
            return self._forward_traced(x, choice, probs, log_probs, bins, key)
        if key != self._stats_key:
            self.reset_length_statistics(bins, key)   # the bins changed: per-bin counts start again
        # A bin longer than the input means "the whole input": the sequence runs at N.
        bins_n = torch.minimum(bins, torch.tensor(N, device=bins.device))      # (K,)
        lengths = bins_n[choice]                                               # (B,)
        # Group sequences by length: one sort and one host read of the distinct lengths and sizes.
        order = torch.argsort(lengths, stable=True)
        uniq, counts = torch.unique_consecutive(lengths[order], return_counts=True)
        uniq_host, counts_host = uniq.tolist(), counts.tolist()
        groups = self._plan_groups(uniq_host, counts_host)
        segs = order.split(counts_host)
        logits = None
        processed = 0
        for lo, hi in groups:
            L = uniq_host[hi - 1]                      # the group runs at its longest member's length
            idx_t = segs[lo] if hi - lo == 1 else torch.cat(segs[lo:hi])
            out = _logits_of(self.base_model(x.index_select(0, idx_t)[:, :L]))   # (b, L, V)
            if hi - lo > 1:
                # Members predicted shorter than L: their positions past their own length are the
                # placeholder too (run only because they share the group's rectangle).
                own = lengths.index_select(0, idx_t)
                out = out * (torch.arange(L, device=x.device)[None, :] < own[:, None]).unsqueeze(-1).to(out.dtype)
            if logits is None:
                # Zeros = uniform placeholder for positions that are not run.
                logits = out.new_zeros(B, N, out.shape[-1])
            logits[idx_t, :L] = out
            processed += L * idx_t.numel()
        predicted = int(sum(L * c for L, c in zip(uniq_host, counts_host)))
        expected = (probs * bins_n.to(probs.dtype)).sum(-1)                     # (B,) with grad
        self._bin_counts += torch.bincount(choice.cpu(), minlength=bins.numel())
        self._sum_lengths += predicted
        self._num_predictions += B
        self._tokens_processed += processed
        self._tokens_total += B * N
        info = {"predicted_lengths": lengths, "length_probs": probs.detach(),
                "log_prob": log_probs.gather(1, choice[:, None]).squeeze(1), "bin_log_probs": log_probs,
                "bin_probs": probs,
                "bin_lengths": bins_n, "expected_length": expected,
                "avg_predicted_length": predicted / B, "max_predicted_length": max(uniq_host),
                "original_length": N, "tokens_processed": processed, "tokens_total": B * N,
                "num_groups": len(groups), "speedup_estimate": B * N / processed}
        return logits, info

    def _host_bins(self, K: int) -> Tuple[int, ...]:
        """The bin lengths as Python ints while tracing (the traced buffer has no readable values)."""
        pred = self.length_predictor
        host = getattr(pred, "length_bins_host", None)
        if isinstance(pred, SequenceLengthPredictor):
            return host
        bins = getattr(pred, "length_bins", None)
        if isinstance(host, (tuple, list)):
            bins = host
        elif bins is not None and not isinstance(bins, (tuple, list)):
            if torch.compiler.is_exporting():  # (torch.compile reads the tensor, breaking the graph)
                raise TypeError("length_predictor: torch.export needs the bin lengths on the host: give the "
                                "predictor length_bins as a Python sequence, or a tuple length_bins_host of its "
                                f"{K} bin lengths next to the length_bins tensor")
            return tuple(check_length_bins("length_predictor.length_bins", bins, self.max_seq_len).tolist())
        with torch._subclasses.fake_tensor.unset_fake_temporarily():  # host values, not traced
            if bins is None:
                return tuple(default_length_bins(self.max_seq_len, K).tolist())
            return tuple(check_length_bins("length_predictor.length_bins", bins, self.max_seq_len).tolist())

    @torch.compiler.disable
    def _record_traced(self, choice: Tensor, lengths: Tensor, bins: Tensor, key: object, N: int) -> None:
        """The statistics of a forward under torch.compile, recorded outside the graph (host reads)."""
        if key != self._stats_key:
            self.reset_length_statistics(bins, key)
        B = choice.shape[0]
        run = int(lengths.sum())
        self._bin_counts += torch.bincount(choice.cpu(), minlength=bins.numel())
        self._sum_lengths += run
        self._num_predictions += B
        self._tokens_processed += run
        self._tokens_total += B * N

    def _forward_traced(self, x: Tensor, choice: Tensor, probs: Tensor, log_probs: Tensor, bins: Tensor,
                        key: object) -> Tuple[Tensor, Dict]:
        """The adaptive forward as torch.export / torch.compile trace it: the group plan of eager
        (host reads of the distinct lengths and their counts) cannot be traced, so the graph makes
        one base-model call per distinct bin length L (bins longer than N run at N), on the rows
        that chose it, gathered with a data-dependent count (an unbacked size; 0 rows when none
        did) and truncated to L. These are eager's exact groups: same logits (zeros past each
        row's length), and the compute saving survives export; with a causal base model eager
        may merge groups into a rectangle (``max_groups``), so the traced graph runs at most as
        many tokens as eager, in up to K calls. The data-dependent entries of its info
        (avg_predicted_length, max_predicted_length, tokens_processed, speedup_estimate) are 0-dim
        tensors; num_groups is the number of base-model calls in the graph. Under torch.compile the
        length statistics are recorded outside the graph; an exported program does not record them
        (it has no Python state)."""
        B, N = x.shape
        K = probs.shape[1]
        host = self._host_bins(K)
        bins_n = bins.clamp(max=N)
        lengths = bins_n[choice]                                               # (B,)
        distinct = sorted({min(int(b), N) for b in host})
        logits = None
        for L in distinct:
            rows = (lengths == L).nonzero().squeeze(1)                         # (b,), b data-dependent
            out = _logits_of(self.base_model(x.index_select(0, rows)[:, :L]))  # (b, L, V)
            if logits is None:
                logits = out.new_zeros(B, N, out.shape[-1])                    # the uniform placeholder
            logits = logits.index_copy(0, rows, F.pad(out, (0, 0, 0, N - L)))
        if not torch.compiler.is_exporting():
            self._record_traced(choice, lengths, bins, key, N)
        processed = lengths.sum()
        expected = (probs * bins_n.to(probs.dtype)).sum(-1)
        info = {"predicted_lengths": lengths, "length_probs": probs.detach(),
                "log_prob": log_probs.gather(1, choice[:, None]).squeeze(1), "bin_log_probs": log_probs,
                "bin_probs": probs, "bin_lengths": bins_n, "expected_length": expected,
                "avg_predicted_length": processed.double() / B, "max_predicted_length": lengths.max(),
                "original_length": N, "tokens_processed": processed, "tokens_total": B * N,
                "num_groups": len(distinct), "speedup_estimate": (B * N) / processed.double()}
        return logits, info

    def _predict(self, emb: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, object]:
        """(choice (B,) bin index, probs (B, K), log_probs (B, K), bins (K,) long, bins key) from the
        predictor, through ``bin_logits``/``choose`` when it has both, else through its
        ``forward(emb, return_distribution=True)``; checked against the documented interface."""
        pred = self.length_predictor
        B = emb.shape[0]
        if callable(getattr(pred, "bin_logits", None)) and callable(getattr(pred, "choose", None)):
            logits = pred.bin_logits(emb)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != B:
                raise ValueError(f"length_predictor.bin_logits: expected a (B={B}, K) tensor, got "
                                 f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
            bins, key = self._bins(logits.shape[1])
            bins = bins.to(emb.device)
            if logits.shape[1] != bins.numel():
                raise ValueError(f"length_predictor.bin_logits: expected {bins.numel()} columns (one per length bin, "
                                 f"length_bins={bins.tolist()}), got {logits.shape[1]}")
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            choice = pred.choose(logits.detach())
            if not isinstance(choice, Tensor) or choice.shape != (B,) or choice.is_floating_point():
                raise ValueError(f"length_predictor.choose: expected (B={B},) integer bin indices, got "
                                 f"{tuple(choice.shape) if isinstance(choice, Tensor) else type(choice).__name__}")
            return choice.long(), log_probs.exp(), log_probs, bins, key
        out = pred(emb, return_distribution=True)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
            raise TypeError("length_predictor: forward(x_emb, return_distribution=True) must return (lengths (B,), "
                            f"probs (B, K)), got {type(out).__name__}")
        lengths, probs = out
        if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"length_predictor: expected lengths of shape (B={B},) with an integer dtype, got "
                             f"{tuple(lengths.shape)} {lengths.dtype}")
        if probs.dim() != 2 or probs.shape[0] != B or not probs.is_floating_point():
            raise ValueError(f"length_predictor: expected probs of shape (B={B}, K) floating, got "
                             f"{tuple(probs.shape)} {probs.dtype}")
        bins, key = self._bins(probs.shape[1])
        bins = bins.to(emb.device)
        if probs.shape[1] != bins.numel():
            raise ValueError(f"length_predictor: probs has {probs.shape[1]} columns but length_bins has "
                             f"{bins.numel()} ({bins.tolist()}); they must match")
        hit = lengths.to(bins.device)[:, None] == bins[None, :]                  # (B, K)
        if torch.compiler.is_compiling():  # no host read while tracing: checked when the graph runs
            torch._assert_async(hit.any(dim=1).all(), "length_predictor: returned a length that is not in length_bins")
        elif not bool(hit.any(dim=1).all()):
            bad = lengths[~hit.any(dim=1)].tolist()
            raise ValueError(f"length_predictor: returned lengths {bad} that are not in length_bins={bins.tolist()} "
                             "(define length_bins on the predictor to use other lengths)")
        probs = probs.float()
        return hit.long().argmax(dim=1), probs, torch.log(probs), bins, key

    def _plan_groups(self, lens, counts):
        """Contiguous groups [(lo, hi), ...] of the sorted distinct lengths ``lens`` (sizes ``counts``)
        that minimise the tokens run (each group runs at its longest length), using at most
        ``max_groups`` groups (each group is one base-model call; fewer, larger calls amortise the
        per-call overhead). Exact groups (one per distinct length) when ``max_groups`` is None or
        the base model is not causal: there, running a position past a sequence's length would
        change its earlier outputs."""
        m = len(lens)
        G = m if self.max_groups is None or not getattr(self.base_model, "causal", False) else min(self.max_groups, m)
        if G >= m:
            return [(i, i + 1) for i in range(m)]
        pref = [0]
        for c in counts:
            pref.append(pref[-1] + c)
        INF = float("inf")
        # best[g][j]: fewest tokens covering lens[:j] with g groups; m <= num_length_bins is small.
        best = [[INF] * (m + 1) for _ in range(G + 1)]
        back = [[0] * (m + 1) for _ in range(G + 1)]
        best[0][0] = 0
        for g in range(1, G + 1):
            for j in range(1, m + 1):
                for i in range(j):
                    c = best[g - 1][i] + lens[j - 1] * (pref[j] - pref[i])
                    if c < best[g][j]:
                        best[g][j], back[g][j] = c, i
        g = min(range(1, G + 1), key=lambda k: (best[k][m], k))
        out, j = [], m
        while j > 0:
            i = back[g][j]
            out.append((i, j))
            j, g = i, g - 1
        return out[::-1]

    def compute_loss(self, logits: Tensor, targets: Tensor, length_info: Optional[Dict] = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
        """(total, ce, length_cost).

        ce: mean cross-entropy over every real target (targets != ignore_index); positions that
        were not run have uniform placeholder logits and cost log(V) each. length_cost:
        ``length_penalty * mean(E_p[L]) / max_seq_len`` (differentiable in the predictor).
        total = ce + length_cost (plus a term of value zero whose gradient is that of the expected
        cost of the dropped targets; see the module doc)."""
        B, N, V = logits.shape
        targets = targets.reshape(B, N)
        per_tok = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none",
                                  ignore_index=self.ignore_index)             # (B, N), 0 at ignored
        valid = (targets != self.ignore_index)
        n_valid = valid.sum()
        # A batch with no real target has ce = 0 (0 / 1), not NaN.
        ce = per_tok.sum() / torch.maximum(n_valid, torch.ones_like(n_valid))
        if length_info is None or "bin_log_probs" not in length_info:
            zero = ce.new_zeros(())
            return ce, ce, zero
        length_cost = self.length_penalty * length_info["expected_length"].mean() / self.max_seq_len
        # The length choice changes the loss through the real targets it drops: each costs log(V)
        # instead of the cross-entropy it would have had if run (estimated by this batch's mean, the
        # one approximation). The count of real targets at or past every bin's length is known from
        # the targets, so the expected drop cost under the predictor's distribution is exact in the
        # bin probabilities: its gradient trains the predictor with no sampling noise (a REINFORCE
        # estimate on per-sequence losses is dominated by how hard each text is). Added as
        # ``cost - cost.detach()``: zero in value, so ``total`` stays ce + length_cost.
        lengths = length_info["bin_lengths"]                                   # (bins,), <= N
        at_or_past = torch.cat([valid.flip(1).cumsum(1).flip(1), valid.new_zeros(B, 1, dtype=torch.long)], 1)
        dropped = at_or_past.index_select(1, lengths).to(per_tok.dtype)        # (B, bins)
        per_drop = (math.log(V) - ce).detach()
        probs = length_info["bin_probs"] if "bin_probs" in length_info else length_info["bin_log_probs"].exp()
        drop_cost = (probs * dropped).sum() * per_drop / torch.maximum(n_valid, torch.ones_like(n_valid))
        return ce + length_cost + (drop_cost - drop_cost.detach()), ce, length_cost


    def training_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Dict]:
        """Loss for ``resnet_bk.training.train``: ``compute_loss`` of an adaptive forward plus the
        base model's MoE balance loss (weighted by its ``moe_aux_weight``)."""
        logits, info = self(x, use_adaptive_length=True)
        total, ce, cost = self.compute_loss(logits, y, info)
        aux = moe_aux_loss(self.base_model)
        weight = float(getattr(self.base_model, "moe_aux_weight", 0.0))
        if aux is not None and weight != 0.0:
            total = total + weight * aux
        return total, {"ce_loss": ce.detach(), "length_cost": cost.detach(),
                       "avg_predicted_length": info["avg_predicted_length"],
                       "token_speedup": info["speedup_estimate"]}
