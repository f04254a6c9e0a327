"""torch.compile of a ResNet-BK language model: graphs, recompiles, and a training step eager vs compiled.

    python -m benchmarks.bench_compile [--d-model 64] [--n-layers 4] [--n-seq 128] [--batch 8]
                                       [--threads 1] [--reps 20] [--json out.json]

One ``LanguageModel`` (MoE top-1 over ``--experts`` experts, causal BK-Core, dropout off so that
both runs compute the same thing), two identical copies: one eager, one wrapped in
``torch.compile(model)`` (Inductor, default options). The training step is the same for both:
``zero_grad``, logits = model(x), cross-entropy plus ``moe_aux_weight`` times the MoE balance loss,
``backward``, ``AdamW.step`` (the optimizer is not compiled). Reported:

* ``graphs_first_call``: graphs Dynamo hands to the backend on the first call (1 = no graph break);
* ``recompiles``: graphs compiled after the first call, over ``--reps`` more calls on the same
  shape (0 = compiled once per shape);
* ``graph_breaks``: Dynamo's graph-break counter;
* ``compile_s``: the first compiled step's wall time (tracing + Inductor codegen);
* ``ms_eager`` / ``ms_compiled``: median ms per training step, the two models timed alternately
  (robust to load drift on a shared machine), after 3 warm-up steps each; ``speedup`` = eager /
  compiled;
* ``max_logit_diff_first_step``: max |compiled - eager| logits of the first step (same weights);
  ``..._last_step``: the same after all the steps (rounding differences grow with training).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import torch.nn.functional as F

from resnet_bk import ops
from resnet_bk.models.base import LanguageModel, moe_aux_loss


class _CountingBackend:
    """Inductor, counting the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        self.graphs += 1
        return compile_fx(gm, example_inputs)


def _step(model, fwd, opt, x, y):
    opt.zero_grad(set_to_none=True)
    logits = fwd(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    aux = moe_aux_loss(model)
    if aux is not None:
        loss = loss + model.moe_aux_weight * aux
    loss.backward()
    opt.step()
    return logits


def bench_compile(d_model=64, n_layers=4, n_seq=128, batch=8, experts=4, vocab=256, reps=20, threads=1,
                  dynamo_reset=True):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch.set_num_threads(threads)
    if dynamo_reset:
        torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = LanguageModel(vocab, d_model, n_layers, n_seq, num_experts=experts, top_k=1, dropout_p=0.0)
    comp = copy.deepcopy(eager)
    backend = _CountingBackend()
    cfwd = torch.compile(comp, backend=backend)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, n_seq), generator=g)
    y = torch.randint(0, vocab, (batch, n_seq), generator=g)
    t0 = time.perf_counter()
    lc = _step(comp, cfwd, opt_c, x, y)
    compile_s = time.perf_counter() - t0
    graphs_first = backend.graphs
    le = _step(eager, eager, opt_e, x, y)
    first_diff = float((le.detach() - lc.detach()).abs().max())
    te, tc = [], []
    for it in range(reps + 3):
        t0 = time.perf_counter()
        le = _step(eager, eager, opt_e, x, y)
        t1 = time.perf_counter()
        lc = _step(comp, cfwd, opt_c, x, y)
        t2 = time.perf_counter()
        if it >= 3:
            te.append(t1 - t0)
            tc.append(t2 - t1)
    med = lambda v: 1e3 * sorted(v)[len(v) // 2]
    out = {"d_model": d_model, "n_layers": n_layers, "n_seq": n_seq, "batch": batch, "experts": experts,
           "threads": threads, "reps": reps,
           "graphs_first_call": graphs_first, "recompiles": backend.graphs - graphs_first,
           "graph_breaks": sum(counters["graph_break"].values()), "compile_s": compile_s,
           "ms_eager": med(te), "ms_compiled": med(tc),
           "max_logit_diff_first_step": first_diff,
           "max_logit_diff_last_step": float((le.detach() - lc.detach()).abs().max())}
    out["speedup"] = out["ms_eager"] / out["ms_compiled"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "backends": ops.available_backends()}
    res["compile"] = bench_compile(a.d_model, a.n_layers, a.n_seq, a.batch, a.experts, reps=a.reps, threads=a.threads)
    print("compile", json.dumps(res["compile"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
