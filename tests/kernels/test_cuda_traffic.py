"""Global-memory traffic of the BK-Core CUDA kernels, counted under the CPU emulation.

The emulation build (tests/kernels/cuda_emu/emu.h) wraps every global pointer the kernels receive
in an accessor that counts the bytes of each load and store and charges them to (kernel, buffer).
Here those counts become assertions: bytes per element (B * N) of the forward and the backward at
B = 1, 64 and 4096, each at a small N that emulates quickly but with the plan the kernels choose
for an H100/H200-sized GPU (132 SMs) for that shape, against the design goals of issue 23:

* forward <= 16 B/element (float32, shared coupling) for a and the output; the shared coupling row
  adds 4 B per pass over the positions for all B rows together (4 per pass per element at B = 1),
  a per-row coupling 4 B per pass, the mask 4 B;
* backward <= 32 B/element for grad a alone (no grad k, no grad z, no mask): grad k not asked for
  is not written (the kernels get a null pointer);
* a carried state (causal: d_in, k_in, and mu0 from the backward) adds O(B) bytes, the rest unchanged.

Causal rows over several blocks take their carries by a decoupled look-back: the forward is one
pass (a read once), the backward two (the pivots entering each block, then the gradients). Under
torch.use_deterministic_algorithms (Plan::deterministic) they take the two-sided plan's passes.

"Model" bytes count a shared coupling row (k of shape (1, N-1)) once per pass over a position for
the whole batch: the B rows read the same N-1 values, which stay in L2 (at most 4 MB at B >= 64
and B * N <= 2^26); at B = 1 shared and per-row coupling are the same bytes. Every other load and
store counts in full. "Raw" bytes count every load as issued.
"""
import ctypes

import pytest
import torch

from test_cuda_emulated import CXX, _Sched, build_emulated, emu_backward, emu_forward, make_canon  # noqa: E402

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) on PATH")

TAGS = ["a", "k", "zri", "mask", "out", "grad", "grad_a", "grad_k", "grad_zri", "grad_mask", "ws", "d_in", "k_in",
        "mu0"]
UNKNOWN = 15
SMS = 132


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulated(tmp_path_factory, "bk_core_cuda.cu", "bk_core_emu_api.cpp")


def traffic(lib):
    """{kernel: {(tag, 'ld'|'st'): bytes}} of the last emulated run."""
    fn = lib.bk_emu_traffic
    fn.restype = ctypes.c_char_p
    out = {}
    for i in range(32):
        b = (ctypes.c_uint64 * 32)()
        n = (ctypes.c_uint64 * 32)()
        name = fn(ctypes.c_int(i), b, n)
        if name is None:
            break
        d = {}
        for t in range(16):
            for s, kind in enumerate(("ld", "st")):
                if b[2 * t + s]:
                    d[(TAGS[t] if t < len(TAGS) else "unknown" if t == UNKNOWN else f"tag{t}", kind)] = b[2 * t + s]
        out[name.decode()] = d
    return out


def per_element(tr, B, N, shared_k):
    """(model, raw) bytes per element summed over kernels, and {kernel: model bytes per element}."""
    model = raw = 0.0
    per_kernel = {}
    for name, d in tr.items():
        assert ("unknown", "ld") not in d and ("unknown", "st") not in d, f"{name}: access outside every buffer"
        m = 0.0
        for (tag, kind), v in d.items():
            raw += v
            m += v / B if (tag == "k" and shared_k) else v
        per_kernel[name] = m / (B * N)
        model += m
    return model / (B * N), raw / (B * N), per_kernel


# (B, N, sms): a small N, and an SM count that gives the emulated shape the plan (positions per
# thread S = 8, 128 threads per block, one or two passes over a) of the full-size shape on 132 SMs:
#   B = 1, N = 16384 (sms 1): S 8, 16 blocks per row  ~ B = 1, N = 2^24 (16384 blocks per row)
#   B = 64, N = 2048 (sms 1): S 8, 2 blocks per row   ~ B = 64, N = 2^18 (256 blocks per row)
#   B = 4096, N = 64 (sms 16): S 8, 16 rows per block ~ B = 4096, N <= 1024 (N = 2^14 is the B = 64 case)
# Per-block costs (the block maps, the carries, z) are per 1024 positions, as at full size.
SHAPES = [(1, 16384, 1), (64, 2048, 1), (4096, 64, 16)]

