"""Learned sparsity and learned sequence length against the plain model, same size and steps.

    python -m benchmarks.bench_adaptive_models [--steps 150] [--threads 1] [--json out.json] [--only sparse|length|micro]

* sparse: ``resnet_bk.training.train.train`` on the byte-level stdlib corpus, model 'plain' vs
  'sparse' (target sparsity 0.5); validation perplexity, median ms per training step and per
  inference batch, and the sparsity actually reached.
* length: "mixed inputs": windows of the same corpus whose real length is drawn half from [8, 32]
  and half from [96, 128], right-padded to 128 (targets -100 on padding). The plain model runs every
  window at full length; the learned-length wrapper runs each group at its predicted length.
  Perplexity is over every real target token (a real token past the predicted length is charged
  log 256). Reported: tokens-processed ratio and the measured wall-clock ratio.
* interleaved: plain vs sparse LM timed alternately on the same batch (robust to load drift).
* micro: forward and forward+backward of one layer's BK part: the plain path (bk_core) vs
  SparseBKCore (importance predictor + bk_core_masked + interpolator) at ~50% sparsity.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from resnet_bk import ops
from resnet_bk.models.base import LanguageModel, MoEResNetBKLayer
from resnet_bk.models.learned_length import AdaptiveSequenceLengthWrapper, LearnedSequenceLengthTrainer
from resnet_bk.models.sparse import SparseBKCore, SparseMoEResNetBKLayer
from resnet_bk.training import train as T


def _median_ms(fn, reps=30, warm=5):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


def bench_sparse(args):
    out = {}
    common = dict(d_model=args.d_model, n_layers=args.n_layers, n_seq=128, batch_size=16, steps=args.steps,
                  threads=args.threads, progress=False, max_bytes=1_000_000)
    for name, kw in (("plain", {}),
                     ("sparse", {"target_sparsity": 0.5, "sparsity_loss_weight": 1.0, "sparsity_loss_type": "l2"})):
        r = T.train(name, model_kwargs=kw, **common)
        model = r.pop("model")
        if name == "sparse":
            model.eval()
            x = torch.randint(0, 256, (16, 128))
            with torch.no_grad():
                model(x)
            r["eval_sparsity_per_layer"] = [l.get_sparsity_stats()["sparsity_ratio"] for l in model.sparse_layers()]
        out[name] = {k: r[k] for k in ("val_ppl", "ms_per_train_step", "ms_per_infer_batch", "num_parameters",
                                        "final_train_loss", "last_metrics") if k in r}
        out[name].update({k: r[k] for k in r if k.startswith("eval_sparsity")})
        print(name, json.dumps(out[name]), flush=True)
    return out


def _mixed_batches(data, n, batch, seq, gen):
    """(x, y) batches of windows with real length half in [8, 32], half in [96, 128], right padded."""
    res = []
    for _ in range(n):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        w = data[starts[:, None] + torch.arange(seq + 1)]
        x, y = w[:, :-1].clone(), w[:, 1:].clone()
        short = torch.rand(batch, generator=gen) < 0.5
        L = torch.where(short, torch.randint(8, 33, (batch,), generator=gen),
                        torch.randint(96, 129, (batch,), generator=gen))
        pad = torch.arange(seq)[None, :] >= L[:, None]
        x[pad] = 0
        y[pad] = -100
        res.append((x, y))
    return res


def bench_length(args):
    torch.set_num_threads(args.threads)
    data = torch.frombuffer(bytearray(T.load_corpus(None, 1_000_000)), dtype=torch.uint8).long()
    n_val = data.numel() // 10
    tr, val = data[:-n_val], data[-n_val:]
    gen = torch.Generator().manual_seed(0)
    train_b = _mixed_batches(tr, args.steps, 16, 128, gen)
    val_b = _mixed_batches(val, 8, 16, 128, gen)
    out = {}
    for name in ("plain", "learned_length"):
        torch.manual_seed(0)
        base = LanguageModel(256, args.d_model, args.n_layers, 128)
        model = base if name == "plain" else AdaptiveSequenceLengthWrapper(base, 128, 8, length_penalty=args.length_penalty)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        trainer = LearnedSequenceLengthTrainer(model, opt) if name != "plain" else None
        step_t = []
        for x, y in train_b:
            t0 = time.perf_counter()
            if trainer is None:
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), ignore_index=-100)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            else:
                trainer.train_step(x, y)
            step_t.append(time.perf_counter() - t0)
        model.eval()
        ce, ntok, inf_t = 0.0, 0, []
        with torch.no_grad():
            for x, y in val_b:
                t0 = time.perf_counter()
                logits = model(x) if trainer is None else model(x)[0]
                inf_t.append(time.perf_counter() - t0)
                ce += F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), ignore_index=-100, reduction="sum").item()
                ntok += int((y != -100).sum())
        st = sorted(step_t[5:])
        inf_t.sort()
        r = {"val_ppl_real_tokens": math.exp(ce / ntok), "ms_per_train_step": 1e3 * st[len(st) // 2],
             "ms_per_infer_batch": 1e3 * inf_t[len(inf_t) // 2]}
        if trainer is not None:
            ev = trainer.evaluate(val_b, measure_time=True)
            r.update({k: ev[k] for k in ("avg_predicted_length", "avg_speedup", "measured_time_speedup",
                                         "length_distribution", "tokens_processed", "tokens_total")})
            # Interleaved wall clock on the same batches (robust to load drift): medians of
            # adaptive and full-length eval forwards, after one warm-up pass.
            ta, tf = [], []
            with torch.no_grad():
                for rep in range(4):
                    for x, _ in val_b:
                        t0 = time.perf_counter()
                        model(x)
                        t1 = time.perf_counter()
                        model(x, use_adaptive_length=False)
                        t2 = time.perf_counter()
                        if rep:
                            ta.append(t1 - t0)
                            tf.append(t2 - t1)
            ta.sort()
            tf.sort()
            r["interleaved_ms_adaptive"] = 1e3 * ta[len(ta) // 2]
            r["interleaved_ms_full"] = 1e3 * tf[len(tf) // 2]
            r["interleaved_time_speedup"] = tf[len(tf) // 2] / ta[len(ta) // 2]
        out[name] = r
        print(name, json.dumps(r), flush=True)
    return out


def bench_micro(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {}
    for B, N, D in ((8, 128, 64), (16, 1024, 64), (8, 4096, 64)):
        plain = MoEResNetBKLayer(D, N)
        core = SparseBKCore(D, N)
        core.importance_predictor.bias.data.zero_()  # ~50% computed
        x = torch.randn(B, N, D, requires_grad=True)
        v = torch.randn(B, N, requires_grad=True)

        def p_fwd():
            with torch.no_grad():
                plain.bk_features(v)

        def s_fwd():
            with torch.no_grad():
                core(x, v)

        def p_fb():
            plain.bk_features(v).sum().backward()

        def s_fb():
            core(x, v)[0].sum().backward()

        core.eval()
        _, m, r = core(x, v, return_sparsity_ratio=True)
        core.train()
        row = {"sparsity_eval": r.item(), "plain_fwd_ms": _median_ms(p_fwd), "sparse_fwd_ms": _median_ms(s_fwd),
               "plain_fwdbwd_ms": _median_ms(p_fb), "sparse_fwdbwd_ms": _median_ms(s_fb)}
        # The full layers (MoE FFN included) for scale.
        sl = SparseMoEResNetBKLayer(D, N)
        sl.sparse_bk_core.importance_predictor.bias.data.zero_()
        with torch.no_grad():
            row["plain_layer_fwd_ms"] = _median_ms(lambda: plain(x), reps=10)
            row["sparse_layer_fwd_ms"] = _median_ms(lambda: sl(x), reps=10)
        out[f"B{B}_N{N}_D{D}"] = row
        print(f"B{B}_N{N}_D{D}", json.dumps(row), flush=True)
    return out


def bench_interleaved(args):
    """Plain vs sparse LM (sparse importance bias 0: ~50% skipped) timed alternately on the same
    batches, so machine-load drift hits both equally: median ms per training step (fwd+bwd+AdamW)
    and per inference batch (eval, no_grad)."""
    from resnet_bk.models.sparse import SparseLanguageModel
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = LanguageModel(256, args.d_model, args.n_layers, 128)
    sparse = SparseLanguageModel(256, args.d_model, args.n_layers, 128, sparsity_loss_weight=1.0)
    for l in sparse.sparse_layers():
        l.sparse_bk_core.importance_predictor.bias.data.zero_()
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, sparse)}
    x = torch.randint(0, 256, (16, 128))
    times = {"plain": {"train": [], "infer": []}, "sparse": {"train": [], "infer": []}}
    for it in range(args.reps + 3):
        for name, m in (("plain", plain), ("sparse", sparse)):
            m.train()
            t0 = time.perf_counter()
            opts[m].zero_grad(set_to_none=True)
            m.training_loss(x, x)[0].backward()
            opts[m].step()
            t1 = time.perf_counter()
            m.eval()
            with torch.no_grad():
                m(x)
            t2 = time.perf_counter()
            if it >= 3:
                times[name]["train"].append(t1 - t0)
                times[name]["infer"].append(t2 - t1)
    med = lambda v: 1e3 * sorted(v)[len(v) // 2]
    out = {n: {"ms_per_train_step": med(t["train"]), "ms_per_infer_batch": med(t["infer"])} for n, t in times.items()}
    out["sparse_eval_sparsity"] = [l.get_sparsity_stats()["sparsity_ratio"] for l in sparse.sparse_layers()]
    out["train_speedup"] = out["plain"]["ms_per_train_step"] / out["sparse"]["ms_per_train_step"]
    out["infer_speedup"] = out["plain"]["ms_per_infer_batch"] / out["sparse"]["ms_per_infer_batch"]
    print("interleaved", json.dumps(out), flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--only", choices=["sparse", "length", "micro", "interleaved"], default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--length-penalty", type=float, default=0.1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "backends": ops.available_backends(), "threads": a.threads, "args": vars(a)}
    for k, fn in (("micro", bench_micro), ("interleaved", bench_interleaved), ("sparse", bench_sparse), ("length", bench_length)):
        if a.only in (None, k):
            res[k] = fn(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
