"""Compile the Triton kernels for a CUDA target without a GPU (Triton -> TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas bundled in the triton wheel).

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it executes them as
Python/NumPy and accepts code the real compiler rejects (type changes of loop-carried values,
methods on arguments that Triton specialises to constexpr, ...). This check runs the real
compiler on every specialisation the launcher can produce, so a machine without a GPU still
knows the kernels compile; only a GPU can show they run (and how fast).

    python -m resnet_bk.triton_kernels.aot_check [--arch 90] [--level smoke|quick|full]

Must run without TRITON_INTERPRET=1 (the kernels must be ``triton.jit`` functions).
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from typing import Dict, Iterator, List, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import bk_core as K
from . import pooling as P
from . import step as S

# (module, kernel, fixed constexprs, pointer arguments in the accumulation dtype A; the others
# are in the activation dtype T). bk_core kernels take one dtype throughout.
_TILE = {"R": 1, "T": K.MAX_TILE}
KERNELS = [(K, name, _TILE, None) for name in ("_pivot_summary_kernel", "_fwd_kernel", "_bwd_kernel")] + [
    (K, name, {"CB": K.CARRY_BLOCK}, None) for name in ("_pivot_carry_kernel", "_lin_carry_kernel")] + [
    (K, "_fwd_lookback_kernel", {"T": K.MAX_TILE}, None)] + [
    (P, "_down_kernel", {"BLOCK_R": 4, "BLOCK_D": P.BLOCK_D}, {"logits_ptr", "u_ptr"}),
    (P, "_up_kernel", {"BLOCK": P.BLOCK_UP}, {"bias_ptr", "scale_ptr"}),
    (P, "_up_bwd_kernel", {"BLOCK": P.BLOCK_UP}, {"bias_ptr", "scale_ptr", "gb_ptr", "gs_ptr"}),
    (S, "_step_kernel", {"BLOCK": S.BLOCK}, None),
]


LEVELS = ("smoke", "quick", "full")
# int32 pointer arguments (the look-back kernels' descriptor status and ticket counter)
INT32_PTRS = {"stat_ptr", "ctr_ptr"}
# warps per program: the BK-Core kernels are planned for NUM_WARPS (resnet_bk's launcher passes it)
NUM_WARPS = {K: K.NUM_WARPS}
# PTX division instructions that are not IEEE round-to-nearest (plain float32 `/` gives div.full.f32)
APPROX_DIV = re.compile(r"\bdiv\.(?:full|approx)\.[a-z0-9.]+")


def _variants(fn, level: str, fixed: Dict[str, object], acc_ptrs
              ) -> Iterator[Tuple[str, Dict[str, str], Dict[str, object]]]:
    """(label, signature, constexprs). "full": every flag combination with float32 and float64
    and int32 integers, integers specialised to constexpr 1 (the launcher does that for the value
    1: one row, one chunk, N = 1) and int64 integers (values >= 2**31); kernels with a separate
    accumulation dtype also with float16 and bfloat16 activations. "quick": flags all on and all
    off, no int64. "smoke": float32 with all flags on (int32) and all off (constexpr 1)."""
    params = fn.params
    flags = [p.name for p in params if p.is_constexpr and p.name not in fixed]
    on, off = tuple(True for _ in flags), tuple(False for _ in flags)
    plan: List[Tuple[str, str, List[Tuple[bool, ...]]]]
    if level == "smoke":
        plan = [("fp32", "i32", [on]), ("fp32", "one", [off])]
    else:
        combos = [off, on] if level == "quick" else list(itertools.product([False, True], repeat=len(flags)))
        plan = [("fp32", "i32", combos), ("fp64", "i32", combos), ("fp32", "one", combos)]
        if acc_ptrs is not None:
            plan += [("fp16", "i32", combos), ("bf16", "i32", combos)]
        if level == "full":
            plan.append(("fp64", "i64", combos))
    for fp, int_kind, vals_list in plan:
        for vals in vals_list:
            sig: Dict[str, str] = {}
            cex: Dict[str, object] = dict(zip(flags, vals))
            cex.update(fixed)
            acc = "fp64" if fp == "fp64" else "fp32"
            for p in params:
                if p.is_constexpr:
                    sig[p.name] = "constexpr"
                elif p.name in INT32_PTRS:
                    sig[p.name] = "*i32"
                elif p.name.endswith("_ptr"):
                    sig[p.name] = "*" + (acc if acc_ptrs is not None and p.name in acc_ptrs else fp)
                elif int_kind == "one":
                    sig[p.name] = "constexpr"
                    cex[p.name] = 1
                else:
                    sig[p.name] = int_kind
            label = f"{fn.__name__}[{fp},{int_kind},{','.join(f'{f}={int(v)}' for f, v in zip(flags, vals))}]"
            yield label, sig, cex


def compile_all(arch: int = 90, level: str = "full", verbose: bool = False, only=None, ptx=None) -> int:
    """Compile every variant to cubin for ``sm_<arch>``; returns how many. Raises on the first
    failure, naming the variant. ``only``: kernel names to compile (None: all); ``ptx``: a dict
    that receives each variant's PTX under its label."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    if K.INTERPRETED or P.INTERPRETED or S.INTERPRETED:
        raise RuntimeError("aot_check: TRITON_INTERPRET=1 is set; run it without the interpreter")
    target = GPUTarget("cuda", arch, 32)
    n = 0
    for mod, name, fixed, acc_ptrs in KERNELS:
        if only is not None and name not in only:
            continue
        fn = getattr(mod, name)
        for label, sig, cex in _variants(fn, level, fixed, acc_ptrs):
            try:
                ck = triton.compile(ASTSource(fn, sig, constexprs=cex), target=target,
                                    options={"num_warps": NUM_WARPS.get(mod, 1)})
            except Exception as exc:  # noqa: BLE001  (re-raised with the variant named)
                raise RuntimeError(f"aot_check: {label} failed to compile for sm_{arch}: {exc}") from exc
            if not ck.asm.get("cubin"):
                raise RuntimeError(f"aot_check: {label} produced no cubin")
            if ptx is not None:
                ptx[label] = ck.asm["ptx"]
            n += 1
            if verbose:
                print("ok", label)
    return n


