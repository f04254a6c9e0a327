"""The peer comparison (benchmarks/peers.py): the Transformer's KV cache decodes exactly what the
full forward computes, and a tiny run gives well-formed rows of every kind for every peer."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import peers as P  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.run import parse_args  # noqa: E402

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "Ns": [16, 32], "Bs": [1], "contexts": [4, 12], "gen_tokens": 2,
        "quality_Ns": [16], "tokens_per_batch": 32, "budget_s": 0.05, "val_tokens": 64, "params_n_seq": 32,
        "max_call_s": 1e-9}


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    m = P.GPTLanguageModel(256, 32, 2, 16, 4).eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(2, 12)
        parts = [m(x[:, :5], cache=cache), m(x[:, 5:6], cache=cache), m(x[:, 6:9], cache=cache),
                 m(x[:, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 12
    with pytest.raises(ValueError, match="at most 0 tokens"):
        m(x[:, :1], cache=cache)


def test_incremental_decoding_api_is_used_when_the_model_has_it():
    """The ResNet-BK peers decode through ``init_cache(B)`` / ``model(tokens, cache=cache)`` once the
    model has them (issue 19): a model with that API (the Transformer here) gets timed rows."""
    cfg = dict(P.PEER_CONFIG["smoke"], **TINY)
    bk = next(p for p in P.peers() if p.name == "resnet_bk")
    fake = P.Peer("with_cache", "resnet_bk's generation path on a model with init_cache", P._transformer,
                  lambda: None, bk.logits, bk.gen_start, bk.gen_step, bk.gen_unavailable)
    from benchmarks.modules import text_corpus
    rows = P.run_generation([fake], cfg, torch.device("cpu"), text_corpus(), log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["cache_bytes"] < rows[1]["cache_bytes"] and rows[0]["time_s"]["n"] == 2


def test_predicted_memory_skip():
    tf = next(p for p in P.peers() if p.name == "transformer")
    cfg = dict(P.PEER_CONFIG["smoke"], max_call_s=100.0, mem_fraction=0.5)
    last = {("transformer", "train_step", 1): (1024, 0.01, (512, 2**30))}
    why = P._predict_skip(tf, ("transformer", "train_step", 1), 4096, last, cfg, cap=4 * 2**30)
    assert why.startswith("predicted 8.0 GiB (linear from 1.00 GiB at N=512)")
    assert P._predict_skip(tf, ("transformer", "train_step", 1), 2048, last, cfg, cap=4 * 2**30) is None


def test_tiny_run_rows(tmp_path):
    res = P.run_peers("smoke", torch.device("cpu"), log=lambda s: None, config=TINY)
    rows = res["rows"]
    names = [p.name for p in P.peers()]
    assert set(res["versions"]) >= {"torch", "transformers", "mambapy", "mamba_scan"}
    mamba_why = P._mamba_unavailable()
    for name in names:
        mine = [r for r in rows if r["peer"] == name]
        assert all(r["suite"] == "peer" and r["device"] == "cpu" and r["d_model"] == 16 for r in mine)
        if name == "mamba" and mamba_why:
            assert [(r["kind"], r["status"], r["reason"]) for r in mine] == [("params", "skipped", mamba_why)]
            continue
        (pr,) = [r for r in mine if r["kind"] == "params"]
        assert 0 < pr["params_active_per_token"] <= pr["params_total"]
        if name.startswith("resnet_bk"):  # top-1 of 4 experts: 3/4 of the expert weights inactive
            assert pr["params_active_per_token"] < pr["params_total"]
            assert pr["params_position_table"] == 32 * 16
        for kind in ("train_step", "inference"):
            first, second = sorted((r for r in mine if r["kind"] == kind), key=lambda r: r["N"])
            assert first["status"] == "ok" and first["N"] == 16 and first["B"] == 1
            t = first["time_s"]
            assert 0 < t["p10"] <= t["median"] <= t["p90"] and t["n"] >= 2
            assert isinstance(first["peak_mem_bytes"], int) and first["peak_mem_bytes"] > 0
            # the limit of 1e-9 s per call: the next N is predicted too slow
            assert second["status"] == "skipped" and second["reason"].startswith("predicted")
            assert second["time_s"] is None
        gen = sorted((r for r in mine if r["kind"] == "generation"), key=lambda r: r["context"])
        assert [r["context"] for r in gen] == [4, 12]
        if name.startswith("resnet_bk") and not hasattr(P._resnet_bk(TINY, 16), "init_cache"):
            assert all(r["status"] == "skipped" and r["reason"] == P.SKIP_NO_CACHE for r in gen)
        else:
            assert all(r["status"] == "ok" and r["time_s"]["n"] == 2 and r["cache_bytes"] > 0 for r in gen)
            if name == "transformer":  # the KV cache grows with the context, 2 (k, v) * L * H * len * hd floats
                assert [r["cache_bytes"] for r in gen] == [2 * 1 * 2 * (c + 4) * 8 * 4 for c in (4, 12)]
            if name == "mamba":  # a fixed-size state
                assert gen[0]["cache_bytes"] == gen[1]["cache_bytes"]
        (q,) = [r for r in mine if r["kind"] == "quality"]
        assert q["status"] == "ok" and q["steps"] >= 1 and q["B"] == 2 and q["val_tokens"] == 64
        assert 0 < q["val_bits_per_byte"] < 16 and math.isfinite(q["val_bits_per_byte"])
    tf = {(r["kind"], r.get("N"), r.get("context")): r for r in rows if r["peer"] == "transformer"}
    for r in rows:
        if "x_transformer" in r:
            t = tf[(r["kind"], r.get("N"), r.get("context"))]
            assert r["x_transformer"] == pytest.approx(t["time_s"]["median"] / r["time_s"]["median"])
    result = {"rows": [], "module_rows": [], "peer_rows": rows, "peer_config": res["config"],
              "peer_versions": res["versions"], "machine_kind": "test"}
    text = report.render_text(result)
    assert "validation bits/byte after the same training time" in text and "goals (resnet_bk vs transformer)" in text
    written = P.plots(result, str(tmp_path), "t")
    assert all(os.path.getsize(p) > 0 for p in written)
    assert parse_args(["--ops", "peers", "--quick"]).ops == ["peers"]
