"""Peers side by side: the ResNet-BK language model against a Transformer and Mamba of the same
width and depth (``python -m benchmarks.run --ops peers [--quick]``).

Peers (every one byte-level, vocabulary 256, d_model and n_layers of the grid):

* ``resnet_bk``: ``resnet_bk.models.LanguageModel`` (4 experts, top-1 MoE FFN).
* ``resnet_bk_hier``: the same trunk with hierarchical multi-scale blocks
  (``MultiScaleResNetBKBlock(hierarchical=True)``), the adaptive variant picked for this table: in
  the module suite (d_model 256, N 256, 4 layers) it is the fastest variant whose cost does not
  depend on what it learned (1.50x train step / 1.34x inference over the plain model; ACT's 2.79x
  needs trained halting, sparse's 1.58x a trained mask, so their timing on fresh weights at long N
  would not show it), and it also reached a lower perplexity than the plain model (7.8 vs 11.0).
* ``transformer``: a GPT-style decoder built here from PyTorch: learned positions, pre-norm blocks
  (LayerNorm, causal ``scaled_dot_product_attention``, d_model/64 heads; LayerNorm, 4*d_model GELU
  MLP), final LayerNorm, linear head; with a preallocated KV cache for generation (``KVCache``).
* ``mamba``: ``transformers.MambaForCausalLM`` (state 16, expand 2, conv 4) on its pure-PyTorch
  path (``mambapy``'s parallel scan when importable, else the sequential loop), an optional
  dependency: without ``transformers`` its rows are SKIPPED with the reason.

Rows (``result["peer_rows"]``, one dict each, ``kind`` says which):

* ``params``: total parameters and active per token (a top-k-of-E MoE counts k/E of its experts),
  with the position table (n_seq x d_model at the params row's n_seq) given apart.
* ``train_step`` (CE loss, backward, AdamW step) and ``inference`` (eval, no_grad forward) at each
  (B, N) of the grid; the peers' calls are interleaved call by call; median / p10 / p90;
  ``peak_mem_bytes`` from one more call measured as the op suite does (``timing.peak_memory``). A peer whose time (extrapolated
  from the previous N: N^2 for the Transformer, N for the others) or memory (linear in N) would
  pass the grid's limits is SKIPPED with the prediction as the reason.
* ``generation``: B = 1, greedy decoding after a prefill of ``context`` tokens (untimed): median
  seconds per generated token over the decode steps (interleaved across the peers), and the bytes
  of the peer's cache after decoding (tensors reachable from the cache object). ResNet-BK uses
  ``model.init_cache(B)`` / ``model(tokens, cache=cache)`` when the model has it (issue 19), else
  its rows are SKIPPED.
* ``quality``: validation bits/byte on ``pydoc_data.topics`` (last 10% held out) after the same
  wall-clock training budget at N = 256 and 2048 (B * N = the grid's tokens per batch): the peers
  take training steps in turn, each charged its own time, until each has spent the budget; AdamW
  lr 3e-3, 10 warm-up steps, gradient clipping 1.0, the same recipe for all (not tuned per peer).
"""
from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .timing import Stats, peak_memory, sync

VOCAB = 256
SKIP_NO_CACHE = "no incremental decoding yet (issue 19)"

# d_model / n_layers / n_heads: model size; Ns, Bs: the timing grid; contexts, gen_tokens: generation;
# quality_Ns, tokens_per_batch, budget_s, val_tokens: the equal-wall-clock quality runs;
# max_call_s: a peer predicted slower than this per call is skipped at that size; mem_fraction:
# a peer predicted to need more than this fraction of the memory available at the start is skipped.
PEER_CONFIG = {
    "full": {"d_model": 256, "n_layers": 4, "n_heads": 4, "Ns": [512, 2048, 8192, 32768], "Bs": [1, 8],
             "contexts": [128, 1024, 8000], "gen_tokens": 32, "quality_Ns": [256, 2048], "tokens_per_batch": 4096,
             "budget_s": 120.0, "val_tokens": 65536, "max_call_s": 30.0, "mem_fraction": 0.5, "params_n_seq": 2048,
             "mem_max_call_s": 10.0},
    "quick": {"d_model": 64, "n_layers": 2, "n_heads": 1, "Ns": [256, 1024], "Bs": [1, 4],
              "contexts": [128, 1024], "gen_tokens": 16, "quality_Ns": [256, 2048], "tokens_per_batch": 2048,
              "budget_s": 3.0, "val_tokens": 8192, "max_call_s": 3.0, "mem_fraction": 0.3, "params_n_seq": 2048,
              "mem_max_call_s": 1.0},
    "smoke": {"d_model": 16, "n_layers": 1, "n_heads": 2, "Ns": [32, 64], "Bs": [1, 2],
              "contexts": [8, 16], "gen_tokens": 3, "quality_Ns": [32, 64], "tokens_per_batch": 128,
              "budget_s": 0.15, "val_tokens": 256, "max_call_s": 5.0, "mem_fraction": 0.3, "params_n_seq": 64,
              "mem_max_call_s": 1.0},
}


