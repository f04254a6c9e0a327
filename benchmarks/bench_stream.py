"""Benchmark cases of streaming BK-Core (``--ops stream``): a sequence computed as chained chunks
with a carried state against the same sequence in one call, and packed variable-length sequences
(``cu_seqlens``) against the same sequences padded to a batch and against one sequence of the same
T tokens. Every implementation that computes the packed/whole output is checked against the
reference (forward and the gradient of diag); the one-sequence row computes a different output (no
boundaries) and is a timing baseline only.

Inputs as the other BK-Core cases (cases.py): diag = -2 + U(-3, 3), b = c = 1, z = 1j, causal.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

import resnet_bk.ops as ops

from .cases import REF_LARGE_N, Impl, Inputs, OpCase, _dsize

Z = 1j


def _available_backends() -> List[str]:
    return [b for b in ops.available_backends() if b != "reference"]


def _why_not(inp: Inputs, backend: str) -> Optional[str]:
    """None when ``backend`` can run this case's causal bk_core call, else the reason."""
    try:
        ops.explain(inp["diag"], inp["off"][1:], inp["off"][1:], Z, causal=True, backend=backend)
    except ops.BackendUnavailableError as exc:
        return str(exc)
    return None


def _chunked(diag, off, chunks: int, backend: Optional[str]):
    N = diag.shape[-1]
    L = -(-N // chunks)
    ys, st = [], None
    for lo in range(0, N, L):
        hi = min(N, lo + L)
        if st is None:
            y, st = ops.bk_core(diag[:, lo:hi], off[lo:hi - 1], off[lo:hi - 1], Z, causal=True,
                                output_final_state=True, backend=backend)
        else:
            y, st = ops.bk_core(diag[:, lo:hi], off[lo - 1:hi - 1], off[lo - 1:hi - 1], Z, causal=True,
                                initial_state=st, output_final_state=True, backend=backend)
        ys.append(y)
    return torch.cat(ys, 1)


def _bytes_causal(elements: int, dtype, mode) -> int:
    s = _dsize(dtype)
    fwd = elements * 3 * s          # read diag, write the complex output
    bwd = elements * 4 * s          # read the complex gradient and diag, write grad_diag
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def _chunked_case() -> OpCase:
    def sizes(grid: str) -> List[Dict[str, int]]:
        if grid == "smoke":
            return [{"B": 2, "N": 64, "chunks": 4}]
        if grid == "quick":
            return [{"B": 8, "N": 4096, "chunks": 16}]
        return [{"B": 8, "N": 65536, "chunks": 16}, {"B": 64, "N": 4096, "chunks": 16}]

    def make(size, dtype, device, gen) -> Inputs:
        B, N = size["B"], size["N"]
        diag = (torch.rand(B, N, generator=gen, dtype=torch.float64) * 6 - 5).to(dtype).to(device)
        return {"diag": diag, "off": torch.ones(N, dtype=dtype, device=device)}

    def impls(size, dtype, device, inp) -> List[Impl]:
        C = size["chunks"]
        out = [Impl("reference", "baseline", "reference backend, the whole sequence in one call",
                    lambda x: ops.bk_core(x["diag"], x["off"][1:], x["off"][1:], Z, causal=True, backend="reference"),
                    split=True)]
        for be in _available_backends():
            why = _why_not(inp, be)
            out.append(Impl(f"{be}-whole", "backend", f"{be} backend, the whole sequence in one call",
                            None if why else (lambda x, be=be: ops.bk_core(x["diag"], x["off"][1:], x["off"][1:], Z,
                                                                           causal=True, backend=be)), skip=why))
            out.append(Impl(be, "backend", f"{be} backend, {C} chained chunks (initial_state / output_final_state)",
                            None if why else (lambda x, be=be: _chunked(x["diag"], x["off"], C, be)), skip=why,
                            versus=f"{be}-whole"))
        return out

    def ref_plan(size, dtype) -> Optional[str]:
        if size["N"] <= REF_LARGE_N:
            return None
        return (f"reference not timed at N = {size['N']} (a Python loop over N); correctness checked on the "
                f"first 2 rows")

    def ref_rows(inp: Inputs, rows: int) -> Inputs:
        return {**inp, "diag": inp["diag"][:rows]}

    return OpCase(
        name="bk_core", variant="causal,chunked", group="stream", unavailable=lambda: None, sizes=sizes,
        dtypes=lambda g: [torch.float32], make_inputs=make, impls=impls, elements=lambda s: s["B"] * s["N"],
        bytes_moved=lambda s, d, m: _bytes_causal(s["B"] * s["N"], d, m), leaves=("diag",), ref_plan=ref_plan,
        ref_rows=ref_rows,
        baseline_note="<be> = chained chunks with a carried state; <be>-whole = one call on the whole sequence "
                      "(the speedup of a chunked row over it is whole time / chunked time)",
        claims={"chunked_vs_whole": "the cost of streaming a sequence in 16 chunks against one call"})


def _lengths(T: int, S: int, gen: torch.Generator) -> List[int]:
    """S lengths >= 1 summing to T, spread like a real batch (cuts drawn uniformly)."""
    cuts = sorted(torch.randperm(T - 1, generator=gen)[: S - 1].add(1).tolist())
    b = [0] + cuts + [T]
    return [b[i + 1] - b[i] for i in range(S)]


def _padded(diag, off, cu: List[int], Lmax: int, backend: Optional[str]):
    """What a user without cu_seqlens writes: scatter into a padded (S, Lmax) batch with per-row
    couplings cut at each sequence's end, run the batch, gather the valid positions back."""
    S = len(cu) - 1
    diag = diag[0]
    idx = torch.cat([torch.arange(cu[s], cu[s + 1]) - cu[s] + s * Lmax for s in range(S)]).to(diag.device)
    a = diag.new_zeros(S * Lmax).index_put((idx,), diag).view(S, Lmax)
    k = diag.new_zeros(S * Lmax)
    valid_k = torch.cat([torch.arange(cu[s] + 1, cu[s + 1]) for s in range(S)]).to(diag.device)
    k_idx = torch.cat([torch.arange(cu[s], cu[s + 1] - 1) - cu[s] + s * Lmax for s in range(S)]).to(diag.device)
    k = k.index_put((k_idx,), off[valid_k]).view(S, Lmax)[:, : Lmax - 1]
    y = ops.bk_core(a, k, torch.ones_like(k), Z, causal=True, backend=backend)
    return y.reshape(-1)[idx][None]


def _packed_case() -> OpCase:
    def sizes(grid: str) -> List[Dict[str, int]]:
        if grid == "smoke":
            return [{"B": 1, "N": 256, "S": 5}]
        if grid == "quick":
            return [{"B": 1, "N": 16384, "S": 64}]
        return [{"B": 1, "N": 65536, "S": 64}, {"B": 1, "N": 65536, "S": 1024}]

    def make(size, dtype, device, gen) -> Inputs:
        T, S = size["N"], size["S"]
        lengths = _lengths(T, S, gen)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        # (1, T): one packed row (the suite's row-subset check then covers all of it)
        diag = (torch.rand(1, T, generator=gen, dtype=torch.float64) * 6 - 5).to(dtype).to(device)
        return {"diag": diag, "off": torch.ones(T, dtype=dtype, device=device), "cu": cu,
                "cu_list": cu.tolist(), "Lmax": max(lengths)}

    def impls(size, dtype, device, inp) -> List[Impl]:
        out = [Impl("reference", "baseline", "reference twin (each sequence alone, plain autograd)",
                    lambda x: ops.bk_core_ref(x["diag"], x["off"][1:], x["off"][1:], Z, causal=True,
                                              cu_seqlens=x["cu"]))]
        for be in _available_backends():
            why = _why_not(inp, be)
            out.append(Impl(be, "backend", f"{be} backend, packed (cu_seqlens)",
                            None if why else (lambda x, be=be: ops.bk_core(x["diag"], x["off"][1:], x["off"][1:], Z,
                                                                           causal=True, cu_seqlens=x["cu"],
                                                                           backend=be)),
                            skip=why, versus=f"{be}-one-sequence", interleave=True))
            out.append(Impl(f"{be}-padded", "baseline", f"{be} backend on the sequences padded to a batch (S, max "
                            f"length), per-row couplings, gathered back",
                            None if why else (lambda x, be=be: _padded(x["diag"], x["off"], x["cu_list"], x["Lmax"], be)),
                            skip=why))
            out.append(Impl(f"{be}-one-sequence", "backend", f"{be} backend, one sequence of the same T tokens (no "
                            f"boundaries: a different output, timing baseline only)",
                            None if why else (lambda x, be=be: ops.bk_core(x["diag"], x["off"][1:], x["off"][1:], Z,
                                                                           causal=True, backend=be)),
                            skip=why, checked=False))
        return out

    def ref_plan(size, dtype) -> Optional[str]:
        if size["N"] <= REF_LARGE_N:
            return None
        return f"reference not timed at T = {size['N']} (a Python loop over T); correctness checked on all of it"

    return OpCase(
        name="bk_core", variant="causal,packed", group="stream", unavailable=lambda: None, sizes=sizes,
        dtypes=lambda g: [torch.float32], make_inputs=make, impls=impls, elements=lambda s: s["N"],
        bytes_moved=lambda s, d, m: _bytes_causal(s["N"], d, m), leaves=("diag",), ref_plan=ref_plan,
        ref_rows=lambda inp, rows: inp,
        baseline_note="N = T packed tokens in S sequences (lengths drawn at random); <be>-padded = the padded-batch "
                      "equivalent; <be>-one-sequence = one sequence of T tokens (goal: packed <= 1.25x its time)",
        claims={"goal_packed_vs_one_sequence": "packed forward and forward+backward <= 1.25x one sequence of T"})


def stream_cases() -> List[OpCase]:
    return [_chunked_case(), _packed_case()]
