"""Token-by-token generation from the O(1) decoding cache: ``GenerationMixin`` gives every causal
language model of the package ``init_cache(batch_size)`` and ``generate(...)``.

``generate`` runs one prefill call on the prompt and then one cached call per new token: each step
costs the same whatever the context (the cache holds one complex pivot per layer and sequence, see
``cache.py``), where recomputing the prefix would cost O(context) per token. Greedy decoding picks,
at every step, the argmax of the logits the full forward of the sequence so far gives (the cached
logits equal the full forward's; tests/models/test_generation.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .cache import DecodeCache

__all__ = ["GenerationMixin", "sample_next"]


def _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, vocab_size: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample: expected a bool, got {do_sample!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature: expected a number, got {temperature!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature: expected a value > 0 when sampling (do_sample=True), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                              or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")
    if eos_token_id is not None and (not isinstance(eos_token_id, int) or isinstance(eos_token_id, bool)
                                     or not 0 <= eos_token_id < vocab_size):
        raise ValueError(f"eos_token_id: expected a token id in [0, vocab_size={vocab_size}) or None, "
                         f"got {eos_token_id!r}")


def sample_next(logits: Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (B, V) -> next token ids (B,): the argmax (greedy), or a sample from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens and to the smallest
    set whose probability reaches ``top_p`` (nucleus)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / float(temperature)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = probs.cumsum(-1) - probs >= float(top_p)
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = scores.scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GenerationMixin:
    """``init_cache`` and ``generate`` for a causal language model with ``forward(x, cache=...)``.

    The host class provides ``n_seq``, ``vocab_size`` and ``causal`` (directly or through
    ``_generation_host``), and may override ``_cached_logits(tokens, cache)`` when its forward
    returns more than the logits."""

    def _generation_host(self):
        return self

    def init_cache(self, batch_size: int, *, length: Optional[int] = None) -> DecodeCache:
        """An empty decoding cache for ``batch_size`` sequences. ``length``: the total length a
        ``LearnableBucketLandmark`` attached to the model normalises positions by (``generate``
        sets it to prompt + new tokens)."""
        host = self._generation_host()
        if not host.causal:
            raise ValueError(f"cache: {type(self).__name__} was built with causal=False: its outputs depend on later "
                             f"tokens, so it cannot decode incrementally")
        return DecodeCache(self, batch_size, length)

    def _cached_logits(self, tokens: Tensor, cache: DecodeCache) -> Tensor:
        return self(tokens, cache=cache)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 streamer: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        """input_ids (B, n) -> (B, n + max_new_tokens) token ids: one prefill call, then one cached
        call per token; greedy (``do_sample=False``) or sampled (``temperature``, ``top_k``,
        ``top_p``; reproducible with ``generator``). A row that produced ``eos_token_id`` is padded
        with it from then on (generation stops early when every row has). ``streamer`` is called with
        each new column of token ids (B,) as soon as it is chosen. Runs in the model's current mode:
        call ``model.eval()`` first so that dropout is off."""
        host = self._generation_host()
        _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, host.vocab_size)
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected a (B, n) tensor of token ids with n >= 1, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        B, n = input_ids.shape
        total = n + max_new_tokens
        if total > host.n_seq:
            raise ValueError(f"max_new_tokens: the prompt ({n}) plus {max_new_tokens} new tokens is {total}, past "
                             f"n_seq={host.n_seq} (the learned position embedding's length)")
        out = input_ids.new_empty(B, total)
        out[:, :n] = input_ids
        if max_new_tokens == 0:
            return out
        cache = self.init_cache(B, length=total)
        logits = self._cached_logits(input_ids, cache)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for t in range(n, total):
            nxt = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator).to(out.dtype)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out[:, t] = nxt
            if streamer is not None:
                streamer(nxt)
            if t == total - 1:
                break
            if eos_token_id is not None and bool(done.all()):
                out[:, t + 1:] = eos_token_id
                break
            logits = self._cached_logits(nxt[:, None], cache)[:, -1]
        return out
