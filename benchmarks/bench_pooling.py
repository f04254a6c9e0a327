"""Benchmark of the multi-scale resamplers and the masked BK-Core on CPU.

    python -m benchmarks.bench_pooling [--quick] [--json PATH]

* learned_downsample / learned_upsample, forward and forward+backward, backends "reference" and
  "cpp", against the unfused plain PyTorch a user would write (softmax, view, multiply, sum /
  view, add, add). Achieved GB/s counts the bytes that must move (inputs read once, outputs written
  once), so it is comparable to the machine's memory bandwidth.
* bk_core_masked forward (cpp) at 0%, 50% and 90% of positions masked against the unmasked bk_core
  (B=64, N=4096, float32).

Every timed configuration is first checked against the plain PyTorch result; a speedup is printed
only for a configuration whose check passed. ``run(quick)`` returns the rows (dicts with keys op,
backend, shape, dtype, mode, median_s, gbps, speedup) for the main benchmark suite.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

from resnet_bk import ops

BACKENDS = ("reference", "cpp")


def _median_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _nbytes(*tensors_or_counts) -> int:
    total = 0
    for t in tensors_or_counts:
        total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else int(t)
    return total


# ---------------------------------------------------------------------------------------------
# plain PyTorch baselines (what a user writes)

def plain_downsample(x, logits):
    B, N, D = x.shape
    M, r = logits.shape
    w = torch.softmax(logits, dim=-1).to(x.dtype)
    return (x.view(B, M, r, D) * w[None, :, :, None]).sum(2)


def plain_upsample(y, bias, residual, scale):
    B, M, RD = y.shape
    r = bias.shape[1]
    D = RD // r
    up = (y.view(B, M, r, D) + bias.to(y.dtype)).view(B, M * r, D)
    return residual + scale.to(y.dtype) * up


# ---------------------------------------------------------------------------------------------

def _fwd_bwd(fn, inputs: Sequence[torch.Tensor], grad: torch.Tensor):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)
    return run


def _rows_for(op, shape, dtype, impls: Dict[str, Callable], inputs, grad, bytes_fwd, bytes_fwdbwd,
              warmup, repeats, rtol):
    rows = []
    with torch.no_grad():
        want = impls["plain"](*inputs)
        for name, fn in impls.items():
            got = fn(*inputs)
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * float(want.abs().max()))
    for mode, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_fwdbwd)):
        base = None
        for name, fn in impls.items():
            if mode == "fwd":
                def timed(fn=fn):
                    with torch.no_grad():
                        fn(*inputs)
            else:
                timed = _fwd_bwd(fn, inputs, grad)
            t = _median_time(timed, warmup, repeats)
            if name == "plain":
                base = t
            rows.append(dict(op=op, backend=name, shape=shape, dtype=str(dtype).replace("torch.", ""), mode=mode,
                             median_s=t, gbps=nbytes / t / 1e9, speedup=(base / t) if base else 1.0))
    return rows


def bench_downsample(B, N, D, r, dtype, warmup, repeats) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    M = N // r
    x = torch.randn(B, N, D, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(M, r, generator=g).requires_grad_()
    grad = torch.randn(B, M, D, generator=g).to(dtype)
    impls = {"plain": plain_downsample}
    for be in BACKENDS:
        impls[be] = (lambda be: lambda x, l: ops.learned_downsample(x, l, backend=be))(be)
    fwd = _nbytes(x, logits, B * M * D * x.element_size())
    # backward: read grad and x (logits gradient), write grad_x and grad_logits
    bwd = _nbytes(grad, x, x, logits)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    return _rows_for("learned_downsample", f"B{B} N{N} D{D} r{r}", dtype, impls, (x, logits), grad, fwd,
                     fwd + bwd, warmup, repeats, rtol)


def bench_upsample(B, N, D, r, dtype, warmup, repeats) -> List[dict]:
    g = torch.Generator().manual_seed(1)
    M = N // r
    y = torch.randn(B, M, r * D, generator=g).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(M, r, D, generator=g)).requires_grad_()
    res = torch.randn(B, N, D, generator=g).to(dtype).requires_grad_()
    scale = torch.tensor(0.5, requires_grad=True)
    grad = torch.randn(B, N, D, generator=g).to(dtype)
    impls = {"plain": plain_upsample}
    for be in BACKENDS:
        impls[be] = (lambda be: lambda y, b, rr, s: ops.learned_upsample(y, b, rr, s, backend=be))(be)
    fwd = _nbytes(y, bias, res, res)  # read y, bias, residual; write out
    # backward: read grad and y (scale gradient), write grad_y and grad_bias (grad_residual is grad)
    bwd = _nbytes(grad, y, y, bias)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    return _rows_for("learned_upsample", f"B{B} N{N} D{D} r{r}", dtype, impls, (y, bias, res, scale), grad, fwd,
                     fwd + bwd, warmup, repeats, rtol)


def bench_masked(B, N, warmup, repeats) -> List[dict]:
    if "cpp" not in ops.available_backends():
        return []
    g = torch.Generator().manual_seed(2)
    a = -2.0 + 6.0 * torch.rand(B, N, generator=g) - 3.0
    b = 0.5 + torch.rand(N - 1, generator=g)
    c = 0.5 + torch.rand(N - 1, generator=g)
    shape = f"B{B} N{N}"

    def run_plain():
        ops.bk_core(a, b, c, 1j, backend="cpp")

    base = _median_time(run_plain, warmup, repeats)
    out_bytes = B * N * 8
    rows = [dict(op="bk_core (unmasked)", backend="cpp", shape=shape, dtype="float32", mode="fwd", median_s=base,
                 gbps=(_nbytes(a, b) + out_bytes) / base / 1e9, speedup=1.0)]
    ref = ops.bk_core(a, b, c, 1j, backend="cpp")
    for frac in (0.0, 0.5, 0.9):
        mask = (torch.rand(B, N, generator=g) >= frac).float()
        got = ops.bk_core_masked(a, b, c, 1j, mask, backend="cpp")
        torch.testing.assert_close(got, mask * ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        t = _median_time(lambda: ops.bk_core_masked(a, b, c, 1j, mask, backend="cpp"), warmup, repeats)
        nbytes = _nbytes(a, b, mask) + out_bytes
        rows.append(dict(op=f"bk_core_masked {int(frac * 100)}% masked", backend="cpp", shape=shape,
                         dtype="float32", mode="fwd", median_s=t, gbps=nbytes / t / 1e9, speedup=base / t))
    return rows


def run(quick: bool = False) -> List[dict]:
    warmup, repeats = (2, 5) if quick else (3, 15)
    if quick:
        cfgs = [(2, 1024, 128, 2), (2, 1024, 128, 4)]
    else:
        cfgs = [(8, 4096, 256, 2), (8, 4096, 256, 4), (4, 4096, 3 * 67, 2)]
    rows: List[dict] = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, N, D, r in cfgs:
            rows += bench_downsample(B, N, D, r, dtype, warmup, repeats)
            rows += bench_upsample(B, N, D, r, dtype, warmup, repeats)
    rows += bench_masked(8 if quick else 64, 1024 if quick else 4096, warmup, repeats)
    return rows


def _print(rows: List[dict]) -> None:
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    hdr = f"{'op':32s} {'backend':10s} {'shape':22s} {'dtype':9s} {'mode':8s} {'median ms':>10s} {'GB/s':>7s} {'speedup':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['op']:32s} {r['backend']:10s} {r['shape']:22s} {r['dtype']:9s} {r['mode']:8s} "
              f"{r['median_s'] * 1e3:10.3f} {r['gbps']:7.2f} {r['speedup']:8.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = run(args.quick)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
