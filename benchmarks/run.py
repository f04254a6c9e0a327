"""The benchmark command: ``python -m benchmarks.run [--quick] [--out DIR] [--compare OLD.json]
[--ops ...] [--backends ...]`` (``bash run.sh bench`` runs it).

For every registered op case (bk_core two-sided and causal, bk_core_masked, learned_downsample,
learned_upsample) on every device here (CPU; CUDA when available), every size and dtype of the
grid, every implementation (each dispatch backend that can take the inputs, the reference, and
the named plain-PyTorch baselines) and every mode (forward, backward, forward+backward):

* warm-up, device synchronisation, median / p10 / p90 over repeats, inputs rotated over a pool of
  distinct tensors;
* correctness of every timed implementation against the reference in the same run (forward and
  gradients, the dispatch layer's tolerance); a failed check marks the row FAILED and no speedup is
  claimed from it;
* peak memory, ns/element, achieved GB/s and its fraction of the measured copy bandwidth.

Then the module cases (each adaptive model vs the plain model) and the peers (``peers.py``: the
ResNet-BK LM vs a Transformer and Mamba of the same size). Results: a printed table,
``<out>/<machine-kind>[-quick].json`` / ``.md`` and PNG plots; ``--compare OLD.json`` prints this
run's speedup over an earlier one row by row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

try:
    import resource  # POSIX: minor page faults per timed call
except ImportError:  # pragma: no cover
    resource = None

import torch

from . import report
from .cases import MODES, OP_GROUPS, Impl, OpCase, op_cases
from .timing import MEMORY_METHOD, Policy, copy_bandwidth, machine_info, machine_kind, measure, peak_memory, sync

POLICIES = {
    "full": Policy(warmup_s=0.05, min_warmup=1, target_s=0.3, min_repeats=5, max_repeats=100, slow_call_s=1.0,
                   slow_repeats=1),
    "quick": Policy(warmup_s=0.02, min_warmup=1, target_s=0.08, min_repeats=3, max_repeats=30, slow_call_s=0.5,
                    slow_repeats=1),
    "smoke": Policy(warmup_s=0.0, min_warmup=1, target_s=0.01, min_repeats=2, max_repeats=5, slow_call_s=0.5,
                    slow_repeats=1),
}
# Module timings: at least two warm-up steps (the optimizer allocates its state on the first) and no
# early stop for slow calls (a training step is never "slow" the way the reference is).
MODULE_POLICIES = {
    "full": Policy(warmup_s=0.2, min_warmup=2, target_s=1.5, min_repeats=5, max_repeats=50, slow_call_s=1e9),
    "quick": Policy(warmup_s=0.05, min_warmup=2, target_s=0.3, min_repeats=3, max_repeats=20, slow_call_s=1e9),
    "smoke": Policy(warmup_s=0.0, min_warmup=1, target_s=0.01, min_repeats=2, max_repeats=3, slow_call_s=1e9),
}
MEM_MAX_CALL_S = 0.3     # on CPU, memory is measured under the profiler only for calls faster than this
REF_CHECK_ROWS = 2       # rows checked against the reference where it is too slow to run on the whole batch


class _Progress:
    """tqdm when installed, else one printed line per unit of work."""

    def __init__(self, total: int, enabled: bool = True):
        self.enabled = enabled
        self.n = 0
        self.total = total
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True) if enabled else None
        except ImportError:
            self.bar = None

    def update(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60])
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _leaves(case: OpCase, inp: dict) -> List[torch.Tensor]:
    return [inp[k] for k in case.leaves]


def _pool(case: OpCase, size: dict, dtype: torch.dtype, device: torch.device) -> List[dict]:
    """A small pool of distinct input sets (2-3, fewer for large inputs), leaves requiring grad."""
    gen = torch.Generator().manual_seed(1234 + size.get("N", 0) + 7 * size.get("B", 0))
    first = case.make_inputs(size, dtype, device, gen)
    nbytes = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
    count = 3 if nbytes <= (64 << 20) else 2
    pool = [first] + [case.make_inputs(size, dtype, device, gen) for _ in range(count - 1)]
    for inp in pool:
        for k in case.leaves:
            inp[k].requires_grad_(True)
    return pool


class _Runner:
    """Times one implementation of one case at one size/dtype/device in all modes."""

    def __init__(self, case: OpCase, pool: List[dict], device: torch.device):
        self.case, self.pool, self.device = case, pool, device
        self.gouts: Dict[int, torch.Tensor] = {}
        # minor page faults inside each timed region, per mode (CPU): a fresh large output pays one
        # per 4 KiB page, and whether a call gets fresh memory depends on the allocator's state
        self.faults: Dict[str, List[int]] = {}
        self.count_faults = device.type == "cpu" and resource is not None

    def _faults_now(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if self.count_faults else 0

    def _log_faults(self, mode: str, f0: int, f1: Optional[int] = None) -> None:
        """Faults from f0 to f1 (default: now) under ``mode``."""
        if self.count_faults:
            self.faults.setdefault(mode, []).append((self._faults_now() if f1 is None else f1) - f0)

    def gout(self, i: int, out: torch.Tensor) -> torch.Tensor:
        j = i % len(self.pool)
        if j not in self.gouts:
            gen = torch.Generator().manual_seed(99 + j)
            shape, cdt = out.shape, out.dtype
            g = torch.randn(shape, generator=gen, dtype=torch.complex128 if cdt.is_complex else torch.float64)
            self.gouts[j] = g.to(cdt).to(self.device)
        return self.gouts[j]

    def steps(self, fn, split: bool, stash: dict):
        pool, dev, case = self.pool, self.device, self.case

        def fwd(i):
            x = pool[i % len(pool)]
            sync(dev)
            f0 = self._faults_now()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(x)
            sync(dev)
            t1 = time.perf_counter()
            self._log_faults("forward", f0)
            return {"forward": t1 - t0}

        def bwd(i):
            x = pool[i % len(pool)]
            out = fn(x)
            g = self.gout(i, out)
            sync(dev)
            f0 = self._faults_now()
            t0 = time.perf_counter()
            torch.autograd.grad(out, _leaves(case, x), g)
            sync(dev)
            t1 = time.perf_counter()
            self._log_faults("backward", f0)
            return {"backward": t1 - t0}

        def both(i):
            x = pool[i % len(pool)]
            sync(dev)
            f0 = self._faults_now()
            t0 = time.perf_counter()
            out = fn(x)
            if split:
                sync(dev)
            t1 = time.perf_counter()
            f1 = self._faults_now() if split else 0
            grads = torch.autograd.grad(out, _leaves(case, x), self.gout(i, out))
            sync(dev)
            t2 = time.perf_counter()
            self._log_faults("forward+backward", f0)
            if split:
                self._log_faults("forward", f0, f1)
                self._log_faults("backward", f1)
            if i % len(pool) == 0 and "out" not in stash:
                stash["out"] = out.detach()
                stash["grads"] = [g.detach() for g in grads]
            res = {"forward+backward": t2 - t0}
            if split:
                res.update({"forward": t1 - t0, "backward": t2 - t1})
            return res

        return fwd, bwd, both

    def memory(self, fn, mode: str) -> Optional[int]:
        x = self.pool[0]
        if mode == "forward":
            def call():
                with torch.no_grad():
                    return fn(x)
            return peak_memory(call, self.device)
        if mode == "backward":
            out = fn(x)
            g = self.gout(0, out)
            return peak_memory(lambda: torch.autograd.grad(out, _leaves(self.case, x), g), self.device)

        def call():
            out = fn(x)
            return torch.autograd.grad(out, _leaves(self.case, x), self.gout(0, out))
        return peak_memory(call, self.device)


def _check(case: OpCase, got: dict, ref: dict, rows: Optional[int]) -> Optional[str]:
    """None when ``got`` (stashed output and gradients on input set 0) matches the reference, else
    the first mismatch. With ``rows`` the reference covers only the first ``rows`` batch rows."""
    from resnet_bk.ops import VerificationError, assert_close
    sl = (lambda t: t[:rows]) if rows else (lambda t: t)
    try:
        assert_close(sl(got["out"]), ref["out"], what="forward output", op=case.name)
        for name, g, r in zip(case.leaves, got["grads"], ref["grads"]):
            assert_close(sl(g), r, what=f"gradient of {name}", op=case.name)
    except VerificationError as exc:
        return str(exc)
    return None


def _ref_subset(case: OpCase, impls: List[Impl], pool: List[dict], runner: _Runner, rows: int) -> dict:
    """Reference output and gradients on the first ``rows`` batch rows of input set 0 (with the
    same upstream gradient rows the timed implementations received)."""
    sub = case.ref_rows(pool[0], rows)
    sub = {k: (v.detach().requires_grad_(True) if k in case.leaves else v) for k, v in sub.items()}
    ref_fn = next(i.fn for i in impls if i.name == "reference")
    out = ref_fn(sub)
    grads = torch.autograd.grad(out, [sub[k] for k in case.leaves], runner.gouts[0][:rows])
    return {"out": out.detach(), "grads": [g.detach() for g in grads]}


def _base_row(case: OpCase, impl: Impl, size: dict, dtype: torch.dtype, device: torch.device, mode: str) -> dict:
    row = {"suite": "op", "op": case.name, "variant": case.variant, "mode": mode, "impl": impl.name,
           "impl_kind": impl.kind, "impl_label": impl.label, "device": device.type,
           "dtype": str(dtype).replace("torch.", ""), **size, "elements": case.elements(size),
           "status": "ok", "reason": None, "time_s": None, "ns_per_element": None, "gbps": None,
           "bw_fraction": None, "bytes_moved": case.bytes_moved(size, dtype, mode), "peak_mem_bytes": None,
           "check": None, "speedup": {}, "notes": []}
    if impl.versus:
        row["versus"] = impl.versus
    return row


def run_op_config(case: OpCase, size: dict, dtype: torch.dtype, device: torch.device, policy: Policy,
                  copy_gbps: float, backends: Optional[List[str]], predictor: dict) -> List[dict]:
    pool = _pool(case, size, dtype, device)
    runner = _Runner(case, pool, device)
    impls = case.impls(size, dtype, device, pool[0])
    if backends:
        impls = [i for i in impls if i.name == "reference" or i.name in backends]
    rows: List[dict] = []
    stashes: Dict[str, dict] = {}
    ref_plan = case.ref_plan(size, dtype)
    for impl in impls:
        mode_rows = {m: _base_row(case, impl, size, dtype, device, m) for m in MODES}
        skip = impl.skip
        if impl.name == "reference" and ref_plan is not None:
            skip = ref_plan
        if skip is not None or impl.fn is None:
            for r in mode_rows.values():
                r["status"], r["reason"] = "skipped", skip
            rows += mode_rows.values()
            continue
        with (impl.context() if impl.context is not None else contextlib.nullcontext()):
            pkey = (case.key, impl.name, str(dtype), size.get("B"), device.type)
            predicted = None
            if pkey in predictor:
                n0, t0 = predictor[pkey]
                predicted = t0 * size["N"] / n0
            stash: dict = {}
            runner.faults = {}
            fwd, bwd, both = runner.steps(impl.fn, impl.split, stash)
            try:
                stats, notes = measure(both, policy, predicted)
                predictor[pkey] = (size["N"], stats["forward+backward"].median)
                if not impl.split:
                    s2, n2 = measure(fwd, policy, predicted)
                    s3, n3 = measure(bwd, policy, predicted)
                    stats.update(s2)
                    stats.update(s3)
                    notes += n2 + n3
                else:
                    notes.append("forward and backward timed as the two halves of each forward+backward call")
            except Exception as exc:  # noqa: BLE001  (a crashing backend is a result, not the end of the run)
                for r in mode_rows.values():
                    r["status"], r["reason"] = "ERROR", f"{type(exc).__name__}: {exc}"
                rows += mode_rows.values()
                continue
            stashes[impl.name] = stash
            for m, r in mode_rows.items():
                st = stats[m]
                r["time_s"] = st.to_dict()
                r["ns_per_element"] = st.median / r["elements"] * 1e9
                r["gbps"] = r["bytes_moved"] / st.median / 1e9
                r["bw_fraction"] = r["gbps"] / copy_gbps if copy_gbps else None
                r["notes"] = list(dict.fromkeys(notes))
                if runner.faults.get(m):
                    r["minor_faults_per_call"] = int(statistics.median(runner.faults[m]))
                if device.type == "cpu" and impl.kind != "backend":
                    r["notes"].append("memory measured for the backends only on CPU (the profiler's per-op overhead "
                                      "on a Python loop over N would dominate)")
                elif device.type == "cuda" or st.median < MEM_MAX_CALL_S:
                    try:
                        r["peak_mem_bytes"] = runner.memory(impl.fn, m)
                    except Exception as exc:  # noqa: BLE001
                        r["notes"].append(f"memory not measured ({type(exc).__name__}: {exc})")
                else:
                    r["notes"].append("memory not measured (slow call; the profiler would dominate)")
            rows += mode_rows.values()
    # implementations timed alternately with the one they are compared with (see _interleaved)
    by_name = {i.name: i for i in impls}
    inter: Dict[Tuple[str, str], dict] = {}
    for impl in impls:
        other = by_name.get(impl.versus) if impl.interleave else None
        if other is None or impl.name not in stashes or other.name not in stashes:
            continue
        for m in ("forward", "forward+backward"):
            try:
                inter[(impl.name, m)] = _interleaved(runner, impl.fn, other.fn, m, policy)
            except Exception as exc:  # noqa: BLE001
                inter[(impl.name, m)] = {"error": f"{type(exc).__name__}: {exc}"}
    for r in rows:
        got = inter.get((r["impl"], r["mode"]))
        if got is not None:
            r["interleaved"] = {"versus": by_name[r["impl"]].versus, **got}
    # correctness of every timed implementation against the reference
    ref = stashes.get("reference")
    ref_rows = None
    ref_err = None
    if ref is None and any(n != "reference" for n in stashes):
        ref_rows = REF_CHECK_ROWS
        try:
            ref = _ref_subset(case, impls, pool, runner, ref_rows)
        except Exception as exc:  # noqa: BLE001
            ref_err = f"reference check could not run ({type(exc).__name__}: {exc})"
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["impl"] == "reference":
            r["check"] = "is the reference"
            continue
        if not by_name[r["impl"]].checked:
            r["check"] = "not compared (a timing baseline with a different output)"
            continue
        if ref is None:
            r["status"], r["check"] = "FAILED", ref_err or "no reference to check against"
            continue
        why = _check(case, stashes[r["impl"]], ref, ref_rows)
        if why is None:
            r["check"] = "ok" + (f" (first {ref_rows} rows vs reference)" if ref_rows else "")
        else:
            r["status"], r["check"] = "FAILED", why
    # speedups over the baselines, only between rows whose checks passed
    for m in MODES:
        by = {r["impl"]: r for r in rows if r["mode"] == m}
        for r in by.values():
            if r["status"] != "ok":
                continue
            for bname, b in by.items():
                if bname == r["impl"] or b["status"] != "ok" or not (b["impl_kind"] == "baseline"
                                                                     or bname == r.get("versus")):
                    continue
                r["speedup"][bname] = b["time_s"]["median"] / r["time_s"]["median"]
        for r in by.values():
            it = r.get("interleaved")
            if r["status"] == "ok" and it and "ratio" in it and by.get(it["versus"], {}).get("status") == "ok":
                r["speedup"][f"{it['versus']} alternating"] = 1.0 / it["ratio"]
    return rows


def _interleaved(runner: "_Runner", fa, fb, mode: str, policy: Policy) -> dict:
    """Time ``fa`` and ``fb`` alternately (a, b, b, a, ...: neither always goes first) in ``mode``
    ("forward" or "forward+backward"), on the same inputs, for about twice the policy's target time;
    returns the median over pairs of time(fa) / time(fb) with its 10th/90th percentiles. Load that
    drifts during a run (a shared VM) moves both halves of a pair alike, which two separately timed
    medians do not see."""
    sa, sb = runner.steps(fa, False, {}), runner.steps(fb, False, {})
    pick = 0 if mode == "forward" else 2
    step_a, step_b = sa[pick], sb[pick]
    for i in range(2):  # warm-up
        step_a(i), step_b(i)
    ratios: List[float] = []
    deadline = time.perf_counter() + 2 * policy.target_s
    i = 0
    while len(ratios) < policy.max_repeats and (len(ratios) < max(policy.min_repeats, 10)
                                                 or time.perf_counter() < deadline):
        if i % 2 == 0:
            ta, tb = step_a(i)[mode], step_b(i)[mode]
        else:
            tb, ta = step_b(i)[mode], step_a(i)[mode]
        ratios.append(ta / tb)
        i += 1
    ratios.sort()
    n = len(ratios)
    return {"ratio": statistics.median(ratios), "p10": ratios[int(0.1 * (n - 1))], "p90": ratios[int(0.9 * (n - 1))],
            "pairs": n}


def _devices(arg: str) -> List[torch.device]:
    if arg == "cpu":
        return [torch.device("cpu")]
    if arg == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small grid, float32, no module training run, peers with a 3 s training budget")
    g.add_argument("--smoke", action="store_true", help="tiny grid used by the tests (seconds)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for <machine-kind>.json/.md and the plots (default benchmarks/results)")
    p.add_argument("--compare", metavar="OLD.json", help="print this run's speedup over an earlier result file")
    p.add_argument("--ops", nargs="+", choices=list(OP_GROUPS) + ["modules", "decode", "peers", "none"],
                   help="what to run (default: every op, the modules, decode and the peers); 'none' runs "
                        "nothing but the machine description and bandwidth")
    p.add_argument("--backends", nargs="+",
                   help="implementations to time besides the reference, which always runs (it is the "
                        "correctness oracle): e.g. cpp cuda triton naive dense")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", help="result file stem (default: the machine kind, plus -quick/-smoke)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    grid = "quick" if args.quick else "smoke" if args.smoke else "full"
    policy = POLICIES[grid]
    groups = set(args.ops or list(OP_GROUPS) + ["modules", "decode", "peers"])
    t_start = time.perf_counter()
    info = machine_info()
    kind = machine_kind(info)
    devices = _devices(args.device)
    print(f"resnet_bk benchmarks ({grid} grid) on {kind}: {info['cpu_model']}, {info['cpu_cores']} cores, "
          f"kernel ISA {info['cpu_isa_used_by_kernels']}, torch {info['torch']}, GPU {info['gpu']}", flush=True)
    import resnet_bk.ops as ops
    print(f"backends: {ops.backend_status()}", flush=True)
    bandwidth = {}
    for dev in devices:
        bandwidth[dev.type] = copy_bandwidth(dev, {"full": 256 << 20, "quick": 64 << 20, "smoke": 16 << 20}[grid])
        print(f"copy bandwidth ({dev.type}): {bandwidth[dev.type]['gbps']:.1f} GB/s "
              f"(median of 5 copy_ of {bandwidth[dev.type]['bytes_per_copy'] // 2 >> 20} MiB)", flush=True)

    cases = [c for c in op_cases() if c.group in groups]
    skipped: List[dict] = []
    plan: List[Tuple[OpCase, dict, torch.dtype, torch.device]] = []
    for c in cases:
        why = c.unavailable()
        if why:
            print(f"SKIPPED {c.key}: {why}", flush=True)
            skipped.append({"case": c.key, "reason": why})
            continue
        for dev in devices:
            for dt in c.dtypes(grid):
                for s in c.sizes(grid):
                    plan.append((c, s, dt, dev))
    mcases = []
    if "modules" in groups:
        from .modules import module_cases
        for mc in module_cases():
            why = mc.unavailable()
            if why:
                print(f"SKIPPED module {mc.name}: {why}", flush=True)
                skipped.append({"case": f"module:{mc.name}", "reason": why})
            else:
                mcases.append(mc)
    n_sizes = 0
    if mcases:
        from .modules import MODULE_CONFIG, run_layer_rows, run_module_case, text_corpus
        n_sizes = len(MODULE_CONFIG[grid])
    progress = _Progress(len(plan) + len(mcases) * len(devices) * n_sizes, enabled=not args.no_progress)
    rows: List[dict] = []
    predictor: dict = {}
    for c, s, dt, dev in plan:
        label = f"{c.key} {dev.type} {str(dt).replace('torch.', '')} " + " ".join(f"{k}={v}" for k, v in s.items())
        t0 = time.perf_counter()
        new = run_op_config(c, s, dt, dev, policy, bandwidth[dev.type]["gbps"], args.backends, predictor)
        rows += new
        for r in new:
            if r["status"] in ("FAILED", "ERROR"):
                progress.write(f"{r['status']}: {label} {r['impl']} {r['mode']}: {r['check'] or r['reason']}")
        progress.update(f"{label} ({time.perf_counter() - t0:.1f} s)")
    module_rows: List[dict] = []
    corpus = None
    if mcases:
        corpus = text_corpus()
        for dev in devices:
            for cfg in MODULE_CONFIG[grid]:
                size = {"B": cfg["B"], "N": cfg["n_seq"], "d_model": cfg["d_model"], "n_layers": cfg["n_layers"]}
                for mc in mcases:
                    t0 = time.perf_counter()
                    try:
                        row = run_module_case(mc, cfg, grid, MODULE_POLICIES[grid], dev, corpus)
                    except Exception as exc:  # noqa: BLE001  (a module that cannot be built is a result)
                        row = {"suite": "module", "module": mc.name, "label": mc.label, "device": dev.type, **size,
                               "status": "ERROR", "reason": f"{type(exc).__name__}: {exc}", "claim": mc.claim}
                        progress.write(f"ERROR module {mc.name}: {row['reason']}")
                    module_rows.append(row)
                    progress.update(f"module {mc.name} {report.size_label(cfg)} {dev.type} ({time.perf_counter() - t0:.1f} s)")
                if any(mc.name.startswith("multi_scale") for mc in mcases):
                    t0 = time.perf_counter()
                    try:
                        module_rows += run_layer_rows(cfg, MODULE_POLICIES[grid], dev)
                    except Exception as exc:  # noqa: BLE001
                        module_rows.append({"suite": "layer", "module": "layer:multi_scale", "label": "per-layer rows",
                                            "device": dev.type, **size, "n_layers": 1, "status": "ERROR",
                                            "reason": f"{type(exc).__name__}: {exc}", "claim": ""})
                        progress.write(f"ERROR layer rows: {module_rows[-1]['reason']}")
                    progress.write(f"layer rows {report.size_label(cfg)} {dev.type} ({time.perf_counter() - t0:.1f} s)")
        report.module_speedups(module_rows)
    decode_rows: List[dict] = []
    if "decode" in groups:
        from .bench_decode import run_decode
        for dev in devices:
            t0 = time.perf_counter()
            try:
                decode_rows += run_decode(grid, dev)
            except Exception as exc:  # noqa: BLE001
                decode_rows.append({"suite": "decode", "device": dev.type, "status": "ERROR",
                                    "reason": f"{type(exc).__name__}: {exc}"})
                progress.write(f"ERROR decode: {decode_rows[-1]['reason']}")
            progress.write(f"decode {dev.type} ({time.perf_counter() - t0:.1f} s)")
    progress.close()
    peer_runs = []
    if "peers" in groups:  # ResNet-BK against a Transformer and Mamba of the same size (peers.py)
        from .modules import text_corpus
        from .peers import run_peers
        corpus = corpus or text_corpus()
        for dev in devices:
            peer_runs.append(run_peers(grid, dev, corpus, log=lambda m: print(m, file=sys.stderr, flush=True)))
    elapsed = time.perf_counter() - t_start
    result = {
        "schema": 1, "grid": grid, "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": info, "machine_kind": kind, "copy_bandwidth": bandwidth, "policy": policy.__dict__, "module_policy": MODULE_POLICIES[grid].__dict__,
        "memory_method": MEMORY_METHOD, "skipped_cases": skipped, "rows": rows, "module_rows": module_rows,
        "decode_rows": decode_rows,
        "module_config": None, "corpus": corpus[2] if corpus else None, "elapsed_s": elapsed,
        "notes": report.METHOD_NOTES,
    }
    if mcases:
        result["module_config"] = MODULE_CONFIG[grid]
    if peer_runs:
        result.update({"peer_rows": [r for pr in peer_runs for r in pr["rows"]], "peer_config": peer_runs[0]["config"],
                       "peer_policy": peer_runs[0]["policy"], "peer_versions": peer_runs[0]["versions"],
                       "peer_memory_method": peer_runs[0]["memory_method"]})
    text = report.render_text(result)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or (kind + ("" if grid == "full" else f"-{grid}"))
    jpath = os.path.join(args.out, stem + ".json")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1, default=str)
    mpath = os.path.join(args.out, stem + ".md")
    with open(mpath, "w") as f:
        f.write(report.render_markdown(result))
    written = [jpath, mpath]
    if not args.no_plots:
        written += report.plots(result, args.out, stem)
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        print(report.render_compare(old, result))
    print(f"wrote {', '.join(written)}")
    print(f"total time {elapsed:.1f} s")
    return 1 if any(r["status"] in ("FAILED", "ERROR")
                    for r in rows + module_rows + decode_rows + result.get("peer_rows", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