# Counted before the on-chip kernels (commit e690cc4: lane-major scratch, serial chunk carries),
# float32, shared k, model bytes/element at these shapes with the 132-SM plan:
BEFORE = {1: (50.87, 153.06), 64: (38.91, 137.08), 4096: (32.13, 112.69)}


def by_tag(tr, B, N, shared_k):
    """{tag: model bytes per element} summed over kernels."""
    out = {}
    for name, d in tr.items():
        assert ("unknown", "ld") not in d and ("unknown", "st") not in d, f"{name}: access outside every buffer"
        for (tag, kind), v in d.items():
            out[tag] = out.get(tag, 0.0) + (v / B if (tag == "k" and shared_k) else v) / (B * N)
    return out


def _state(B, dtype, state):
    if not state:
        return {}
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    return dict(d_in=torch.full((B,), 1.5 - 0.7j, dtype=cdt), k_in=torch.full((B,), 0.8, dtype=dtype))


def run_fwd(emu, B, N, sms, shared=True, masked=False, causal=False, dtype=torch.float32, state=False,
            deterministic=False):
    a, k, zri, mask, _ = make_canon(B, N, dtype, shared, masked, 5)
    with _Sched(emu, deterministic=deterministic):
        _, plan = emu_forward(emu, a, k, zri, mask, causal, "auto", 0, sms=sms, **_state(B, dtype, state))
    return by_tag(traffic(emu), B, N, shared), plan


def run_bwd(emu, B, N, sms, shared=True, masked=False, causal=False, dtype=torch.float32, need_k_grad=True,
            state=False, deterministic=False):
    a, k, zri, mask, grad = make_canon(B, N, dtype, shared, masked, 5)
    with _Sched(emu, deterministic=deterministic):
        _, plan = emu_backward(emu, grad, a, k, zri, mask, causal, masked, "auto", 0, sms=sms,
                               need_k_grad=need_k_grad, **_state(B, dtype, state))
    return by_tag(traffic(emu), B, N, shared), plan


def fwd_passes(plan, causal, deterministic=False):
    """Reads of a by the forward: rows over several blocks read it for the block maps and again for the
    outputs, except causal ones with the look-back (one pass)."""
    if plan[4] == 1:
        return 1
    return 1 if causal and not deterministic else 2


def bwd_passes(plan, causal, deterministic=False):
    """(reads of a, reads of grad) by the backward: rows over several blocks take the pivot maps (a),
    the gradient summaries and the final pass (a, grad), or causal with the look-back: the pivots
    entering each block (a), then the gradients (a, grad)."""
    if plan[4] == 1:
        return 1, 1
    return (2, 1) if causal and not deterministic else (3, 2)


# the emulation runs a block's threads as OS threads: the larger shapes take 10-25 s each
_SHAPE_PARAMS = [pytest.param(*s, id=f"B{s[0]}", marks=[pytest.mark.slow] if s[0] > 1 else []) for s in SHAPES]