@dataclass
class PeerPolicy:
    """Interleaved timing: ``warmup`` untimed calls per peer (one when a call takes longer than
    ``long_call_s``), then about ``target_s`` of timed calls each, within [min_reps, max_reps]."""
    warmup: int
    target_s: float
    min_reps: int
    max_reps: int
    long_call_s: float


PEER_POLICIES = {
    "full": PeerPolicy(warmup=2, target_s=2.0, min_reps=3, max_reps=20, long_call_s=3.0),
    "quick": PeerPolicy(warmup=2, target_s=0.25, min_reps=3, max_reps=10, long_call_s=0.5),
    "smoke": PeerPolicy(warmup=1, target_s=0.01, min_reps=2, max_reps=3, long_call_s=0.5),
}

MEMORY_METHOD = ("one more call after the timed ones, measured as the op suite measures memory (timing.peak_memory: "
                 "CUDA max_memory_allocated; CPU: peak live bytes of PyTorch's allocator under the profiler), so it "
                 "includes activations kept for backward and the optimizer step; not measured for calls slower "
                 "than the grid's mem_max_call_s")


# ---------------------------------------------------------------------------------------------
# the Transformer peer

class KVCache:
    """Preallocated keys and values, (n_layers, B, H, max_len, head_dim) each; ``pos`` tokens filled."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.max_len = max_len

    def append(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, H, n, hd) at positions [pos, pos + n) of ``layer``; the keys and values of
        positions [0, pos + n). ``advance(n)`` moves ``pos`` once every layer has appended."""
        n = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + n] = k
        self.v[layer, :, :, self.pos:self.pos + n] = v
        return self.k[layer, :, :, :self.pos + n], self.v[layer, :, :, :self.pos + n]

    def advance(self, n: int) -> None:
        self.pos += n


