"""The prepared GPU check: ``python -m benchmarks.gpu_check [OUT_DIR] [--dry-run]`` (``bash run.sh gpu-check``).

On a CUDA machine with the package built against the installed torch, in one short run (< 8 min):

1. the machine (GPU, torch / CUDA / triton versions, ``ops.backend_status()``); stops at once (exit 2)
   without a GPU or without the "cuda" backend, saying why;
2. ``pytest -q tests/cuda tests/kernels/test_triton.py -x`` on the GPU in a subprocess (TRITON_INTERPRET
   removed, timeout ``--test-timeout``), its summary line recorded; a failure makes the exit code 1
   but the grid still runs;
3. the device-to-device copy bandwidth, then ``bk_core`` float32 (two-sided, causal, and causal under
   ``torch.use_deterministic_algorithms(True)``: "causal-deterministic", where the CUDA kernels take
   row scans instead of the decoupled look-back) at B*N = 2^24
   (B = 1, 64, 4096) for the "cuda" and "triton" backends (forced): forward, backward and
   forward+backward; median time, ns/element, GB/s of the minimum traffic (``benchmarks.cases``)
   and its % of the copy bandwidth, beside the goals (forward >= 70 %, backward >= 50 %);
4. every (variant, B, backend) checked against the C++ CPU backend on the same inputs (the
   reference is a Python loop over N) and, at the largest B, its first 4 rows against the
   reference itself: forward output on the forward rows, grad_diag on the other two; a failed
   check marks the row FAILED and makes the exit code 1;
5. ``OUT_DIR/gpu-<slug>.json`` and ``.md`` (slug from the GPU name, e.g. ``h200``), table printed.

Timing: CUDA events around one call, 3 warm-ups and 20 timed calls (``--warmup``, ``--repeats``).
Before each call a 1 GiB buffer is zeroed: it evicts the inputs from L2 (50 MiB on H100/H200) and
keeps the GPU busy while the host dispatches the op, so the events time the device work, not the
Python dispatch. The backward row is ``torch.autograd.grad`` alone, after an untimed forward (the
backward goal is judged on it); forward+backward is one call of both. The copy bandwidth is timed
the same way (``dst.copy_(src)``, 256 MiB), not with ``timing.copy_bandwidth``, whose host timer
and synchronisation would bias a 0.1 ms copy.

``--dry-run`` runs the whole pipeline on the CPU with tiny sizes (B*N = 2^12, B = 1, 4, 64), the
"cpp" backend standing in for cuda/triton and no pytest step; ``--perturb`` (for the tests)
multiplies the timed backend's outputs by 1.001 so that every check must fail.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Optional

# The Triton kernels must be compiled for the GPU: triton reads TRITON_INTERPRET when first imported.
_INTERPRET_WAS = os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import resnet_bk.ops as ops  # noqa: E402

from .cases import op_cases  # noqa: E402
from .timing import Stats, machine_info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SIZES = [(1, 1 << 24), (64, 1 << 18), (4096, 1 << 12)]
DRY_SIZES = [(1, 1 << 12), (4, 1 << 10), (64, 1 << 6)]
MODES = ("forward", "backward", "forward+backward")
GOALS = {"forward": 0.70, "backward": 0.50}  # fraction of the copy bandwidth
REF_ROWS = 4
# Both sides of the comparison are float32 computations: the test suite holds the GPU backends to
# within 2x the policy of the reference (tests/cuda) and the cpp backend to within 1x, so two
# correct backends may differ by 3x (triangle inequality). Not loosened for long N: the err/tol
# column (max |got - ref| / (|ref| + max|ref|) over the policy tolerance) shows the headroom.
TOL_FACTOR = 3
TOL_NOTE = (f"checks: assert_close at {TOL_FACTOR} x ops.tolerance(float32) = {TOL_FACTOR * ops.tolerance(torch.float32):g} "
            f"(GPU backends are held to 2x the reference, cpp to 1x: triangle inequality), not loosened for long N; "
            f"err/tol = max |got - ref| / (|ref| + max|ref|) in units of ops.tolerance(float32)")
Z = 1j


class Timer:
    """Times ``call(setup())`` with CUDA events (host clock on the CPU), each call after a flush."""

    def __init__(self, device: torch.device, flush_bytes: int, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush = torch.empty(flush_bytes // 4, device=device)

    def __call__(self, call: Callable, setup: Callable = lambda: None) -> Stats:
        ts = []
        for i in range(self.warmup + self.repeats):
            arg = setup()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(arg)
                end.record()
                end.synchronize()
                t = start.elapsed_time(end) / 1e3
            else:
                self.flush.zero_()
                t0 = time.perf_counter()
                call(arg)
                t = time.perf_counter() - t0
            if i >= self.warmup:
                ts.append(t)
        return Stats.of(ts, self.warmup)


def run_tests(timeout: int) -> dict:
    """The CUDA and Triton tests on the GPU, in a subprocess; the pytest summary line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/cuda", "tests/kernels/test_triton.py", "-x"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = None, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    lines = out.strip().splitlines()
    pat = re.compile(r"\d+ (passed|failed|errors?|skipped)|no tests ran")
    summary = next((ln.strip("= ") for ln in reversed(lines) if pat.search(ln)), "(no pytest summary line)")
    if rc is None:
        summary = f"timed out after {timeout} s; last summary seen: {summary}"
    state = "ok" if rc == 0 else "timeout" if rc is None else "FAILED"
    return {"command": " ".join(["python"] + cmd[1:]), "rc": rc, "status": state, "summary": summary,
            "seconds": round(time.time() - t0, 1), "tail": [] if rc == 0 else lines[-40:]}