@pytest.mark.parametrize("B,N,sms", _SHAPE_PARAMS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_forward_bytes_per_element(emu, B, N, sms, causal):
    """float32: a is read once (rows in one block, or causal rows over several blocks: the look-back)
    or twice (two-sided rows over several blocks: the block maps, then the chunk pass), the output
    written once, every value a block needs once (z, the carries, the look-back's descriptors) read
    once per block. Goal: <= 16 B/element with a shared coupling (B >= 64; at B = 1 the shared row is
    a full-size input: + 4 B per read of a); a per-row coupling adds 4 B per read of a, the mask 4 B."""
    t, plan = run_fwd(emu, B, N, sms, causal=causal)
    assert plan[0] == 8 and plan[1] == 128, plan  # the full-size segment and block
    passes = fwd_passes(plan, causal)
    assert (plan[4] > 1) == (B < 4096)
    assert t["a"] == pytest.approx(4.0 * passes)
    assert t["out"] == pytest.approx(8.0)
    assert t["k"] <= 4.0 * passes / B + 0.01
    overhead = t.get("ws", 0.0) + t.get("zri", 0.0)
    assert overhead <= 0.3, t  # block maps and carries, z: per block of 1024 positions
    total = sum(t.values())
    assert t["a"] + t["out"] <= 16.0
    # + the shared coupling row (4 B per pass over a position, for all B rows) and kin (4 B per block)
    assert total <= 16.0 + 4.0 * passes / B + overhead + 0.01, t
    assert total < BEFORE[B][0] / (2 if causal else 1)
    tp, _ = run_fwd(emu, B, N, sms, shared=False, causal=causal)
    assert tp["k"] <= 4.0 * passes + 0.01 and sum(tp.values()) <= total + 4.0 * passes + 0.01
    tm, _ = run_fwd(emu, B, N, sms, masked=True, causal=causal)
    assert tm["mask"] == pytest.approx(4.0) and sum(tm.values()) == pytest.approx(total + 4.0)
    if causal and plan[4] > 1:
        # the look-back: 16 B at B = 1 (a, k, out), 12 B + the coupling at B = 64; deterministic: the
        # two-sided plan's two passes
        assert total <= (16.0 if B == 1 else 12.0 + 4.0 / B) + 0.15, t
        td, _ = run_fwd(emu, B, N, sms, causal=True, deterministic=True)
        assert td["a"] == pytest.approx(8.0) and sum(td.values()) > total + 4.0 - 0.1, td


@pytest.mark.slow
def test_forward_bytes_float64(emu):
    """float64: twice float32's bytes (16-byte vectors of 2 values)."""
    B, N, sms = SHAPES[1]
    t, plan = run_fwd(emu, B, N, sms, dtype=torch.float64)
    assert t["a"] == pytest.approx(16.0) and t["out"] == pytest.approx(16.0)


@pytest.mark.parametrize("B,N,sms", _SHAPE_PARAMS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_backward_bytes_per_element(emu, B, N, sms, causal):
    """float32: a and the upstream gradient are read once per pass (rows over several blocks: the
    pivot maps read a, the gradient maps a and grad, the final pass a and grad; rows in one block:
    one pass), grad a written once: grad a alone <= 32 B/element (+ the coupling row, + the
    per-block carries and z's partial sums). grad k (4 B) is written only when asked for (per row;
    the binding reduces a shared k); a shared coupling row adds 4 B per pass for all rows, the mask
    4 B (+ 4 B for its gradient)."""
    t, plan = run_bwd(emu, B, N, sms, causal=causal)
    passes, gpasses = bwd_passes(plan, causal)
    assert t["a"] == pytest.approx(4.0 * passes)
    assert t["grad"] == pytest.approx(8.0 * gpasses)
    assert t["grad_a"] == pytest.approx(4.0) and t["grad_k"] == pytest.approx(4.0 * (N - 1) / N)
    assert t["a"] + t["grad"] + t["grad_a"] <= 32.0
    overhead = t.get("ws", 0.0) + t.get("zri", 0.0) + t.get("grad_zri", 0.0)
    assert overhead <= 0.6, t
    assert t["k"] <= 4.0 * passes / B + 0.02
    total = sum(t.values())
    assert total <= 36.0 + 4.0 * passes / B + overhead + 0.02, t
    assert total < BEFORE[B][1] / 3
    # grad a alone: grad k not written, the rest the same bytes
    tl, _ = run_bwd(emu, B, N, sms, causal=causal, need_k_grad=False)
    assert "grad_k" not in tl, tl
    assert tl == pytest.approx({tag: v for tag, v in t.items() if tag != "grad_k"})
    assert sum(tl.values()) <= 32.0 + 4.0 * passes / B + overhead + 0.02, tl
    tm, _ = run_bwd(emu, B, N, sms, masked=True, causal=causal)
    assert tm["mask"] == pytest.approx(4.0 * gpasses) and tm["grad_mask"] == pytest.approx(4.0)
    if causal and plan[4] > 1:
        # the look-back: grad a alone 28 B at B = 1 (a, k twice; grad once; grad a), 20 B + the
        # coupling at B = 64; deterministic: the row scans' three passes
        assert sum(tl.values()) <= (28.0 if B == 1 else 20.0 + 8.0 / B) + 0.3, tl
        td, _ = run_bwd(emu, B, N, sms, causal=True, deterministic=True)
        assert td["a"] == pytest.approx(12.0) and td["grad"] == pytest.approx(16.0), td


@pytest.mark.parametrize("B,N,sms", _SHAPE_PARAMS)
def test_state_bytes(emu, B, N, sms):
    """A carried state (causal): every buffer's bytes as without it; d_in, k_in and mu0 add O(B):
    per row, k_in read by each pass whose block starts the row, d_in once (by the pass, the look-back
    or the row scan that starts the row's pivots), mu0 written once. The same with the deterministic
    plan (row scans)."""
    for det in (False, True):
        for kind, run in (("fwd", run_fwd), ("bwd", run_bwd)):
            t, plan = run(emu, B, N, sms, causal=True, deterministic=det)
            ts, _ = run(emu, B, N, sms, causal=True, state=True, deterministic=det)
            extra = {tag: ts.pop(tag) for tag in ("d_in", "k_in", "mu0") if tag in ts}
            assert ts == pytest.approx(t), (kind, det)
            passes = fwd_passes(plan, True, det) if kind == "fwd" else bwd_passes(plan, True, det)[0]
            want = {"d_in": 8.0, "k_in": 4.0 * passes}
            if kind == "bwd":
                want["mu0"] = 8.0
            assert extra == pytest.approx({tag: v / N for tag, v in want.items()}), (kind, det, extra)


def plan_of(emu, B, N, sms=132, strategy=0):
    p = (ctypes.c_int64 * 6)()
    emu.bk_emu_plan.restype = ctypes.c_int64
    depth = emu.bk_emu_plan(ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int(strategy), ctypes.c_int64(0),
                            ctypes.c_int(sms), ctypes.c_int(0), p)
    return depth, tuple(p)


def test_forward_carry_depth(emu):
    """Dependent steps from a row's first position to its last output, B = 1, N = 2^24, 132 SMs
    (forward; the backward below, from its passes). Before: the chunked plan's lanes (C chunks
    of Lc) walked all C chunk carries of the row in one thread: Lc + (C - 1) + Lc steps. Now: segment
    maps, a block scan, the per-row scan of block maps (runs of cb / 256), the segment's pivots."""
    depth, p = plan_of(emu, 1, 1 << 24)
    # the former plan at this shape: 1024 lanes per SM, chunks of Lc = 125, C = 134218 chunks
    C, Lc = 134218, 125
    before = Lc + (C - 1) + Lc
    S, T, segs, rpb, cb = p[0:5]
    assert (S, T, cb) == (8, 128, 16384)
    assert depth == 8 + 7 + 1 + 64 + 8 + 1 + 64 + 8
    assert depth < before / 500
    # the backward, pass by pass (backward_impl): block pivot maps (segment maps 8, block scan 7),
    # the pivot row scan (runs of 64, scan 8, apply 1, runs 64), the gradient summaries (apply 1,
    # pivots 8, mu summary 8, block scan 7), the gradient row scan (137 again), the final pass
    # (apply 1, walk 8)
    row_scan = 64 + 8 + 1 + 64
    assert backward_depth(emu, 1, 1 << 24) == (8 + 7) + row_scan + (1 + 8 + 8 + 7) + row_scan + (1 + 8) == 322
    # rows in one block (B = 4096, N = 1024: S 8, 128 segments): one pass, two block scans
    _, p = plan_of(emu, 4096, 1024)
    assert p[4] == 1 and p[0] == 8 and p[2] == 128
    assert backward_depth(emu, 4096, 1024) == 8 + 7 + (1 + 8) + 8 + 7 + (1 + 8)
    # every shape fills the GPU: at least 2048 threads per SM of work, or one thread per 8 positions
    for B in (1, 64, 4096):
        for N in (1, 1000, 1 << 14, (1 << 26) // B):
            _, p = plan_of(emu, B, N)
            threads = p[5] * p[1]
            assert threads >= min(2048 * 132, B * N // 8), (B, N, p)



@pytest.mark.parametrize("S,L", [(64, 2048), (4096, 64), (8, 1 << 20), (1000, 1000)])
def test_packed_row_fills_the_gpu_as_its_batch(emu, S, L):
    """Packed sequences (ops.bk_core(..., cu_seqlens=...)) run as one row of T = S * L positions with
    the couplings into each sequence start zeroed: the plan for (1, T) puts as many threads to work
    as the plan for the batch (S, L) of the same positions, and the carries stay shallow (a packed
    row does not fall back to a long serial walk)."""
    _, packed = plan_of(emu, 1, S * L)
    _, batch = plan_of(emu, S, L)
    assert packed[0] == batch[0]  # the same positions per thread
    # busy threads (one per segment): the packed row's segments are the batch's, less the batch
    # rows' rounding of their last segments; every segment has a thread
    assert packed[2] >= S * batch[2] - S, (packed, batch)
    assert packed[5] * packed[1] >= packed[2]
    depth, _ = plan_of(emu, 1, S * L)
    assert depth <= 2 * 161, depth  # at most the B = 1, N = 2^24 forward's depth, twice

def backward_depth(emu, B, N, sms=132, strategy=0):
    emu.bk_emu_backward_depth.restype = ctypes.c_int64
    return emu.bk_emu_backward_depth(ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int(strategy),
                                     ctypes.c_int64(0), ctypes.c_int(sms), ctypes.c_int(0))


if __name__ == "__main__":
    import pathlib
    import sys
    import tempfile

    class _F:
        def mktemp(self, n):
            return pathlib.Path(tempfile.mkdtemp())

    lib = build_emulated(_F(), "bk_core_cuda.cu", "bk_core_emu_api.cpp")
    print("carry depth B=1 N=2^24: forward", plan_of(lib, 1, 1 << 24), "backward", backward_depth(lib, 1, 1 << 24))
    print("bytes/element, float32, shared k (model bytes): fwd, bwd (grad a, k, z), bwd without grad k;"
          " causal with a carried state: fwd, bwd")
    for B, N, sms in SHAPES:
        for causal in (False, True):
            f, _ = run_fwd(lib, B, N, sms, causal=causal)
            b, _ = run_bwd(lib, B, N, sms, causal=causal)
            bl, _ = run_bwd(lib, B, N, sms, causal=causal, need_k_grad=False)
            line = (f"  B={B:<5d} {'causal   ' if causal else 'two-sided'}  fwd {sum(f.values()):6.2f}  "
                    f"bwd {sum(b.values()):6.2f}  bwd-no-grad_k {sum(bl.values()):6.2f}")
            if causal:
                fs, _ = run_fwd(lib, B, N, sms, causal=True, state=True)
                bs, _ = run_bwd(lib, B, N, sms, causal=True, state=True)
                line += f"  state: fwd {sum(fs.values()):6.3f}  bwd {sum(bs.values()):6.3f}"
                fd, _ = run_fwd(lib, B, N, sms, causal=True, deterministic=True)
                bd, _ = run_bwd(lib, B, N, sms, causal=True, deterministic=True)
                bdl, _ = run_bwd(lib, B, N, sms, causal=True, deterministic=True, need_k_grad=False)
                line += (f"\n  B={B:<5d} causal, deterministic: fwd {sum(fd.values()):6.2f}  bwd {sum(bd.values()):6.2f}"
                         f"  bwd-no-grad_k {sum(bdl.values()):6.2f}")
            print(line)
    for B, N, sms in SHAPES:
        for causal in (False, True):
            for shared, masked in ((True, False), (False, False), (True, True)):
                f, plan = run_fwd(lib, B, N, sms, shared, masked, causal)
                b, _ = run_bwd(lib, B, N, sms, shared, masked, causal)
                print(f"B={B} N={N} {'causal' if causal else 'two-sided'} {'shared' if shared else 'per-row'}"
                      f"{' mask' if masked else ''}: fwd {sum(f.values()):.2f} bwd {sum(b.values()):.2f} plan {plan}")
                print("   fwd", {k: round(v, 3) for k, v in f.items()})
                print("   bwd", {k: round(v, 3) for k, v in b.items()})