class GPTBlock(nn.Module):
    """Pre-norm decoder block: x + attn(LN(x)); x + MLP(LN(x)), causal SDPA attention."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        B, n, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).view(B, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = cache.pos
            k, v = cache.append(layer, k, v)
            if n == 1:
                a = F.scaled_dot_product_attention(q, k, v)
            elif past == 0:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # query i (at position past + i) sees keys 0 .. past + i
                mask = torch.arange(past + n, device=x.device)[None, :] <= (past + torch.arange(n, device=x.device))[:, None]
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, n, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPTLanguageModel(nn.Module):
    """Token + learned position embedding -> pre-norm decoder blocks -> LayerNorm -> head.

    forward(x (B, n) long, cache=None) -> logits (B, n, vocab). With ``cache = init_cache(B)`` the
    tokens continue each sequence at ``cache.pos`` and the cache advances by n."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_seq: int, n_heads: int):
        super().__init__()
        self.n_seq, self.n_heads, self.d_model = n_seq, n_heads, d_model
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(n_seq, d_model)
        self.blocks = nn.ModuleList([GPTBlock(d_model, n_heads) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def init_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        w = self.lm_head.weight
        return KVCache(len(self.blocks), batch_size, self.n_heads, max_len or self.n_seq, self.d_model // self.n_heads,
                       w.dtype, w.device)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"x: expected token ids (B, n), got shape {tuple(x.shape)}")
        past = cache.pos if cache is not None else 0
        n = x.shape[1]
        limit = min(self.n_seq, cache.max_len) if cache is not None else self.n_seq
        if past + n > limit:
            raise ValueError(f"x: expected at most {limit - past} tokens (position limit {limit}, {past} cached), got {n}")
        if cache is not None and x.shape[0] != cache.k.shape[1]:
            raise ValueError(f"x: expected batch size {cache.k.shape[1]} (the cache's), got {x.shape[0]}")
        h = self.token_embedding(x) + self.position_embedding(torch.arange(past, past + n, device=x.device))
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        if cache is not None:
            cache.advance(n)
        return self.lm_head(self.ln_f(h))


# ---------------------------------------------------------------------------------------------
# the peers

@dataclass
class Peer:
    name: str
    label: str
    build: Callable[[dict, int], nn.Module]          # (config, n_seq) -> model
    unavailable: Callable[[], Optional[str]]
    logits: Callable[[nn.Module, Tensor], Tensor]
    gen_start: Callable[[nn.Module, Tensor, int], Tuple[object, Tensor]]  # (model, prefix, max_len) -> (cache, logits)
    gen_step: Callable[[nn.Module, object, Tensor], Tensor]               # (model, cache, tokens (B, 1)) -> logits
    gen_unavailable: Callable[[nn.Module], Optional[str]] = lambda m: None


def _resnet_bk(cfg: dict, n_seq: int) -> nn.Module:
    from resnet_bk.models import LanguageModel
    return LanguageModel(VOCAB, cfg["d_model"], cfg["n_layers"], n_seq, num_experts=4, top_k=1)


def _resnet_bk_hier(cfg: dict, n_seq: int) -> nn.Module:
    from resnet_bk.models import LanguageModel
    from resnet_bk.models.multi_scale import MultiScaleResNetBKBlock
    d = cfg["d_model"]
    return LanguageModel(VOCAB, d, cfg["n_layers"], n_seq,
                         block_factory=lambda i: MultiScaleResNetBKBlock(d, n_seq, 4, hierarchical=True))


def _bk_gen_unavailable(model: nn.Module) -> Optional[str]:
    return None if hasattr(model, "init_cache") else SKIP_NO_CACHE


def _bk_gen_start(model, prefix, max_len):
    cache = model.init_cache(prefix.shape[0])
    return cache, model(prefix, cache=cache)


def _transformer(cfg: dict, n_seq: int) -> nn.Module:
    return GPTLanguageModel(VOCAB, cfg["d_model"], cfg["n_layers"], n_seq, cfg["n_heads"])


def _gpt_gen_start(model, prefix, max_len):
    cache = model.init_cache(prefix.shape[0], max_len)
    return cache, model(prefix, cache=cache)


def _mamba_unavailable() -> Optional[str]:
    try:
        import transformers
    except ImportError as exc:
        return f"transformers is not installed ({exc}); pip install transformers (optional benchmark dependency)"
    if not hasattr(transformers, "MambaForCausalLM"):
        return f"transformers {transformers.__version__} has no MambaForCausalLM"
    return None


def _mambapy() -> bool:
    try:
        importlib.import_module("mambapy.pscan")
        return True
    except ImportError:
        return False


def _mamba(cfg: dict, n_seq: int) -> nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the fallback-kernel notices: the rows say which path ran
    conf = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layers"],
                                    state_size=16, expand=2, conv_kernel=4, use_mambapy=_mambapy())
    return transformers.MambaForCausalLM(conf)


def _mamba_gen_start(model, prefix, max_len):
    out = model(prefix, use_cache=True)
    return out.cache, out.logits


def _mamba_gen_step(model, cache, tok):
    return model(tok, cache=cache, use_cache=True).logits


def peers() -> List[Peer]:
    return [
        Peer("resnet_bk", "ResNet-BK LanguageModel (4 experts, top-1)", _resnet_bk, lambda: None,
             lambda m, x: m(x), _bk_gen_start, lambda m, c, t: m(t, cache=c), _bk_gen_unavailable),
        Peer("resnet_bk_hier", "ResNet-BK, hierarchical multi-scale blocks", _resnet_bk_hier, lambda: None,
             lambda m, x: m(x), _bk_gen_start, lambda m, c, t: m(t, cache=c), _bk_gen_unavailable),
        Peer("transformer", "GPT-style Transformer (pre-norm, SDPA causal, KV cache)", _transformer, lambda: None,
             lambda m, x: m(x), _gpt_gen_start, lambda m, c, t: m(t, cache=c)),
        Peer("mamba", "Mamba (transformers MambaForCausalLM, pure-PyTorch path)", _mamba, _mamba_unavailable,
             lambda m, x: m(x).logits, _mamba_gen_start, _mamba_gen_step),
    ]


def peer_versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("transformers", "mambapy"):
        try:
            m = importlib.import_module(mod)
            out[mod] = getattr(m, "__version__", None) or _dist_version(mod)
        except ImportError:
            out[mod] = None
    out["mamba_scan"] = "mambapy.pscan (parallel scan)" if _mambapy() else "sequential loop over N"
    return out


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------
# measurement helpers

