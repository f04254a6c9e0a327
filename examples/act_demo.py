"""Adaptive Computation Time in a few seconds on a CPU (seeds/001's ``examples/act_demo.py``).

    python examples/act_demo.py [--steps 30] [--d-model 32] [--n-layers 4] [--n-seq 32] [--batch-size 8]

Shows, on tiny models and real text (CPython's ``pydoc_data.topics``, bytes as tokens):
1. the effect of the halting threshold on an untrained model (blocks actually run per token);
2. the effect of act_lambda after a short training run (ACTTrainer): cross-entropy, ponder cost
   (Graves' N(t) + R(t)) and blocks run per token;
3. the training dynamics of one run;
4. the comparison with the standard model of the same size trained the same way.
"Blocks per token" counts the blocks each token really went through (halted tokens skip the later
blocks' per-token work). Times are not measured here: speed figures come from the benchmark suite
(``python -m benchmarks.run --ops modules``).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from resnet_bk.models import ACTLanguageModel, LanguageModel
from resnet_bk.training import ACTTrainer

from _data import text_batches  # noqa: E402  (examples/_data.py, beside this script)

VOCAB = 256




def act_model(args, threshold: float, act_lambda: float, seed: int) -> ACTLanguageModel:
    torch.manual_seed(seed)
    return ACTLanguageModel(VOCAB, args.d_model, args.n_layers, args.n_seq, act_threshold=threshold,
                            act_lambda=act_lambda, halt_bias_init=0.0)


@torch.no_grad()
def evaluate(model, batches) -> dict:
    model.eval()
    ce, layers = 0.0, 0.0
    for x, y in batches:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        ce += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)))
        layers += model.get_avg_layers_executed() if hasattr(model, "get_avg_layers_executed") else model.n_layers
    model.train()
    return {"val_ce": ce / len(batches), "blocks_per_token": layers / len(batches)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-seq", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_b = text_batches(args.steps, args.batch_size, args.n_seq, args.seed)
    val_b = text_batches(2, args.batch_size, args.n_seq, args.seed + 1)
    res = {"thresholds": {}, "lambdas": {}}

    print(f"1. Threshold (untrained, {args.n_layers} blocks): blocks run per token")
    x = val_b[0][0]
    for thr in (0.5, 0.8, 0.99):
        m = act_model(args, thr, 0.01, args.seed).eval()
        with torch.no_grad():
            _, ponder = m(x)
        res["thresholds"][thr] = {"blocks_per_token": m.get_avg_layers_executed(), "ponder_cost": float(ponder)}
        print(f"   threshold {thr:<5} blocks/token {m.get_avg_layers_executed():.2f}  ponder {float(ponder):.2f}")

    print(f"2. act_lambda after {args.steps} training steps (threshold 0.95)")
    curve = []
    for lam in (0.001, 0.01, 0.1):
        m = act_model(args, 0.95, lam, args.seed)
        trainer = ACTTrainer(m, torch.optim.AdamW(m.parameters(), lr=3e-3), device="cpu")
        for i, (xb, yb) in enumerate(train_b):
            metrics = trainer.train_step(xb, yb)
            if lam == 0.01:
                curve.append(metrics)
        ev = evaluate(m, val_b)
        res["lambdas"][lam] = {**ev, "train_ponder_cost": metrics["ponder_cost"]}
        print(f"   lambda {lam:<6} val CE {ev['val_ce']:.3f}  blocks/token {ev['blocks_per_token']:.2f}  "
              f"train ponder {metrics['ponder_cost']:.2f}")

    print("3. Training dynamics (lambda 0.01)")
    every = max(1, len(curve) // 5)
    for i in list(range(0, len(curve), every)) + ([len(curve) - 1] if (len(curve) - 1) % every else []):
        c = curve[i]
        print(f"   step {i + 1:>3}  total {c['total_loss']:.3f}  CE {c['ce_loss']:.3f}  "
              f"ponder {c['ponder_cost']:.2f}  blocks/token {c['avg_layers_executed']:.2f}")
    res["curve"] = [{k: c[k] for k in ("total_loss", "ce_loss", "ponder_cost", "avg_layers_executed")} for c in curve]

    print("4. Against the standard model (same size, same steps)")
    torch.manual_seed(args.seed)
    std = LanguageModel(VOCAB, args.d_model, args.n_layers, args.n_seq)
    opt = torch.optim.AdamW(std.parameters(), lr=3e-3)
    for xb, yb in train_b:
        loss = F.cross_entropy(std(xb).reshape(-1, VOCAB), yb.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    res["standard"] = evaluate(std, val_b)
    act = res["lambdas"][0.01]
    print(f"   standard  val CE {res['standard']['val_ce']:.3f}  blocks/token {args.n_layers}")
    print(f"   ACT       val CE {act['val_ce']:.3f}  blocks/token {act['blocks_per_token']:.2f}  "
          f"(work ratio {args.n_layers / act['blocks_per_token']:.2f}x in blocks; times: benchmarks/)")
    if args.json:
        print(json.dumps(res, default=float))
    return res


if __name__ == "__main__":
    main()
