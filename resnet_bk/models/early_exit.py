"""Early exit (seeds/000 names ``EarlyExitLanguageModel``): every block but the last has an exit
classifier, and at inference a token stops at the first block whose exit prediction is confident
enough (maximum softmax probability >= ``confidence_threshold``); its logits are that exit's.

What is actually saved (the prototype computed every block on every token until the whole batch
had exited, so nothing was skipped):

* After a block, only the tokens still running are gathered and go on: the per-token work of the
  later blocks (LayerNorm, MoE FFN, v projection, output projection, exit classifier) runs on them
  alone, and a block that no token reaches is not executed at all.
* The BK-Core mixes the whole sequence (every G_ii depends on all of H), so it runs on the full
  sequence; an exited token takes part with its potential frozen at the last block it ran (its
  state frozen too), as in ``ACTLanguageModel``. It is O(N) and cheap next to the MoE FFN.
* Deciding costs something. ``confidence="softmax"`` (the design's rule) computes the exit
  classifier's softmax for every running token at every block: ``d_model * vocab_size``
  multiply-adds each, which can cost more than the blocks it skips. ``confidence="head"`` decides
  with a learned ``confidence_head`` (``Linear(d_model, 1)``, sigmoid) that predicts that maximum
  probability (trained on it, detached, in ``training_loss``) and runs the exit classifier only on
  the tokens that exit: ``d_model`` multiply-adds per running token per block. The last block
  has no exit classifier (its tokens take the LM head's logits anyway).

Training (``training_loss``) runs every block on every token and adds the mean cross-entropy of
the exit classifiers to the final one (deep supervision, weight ``exit_loss_weight``), so every
exit learns to predict; the early-exit forward is for inference. With no token confident enough the
early-exit forward equals the full forward. Causality: a token's exit decision depends on its
state, which with the causal BK-Core depends on positions <= t only.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import MoEResNetBKLayer, check_hidden, embed_tokens, init_lm_trunk, moe_aux_loss
from .cache import DecodeCache, active_cache
from .generation import GenerationMixin

__all__ = ["EarlyExitResNetBKBlock", "EarlyExitLanguageModel"]


class EarlyExitResNetBKBlock(nn.Module):
    """A pre-norm ResNet-BK block with an exit classifier ``LayerNorm(d) -> Linear(d, vocab_size)``.

    forward(x (B, N, D)) -> (x + bk_layer(LayerNorm(x)) (B, N, D), exit_logits (B, N, vocab_size)),
    exit_logits None when built with ``exit_head=False``. ``process(x)`` is the block without its
    exit classifier. With an exit head the block also has ``confidence_head`` = ``Linear(d_model,
    1)``, the learned estimate (a logit) of the exit's maximum probability (see the module doc).
    """

    def __init__(self, d_model: int, n_seq: int, vocab_size: int, num_experts: int = 4, top_k: int = 1,
                 dropout_p: float = 0.1, *, causal: bool = True, backend: Optional[str] = None,
                 learnable_z: bool = False, exit_head: bool = True):
        super().__init__()
        self.d_model = d_model
        self.n_seq = n_seq
        self.vocab_size = vocab_size
        self.layer_norm = nn.LayerNorm(d_model)
        self.bk_layer = MoEResNetBKLayer(d_model, n_seq, num_experts, top_k, dropout_p, causal=causal,
                                         backend=backend, learnable_z=learnable_z)
        self.exit_classifier = (nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size))
                                if exit_head else None)
        self.confidence_head = nn.Linear(d_model, 1) if exit_head else None

    def process(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        check_hidden("x", x, self.d_model, self.n_seq, self.layer_norm.weight.dtype)
        if cache is None:
            return x + self.bk_layer(self.layer_norm(x))
        return x + self.bk_layer(self.layer_norm(x), cache=cache)

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        h = self.process(x)
        return h, (self.exit_classifier(h) if self.exit_classifier is not None else None)

    def step_compact(self, h_run: Tensor, idx: Optional[Tensor], v_full: Optional[Tensor], B: int, N: int,
                     cache: Optional[DecodeCache] = None) -> Tuple[Tensor, Tensor]:
        """The block on the running tokens only: h_run (T, D) their states, idx (T,) their flat
        indices in B*N (None: all tokens in order), v_full (B*N,) potentials with exited tokens'
        frozen (None before the first block). Returns (h_new (T, D), v_full (B*N,))."""
        ffn, v_run = self.bk_layer.ffn_and_potential(self.layer_norm(h_run))
        v_full = v_run if idx is None else v_full.to(v_run.dtype).index_copy(0, idx, v_run)
        feats = self.bk_layer.bk_features(v_full.view(B, N), cache).reshape(B * N, 2)
        f_run = feats if idx is None else feats.index_select(0, idx)
        return h_run + self.bk_layer.mix_output(ffn, f_run), v_full


class EarlyExitLanguageModel(GenerationMixin, nn.Module):
    """Language model whose tokens leave at the first confident exit. Causal by default.

    forward(x (B, N) long, use_early_exit=None) -> logits (B, N, V) when early exit is off (every
    block on every token, the final LM head), or (logits, exit_info) when on. ``use_early_exit=None``
    takes the constructor's ``use_early_exit`` (default False, as in the design).

    exit_info: exit_layers (B, N) long, index of the block whose prediction the token took (the
    last block, n_layers - 1, for tokens that never exited); exit_confidences (B, N) the maximum
    probability of that prediction; exited_mask (B, N) bool, True for tokens that left before the
    last block; layers_executed (B, N) = exit_layers + 1; avg_layers_executed (float); tokens_run
    (int, token-blocks computed); blocks_skipped (int, blocks no token reached).

    ``get_exit_statistics()`` accumulates over early-exit forwards since ``reset_exit_statistics()``.
    ``confidence``: "softmax" (default, the design's rule: the exit's maximum probability) or
    "head" (the learned estimate of it; see the module doc).
    """

    CONFIDENCES = ("softmax", "head")

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 4, n_seq: int = 128,
                 num_experts: int = 4, top_k: int = 1, dropout_p: float = 0.1, confidence_threshold: float = 0.9,
                 *, causal: bool = True, backend: Optional[str] = None, learnable_z: bool = False,
                 exit_loss_weight: float = 1.0, moe_aux_weight: float = 0.01, use_early_exit: bool = False,
                 confidence: str = "softmax"):
        super().__init__()
        if confidence not in self.CONFIDENCES:
            raise ValueError(f"confidence: expected one of {self.CONFIDENCES}, got {confidence!r}")
        self.confidence = confidence
        if not (0.0 < float(confidence_threshold) <= 1.0):
            raise ValueError(f"confidence_threshold: expected a probability in (0, 1], got {confidence_threshold!r}")
        if not float(exit_loss_weight) >= 0.0:
            raise ValueError(f"exit_loss_weight: expected >= 0, got {exit_loss_weight!r}")
        init_lm_trunk(self, vocab_size, d_model, n_layers, n_seq, causal, moe_aux_weight,
                      lambda i: EarlyExitResNetBKBlock(d_model, n_seq, vocab_size, num_experts, top_k, dropout_p,
                                                       causal=causal, backend=backend, learnable_z=learnable_z,
                                                       exit_head=i < n_layers - 1))
        self.confidence_threshold = float(confidence_threshold)
        self.exit_loss_weight = float(exit_loss_weight)
        self.use_early_exit = bool(use_early_exit)
        self.avg_layers_executed: float = float(n_layers)
        self.reset_exit_statistics()

    # -- statistics ------------------------------------------------------------------------------
    def reset_exit_statistics(self) -> None:
        self._exit_counts = torch.zeros(self.n_layers, dtype=torch.long)

    def get_exit_statistics(self) -> Dict:
        """avg_exit_layer (mean block index of the exits), avg_layers_executed, exit_distribution (%
        of tokens per exit block), speedup_estimate (= n_layers / avg_layers_executed: a ratio of
        blocks per token, not a time), total_tokens_processed."""
        n = int(self._exit_counts.sum())
        if n == 0:
            return {"avg_exit_layer": 0.0, "avg_layers_executed": 0.0, "exit_distribution": [0.0] * self.n_layers,
                    "speedup_estimate": 1.0, "speedup_kind": "n_layers / avg_layers_executed (not wall-clock)",
                    "total_tokens_processed": 0}
        layer = torch.arange(self.n_layers, dtype=torch.float64)
        avg_exit = float((self._exit_counts.double() * layer).sum()) / n
        return {"avg_exit_layer": avg_exit, "avg_layers_executed": avg_exit + 1.0,
                "exit_distribution": (self._exit_counts.double() / n * 100.0).tolist(),
                "speedup_estimate": self.n_layers / (avg_exit + 1.0),
                "speedup_kind": "n_layers / avg_layers_executed (not wall-clock)",
                "total_tokens_processed": n}

    def get_avg_layers_executed(self) -> float:
        """Mean number of blocks computed per token in the last forward (n_layers without early exit)."""
        return self.avg_layers_executed

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Token + position embedding (B, N, D) of x (B, N) long, checked."""
        return embed_tokens(self, x)

    def forward(self, x: Tensor, use_early_exit: Optional[bool] = None, cache: Optional[DecodeCache] = None):
        """``cache`` (from ``init_cache``): x continues the cached sequences; every block's BK-Core
        state advances through the new positions (an exited token with its frozen potential, also in
        blocks no new token reaches), so the logits equal the full forward's."""
        if use_early_exit is None:
            use_early_exit = self.use_early_exit
        if cache is not None:
            with active_cache(cache):
                out = self._forward_early_exit(x, cache) if use_early_exit else self._forward_all(x, cache)
            cache.position += x.shape[1]
            return out
        if use_early_exit:
            return self._forward_early_exit(x)
        return self._forward_all(x)

    def _forward_all(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        h = embed_tokens(self, x, cache)
        for block in self.blocks:
            h = block.process(h, cache)
        self.avg_layers_executed = float(self.n_layers)
        return self.lm_head(self.layer_norm_final(h))

    def _cached_logits(self, tokens: Tensor, cache: DecodeCache) -> Tensor:
        out = self(tokens, cache=cache)
        return out[0] if isinstance(out, tuple) else out

    def _forward_early_exit(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tuple[Tensor, Dict]:
        h = embed_tokens(self, x, cache)
        B, N = x.shape
        D, V, L = self.d_model, self.vocab_size, self.n_layers
        total = B * N
        grad = torch.is_grad_enabled()
        h_run = h.reshape(total, D)
        idx: Optional[Tensor] = None            # flat indices of the running tokens (None: all)
        v_full: Optional[Tensor] = None
        exit_layer = torch.full((total,), L - 1, dtype=torch.long, device=x.device)
        conf = torch.zeros(total, dtype=torch.float32, device=x.device)
        logits = None
        tokens_run, skipped = 0, 0
        for l, block in enumerate(self.blocks):
            T = h_run.shape[0]
            tokens_run += T
            h_new, v_full = block.step_compact(h_run, idx, v_full, B, N, cache)
            last = l == L - 1
            lg = None
            if last:
                lg = self.lm_head(self.layer_norm_final(h_new))
                score = torch.softmax(lg.float(), dim=-1).amax(dim=-1)        # (T,)
                done = None                                                   # every running token
            else:
                if self.confidence == "softmax":
                    lg = block.exit_classifier(h_new)
                    score = torch.softmax(lg.float(), dim=-1).amax(dim=-1)
                else:
                    score = torch.sigmoid(block.confidence_head(h_new).squeeze(-1).float())
                done = (score >= self.confidence_threshold).nonzero().squeeze(1)  # one host read per block
            if done is None or done.numel() > 0:
                if done is None:                 # the last block: every running token takes its logits
                    lg_done, c_done, g = lg, score, idx
                else:
                    if lg is None:               # confidence "head": the exit classifier on the exiting rows only
                        lg_done = block.exit_classifier(h_new.index_select(0, done))
                        c_done = torch.softmax(lg_done.float(), dim=-1).amax(dim=-1)
                    else:
                        lg_done, c_done = lg.index_select(0, done), score.index_select(0, done)
                    g = done if idx is None else idx.index_select(0, done)
                if g is None:                    # all B*N tokens in order (none has exited before)
                    logits, conf = lg_done, c_done.detach()
                    exit_layer.fill_(l)
                else:
                    if logits is None:
                        logits = lg_done.new_zeros(total, V)
                    if grad:
                        logits = logits.index_copy(0, g, lg_done)
                    else:
                        logits.index_copy_(0, g, lg_done)
                    conf.index_copy_(0, g, c_done.detach())
                    exit_layer.index_fill_(0, g, l)
            if last:
                break
            n_done = 0 if done is None else done.numel()
            if n_done == T:                      # every token has exited: later blocks do no work
                skipped = L - 1 - l
                for later in self.blocks[l + 1:]:
                    later.bk_layer.moe_ffn.aux_loss = None
                    if cache is not None:  # (but their BK-Core states still pass these positions)
                        later.bk_layer.bk_features(v_full.view(B, N), cache)
                break
            if n_done:
                keep = (score < self.confidence_threshold).nonzero().squeeze(1)
                idx = keep if idx is None else idx.index_select(0, keep)
                h_run = h_new.index_select(0, keep)
            else:
                h_run = h_new
        self.avg_layers_executed = tokens_run / float(total)
        counts = torch.bincount(exit_layer.cpu(), minlength=L)
        self._exit_counts += counts
        info = {"exit_layers": exit_layer.view(B, N), "exit_confidences": conf.detach().view(B, N),
                "exited_mask": (exit_layer < L - 1).view(B, N), "layers_executed": (exit_layer + 1).view(B, N),
                "avg_layers_executed": self.avg_layers_executed, "tokens_run": tokens_run,
                "blocks_skipped": skipped}
        return logits.view(B, N, V), info

    # -- training --------------------------------------------------------------------------------
    def training_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Dict]:
        """Every block on every token: CE of the LM head + ``exit_loss_weight`` * (mean CE of the
        exit classifiers + mean binary cross-entropy of each confidence head against its exit's
        maximum probability, detached) (+ ``moe_aux_weight`` * MoE balance loss). Returns (loss,
        metrics)."""
        h = embed_tokens(self, x)
        exit_ces, conf_losses = [], []
        yf = y.reshape(-1)
        for block in self.blocks:
            h, el = block(h)
            if el is not None:
                exit_ces.append(F.cross_entropy(el.reshape(-1, el.shape[-1]), yf))
                target = torch.softmax(el.detach().float(), dim=-1).amax(dim=-1)
                conf_losses.append(F.binary_cross_entropy_with_logits(
                    block.confidence_head(h).squeeze(-1).float(), target))
        logits = self.lm_head(self.layer_norm_final(h))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yf)
        loss = ce
        metrics: Dict = {"ce_loss": ce.detach()}
        if exit_ces:
            exit_ce = torch.stack(exit_ces).mean()
            conf_loss = torch.stack(conf_losses).mean()
            loss = loss + self.exit_loss_weight * (exit_ce + conf_loss)
            metrics["exit_ce_loss"] = exit_ce.detach()
            metrics["confidence_loss"] = conf_loss.detach()
        aux = moe_aux_loss(self)
        if aux is not None and self.moe_aux_weight != 0:
            loss = loss + self.moe_aux_weight * aux
        self.avg_layers_executed = float(self.n_layers)
        return loss, metrics