def param_counts(model: nn.Module) -> dict:
    """Total parameters, active per token (a top-k of E expert layer counts k/E of its experts),
    and the position table's share."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for m in model.modules():
        experts, k = getattr(m, "experts", None), getattr(m, "top_k", None)
        if isinstance(experts, nn.ModuleList) and isinstance(k, int) and 0 < k < len(experts):
            inactive += sum(p.numel() for p in experts.parameters()) * (len(experts) - k) / len(experts)
    pos = getattr(model, "position_embedding", None)
    return {"params_total": total, "params_active_per_token": int(round(total - inactive)),
            "params_position_table": pos.weight.numel() if isinstance(pos, nn.Embedding) else 0}


def cache_bytes(obj, _seen=None, _depth=0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (attributes, lists, dicts)."""
    seen = set() if _seen is None else _seen
    if _depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple, set)):
        return sum(cache_bytes(o, seen, _depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(cache_bytes(o, seen, _depth + 1) for o in obj.values())
    if isinstance(obj, nn.Module):
        return 0
    if hasattr(obj, "__dict__"):
        return sum(cache_bytes(o, seen, _depth + 1) for o in vars(obj).values())
    return 0


def mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def interleaved(calls: Dict[str, Callable[[int], None]], policy: PeerPolicy, device: torch.device,
                mem_max_call_s: float = 10.0) -> Dict[str, dict]:
    """Time each named call round-robin (one call of each per round, in turn); per name the Stats
    dict and the peak memory of one more call (``timing.peak_memory``; not measured, None, for
    calls slower than ``mem_max_call_s``: the profiler would take as long again)."""
    per: Dict[str, float] = {}
    warm: Dict[str, int] = {}
    names = list(calls)
    for r in range(policy.warmup):
        for name in names:
            if r > 0 and per.get(name, 0.0) > policy.long_call_s:
                continue
            sync(device)
            t0 = time.perf_counter()
            calls[name](r)
            sync(device)
            per[name] = time.perf_counter() - t0
            warm[name] = warm.get(name, 0) + 1
    reps = {n: int(min(policy.max_reps, max(policy.min_reps, round(policy.target_s / max(per.get(n, 1e-6), 1e-6)))))
            for n in names}
    samples: Dict[str, List[float]] = {n: [] for n in names}
    i = policy.warmup
    while any(len(samples[n]) < reps[n] for n in names):
        for name in names:
            if len(samples[name]) >= reps[name]:
                continue
            sync(device)
            t0 = time.perf_counter()
            calls[name](i)
            sync(device)
            samples[name].append(time.perf_counter() - t0)
        i += 1
    out = {}
    for n in names:
        st = Stats.of(samples[n], warm.get(n, 0))
        mem = peak_memory(lambda: calls[n](0), device) if st.median < mem_max_call_s else None
        out[n] = {"time_s": st.to_dict(), "peak_mem_bytes": mem}
    return out


def _loss(peer: Peer, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    if hasattr(model, "training_loss"):
        return model.training_loss(x, y)[0]
    logits = peer.logits(model, x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _row(kind: str, peer: Peer, cfg: dict, device: torch.device, **extra) -> dict:
    row = {"suite": "peer", "kind": kind, "peer": peer.name, "label": peer.label, "device": device.type,
           "d_model": cfg["d_model"], "n_layers": cfg["n_layers"], "status": "ok", "reason": None, "notes": []}
    row.update(extra)
    return row


# ---------------------------------------------------------------------------------------------
# the four parts

def run_params(avail: List[Peer], cfg: dict, device: torch.device) -> List[dict]:
    rows = []
    for p in avail:
        torch.manual_seed(0)
        m = p.build(cfg, cfg["params_n_seq"])
        rows.append(_row("params", p, cfg, device, n_seq=cfg["params_n_seq"], **param_counts(m)))
    return rows


def run_speed(avail: List[Peer], cfg: dict, policy: PeerPolicy, device: torch.device, corpus, log=print) -> List[dict]:
    """train_step and inference rows over the (B, N) grid, peers interleaved at each point."""
    train = corpus[0]
    rows: List[dict] = []
    last: Dict[Tuple[str, str, int], Tuple[int, float, Optional[int]]] = {}  # (peer, kind, B) -> (N, t, mem)
    stopped: Dict[Tuple[str, str, int], str] = {}
    avail_mem = mem_available()
    cap = None if avail_mem is None else cfg["mem_fraction"] * avail_mem
    for N in cfg["Ns"]:
        models = {}
        for B in cfg["Bs"]:
            gen = torch.Generator().manual_seed(N + B)
            pool = []
            for _ in range(2):
                starts = torch.randint(0, len(train) - N - 1, (B,), generator=gen)
                seq = train[starts[:, None] + torch.arange(N + 1)].to(device)
                pool.append((seq[:, :-1], seq[:, 1:]))
            for kind in ("train_step", "inference"):
                calls: Dict[str, Callable[[int], None]] = {}
                pending: Dict[str, dict] = {}
                for p in avail:
                    key = (p.name, kind, B)
                    row = _row(kind, p, cfg, device, B=B, N=N, time_s=None, peak_mem_bytes=None)
                    pending[p.name] = row
                    why = stopped.get(key) or _predict_skip(p, key, N, last, cfg, cap)
                    if why:
                        row["status"], row["reason"] = "skipped", why
                        stopped.setdefault(key, f"skipped at a smaller N ({why})")
                        continue
                    try:
                        if p.name not in models:
                            torch.manual_seed(0)
                            m = p.build(cfg, N).to(device)
                            models[p.name] = (m, torch.optim.AdamW(m.parameters(), lr=3e-3))
                    except Exception as exc:  # noqa: BLE001  (a peer that cannot be built is a result)
                        row["status"], row["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
                        continue
                    calls[p.name] = _make_call(p, kind, *models[p.name], pool)
                try:
                    res = interleaved(calls, policy, device, cfg["mem_max_call_s"]) if calls else {}
                except Exception as exc:  # noqa: BLE001
                    res = {}
                    for n in calls:
                        pending[n]["status"], pending[n]["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
                for name, r in res.items():
                    pending[name].update(r)
                    if r["peak_mem_bytes"] is None:
                        pending[name]["notes"].append(f"memory not measured (calls slower than {cfg['mem_max_call_s']} s)")
                    old = last.get((name, kind, B))
                    mem = (N, r["peak_mem_bytes"]) if r["peak_mem_bytes"] is not None else (old[2] if old else None)
                    last[(name, kind, B)] = (N, r["time_s"]["median"], mem)  # mem: the last measured (N, bytes)
                rows += pending.values()
                log(f"peers {kind} B={B} N={N}: " + ", ".join(
                    f"{n} {_fmt_s(r['time_s']['median'])}" if r["status"] == "ok" else f"{n} {r['status']}"
                    for n, r in pending.items()))
        del models
    return rows


def _make_call(p: Peer, kind: str, model: nn.Module, opt, pool) -> Callable[[int], None]:
    if kind == "train_step":
        def call(i):
            x, y = pool[i % len(pool)]
            model.train()
            loss = _loss(p, model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        def call(i):
            x, _ = pool[i % len(pool)]
            model.eval()
            with torch.no_grad():
                p.logits(model, x)
    return call


def _predict_skip(p: Peer, key, N: int, last, cfg: dict, cap: Optional[float]) -> Optional[str]:
    if key not in last:
        return None
    n0, t0, mem = last[key]
    expo = 2 if p.name == "transformer" else 1
    t = t0 * (N / n0) ** expo
    if t > cfg["max_call_s"]:
        return (f"predicted {t:.1f} s per call (N^{expo} from {_fmt_s(t0)} at N={n0}) > the grid's limit "
                f"{cfg['max_call_s']:.0f} s")
    if cap is not None and mem is not None and mem[1] * N / mem[0] > cap:
        nm, m0 = mem
        return (f"predicted {m0 * N / nm / 2**30:.1f} GiB (linear from {m0 / 2**30:.2f} GiB at N={nm}) > "
                f"{cfg['mem_fraction']:.0%} of the memory available at the start")
    return None


def run_generation(avail: List[Peer], cfg: dict, device: torch.device, corpus, log=print) -> List[dict]:
    """Per-token latency of greedy decoding at each context (B = 1), peers interleaved per token."""
    train = corpus[0]
    rows: List[dict] = []
    steps = cfg["gen_tokens"]
    warm = 2
    for C in cfg["contexts"]:
        max_len = C + steps + warm
        prefix = train[1000:1000 + C][None].to(device)
        state: Dict[str, list] = {}
        pending: Dict[str, dict] = {}
        for p in avail:
            row = _row("generation", p, cfg, device, B=1, context=C, time_s=None, cache_bytes=None, prefill_s=None)
            pending[p.name] = row
            try:
                torch.manual_seed(0)
                m = p.build(cfg, max_len).to(device).eval()
                why = p.gen_unavailable(m)
                if why:
                    row["status"], row["reason"] = "skipped", why
                    continue
                t0 = time.perf_counter()
                with torch.no_grad():
                    cache, logits = p.gen_start(m, prefix, max_len)
                sync(device)
                row["prefill_s"] = time.perf_counter() - t0
                state[p.name] = [m, cache, logits[:, -1:].argmax(-1), []]
            except NotImplementedError as exc:
                row["status"], row["reason"] = "skipped", f"NotImplementedError: {exc}"
            except Exception as exc:  # noqa: BLE001
                row["status"], row["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
        for i in range(warm + steps):
            for name, st in list(state.items()):
                m, cache, tok, ts = st
                try:
                    sync(device)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        logits = (next(p for p in avail if p.name == name)).gen_step(m, cache, tok)
                    sync(device)
                except Exception as exc:  # noqa: BLE001
                    pending[name]["status"], pending[name]["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
                    del state[name]
                    continue
                if i >= warm:
                    ts.append(time.perf_counter() - t0)
                st[2] = logits[:, -1:].argmax(-1)
        for name, (m, cache, tok, ts) in state.items():
            pending[name]["time_s"] = Stats.of(ts, warm).to_dict()
            pending[name]["cache_bytes"] = cache_bytes(cache)
            pending[name]["notes"].append(f"greedy, {steps} timed tokens after {warm} untimed; prefill of {C} untimed")
        rows += pending.values()
        log(f"peers generation context={C}: " + ", ".join(
            f"{n} {_fmt_s(r['time_s']['median'])}/token" if r["status"] == "ok" else f"{n} {r['status']}"
            for n, r in pending.items()))
    return rows


def run_quality(avail: List[Peer], cfg: dict, device: torch.device, corpus, log=print) -> List[dict]:
    """Validation bits/byte after the same wall-clock training budget, peers taking steps in turn."""
    from .modules import batches, fixed_batches
    train, val, _ = corpus
    rows: List[dict] = []
    budget = cfg["budget_s"]
    for N in cfg["quality_Ns"]:
        B = max(1, cfg["tokens_per_batch"] // N)
        runs = {}
        pending: Dict[str, dict] = {}
        for p in avail:
            row = _row("quality", p, cfg, device, B=B, N=N, budget_s=budget)
            pending[p.name] = row
            try:
                torch.manual_seed(0)
                m = p.build(cfg, N).to(device)
            except Exception as exc:  # noqa: BLE001
                row["status"], row["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
                continue
            opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
            runs[p.name] = {"peer": p, "model": m, "opt": opt, "spent": 0.0, "steps": 0, "loss": None,
                            "gen": torch.Generator().manual_seed(2)}
        active = [n for n in runs]
        while active:
            for name in list(active):
                r = runs[name]
                m, opt = r["model"], r["opt"]
                x, y = batches(train, B, N, r["gen"], device)
                for g in opt.param_groups:
                    g["lr"] = 3e-3 * min(1.0, (r["steps"] + 1) / 10)
                sync(device)
                t0 = time.perf_counter()
                try:
                    m.train()
                    loss = _loss(r["peer"], m, x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                    opt.step()
                    sync(device)
                except Exception as exc:  # noqa: BLE001
                    pending[name]["status"], pending[name]["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
                    active.remove(name)
                    continue
                r["spent"] += time.perf_counter() - t0
                r["steps"] += 1
                r["loss"] = float(loss.detach())
                if r["spent"] >= budget:
                    active.remove(name)
        count = max(1, cfg["val_tokens"] // (B * N))
        vb = fixed_batches(val, B, N, count, device)
        for name, r in runs.items():
            row = pending[name]
            if row["status"] != "ok":
                continue
            m = r["model"].eval()
            total, n_tok = 0.0, 0
            with torch.no_grad():
                for x, y in vb:
                    logits = r["peer"].logits(m, x)
                    total += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"))
                    n_tok += y.numel()
            row.update({"steps": r["steps"], "train_s": r["spent"], "tokens_seen": r["steps"] * B * N,
                        "final_train_loss": r["loss"], "val_tokens": n_tok, "val_bits_per_byte": total / n_tok / math.log(2),
                        "optimizer": "AdamW lr 3e-3, 10 warm-up steps, clip 1.0"})
        rows += pending.values()
        log(f"peers quality N={N} B={B}: " + ", ".join(
            f"{n} {r['val_bits_per_byte']:.3f} bits/byte ({r['steps']} steps)" if r["status"] == "ok"
            else f"{n} {r['status']}" for n, r in pending.items()))
    return rows


def run_peers(grid: str, device: torch.device, corpus=None, log=print, config: Optional[dict] = None) -> dict:
    """Every peer row of ``grid`` on ``device``: {"rows", "config", "versions", "memory_method"}."""
    from .modules import text_corpus
    cfg = dict(PEER_CONFIG[grid], **(config or {}))
    policy = PEER_POLICIES[grid]
    corpus = corpus or text_corpus()
    avail, rows = [], []
    for p in peers():
        why = p.unavailable()
        if why:
            log(f"SKIPPED peer {p.name}: {why}")
            rows.append(_row("params", p, cfg, device, status="skipped", reason=why))
        else:
            avail.append(p)
    rows += run_params(avail, cfg, device)
    rows += run_speed(avail, cfg, policy, device, corpus, log)
    rows += run_generation(avail, cfg, device, corpus, log)
    rows += run_quality(avail, cfg, device, corpus, log)
    add_ratios(rows)
    return {"rows": rows, "config": cfg, "policy": policy.__dict__, "versions": peer_versions(),
            "memory_method": MEMORY_METHOD}


def add_ratios(rows: List[dict]) -> None:
    """``x_transformer``: the Transformer's median time over this row's (same kind, device, B, N or
    context), and ``bpb_vs_transformer``: this row's bits/byte over the Transformer's."""
    def key(r):
        return r["kind"], r["device"], r.get("B"), r.get("N"), r.get("context")
    tf = {key(r): r for r in rows if r["peer"] == "transformer" and r["status"] == "ok"}
    for r in rows:
        t = tf.get(key(r))
        if t is None or r["status"] != "ok":
            continue
        if r.get("time_s") and t.get("time_s"):
            r["x_transformer"] = t["time_s"]["median"] / r["time_s"]["median"]
        if "val_bits_per_byte" in r:
            r["bpb_vs_transformer"] = r["val_bits_per_byte"] / t["val_bits_per_byte"]


# ---------------------------------------------------------------------------------------------
# presentation (called from report.py)

def _fmt_s(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t:.2f} s" if t >= 1 else (f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} us")


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.3g}"


def _why(r: dict) -> str:
    return "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"


def peer_tables(result: dict) -> List[Tuple[str, List[str], List[List[str]]]]:
    """(title, head, body) of each peer table."""
    rows = result.get("peer_rows") or []
    out = []
    body = [[r["peer"], r["device"], str(r.get("n_seq", "-")), f"{r['params_total'] / 1e6:.3g}M" if "params_total" in r else "-",
             f"{r['params_active_per_token'] / 1e6:.3g}M" if "params_active_per_token" in r else "-",
             f"{r['params_position_table'] / 1e6:.3g}M" if "params_position_table" in r else "-", _why(r)]
            for r in rows if r["kind"] == "params"]
    out.append(("parameters", ["peer", "device", "n_seq", "total", "active/token", "of which position table", "status"],
                body))
    for kind in ("train_step", "inference"):
        body = []
        for r in sorted((r for r in rows if r["kind"] == kind), key=lambda r: (r["device"], r["B"], r["N"])):
            t = r.get("time_s")
            body.append([r["peer"], r["device"], str(r["B"]), str(r["N"]), _fmt_s(t["median"]) if t else "-",
                         f"{_fmt_s(t['p10'])}-{_fmt_s(t['p90'])}" if t else "-", str(t["n"]) if t else "-",
                         _mib(r.get("peak_mem_bytes")),
                         f"{r['x_transformer']:.3g}x" if "x_transformer" in r else "-", _why(r)])
        out.append((kind.replace("_", " "), ["peer", "device", "B", "N", "median", "p10-p90", "n", "peak MiB",
                                             "x transformer", "status"], body))
    body = []
    for r in sorted((r for r in rows if r["kind"] == "generation"), key=lambda r: (r["device"], r["context"])):
        t = r.get("time_s")
        body.append([r["peer"], r["device"], str(r["context"]), _fmt_s(t["median"]) if t else "-",
                     f"{_fmt_s(t['p10'])}-{_fmt_s(t['p90'])}" if t else "-", _mib(r.get("cache_bytes")),
                     _fmt_s(r.get("prefill_s")), f"{r['x_transformer']:.3g}x" if "x_transformer" in r else "-", _why(r)])
    out.append(("generation (B=1, per token)", ["peer", "device", "context", "median/token", "p10-p90", "cache MiB",
                                                "prefill", "x transformer", "status"], body))
    body = []
    for r in sorted((r for r in rows if r["kind"] == "quality"), key=lambda r: (r["device"], r["N"])):
        ok = r["status"] == "ok"
        body.append([r["peer"], r["device"], str(r["B"]), str(r["N"]), f"{r['budget_s']:.3g} s",
                     str(r["steps"]) if ok else "-", f"{r['val_bits_per_byte']:.3f}" if ok else "-",
                     f"{r['bpb_vs_transformer']:.3f}" if "bpb_vs_transformer" in r else "-", _why(r)])
    out.append(("validation bits/byte after the same training time", ["peer", "device", "B", "N", "budget", "steps",
                                                                       "val bits/byte", "/ transformer's", "status"],
                body))
    return out


def goal_lines(result: dict) -> List[str]:
    """Issue 21's goals for ResNet-BK against the Transformer, as measured ratios."""
    rows = [r for r in result.get("peer_rows") or [] if r["peer"] == "resnet_bk" and r["status"] == "ok"]
    cfg = result.get("peer_config") or {}
    issue = cfg.get("d_model") == 256 and cfg.get("n_layers") == 4 and (cfg.get("budget_s") or 0) >= 120
    out = ["goals (resnet_bk vs transformer)" + ("" if issue else
           f" -- NOT the issue's configuration (d_model {cfg.get('d_model')}, {cfg.get('n_layers')} layers, "
           f"{cfg.get('budget_s')} s training budget; the goals are for d_model 256, 4 layers, 120 s): "
           f"ratios for information only") + ":"]

    def pick(kind, **kw):
        return [r for r in rows if r["kind"] == kind and all(r.get(k) == v for k, v in kw.items())]
    for kind, goal in (("train_step", 8), ("inference", 10)):
        rs = [r for r in pick(kind, N=8192) if "x_transformer" in r]
        if not rs:
            out.append(f"  {kind} at N=8192 >= {goal}x: not measured in this grid")
        for r in rs:
            x = r["x_transformer"]
            out.append(f"  {kind} at N=8192, B={r['B']}: {x:.3g}x (goal >= {goal}x: {'met' if x >= goal else 'NOT met'})")
    rs = [r for r in pick("generation", context=8000) if "x_transformer" in r]
    gen_all = [r for r in result.get("peer_rows") or [] if r["peer"] == "resnet_bk" and r["kind"] == "generation"]
    if rs:
        x = rs[0]["x_transformer"]
        out.append(f"  generation per token at context 8000: {x:.3g}x (goal >= 5x: {'met' if x >= 5 else 'NOT met'})")
    else:
        out.append("  generation per token at context 8000 >= 5x: not measured"
                   + (f" ({gen_all[0]['reason']})" if gen_all and gen_all[0].get("reason") else ""))
    for n, want in ((256, "within 5%"), (2048, "better")):
        rs = [r for r in pick("quality", N=n) if "bpb_vs_transformer" in r]
        if not rs:
            out.append(f"  bits/byte at N={n} ({want}): not measured in this grid")
            continue
        v = rs[0]["bpb_vs_transformer"]
        met = v <= 1.05 if n == 256 else v < 1.0
        out.append(f"  bits/byte at N={n}: {v:.3f} of the Transformer's (goal {want}: {'met' if met else 'NOT met'})")
    return out


def render_lines(result: dict, fmt_table, md: bool = False) -> List[str]:
    """Text (or with ``md`` Markdown) sections: ``fmt_table(head, body)`` renders one table."""
    cfg = result.get("peer_config") or {}
    v = result.get("peer_versions") or {}
    out = ([""] if md else []) + [f"peers: d_model={cfg.get('d_model')}, n_layers={cfg.get('n_layers')}, byte-level vocabulary 256; "
           f"versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    for title, head, body in peer_tables(result):
        out += ["", f"### {title}" if md else f"{title}:"] + ([""] if md else []) + [fmt_table(head, body)]
    goals = goal_lines(result)
    out += ["", "```", *goals, "```"] if md else [""] + goals
    return out


def plots(result: dict, out_dir: str, stem: str) -> List[str]:
    """One PNG per mode (train step, inference, generation): time against N (context) log-log, one
    line per peer and batch size."""
    rows = [r for r in result.get("peer_rows") or [] if r["status"] == "ok" and r.get("time_s")]
    if not rows:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no peer plots")
        return []
    written = []
    for kind, xkey, ylabel in (("train_step", "N", "median train step (s)"), ("inference", "N", "median forward (s)"),
                               ("generation", "context", "median s per generated token")):
        lines: Dict[Tuple[str, str, int], List[dict]] = {}
        for r in rows:
            if r["kind"] == kind:
                lines.setdefault((r["peer"], r["device"], r["B"]), []).append(r)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        for (peer, dev, B), rs in sorted(lines.items()):
            rs.sort(key=lambda r: r[xkey])
            ax.plot([r[xkey] for r in rs], [r["time_s"]["median"] for r in rs], marker="o", label=f"{peer} B={B} {dev}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xkey)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"peers: {kind} ({result.get('machine_kind')})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-peers-{kind}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