def check(got: torch.Tensor, ref: torch.Tensor, what: str) -> dict:
    """``ops.assert_close`` at TOL_FACTOR x the policy, and the error in units of the policy."""
    g, r = got.detach().cpu(), ref.detach()
    ra = r.abs()
    err = float(((g.to(r.dtype) - r).abs() / (ra + ra.max())).max()) / ops.tolerance(torch.float32)
    try:
        ops.assert_close(g, r, tol=TOL_FACTOR * ops.tolerance(torch.float32), what=what, op="bk_core")
        return {"status": "ok", "err_over_tol": err}
    except ops.VerificationError as exc:
        return {"status": f"FAILED: {exc}", "err_over_tol": err}


def grad_of(fn: Callable, diag: torch.Tensor, gout: torch.Tensor):
    d = diag.detach().requires_grad_(True)
    out = fn(d)
    (g,) = torch.autograd.grad(out, d, gout)
    return out.detach(), g


class deterministic_algorithms:
    """``torch.use_deterministic_algorithms(on, warn_only=True)`` for a block, restored after."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.prev = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(self.on, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev[0], warn_only=self.prev[1])


def run_config(case, B: int, N: int, backends: List[str], device: torch.device, timer: Timer, copy_gbps: float,
               ref_slice: bool, perturb: bool, log: Callable[[str], None], label: Optional[str] = None,
               deterministic: bool = False) -> List[dict]:
    """All rows of one (variant, B, N): the oracles once, then per backend the check and the timings;
    ``label`` names the rows' variant (default: the case's), ``deterministic`` runs the backends under
    torch.use_deterministic_algorithms(True)."""
    with deterministic_algorithms(deterministic):
        return _run_config(case, B, N, backends, device, timer, copy_gbps, ref_slice, perturb, log,
                           label or case.variant)


def _run_config(case, B, N, backends, device, timer, copy_gbps, ref_slice, perturb, log, label) -> List[dict]:
    causal = case.variant == "causal"
    size, f32 = {"B": B, "N": N}, torch.float32
    gen = torch.Generator().manual_seed(1234 + B)
    inp = case.make_inputs(size, f32, device, gen)
    diag, off = inp["diag"], inp["super"]
    gout = torch.randn(B, N, dtype=torch.complex64, generator=gen).to(device)

    def op(backend: str, factor: float = 1.0):
        def fn(d, off=off):
            y = ops.bk_core(d, off.to(d.device), off.to(d.device), Z, causal=causal, backend=backend)
            return y * factor if factor != 1.0 else y
        return fn

    # the oracles, once per (variant, B): the cpp backend on the whole batch; the reference on 4 rows
    ref_out, ref_grad = grad_of(op("cpp"), diag.cpu(), gout.cpu())
    sub = grad_of(op("reference"), diag[:REF_ROWS].cpu(), gout[:REF_ROWS].cpu()) if ref_slice else None
    rows = []
    for name in backends:
        fn = op(name, 1.001 if perturb else 1.0)
        base = {"op": "bk_core", "variant": label, "dtype": "float32", "B": B, "N": N, "backend": name}
        try:
            with torch.no_grad():
                out = fn(diag)  # the forward row's call (the grad-enabled forward is checked through its gradient)
            grad = grad_of(fn, diag, gout)[1]
            checks = {"forward": {"vs_cpp": check(out, ref_out, "forward output")},
                      "grad": {"vs_cpp": check(grad, ref_grad, "grad_diag")}}
            if sub is not None:
                checks["forward"][f"vs_reference_{REF_ROWS}_rows"] = check(out[:REF_ROWS], sub[0], "forward output")
                checks["grad"][f"vs_reference_{REF_ROWS}_rows"] = check(grad[:REF_ROWS], sub[1], "grad_diag")
            del out, grad

            def leaf():
                return diag.detach().requires_grad_(True)

            def fwd_then_leaf():
                d = leaf()
                return fn(d), d

            stats = {"forward": timer(lambda _: fn(diag.detach())),
                     "backward": timer(lambda od: torch.autograd.grad(od[0], od[1], gout), fwd_then_leaf),
                     "forward+backward": timer(lambda d: torch.autograd.grad(fn(d), d, gout), leaf)}
        except Exception as exc:  # noqa: BLE001  (a backend that cannot run is a reported row, not a crash)
            rows += [dict(base, mode=m, status=f"error: {type(exc).__name__}: {exc}", check="not run") for m in MODES]
            log(f"  {label} B={B} {name}: ERROR {type(exc).__name__}: {exc}")
            continue
        for mode in MODES:
            st = stats[mode]
            c = checks["forward" if mode == "forward" else "grad"]
            bad = [f"{k}: {v['status']}" for k, v in c.items() if v["status"] != "ok"]
            nbytes = case.bytes_moved(size, f32, mode)
            gbps = nbytes / st.median / 1e9
            frac = gbps / copy_gbps
            goal = GOALS.get(mode)
            row = dict(base, mode=mode, status="ok", time_s=st.to_dict(), ns_per_element=st.median / (B * N) * 1e9,
                       bytes=nbytes, gbps=gbps, copy_fraction=frac, goal_fraction=goal,
                       goal_met=None if goal is None else frac >= goal, check="ok" if not bad else "FAILED",
                       check_detail={k: v for k, v in c.items()}, check_failures=bad)
            rows.append(row)
            log("  " + fmt_row(row))
    return rows


def fmt_goal(r: dict) -> str:
    if r.get("goal_fraction") is None:
        return "-"
    return f">= {r['goal_fraction']:.0%}: {'met' if r['goal_met'] else 'BELOW'}"


def fmt_err(r: dict) -> str:
    return " / ".join(f"{v['err_over_tol']:.2g}" for v in r.get("check_detail", {}).values()) or "-"


HEADER = ["variant", "B", "N", "backend", "mode", "median us", "ns/elem", "GB/s", "% copy", "goal", "check",
          "err/tol (cpp / ref rows)"]


def fmt_row(r: dict, sep: str = " | ") -> str:
    if r["status"] != "ok":
        cells = [r["variant"], str(r["B"]), str(r["N"]), r["backend"], r["mode"]] + ["-"] * 5 + [r["status"][:80], "-"]
    else:
        cells = [r["variant"], str(r["B"]), str(r["N"]), r["backend"], r["mode"], f"{r['time_s']['median'] * 1e6:.1f}",
                 f"{r['ns_per_element']:.3g}", f"{r['gbps']:.3g}", f"{r['copy_fraction']:.0%}", fmt_goal(r), r["check"],
                 fmt_err(r)]
    return sep.join(cells)


def render_md(res: dict) -> str:
    m, t, cb = res["machine"], res["tests"], res["copy_bandwidth"]
    lines = [f"# GPU check: {m.get('gpu') or 'CPU dry run'}", "",
             f"torch {m['torch']}, CUDA {m['torch_cuda']}, triton {m['triton']}, commit {m['git_commit']}", "",
             f"backends: {res['backend_status']}", "",
             f"tests: {t['status']}: {t['summary']}" + (f" ({t['command']}, {t['seconds']} s)" if t.get("command") else ""),
             "", f"copy bandwidth: {cb['gbps']:.0f} GB/s (dst.copy_(src), {cb['bytes_per_copy'] >> 20} MiB moved, "
             f"median of {cb['n']})", "", res["tolerance_note"], "",
             "goals: forward >= 70% and backward (autograd.grad alone, after an untimed forward) >= 50% of the copy "
             "bandwidth; GB/s of the minimum traffic (benchmarks/cases.py bk_core bytes_moved)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + fmt_row(r) + " |" for r in res["rows"]]
    lines += ["", f"result: {res['verdict']}", ""]
    return "\n".join(lines)


def slug_of(name: Optional[str]) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (name or "").lower().replace("nvidia", "")).strip("-")
    return s[:40] or "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, cpp in place of cuda/triton, no pytest")
    p.add_argument("--perturb", action="store_true", help="(tests) multiply the timed outputs by 1.001")
    p.add_argument("--backends", nargs="+", help="default: cuda and triton (cpp with --dry-run)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    p.add_argument("--test-timeout", type=int, default=240)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    machine, status = machine_info(), ops.backend_status()
    print(f"GPU: {machine['gpu']}; torch {machine['torch']}, CUDA {machine['torch_cuda']}, triton {machine['triton']}")
    print(f"backend_status: {json.dumps(status, indent=1)}")
    if _INTERPRET_WAS is not None:
        print(f"note: TRITON_INTERPRET={_INTERPRET_WAS} was removed from the environment (kernels compile for the GPU)")
    if not a.dry_run:
        if not torch.cuda.is_available():
            print(f"gpu_check: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                  f"{torch.version.cuda}); nothing to check. Use --dry-run on a CPU machine.", file=sys.stderr)
            return 2
        if "cuda" not in ops.available_backends():
            print(f"gpu_check: the 'cuda' backend is not available: {status.get('cuda')}", file=sys.stderr)
            return 2
        machine["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    device = torch.device("cpu" if a.dry_run else "cuda")
    sizes = DRY_SIZES if a.dry_run else GPU_SIZES
    wanted = a.backends or (["cpp"] if a.dry_run else ["cuda", "triton"])
    backends = [b for b in wanted if b in ops.available_backends()]
    skipped = {b: status.get(b, "unknown backend") for b in wanted if b not in backends}
    for b, why in skipped.items():
        print(f"skipping backend {b}: {why}")

    if a.dry_run or a.no_tests:
        tests = {"status": "skipped", "summary": "dry run" if a.dry_run else "--no-tests", "rc": None}
    else:
        print(f"running the CUDA and Triton tests (timeout {a.test_timeout} s) ...", flush=True)
        tests = run_tests(a.test_timeout)
        print(f"tests: {tests['status']}: {tests['summary']} ({tests['seconds']} s)")
        if tests["status"] != "ok":
            print("\n".join(tests["tail"]))

    timer = Timer(device, (4 << 20) if a.dry_run else (1 << 30), a.warmup, a.repeats)
    src = torch.rand((16 << 20 if a.dry_run else 256 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    cst = timer(lambda _: dst.copy_(src))
    copy = {"method": "dst.copy_(src), timed like the rows", "bytes_per_copy": 2 * src.numel() * 4,
            "median_s": cst.median, "n": cst.n, "gbps": 2 * src.numel() * 4 / cst.median / 1e9}
    del src, dst
    print(f"copy bandwidth: {copy['gbps']:.0f} GB/s\n{TOL_NOTE}\n" + " | ".join(HEADER), flush=True)

    rows: List[dict] = []
    cases = {c.variant: c for c in op_cases() if c.name == "bk_core"}
    for label, variant, det in (("two-sided", "two-sided", False), ("causal", "causal", False),
                                ("causal-deterministic", "causal", True)):
        for B, N in sizes:
            rows += run_config(cases[variant], B, N, backends, device, timer, copy["gbps"],
                               B == max(b for b, _ in sizes), a.perturb, lambda s: print(s, flush=True),
                               label=label, deterministic=det)
    failed = [r for r in rows if r["status"] != "ok" or r["check"] != "ok"]
    problems = ([f"tests {tests['status']}"] if tests["status"] not in ("ok", "skipped") else []) + \
               ([f"{len(failed)} row(s) failed or errored"] if failed else []) + \
               ([f"no backend to time ({skipped})"] if not backends else [])
    verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
    res = {"suite": "gpu_check", "dry_run": a.dry_run, "perturbed": a.perturb, "machine": machine,
           "backend_status": status, "skipped_backends": skipped, "tests": tests, "copy_bandwidth": copy,
           "tolerance_note": TOL_NOTE, "tol_factor": TOL_FACTOR, "goals": GOALS, "rows": rows, "verdict": verdict,
           "seconds": round(time.time() - t_start, 1)}
    os.makedirs(a.out_dir, exist_ok=True)
    base = os.path.join(a.out_dir, "gpu-" + ("cpu-dry-run" if a.dry_run else slug_of(machine.get("gpu"))))
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = render_md(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"wrote {base}.json and {base}.md ({res['seconds']} s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
