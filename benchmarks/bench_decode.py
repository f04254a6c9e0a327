"""The decode benchmark (``python -m benchmarks.run --ops decode``): token-by-token generation of a
``LanguageModel`` from its O(1) cache (``model.init_cache``), against recomputing the prefix.

For a d_model 256, 4-layer model with n_seq 8192 (full grid): per-token latency at batch 1 and
throughput (tokens/s) at batch 1, 16 and 64 after contexts of 128, 1024 and 8000 tokens; beside it
the time of one full forward over the context (what a cache-less loop pays for every token);
prefill tokens/s; the cache's memory. Every configuration first checks that the cached step's
logits equal the full forward's at that position (the op layer's tolerance).

Goals (CPU, this command): per-token time at context 8000 within 1.2x of that at context 128;
>= 100x faster than recomputation at context 8000; a batch-1 step under 1 ms on 2 cores.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch

CONFIG = {
    "full": {"d_model": 256, "n_layers": 4, "n_seq": 8192, "contexts": (128, 1024, 8000), "batches": (1, 16, 64),
             "steps": 30, "recompute_reps": 3},
    "quick": {"d_model": 256, "n_layers": 4, "n_seq": 1024, "contexts": (128, 1000), "batches": (1, 16),
              "steps": 20, "recompute_reps": 3},
    "smoke": {"d_model": 32, "n_layers": 2, "n_seq": 128, "contexts": (16, 100), "batches": (1, 4),
              "steps": 5, "recompute_reps": 1},
}
VOCAB = 256
GOALS = {"flat_ratio_max": 1.2, "vs_recompute_min": 100.0, "step_ms_max": 1.0}


def _model(cfg, device):
    from resnet_bk.models import LanguageModel
    torch.manual_seed(0)
    return LanguageModel(VOCAB, cfg["d_model"], cfg["n_layers"], cfg["n_seq"]).to(device).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _stats(ts: List[float]) -> Dict[str, float]:
    s = sorted(ts)
    return {"median": statistics.median(s), "p10": s[int(0.1 * (len(s) - 1))], "p90": s[int(0.9 * (len(s) - 1))],
            "n": len(s)}


def run_decode(grid: str, device: torch.device) -> List[dict]:
    """One row per (batch, context): step latency and throughput, the recomputation baseline
    (batch 1), prefill throughput and the cache's bytes, each with its correctness check."""
    from resnet_bk.ops import tolerance
    cfg = CONFIG[grid]
    m = _model(cfg, device)
    g = torch.Generator().manual_seed(1)
    rows: List[dict] = []
    for B in cfg["batches"]:
        for ctx in cfg["contexts"]:
            row = {"suite": "decode", "device": device.type, "B": B, "context": ctx, "d_model": cfg["d_model"],
                   "n_layers": cfg["n_layers"], "n_seq": cfg["n_seq"], "status": "ok", "check": None, "notes": []}
            steps = cfg["steps"]
            if ctx + steps + 1 > cfg["n_seq"]:
                steps = cfg["n_seq"] - ctx - 1
            x = torch.randint(0, VOCAB, (B, ctx + steps + 1), generator=g).to(device)
            with torch.no_grad():
                cache = m.init_cache(B)
                _sync(device)
                t0 = time.perf_counter()
                logits = m(x[:, :ctx], cache=cache)
                _sync(device)
                prefill = time.perf_counter() - t0
                # correctness: the cached step equals the full forward at that position
                step_logits = m(x[:, ctx:ctx + 1], cache=cache)[:, -1]
                full_last = m(x[:, :ctx + 1])[:, -1]
                scale = full_last.abs().max().item()
                err = (step_logits - full_last).abs().max().item() / scale
                tol = tolerance(torch.float32)
                row["check"] = "ok" if err <= tol else f"FAILED: cached step vs full forward rel err {err:.3g} > {tol}"
                if err > tol:
                    row["status"] = "FAILED"
                times = []
                for t in range(ctx + 1, ctx + 1 + steps):
                    tok = x[:, t:t + 1]
                    _sync(device)
                    t0 = time.perf_counter()
                    m(tok, cache=cache)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                st = _stats(times)
                row["step_time_s"] = st
                row["per_token_ms"] = st["median"] * 1e3
                row["tokens_per_s"] = B / st["median"]
                row["prefill_tokens_per_s"] = B * ctx / prefill
                row["cache_bytes"] = cache.nbytes()
                if B == 1:
                    rt = []
                    for _ in range(cfg["recompute_reps"]):
                        _sync(device)
                        t0 = time.perf_counter()
                        m(x[:, :ctx + 1])
                        _sync(device)
                        rt.append(time.perf_counter() - t0)
                    row["recompute_time_s"] = _stats(rt)
                    row["vs_recompute"] = statistics.median(rt) / st["median"]
            rows.append(row)
    _goals(rows, cfg)
    return rows


def _goals(rows: List[dict], cfg) -> None:
    b1 = {r["context"]: r for r in rows if r["B"] == 1 and r["status"] == "ok"}
    lo, hi = min(cfg["contexts"]), max(cfg["contexts"])
    if lo in b1 and hi in b1:
        ratio = b1[hi]["per_token_ms"] / b1[lo]["per_token_ms"]
        b1[hi]["flat_ratio"] = ratio
        b1[hi]["goals"] = {
            f"per-token time at context {hi} / at {lo} <= {GOALS['flat_ratio_max']}": ratio <= GOALS["flat_ratio_max"],
            f"vs recomputation at context {hi} >= {GOALS['vs_recompute_min']:.0f}x":
                b1[hi].get("vs_recompute", 0) >= GOALS["vs_recompute_min"],
            f"batch-1 step < {GOALS['step_ms_max']} ms": b1[hi]["per_token_ms"] < GOALS["step_ms_max"],
        }


def render(rows: List[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    out = [f"== decode: LanguageModel d_model {r0['d_model']}, {r0['n_layers']} layers, n_seq {r0['n_seq']} "
           f"on {r0['device']} (cached step vs recomputing the prefix)",
           f"{'B':>3} {'context':>7} {'ms/token':>9} {'p10-p90 ms':>13} {'tokens/s':>9} {'prefill tok/s':>13} "
           f"{'recompute ms':>12} {'speedup':>8} {'cache B':>8} status"]
    for r in rows:
        if r.get("step_time_s") is None:
            out.append(f"{r['B']:>3} {r['context']:>7} {r['status']}: {r.get('check')}")
            continue
        st = r["step_time_s"]
        rec = r.get("recompute_time_s")
        out.append(f"{r['B']:>3} {r['context']:>7} {r['per_token_ms']:>9.3f} "
                   f"{st['p10'] * 1e3:>6.3f}-{st['p90'] * 1e3:<6.3f} {r['tokens_per_s']:>9.0f} "
                   f"{r['prefill_tokens_per_s']:>13.0f} {(rec['median'] * 1e3 if rec else float('nan')):>12.2f} "
                   f"{(r.get('vs_recompute') or float('nan')):>7.0f}x {r['cache_bytes']:>8} {r['status']} ({r['check']})")
    for r in rows:
        for goal, ok in r.get("goals", {}).items():
            out.append(f"  goal: {goal}: {'met' if ok else 'NOT met'}")
    return "\n".join(out)
