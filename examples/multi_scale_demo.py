"""Multi-scale sequence processing in a few seconds on a CPU (seeds/002's ``examples/multi_scale_demo.py``).

    python examples/multi_scale_demo.py [--d-model 32] [--lengths 64 128 256] [--batch-size 4] [--steps 20]

Shows, on tiny layers and models:
1. the standard layer (``MoEResNetBKLayer``) against the simple (N -> N/2 -> N) and hierarchical
   (N -> N/2 -> N/4 -> N/2 -> N) multi-scale layers at several sequence lengths: parameters, the
   analytic multiply-adds per sequence (``count_flops_multi_scale``) and, labelled indicative, a
   median forward time of a few calls (speed figures come from the benchmark suite:
   ``python -m benchmarks.run --ops modules``, which times them interleaved on trained models);
2. numerical stability: float32 against float64 of the same weights, and inputs scaled by 10;
3. a short training run of a language model built from multi-scale blocks against the standard
   model (real text: CPython's ``pydoc_data.topics``, bytes as tokens).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from resnet_bk.models import (HierarchicalMultiScaleLayer, LanguageModel, MoEResNetBKLayer, MultiScaleResNetBKBlock,
                              MultiScaleResNetBKLayer, count_flops_multi_scale)

from _data import text_batches  # noqa: E402  (examples/_data.py, beside this script)

VOCAB = 256




@torch.no_grad()
def median_forward_ms(layer, x, reps: int = 5) -> float:
    layer.eval()
    layer(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        layer(x)
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def train_lm(model, batches, lr: float = 3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    D, B = args.d_model, args.batch_size
    res = {"layers": [], "stability": {}, "training": {}}

    print("1. Layers (analytic multiply-adds per sequence; time: indicative median of 5 forwards)")
    print(f"   {'N':>5} {'layer':<14} {'params':>8} {'madds':>10} {'vs std':>7} {'ms':>7}")
    for N in args.lengths:
        torch.manual_seed(args.seed)
        x = torch.randn(B, N, D)
        for name, layer, fl in (
                ("standard", MoEResNetBKLayer(D, N), None),
                ("multi-scale", MultiScaleResNetBKLayer(D, N), count_flops_multi_scale(D, N)),
                ("hierarchical", HierarchicalMultiScaleLayer(D, N), count_flops_multi_scale(D, N, hierarchical=True))):
            out = layer.eval()(x)
            assert out.shape == x.shape and bool(torch.isfinite(out).all())
            madds = fl["multi_scale_flops"] if fl else count_flops_multi_scale(D, N)["standard_flops"]
            ratio = fl["speedup"] if fl else 1.0
            ms = median_forward_ms(layer, x)
            n_par = sum(q.numel() for q in layer.parameters())
            res["layers"].append({"N": N, "layer": name, "params": n_par, "madds": madds,
                                  "analytic_speedup": ratio, "indicative_ms": ms})
            print(f"   {N:>5} {name:<14} {n_par:>8} {madds:>10.3g} {ratio:>6.2f}x {ms:>7.2f}")

    print("2. Numerical stability (largest |float32 - float64| / max|float64|, and with inputs x10)")
    N = args.lengths[0]
    torch.manual_seed(args.seed)
    x = torch.randn(B, N, D, dtype=torch.float64)
    for name, cls in (("multi-scale", MultiScaleResNetBKLayer), ("hierarchical", HierarchicalMultiScaleLayer)):
        torch.manual_seed(args.seed)
        l64 = cls(D, N).double().eval()
        l32 = copy.deepcopy(l64).float()
        with torch.no_grad():
            ref = l64(x)
            err = float((l32(x.float()).double() - ref).abs().max() / ref.abs().max())
            big = l32(10 * x.float())
        finite = bool(torch.isfinite(big).all())
        res["stability"][name] = {"rel_err_f32_vs_f64": err, "finite_at_10x": finite}
        print(f"   {name:<14} rel err {err:.2e}   inputs x10 finite: {finite}")

    print(f"3. Language models after {args.steps} training steps (N={N}, 2 blocks)")
    train_b = text_batches(args.steps, B, N, args.seed)
    val_b = text_batches(2, B, N, args.seed + 1)
    for name, factory in (("standard", None),
                          ("multi-scale", lambda i: MultiScaleResNetBKBlock(D, N)),
                          ("hierarchical", lambda i: MultiScaleResNetBKBlock(D, N, hierarchical=True))):
        torch.manual_seed(args.seed)
        lm = LanguageModel(VOCAB, D, 2, N, block_factory=factory)
        losses = train_lm(lm, train_b)
        lm.eval()
        with torch.no_grad():
            val = sum(float(F.cross_entropy(lm(xv).reshape(-1, VOCAB), yv.reshape(-1))) for xv, yv in val_b) / len(val_b)
        res["training"][name] = {"first_loss": losses[0], "last_loss": losses[-1], "val_ce": val}
        print(f"   {name:<14} train loss {losses[0]:.3f} -> {losses[-1]:.3f}   val CE {val:.3f}")
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