IEEE_DIV = re.compile(r"\bdiv\.rn\.f(?:32|64)\b")


def approximate_divisions(arch: int = 90, level: str = "smoke", rn_count: bool = False):
    """The non-IEEE division instructions (div.full / div.approx) in the PTX of every BK-Core
    (bk_core and the decode step) variant of ``level``, by variant label (empty lists: every division is IEEE); with ``rn_count``
    each entry is (that list, the number of IEEE div.rn instructions)."""
    ptx: Dict[str, str] = {}
    names = [name for mod, name, _, _ in KERNELS if mod is K or mod is S]
    compile_all(arch, level, only=names, ptx=ptx)
    out = {}
    for label, text in ptx.items():
        approx = sorted(set(APPROX_DIV.findall(text)))
        out[label] = (approx, len(IEEE_DIV.findall(text))) if rn_count else approx
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (80, 90, ...)")
    ap.add_argument("--level", choices=LEVELS, default="full", help="how many specialisations (default full)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    t = time.time()
    ptx: Dict[str, str] = {}
    n = compile_all(args.arch, args.level, args.verbose, ptx=ptx)
    bad = {label: sorted(set(APPROX_DIV.findall(text))) for label, text in ptx.items()
           if label.startswith(tuple(name for mod, name, _, _ in KERNELS if mod is K or mod is S))}
    bad = {label: found for label, found in bad.items() if found}
    if bad:
        raise RuntimeError(f"aot_check: approximate divisions in BK-Core kernels: {bad}")
    print(f"aot_check: {n} kernel variants compiled for sm_{args.arch} in {time.time() - t:.1f}s "
          f"(BK-Core PTX: IEEE divisions only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
