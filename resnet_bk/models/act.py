"""Adaptive Computation Time (Graves 2016) over the depth of a ResNet-BK language model.

Each token carries a state h_l through the blocks. After block l a halting unit gives p_l(t) in
(0, 1); the token halts at the first layer N(t) where sum_{l<=N} p_l >= threshold (or at the last
layer), with remainder R(t) = 1 - sum_{l<N(t)} p_l. The output is sum_l w_l h_l with w_l = p_l for
l < N(t) and w_N = R(t), and the ponder cost is Graves' rho(t) = N(t) + R(t), whose gradient
(-1 for every p_l, l < N) pushes the halting probabilities up, i.e. towards halting earlier.

What is actually saved (fixing ORIGINAL_DESIGN.md 3.3):

* The per-token work of a block (LayerNorm, MoE FFN, v projection, output projection, halting
  unit) runs only on the tokens still running: they are gathered, processed, and scattered back.
  A block in which no token is running is not executed at all.
* The BK-Core mixes the whole sequence (its pivots couple every position), so it runs on the full
  sequence; halted tokens take part with their potential frozen at the value of the last block
  they executed (and their hidden state frozen). The BK-Core is O(N) and cheap next to the MoE.
* ``avg_layers_executed`` is the mean of N(t): the real number of blocks each token went through.

Export (torch.export, eval): the same compaction is in the exported graph, with the running
counts as data-dependent (unbacked) sizes: no Python branch reads them, so every block is in the
graph and runs on its compact running set, possibly empty; the full-sequence BK-Core of a block
with no running token is skipped under ``torch.cond``. The result equals eager's (the gathers are
the same; eager merely skips empty blocks instead of running them on 0 tokens), and the per-token
work saved in eager is saved in the exported program too. ``avg_layers_executed`` and
``layers_skipped`` are read from int64 buffers that the forward (eager, compiled or exported)
updates.

Causality: with the causal BK-Core (default) a token's state depends on positions <= t only, so
its halting decision does too; the running set of one token never influences another token's
computation except through the frozen potentials of positions <= t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from ._lazy import lazy_reexports
from .base import MoEResNetBKLayer, check_hidden, embed_tokens, init_lm_trunk, moe_aux_loss
from .cache import DecodeCache, active_cache
from .generation import GenerationMixin

if TYPE_CHECKING:
    from ..training.act import ACTTrainer

# Moved to resnet_bk.training.act; lazy re-export (PEP 562): models never import training.
__getattr__, __dir__ = lazy_reexports(globals(), {"ACTTrainer": "resnet_bk.training.act"})

__all__ = ["AdaptiveResNetBKBlock", "ACTLanguageModel", "ACTTrainer", "ACTStep"]


@dataclass
class ACTStep:
    """Result of one adaptive block on a batch (flat index space of size B*N).

    h: (B, N, D) new states (halted tokens unchanged); cumsum: (B, N) halting-probability sums
    (1 for tokens that halted); running: (B, N) bool, still running after this block;
    weight: (B, N) w_l (p_l, the remainder R for tokens halting here, 0 for tokens not run);
    v: (B, N) potentials used by the BK-Core (running tokens' new v, others frozen);
    idx: (T,) flat indices of the tokens this block processed; h_run: (T, D) their new states;
    w_run: (T,) their weights; halted_now: (T,) bool; remainder: (T,) R for those halting here.
    """
    h: Tensor
    cumsum: Tensor
    running: Tensor
    weight: Tensor
    v: Tensor
    idx: Tensor
    h_run: Tensor
    w_run: Tensor
    halted_now: Tensor
    remainder: Tensor


def _unbacked(n) -> bool:
    """n is a data-dependent size while tracing (an unbacked SymInt, as torch.export makes for
    the count of a nonzero): no Python branch may read its value."""
    return isinstance(n, torch.SymInt) and bool(free_unbacked_symbols(n))


class AdaptiveResNetBKBlock(nn.Module):
    """A ResNet-BK block with a halting unit ``Linear(d,d/2)-ReLU-Linear(d/2,1)-Sigmoid``.

    forward(x (B,N,D), halting_prob_cumsum=None (B,N), still_running=None (B,N) bool, *,
    frozen_v=None (B,N), is_last=False) -> (x_processed (B,N,D), cumsum_new (B,N),
    still_running_new (B,N) bool, weight (B,N)), computing only the running tokens (see module doc).
    ``halt_bias_init`` sets the initial halting logit (p = sigmoid(bias) at init).

    ``ponder_cost`` (the design's buffer; 0-dim, float32, detached, not saved in the state dict):
    this block's share of Graves' ponder cost summed over every forward since
    ``reset_ponder_cost()``: one per token the block ran plus the remainder R(t) of each token that
    halted at it. Summed over an ``ACTLanguageModel``'s blocks and divided by B*N it is the ponder
    cost that model's forward returns (which carries the gradient; this is for monitoring).
    """

    def __init__(self, d_model: int, n_seq: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, threshold: float = 0.99, *, causal: bool = True,
                 backend: Optional[str] = None, learnable_z: bool = False, halt_bias_init: float = -1.0):
        super().__init__()
        if not (0.0 < float(threshold) <= 1.0):
            raise ValueError(f"threshold: expected a value in (0, 1], got {threshold!r}")
        self.d_model = d_model
        self.n_seq = n_seq
        self.threshold = float(threshold)
        self.layer_norm = nn.LayerNorm(d_model)
        self.bk_layer = MoEResNetBKLayer(d_model, n_seq, num_experts, top_k, dropout_p, causal=causal,
                                         backend=backend, learnable_z=learnable_z)
        hidden = max(d_model // 2, 1)
        self.halting_unit = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, 1),
                                          nn.Sigmoid())
        with torch.no_grad():
            self.halting_unit[2].bias.fill_(float(halt_bias_init))
        self.register_buffer("ponder_cost", torch.zeros(()), persistent=False)

    def reset_ponder_cost(self) -> None:
        """Set ``ponder_cost`` back to 0."""
        self.ponder_cost.zero_()

    def _add_ponder(self, tokens_run: int, halted: Tensor, remainder: Tensor) -> None:
        with torch.no_grad():
            self.ponder_cost.add_(torch.where(halted, remainder, torch.zeros_like(remainder)).sum() + tokens_run)

    def step_compact(self, h_run: Tensor, idx: Optional[Tensor], c_run: Tensor, v_full: Optional[Tensor],
                     B: int, N: int, is_last: bool = False, cache: Optional[DecodeCache] = None):
        """One block on compact running-token state (the path ``ACTLanguageModel`` uses).

        h_run (T, D) running tokens' states, idx (T,) their flat indices in B*N (None: all B*N tokens
        in order), c_run (T,) their halting sums, v_full (B*N,) potentials with halted tokens'
        frozen (None before the first block). Returns (h_new (T, D), v_full (B*N,), c_new (T,),
        halted (T,) bool, w (T,) the weights w_l, remainder (T,) = 1 - c_run). One gather of the
        features and one scatter of the potentials; no full-size copies of the hidden states.
        """
        ffn, v_run = self.bk_layer.ffn_and_potential(self.layer_norm(h_run))
        if idx is None:
            v_full = v_run
        else:
            v_full = v_full.to(v_run.dtype).index_copy(0, idx, v_run)
        if idx is not None and cache is None and _unbacked(h_run.shape[0]):
            # Traced with a data-dependent running count T (torch.export): the block runs whatever
            # T; the full-sequence BK-Core is skipped under torch.cond when T == 0, as eager skips
            # the whole block.
            feats = self._traced_features(v_full, h_run.shape[0], B, N)
        else:
            feats = self.bk_layer.bk_features(v_full.view(B, N), cache).reshape(B * N, 2)
        f_run = feats if idx is None else feats.index_select(0, idx)
        h_new = h_run + self.bk_layer.mix_output(ffn, f_run)
        remainder = 1.0 - c_run
        if is_last:  # every token still running halts here with the remainder
            halted = torch.ones_like(c_run, dtype=torch.bool)
            self._add_ponder(h_run.shape[0], halted, remainder)
            return h_new, v_full, c_run, halted, remainder, remainder
        p = self.halting_unit(h_new).squeeze(-1).to(c_run.dtype)
        c_new = c_run + p
        halted = c_new >= self.threshold
        self._add_ponder(h_run.shape[0], halted, remainder)
        return h_new, v_full, c_new, halted, torch.where(halted, remainder, p), remainder

    def _traced_features(self, v_full: Tensor, T, B: int, N: int) -> Tensor:
        bk = self.bk_layer

        def run(v: Tensor) -> Tensor:
            return bk.bk_features(v.view(B, N)).reshape(B * N, 2)

        def idle(v: Tensor) -> Tensor:  # nothing reads the features of a block no token runs
            return v.new_zeros(B * N, 2, dtype=torch.promote_types(bk.h0_diag_base.dtype, v.dtype))

        return torch.cond(T > 0, run, idle, (v_full,))

    def step(self, h: Tensor, cumsum: Tensor, running: Tensor, frozen_v: Optional[Tensor] = None,
             is_last: bool = False) -> Optional[ACTStep]:
        """One block on the running tokens only. Returns None (nothing computed) when no token runs."""
        B, N, D = h.shape
        idx = running.reshape(-1).nonzero().squeeze(1)  # one host read per block: the gather size
        if not _unbacked(idx.numel()) and idx.numel() == 0:  # (traced unbacked count: runs on 0 tokens)
            # Not executed: drop the balance loss of an earlier forward (its graph may be freed).
            self.bk_layer.moe_ffn.aux_loss = None
            return None
        hf = h.reshape(B * N, D)
        h_run = hf.index_select(0, idx)
        ffn, v_run = self.bk_layer.ffn_and_potential(self.layer_norm(h_run))
        base_v = frozen_v.reshape(-1) if frozen_v is not None else v_run.new_zeros(B * N)
        v_full = base_v.to(v_run.dtype).index_copy(0, idx, v_run)
        feats = self.bk_layer.bk_features(v_full.view(B, N))  # full sequence, halted v frozen
        f_run = feats.reshape(B * N, 2).index_select(0, idx)
        h_run_new = h_run + self.bk_layer.mix_output(ffn, f_run)
        c_prev = cumsum.reshape(-1).index_select(0, idx)
        remainder = 1.0 - c_prev
        if is_last:  # every token still running halts here with the remainder; p is not needed
            p = torch.zeros_like(c_prev)
            c_new = c_prev
            halted_now = torch.ones_like(c_prev, dtype=torch.bool)
        else:
            p = self.halting_unit(h_run_new).squeeze(-1).to(cumsum.dtype)
            c_new = c_prev + p
            halted_now = c_new >= self.threshold
        self._add_ponder(idx.numel(), halted_now, remainder)
        w_run = torch.where(halted_now, remainder, p)
        cumsum_new = cumsum.reshape(-1).index_copy(
            0, idx, torch.where(halted_now, torch.ones_like(c_new), c_new)).view(B, N)
        running_new = running.reshape(-1).index_copy(0, idx, ~halted_now).view(B, N)
        weight = cumsum.new_zeros(B * N).index_copy(0, idx, w_run).view(B, N)
        h_new = hf.index_copy(0, idx, h_run_new.to(hf.dtype)).view(B, N, D)
        return ACTStep(h_new, cumsum_new, running_new, weight, v_full.view(B, N), idx, h_run_new,
                       w_run, halted_now, remainder)

    def forward(self, x: Tensor, halting_prob_cumsum: Optional[Tensor] = None,
                still_running: Optional[Tensor] = None, *, frozen_v: Optional[Tensor] = None,
                is_last: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        check_hidden("x", x, self.d_model, self.n_seq, self.layer_norm.weight.dtype)
        B, N, _ = x.shape
        if halting_prob_cumsum is None:
            halting_prob_cumsum = x.new_zeros(B, N, dtype=torch.float32)
        if still_running is None:
            still_running = torch.ones(B, N, dtype=torch.bool, device=x.device)
        for name, t in (("halting_prob_cumsum", halting_prob_cumsum), ("still_running", still_running)):
            if t.shape != (B, N):
                raise ValueError(f"{name}: expected shape {(B, N)}, got {tuple(t.shape)}")
        if still_running.dtype != torch.bool:
            raise TypeError(f"still_running: expected a bool tensor, got dtype {still_running.dtype}")
        st = self.step(x, halting_prob_cumsum, still_running, frozen_v, is_last)
        if st is None:
            return x, halting_prob_cumsum, still_running, halting_prob_cumsum.new_zeros(B, N)
        return st.h, st.cumsum, st.running, st.weight


class ACTLanguageModel(GenerationMixin, nn.Module):
    """Language model whose depth adapts per token (ACT). Causal by default.

    forward(x (B,N) long, return_ponder_cost=True) -> (logits (B,N,V), ponder_cost scalar) or logits.
    ponder_cost = mean over tokens of N(t) + R(t) (differentiable through R). After a forward,
    ``get_avg_layers_executed()`` is the mean number of blocks computed per token.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 4, n_seq: int = 128,
                 num_experts: int = 4, top_k: int = 1, dropout_p: float = 0.1, act_threshold: float = 0.99,
                 act_lambda: float = 0.01, *, causal: bool = True, backend: Optional[str] = None,
                 learnable_z: bool = False, halt_bias_init: float = -1.0, moe_aux_weight: float = 0.01):
        super().__init__()
        init_lm_trunk(self, vocab_size, d_model, n_layers, n_seq, causal, moe_aux_weight,
                      lambda i: AdaptiveResNetBKBlock(d_model, n_seq, num_experts, top_k, dropout_p, act_threshold,
                                                      causal=causal, backend=backend, learnable_z=learnable_z,
                                                      halt_bias_init=halt_bias_init))
        self.act_threshold = float(act_threshold)
        self.act_lambda = float(act_lambda)
        # Per-forward counters as buffers (not Python numbers): a traced forward (torch.export,
        # torch.compile) updates them with data-dependent counts, which a Python attribute cannot hold.
        self.register_buffer("_tokens_run", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("_tokens_total", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("_blocks_skipped", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def avg_layers_executed(self) -> float:
        """Mean number of blocks computed per token in the last forward (0.0 before any)."""
        total = int(self._tokens_total)
        return int(self._tokens_run) / float(total) if total else 0.0

    @property
    def layers_skipped(self) -> int:
        """Blocks of the last forward in which no token ran (not executed in eager)."""
        return int(self._blocks_skipped)

    def forward(self, x: Tensor, return_ponder_cost: bool = True, cache: Optional[DecodeCache] = None):
        """``cache`` (from ``init_cache``): x continues the cached sequences; each block's BK-Core
        state advances through the new positions with the potentials the full forward would use
        (a halted token's frozen potential), also in blocks no new token runs."""
        if cache is None:
            return self._forward(x, return_ponder_cost, None)
        with active_cache(cache):
            return self._forward(x, return_ponder_cost, cache)

    def _forward(self, x: Tensor, return_ponder_cost: bool, cache: Optional[DecodeCache]):
        h = embed_tokens(self, x, cache)
        B, N = x.shape
        D = self.d_model
        # Compact state: only the running tokens' states, halting sums and flat indices are kept
        # (idx None = every token, so block 0 needs no gather). Halted tokens cost nothing but
        # their frozen potential in v_full, which the full-sequence BK-Core reads.
        h_run = h.reshape(B * N, D)
        c_run = h_run.new_zeros(B * N, dtype=torch.float32)
        idx: Optional[Tensor] = None
        v_full: Optional[Tensor] = None
        idx_parts, contrib_parts = [], []
        ponder = h.new_zeros((), dtype=torch.float32)
        tokens_run = 0
        skipped = 0
        # Traced by torch.export, the running-token counts are unbacked SymInts: no Python branch
        # reads them; every block runs, on its (possibly empty) compact set. (torch.compile breaks
        # the graph at nonzero: its counts are known and take the eager branches.)
        L = len(self.blocks)
        for l, block in enumerate(self.blocks):
            T = h_run.shape[0]
            if not _unbacked(T) and T == 0:  # every token has halted: the remaining blocks do no work at all
                skipped = L - l
                for later in self.blocks[l:]:
                    later.bk_layer.moe_ffn.aux_loss = None
                    if cache is not None:  # (but their BK-Core states still pass these positions)
                        later.bk_layer.bk_features(v_full.view(B, N), cache)
                break
            tokens_run += T
            h_new, v_full, c_new, halted, w, remainder = block.step_compact(
                h_run, idx, c_run, v_full, B, N, is_last=(l == L - 1), cache=cache)
            idx_parts.append(idx)
            contrib_parts.append(w.unsqueeze(-1).to(h_new.dtype) * h_new)
            # Graves' rho = N(t) + R(t), summed over the tokens halting at block l (N(t) = l + 1).
            ponder = ponder + torch.where(halted, remainder + (l + 1), torch.zeros_like(remainder)).sum()
            if l == L - 1:
                break
            keep = (~halted).nonzero().squeeze(1)  # one host read per block: the next gather size
            if _unbacked(keep.shape[0]):
                # The gather always (of every token when none halted: the same values), and the
                # skipped-block count as a tensor: no token runs after block l.
                skipped = halted.all().to(torch.int64) + skipped
                idx = keep if idx is None else idx.index_select(0, keep)
                h_run, c_run = h_new.index_select(0, keep), c_new.index_select(0, keep)
            elif keep.numel() == T:  # nobody halted: no gather needed
                h_run, c_run = h_new, c_new
            else:
                idx = keep if idx is None else idx.index_select(0, keep)
                h_run, c_run = h_new.index_select(0, keep), c_new.index_select(0, keep)
        if cache is not None:
            cache.position += N
        with torch.no_grad():
            self._tokens_run.fill_(tokens_run)
            self._tokens_total.fill_(B * N)
            self._blocks_skipped.fill_(skipped)
        # Output = sum_l w_l h_l: the full-size first contribution plus one index_add of the rest.
        full = [c for i, c in zip(idx_parts, contrib_parts) if i is None]
        out = full[0] if full else h.new_zeros(B * N, D)
        for c in full[1:]:
            out = out + c
        rest = [(i, c) for i, c in zip(idx_parts, contrib_parts) if i is not None]
        if rest:
            out = out.index_add(0, torch.cat([i for i, _ in rest]), torch.cat([c for _, c in rest]).to(out.dtype))
        logits = self.lm_head(self.layer_norm_final(out.view(B, N, D)))
        if not return_ponder_cost:
            return logits
        return logits, ponder / float(B * N)

    def _cached_logits(self, tokens: Tensor, cache: DecodeCache) -> Tensor:
        return self(tokens, return_ponder_cost=False, cache=cache)

    def compute_loss(self, logits: Tensor, targets: Tensor, ponder_cost: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(total = CE + act_lambda * ponder, ce, ponder). logits (B,N,V) or (B*N,V); targets (B,N) or (B*N,)."""
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce + self.act_lambda * ponder_cost, ce, ponder_cost

    def reset_ponder_cost(self) -> None:
        """``reset_ponder_cost()`` of every block."""
        for block in self.blocks:
            block.reset_ponder_cost()

    def get_avg_layers_executed(self) -> float:
        """Mean number of blocks computed per token in the last forward (1 .. n_layers)."""
        return self.avg_layers_executed

    def training_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        """Loss for ``resnet_bk.training.train``: CE + act_lambda * ponder (+ MoE balance term)."""
        logits, ponder = self(x)
        total, ce, ponder = self.compute_loss(logits, y, ponder)
        aux = moe_aux_loss(self)
        if aux is not None and self.moe_aux_weight != 0:
            total = total + self.moe_aux_weight * aux
        return total, {"ce_loss": ce.detach(), "ponder_cost": ponder.detach(),
                       "avg_layers_executed": self.avg_layers_executed}
