"""Measurement: timed calls with warm-up, synchronisation and quantiles; peak memory; copy
bandwidth; the machine description written into every result file.

A *step* is a callable ``step(i) -> dict`` that runs one call on input set ``i`` (the caller
rotates through a small pool of distinct inputs so caches do not flatter) and returns the seconds
of the segments it timed, e.g. ``{"forward": 0.01}``, or ``{"forward": .., "backward": ..,
"forward+backward": ..}`` for a *split* step that times the two halves of one call. Each step does
its own untimed setup (e.g. the forward pass before a backward-only timing) and synchronises the
device around the timed segment.
"""
from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

Step = Callable[[int], Dict[str, float]]


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a host timer measures the kernels and not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Policy:
    """How long and how often to time one row.

    warmup_s / min_warmup: warm up for at least this long and this many calls (JIT, allocator,
    caches, thread pool). target_s: spend about this long on the timed repeats, within
    [min_repeats, max_repeats]. A call predicted (from a smaller size) to take longer than
    slow_call_s is timed slow_repeats times with no warm-up (its code path was warmed at the
    smaller size); the result says so.
    """
    warmup_s: float = 0.05
    min_warmup: int = 1
    target_s: float = 0.4
    min_repeats: int = 5
    max_repeats: int = 200
    slow_call_s: float = 1.0
    slow_repeats: int = 1


@dataclass
class Stats:
    median: float
    p10: float
    p90: float
    mean: float
    min: float
    n: int
    warmup: int

    @staticmethod
    def of(samples: List[float], warmup: int) -> "Stats":
        xs = sorted(samples)
        return Stats(median=_quantile(xs, 0.5), p10=_quantile(xs, 0.1), p90=_quantile(xs, 0.9),
                     mean=sum(xs) / len(xs), min=xs[0], n=len(xs), warmup=warmup)

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: List[float], q: float) -> float:
    """Linear-interpolation quantile of sorted xs (numpy's default method)."""
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(step: Step, policy: Policy, predicted_s: Optional[float] = None) -> Tuple[Dict[str, Stats], List[str]]:
    """Warm up, then time ``step`` repeatedly; returns per-segment Stats and notes.

    The number of repeats is chosen from the warm-up's per-call time so that the timed part takes
    about ``policy.target_s``. With ``predicted_s`` above ``policy.slow_call_s`` there is no
    warm-up and ``policy.slow_repeats`` timed calls.
    """
    notes: List[str] = []
    samples: Dict[str, List[float]] = {}
    i = 0
    if predicted_s is not None and predicted_s > policy.slow_call_s:
        warm = 0
        reps = policy.slow_repeats
        notes.append(f"slow call (predicted {predicted_s:.1f} s): {reps} timed call(s), no warm-up at this size")
    else:
        warm = 0
        t_start = time.perf_counter()
        last = 0.0
        while warm < policy.min_warmup or (time.perf_counter() - t_start) < policy.warmup_s:
            t0 = time.perf_counter()
            step(i)
            last = time.perf_counter() - t0
            i += 1
            warm += 1
            if last > policy.slow_call_s:  # one warm-up call of a slow path is enough
                break
        per_call = max(last, 1e-7)
        if per_call > policy.slow_call_s:
            reps = max(policy.slow_repeats, 1)
            notes.append(f"slow call ({per_call:.1f} s): {reps} timed call(s)")
        else:
            reps = int(min(policy.max_repeats, max(policy.min_repeats, round(policy.target_s / per_call))))
    for _ in range(reps):
        for k, v in step(i).items():
            samples.setdefault(k, []).append(v)
        i += 1
    return {k: Stats.of(v, warm) for k, v in samples.items()}, notes


# ---------------------------------------------------------------------------------------------
# peak memory

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one call, minus the bytes allocated before it",
    "cpu": ("peak of live bytes allocated through PyTorch's CPU allocator during one call (torch.profiler "
            "profile_memory, per-op accounting: a transient freed inside a single op and memory a kernel "
            "allocates outside the allocator are not seen); inputs allocated before the call are not counted"),
}


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra bytes allocated while ``fn()`` runs (see MEMORY_METHOD for what is measured)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak)


# ---------------------------------------------------------------------------------------------
# copy bandwidth

def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Achievable memory bandwidth: ``dst.copy_(src)`` of a large float32 tensor moves
    2 * nbytes (read + write); returns the median GB/s (1e9 bytes/s) over ``repeats`` copies."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        ts.append(time.perf_counter() - t0)
    med = _quantile(sorted(ts), 0.5)
    return {"device": str(device), "bytes_per_copy": 2 * 4 * n, "median_s": med,
            "gbps": 2 * 4 * n / med / 1e9, "threads": torch.get_num_threads() if device.type == "cpu" else None}


# ---------------------------------------------------------------------------------------------
# machine description (no hostname)

def _cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not sha:
        return None
    return sha + ("+dirty" if dirty else "")


def _thp_mode() -> Optional[str]:
    """The bracketed choice in /sys/kernel/mm/transparent_hugepage/enabled (None if not Linux)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def machine_info() -> dict:
    """What ran the benchmark: CPU model and ISA, cores, GPU, library versions, git commit."""
    ci = _cpuinfo()
    flags = set(ci.get("flags", "").split())
    huge = None
    try:
        from resnet_bk import ops
        isa = ops.cpu_isa()
        huge = ops.cpu_huge_pages()
    except Exception as exc:  # noqa: BLE001  (the suite still runs the reference without the extension)
        isa = f"unavailable ({type(exc).__name__})"
    try:
        import triton
        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = None
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": ci.get("model name", platform.processor() or "unknown"),
        "cpu_vendor": ci.get("vendor_id"),
        "cpu_family": int(ci["cpu family"]) if ci.get("cpu family", "").isdigit() else None,
        "cpu_model_number": int(ci["model"]) if ci.get("model", "").isdigit() else None,
        "thp_mode": _thp_mode(),   # transparent huge pages: what ops.cpu_huge_pages(True) can use
        "cpu_huge_pages": huge,    # the cpp rows' setting (cpp-huge rows switch it on)
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512dq", "avx512vl",
                                                      "avx512bw", "avx512_bf16", "amx_tile", "sse4_2"}),
        "cpu_isa_used_by_kernels": isa,
        "memory_bytes": mem_total,
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_v,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "git_commit": _git_commit(),
    }


def machine_kind(info: dict) -> str:
    """A short file-name slug such as ``cpu-2core-xeon-avx512`` or ``cuda-nvidia-h100``."""
    if info.get("gpu"):
        return "cuda-" + _slug(info["gpu"])
    model = info.get("cpu_model", "").lower()
    family = "cpu"
    for key in ("xeon", "epyc", "ryzen", "core", "graviton", "neoverse", "apple"):
        if key in model:
            family = key
            break
    gen = _amd_generation(info)
    if gen:
        # A VM often reports only "AMD EPYC": the generation keeps Zen 4 and Zen 5 results apart.
        family = f"{family}-{gen}"
    return f"cpu-{info.get('cpu_cores')}core-{family}-{_slug(str(info.get('cpu_isa_used_by_kernels')))}"


def _amd_generation(info: dict) -> Optional[str]:
    """``zen4``/``zen5``/... from an AMD CPU's family and model numbers (None elsewhere or if unknown)."""
    if info.get("cpu_vendor") != "AuthenticAMD" or info.get("cpu_family") is None:
        return None
    fam, model = info["cpu_family"], info.get("cpu_model_number") or 0
    if fam == 0x17:
        return "zen2" if model >= 0x30 else "zen1"
    if fam == 0x19:
        # Zen 3 and Zen 4 share family 19h; Zen 4 is models 10h-1Fh, 60h-7Fh, A0h-AFh (and has AVX-512)
        return "zen4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF) else "zen3"
    if fam == 0x1A:
        return "zen5"
    return f"fam{fam:x}h"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40] or "unknown"
