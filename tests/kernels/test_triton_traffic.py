"""Global-memory traffic of the Triton kernels, counted under Triton's interpreter (tests/kernels/
triton_traffic.py), against the design goals of issue 23 (the model is tests/kernels/
test_cuda_traffic.py):

* forward <= 16 B/element (float32, shared coupling) for a and the complex64 output; the shared
  coupling row adds 4 B per pass over the positions for all B rows together, a per-row coupling
  4 B per pass, the mask 4 B;
* backward <= 32 B/element for a, the upstream gradient and grad a (grad k is 4 B more, always
  written; the mask 4 B per pass and 4 B for its gradient);
* every streaming access (a, k, mask, out, grad, grad a, grad k, grad mask) contiguous along the
  program's vector axis (consecutive lanes, consecutive addresses: coalesced).

"Model" bytes count a shared coupling row (k of shape (1, N-1)) once per pass for the whole batch
(the B rows read the same N-1 values, which stay in L2), every other access in full.

Shapes: a small N with the plan of a full-size shape on a 132-SM GPU (``plan(..., sms=)``):
  B = 1, N = 4096, sms 1: R 1, T 1024, 4 chunks    ~ B = 1, N = 2^24 (T 1024, 16384 chunks)
  B = 64, N = 2048, sms 32: R 1, T 1024, 2 chunks  ~ B = 64, N = 2^18 (T 1024, 256 chunks)
  B = 4096, N = 64 (132 SMs): R 4, T 64, 1 chunk   ~ B = 4096, N <= 1024 (one pass, rows per tile)
The interpreter runs a program in about 0.1-0.5 s, so only the programs of rows 0 and B - 1 run
(``count(select=)``; the look-back kernels' programs by ticket); bytes per element are over the
elements those programs own. Chunked two-sided plans (C > 1) read a twice in the forward (chunk
summaries, then the tiles) and three times in the backward (pivot summaries, gradient summaries,
the final pass). Chunked causal plans carry between chunks by a decoupled look-back inside the
tile kernel: a once in the forward (one launch), twice in the backward (the pivots entering each
chunk, then the gradient tiles); their status words and ticket counter are zeroed by the host per
launch (tag "zero": 4 (B C + 1) bytes over the B N elements).
"""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from triton_env import ON_GPU, import_kernels  # noqa: E402

if ON_GPU:
    pytest.skip("counts traffic under Triton's interpreter (TRITON_INTERPRET=1, CPU)", allow_module_level=True)

K, S, P = import_kernels("resnet_bk.triton_kernels.bk_core", "resnet_bk.triton_kernels.step",
                         "resnet_bk.triton_kernels.pooling")

from triton_traffic import count  # noqa: E402

if getattr(K, "INTERPRETER_PROBLEM", None):
    pytest.skip(K.INTERPRETER_PROBLEM, allow_module_level=True)

SHAPES = [(1, 4096, 1), (64, 2048, 32), (4096, 64, None)]
CARRY_KERNELS = ("_pivot_carry_kernel", "_lin_carry_kernel")
STREAMING = ("a", "k", "mask", "out", "grad", "grad_a", "grad_k", "grad_mask")

# Before this branch (two-sided chains each loading a and k, k_n loaded a third time in the
# backward, complex output / upstream gradient as two stride-2 accesses), float32, shared k, model
# bytes/element at these shapes (B = 4096 with R = 16, the same per element): (fwd two-sided, fwd causal, bwd two-sided,
# bwd causal)
BEFORE = {1: (40.20, 24.11, 80.38, 56.18), 64: (24.45, 16.23, 48.89, 36.50), 4096: (16.01, 12.01, 23.96, 19.96)}
# Causal, before the look-back (three launches forward, five backward) and with it (one forward,
# two backward), same units: (fwd, bwd, bwd without grad k). B = 4096 is whole rows (one launch
# each way, unchanged).
CAUSAL_BEFORE = {1: (24.11, 48.19, 44.19), 64: (16.23, 36.37, 32.38), 4096: (12.03, 20.00, 16.06)}
CAUSAL_NOW = {1: (16.08, 32.17, 28.17), 64: (12.13, 24.27, 20.27), 4096: (12.03, 20.00, 16.06)}
LOOKBACK_KERNELS = ("_fwd_lookback_kernel",)


def pass_counts(p, causal, bwd):
    """(passes over a, passes over the upstream gradient) of a plan."""
    if p.C == 1:
        return 1, 1
    if causal:
        return (2, 1) if bwd else (1, 0)
    return (3, 2) if bwd else (2, 0)


def make(B, N, shared=True, masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, N, generator=g) * 0.5 + 2.0
    k = torch.rand(1 if shared else B, N - 1, generator=g) * 0.5 + 0.1
    zri = torch.tensor([0.1, 0.3])
    mask = (torch.rand(B, N, generator=g) > 0.2).float() if masked else None
    grad = torch.randn(B, N, dtype=torch.complex64, generator=g)
    return a, k, zri, mask, grad


def _selector(p, B):
    """Programs of rows 0 and B - 1, and the rows they own."""
    rows = {0, B - 1}
    blocks = {r // p.R for r in rows}
    owned = {rb * p.R + i for rb in blocks for i in range(p.R) if rb * p.R + i < B}

    def select(name, idx, ticketed):
        if ticketed:   # idx[0] is the ticket: chunk-major, one row per tile
            return idx[0] % B in rows
        if name in CARRY_KERNELS:
            return idx[0] in rows
        return idx[0] // p.C in blocks
    return select, len(owned)


def measure(B, N, sms, bwd, causal, shared=True, masked=False, need_k_grad=True, state=False):
    """({tag: model bytes per element}, {kernel: model bytes per element}, Traffic, plan). ``state``:
    a carried state (causal), tagged "d_in" and "k_in" (the backward's mu0 output: "mu0")."""
    a, k, zri, mask, grad = make(B, N, shared, masked)
    p = K.plan(B, N, sms=sms)
    select, rows = _selector(p, B)
    st = {}
    if state:
        g = torch.Generator().manual_seed(5)
        st = dict(d_in=torch.randn(B, dtype=torch.complex64, generator=g) + 2.0, k_in=torch.rand(B, generator=g))
    tensors = dict(a=a, k=k, zri=zri, mask=mask, grad=torch.view_as_real(grad))
    if state:
        tensors.update(d_in=torch.view_as_real(st["d_in"]), k_in=st["k_in"])
    with count(select=select, **tensors) as tr:
        if bwd:
            K.bk_core_bwd(grad, a, k, zri, mask, causal, True, need_k_grad, sms=sms, **st)
        else:
            K.bk_core_fwd(a, k, zri, mask, causal, sms=sms, **st)
    assert not tr.outside, f"accesses outside every buffer: {tr.outside[:4]}"
    tags, kernels = {}, {}
    if tr.ticketed:
        tags["zero"] = len(tr.ticketed) * 4.0 * (B * p.C + 1) / (B * N)
    for (kn, tag, _), acc in tr.acc.items():
        v = acc.bytes / (rows * N) / (B if (tag == "k" and shared) else 1)
        tags[tag] = tags.get(tag, 0.0) + v
        kernels[kn] = kernels.get(kn, 0.0) + v
    return tags, kernels, tr, p


def assert_coalesced(tr):
    bad = {key: s for key, s in tr.strided().items() if key[1] in STREAMING}
    assert not bad, f"streaming accesses not contiguous along the vector axis: {bad}"


# the interpreter runs the selected programs in 1-9 s per test: B = 64 (two rows of chunked tiles,
# per-row k and mask too) is the slow lane's
_PARAMS = [pytest.param(*s, id=f"B{s[0]}", marks=[pytest.mark.slow] if s[0] == 64 else []) for s in SHAPES]


@pytest.mark.parametrize("B,N,sms", _PARAMS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_forward_bytes_per_element(B, N, sms, causal):
    """a read once per pass (one pass, or two for chunked rows: the chunk summaries, then the
    tiles), the complex64 output written once: a + out <= 16 B/element; the coupling read with a
    (k_n and the one value entering the tile), z once per program, the chunk carries per 1024
    positions."""
    t, kern, tr, p = measure(B, N, sms, False, causal)
    assert (p.R, p.T, p.C > 1) == ((1, 1024, True) if B < 4096 else (4, 64, False)), p
    passes, _ = pass_counts(p, causal, False)
    assert t["a"] == pytest.approx(4.0 * passes)
    assert t["out"] == pytest.approx(8.0)
    assert t["a"] + t["out"] <= 16.0
    assert t["k"] <= 4.0 * passes / B + 0.01, t
    overhead = t.get("ws", 0.0) + t.get("zri", 0.0) + t.get("zero", 0.0)
    assert overhead <= 0.3, t
    total = sum(t.values())
    assert total <= 16.0 + 4.0 * passes / B + overhead + 0.01, t
    assert total <= BEFORE[B][1 if causal else 0] + 0.05, (total, BEFORE[B])
    if causal:
        # one launch; a, k, out each once: 16 B/element at B = 1, 12 (+ k / B) with many rows
        assert tr.launches == (["_fwd_lookback_kernel"] if p.C > 1 else ["_fwd_kernel"]), tr.launches
        assert total == pytest.approx(CAUSAL_NOW[B][0], abs=0.05), (total, CAUSAL_NOW[B])
        # chunked: one pass over a and k fewer than the three launches read
        saved = (4.0 + 4.0 / B) if p.C > 1 else 0.0
        assert CAUSAL_BEFORE[B][0] - total == pytest.approx(saved, abs=0.1), (total, CAUSAL_BEFORE[B])
    assert_coalesced(tr)
    if B == 1:
        return  # at B = 1 a per-row coupling is the shared one; the mask is counted at B = 64 and 4096
    tp, _, trp, _ = measure(B, N, sms, False, causal, shared=False)
    assert tp["k"] <= 4.0 * passes + 0.01 and sum(tp.values()) <= total + 4.0 * passes + 0.01, tp
    assert_coalesced(trp)
    tm, _, trm, _ = measure(B, N, sms, False, causal, masked=True)
    assert tm["mask"] == pytest.approx(4.0) and sum(tm.values()) == pytest.approx(total + 4.0), tm
    assert_coalesced(trm)


@pytest.mark.parametrize("B,N,sms", _PARAMS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_backward_bytes_per_element(B, N, sms, causal):
    """a read once per pass (one pass, or three for chunked rows), the upstream gradient once per
    gradient pass (one or two), grad a written once: a + grad + grad a <= 32 B/element; grad k 4 B
    (per row) only when asked for, z's partial sums once per program."""
    t, kern, tr, p = measure(B, N, sms, True, causal)
    passes, gpasses = pass_counts(p, causal, True)
    assert t["a"] == pytest.approx(4.0 * passes)
    assert t["grad"] == pytest.approx(8.0 * gpasses)
    assert t["grad_a"] == pytest.approx(4.0) and t["grad_k"] <= 4.0
    assert t["a"] + t["grad"] + t["grad_a"] <= 32.0
    assert t["k"] <= 4.0 * passes / B + 0.02, t
    overhead = t.get("ws", 0.0) + t.get("zri", 0.0) + t.get("grad_zri", 0.0) + t.get("zero", 0.0)
    assert overhead <= 0.6, t
    total = sum(t.values())
    assert total <= 36.0 + 4.0 * passes / B + overhead + 0.02, t
    assert total <= BEFORE[B][3 if causal else 2] + 0.05, (total, BEFORE[B])
    if causal:
        # two launches (the pivots entering each chunk; the gradient tiles): a, k once each, then
        # a, k, the upstream gradient once and grad a (and grad k) written once: 28 (32) B/element
        # at B = 1, 20 (24) with many rows
        assert tr.launches == (["_fwd_lookback_kernel", "_bwd_kernel"] if p.C > 1 else ["_bwd_kernel"]), tr.launches
        assert total == pytest.approx(CAUSAL_NOW[B][1], abs=0.05), (total, CAUSAL_NOW[B])
        # chunked: one pass over a, k and one over the upstream gradient fewer than the five launches
        saved = (4.0 + 4.0 / B + 8.0) if p.C > 1 else 0.0
        assert CAUSAL_BEFORE[B][1] - total == pytest.approx(saved, abs=0.1), (total, CAUSAL_BEFORE[B])
    assert_coalesced(tr)
    # grad k not asked for is not stored, and nothing else changes
    tn, _, _, _ = measure(B, N, sms, True, causal, need_k_grad=False)
    assert tn.get("grad_k", 0.0) == 0.0, tn
    assert {key: v for key, v in t.items() if key != "grad_k"} == pytest.approx(tn), (t, tn)
    assert sum(tn.values()) <= 32.0 + 4.0 * passes / B + overhead + 0.02, tn
    if causal:
        assert sum(tn.values()) == pytest.approx(CAUSAL_NOW[B][2], abs=0.05), (tn, CAUSAL_NOW[B])
    if B == 1:
        return
    tm, _, trm, _ = measure(B, N, sms, True, causal, masked=True)
    assert tm["mask"] == pytest.approx(4.0 * gpasses) and tm["grad_mask"] == pytest.approx(4.0), tm
    assert_coalesced(trm)


@pytest.mark.parametrize("B,N,sms", [pytest.param(*s, id=f"B{s[0]}") for s in SHAPES if s[0] != 64])
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
def test_state_adds_bytes_per_row_only(B, N, sms, bwd):
    """A carried state (causal) changes no per-element traffic: the same bytes for every other
    buffer, and per row d_in (8 B) read once per chain start (the carry kernel's or the whole-row
    tile's: once per pass that scans the pivots), k_in (4 B) once per pass over the row's first
    chunk, mu0 (8 B) written once; every access coalesced."""
    t0, _, _, p = measure(B, N, sms, bwd, True)
    t, _, tr, _ = measure(B, N, sms, bwd, True, state=True)
    extra = {key: v * N for key, v in t.items() if key in ("d_in", "k_in", "mu0")}  # bytes per row
    assert {key: v for key, v in t.items() if key not in extra} == pytest.approx(t0), (t, t0)
    passes = (2 if bwd else 1) if p.C > 1 else 1   # causal: passes over the row's first chunk
    assert 0 < extra["d_in"] <= 8.0 * passes, extra
    assert 0 < extra["k_in"] <= 4.0 * passes, extra
    assert extra.get("mu0", 0.0) == pytest.approx(8.0 if bwd else 0.0), extra
    assert_coalesced(tr)


def test_plan_sm_override():
    """``plan(sms=)`` (the tests' way to give a small shape a full-size plan): 132 is the default,
    fewer SMs give larger tiles, a bad count is an error naming it."""
    for B, N in [(1, 1 << 24), (64, 2048), (4096, 64), (3, 1000)]:
        assert K.plan(B, N, sms=K.SM_COUNT) == K.plan(B, N)
    assert K.plan(1, 4096).T == 128 and K.plan(1, 4096, sms=1).T == 1024
    with pytest.raises(ValueError, match="plan: expected sms >= 1, got 0"):
        K.plan(1, 5, sms=0)


def test_counter_catches_out_of_bounds_and_scatter():
    """The counter itself: an access past a registered buffer is reported, a stride-2 access is
    not contiguous."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + 2 * i, mask=i < n, other=0.0)
        tl.store(y_ptr + i, v, mask=i < n + 1)

    x = torch.arange(8.0)
    y = torch.zeros(4)
    with count(x=x, y=y) as tr:
        _k[(1,)](x, y, 4, BLOCK=8)
    assert tr.outside and tr.outside[0][1] == "st"     # y[4]: one past the end
    assert tr.acc[("_k", "x", "ld")].bytes == 16 and tr.acc[("_k", "x", "ld")].strides == {2}
    assert tr.acc[("_k", "y", "st")].coalesced


def test_step_kernel_bytes():
    """The decode step with a state, per-row b and c: a, b, c (4 B each) and the complex state
    (8 B) read once, y and d (8 B each) written once: 36 B per sequence, the minimum; z once per
    program. Every access contiguous."""
    n = 256
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(n, generator=g) for _ in range(3))
    zri = torch.tensor([0.1, 0.3])
    state = torch.randn(n, dtype=torch.complex64, generator=g) + 2.0
    y = torch.empty(n, dtype=torch.complex64)
    d = torch.empty(n, dtype=torch.complex64)
    with count(a=a, b=b, c=c, zri=zri, state=torch.view_as_real(state), y=torch.view_as_real(y),
               d=torch.view_as_real(d)) as tr:
        S.bk_core_step(a, b, c, zri, state, y, d)
    assert not tr.outside
    t = {tag: v / n for tag, v in tr.tags().items()}
    assert t == pytest.approx({"a": 4.0, "b": 4.0, "c": 4.0, "state": 8.0, "y": 8.0, "d": 8.0,
                               "zri": 8.0 * 2 / n})
    assert not tr.strided(), tr.strided()


def test_pooling_kernel_bytes():
    """Learned down/upsampling, once each: bytes per element against the minimum (every input read
    once, every output written once), and contiguous accesses to the activations."""
    B, M, r, D = 2, 4, 4, 64
    N = M * r
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, N, D, generator=g)
    logits = torch.randn(M, r, generator=g)
    with count(x=x, logits=logits) as tr:
        out = P.learned_downsample_fwd(x, logits, causal=False)
    assert not tr.outside
    t = tr.tags()
    # x once, out once; the (M, r) logits once per output row (b, j): r values per D outputs
    assert t["x"] == x.numel() * 4 and t["out"] == out.numel() * 4
    assert t["logits"] == B * M * r * 4
    assert not {key for key in tr.strided() if key[1] in ("x", "out")}, tr.strided()
    grad = torch.randn(B, M, D, generator=g)
    with count(x=x, logits=logits, grad=grad) as tr:
        P.learned_downsample_bwd(grad, x, logits, causal=False)
    assert not tr.outside
    t = tr.tags()
    # grad read once per output row, x once (for the logits' gradient), grad x written once (the
    # host zero-fills it first: that fill is not a kernel), u (B, M, r) once
    assert t["grad"] == grad.numel() * 4 and t["x"] == x.numel() * 4 and t["grad_x"] == x.numel() * 4
    assert t["ws"] == B * M * r * 4
    assert not {key for key in tr.strided() if key[1] in ("x", "grad", "grad_x")}, tr.strided()
    yv = torch.randn(B, M, r * D, generator=g)
    bias = torch.randn(1, r, 1, generator=g)
    res = torch.randn(B, N, D, generator=g)
    with count(y=yv, bias=bias, residual=res) as tr:
        o = P.learned_upsample_fwd(yv, bias, res, None)
    assert not tr.outside
    t = tr.tags()
    assert t["y"] == yv.numel() * 4 and t["residual"] == res.numel() * 4 and t["out"] == o.numel() * 4
    # the broadcast bias (1, r, 1) is read per output element (from cache: r distinct values)
    assert t["bias"] == o.numel() * 4
    assert not {key for key in tr.strided() if key[1] in ("y", "residual", "out")}, tr.strided()
    go = torch.randn(B, N, D, generator=g)
    scale = torch.tensor(0.5)
    with count(y=yv, bias=bias, grad=go, scale=scale) as tr:
        P.learned_upsample_bwd(go, yv, bias, scale)
    assert not tr.outside
    t = tr.tags()
    assert t["grad"] == go.numel() * 4 and t["y"] == yv.numel() * 4 and t["grad_y"] == yv.numel() * 4
    assert not {key for key in tr.strided() if key[1] in ("y", "grad", "grad_y")}, tr.strided()


if __name__ == "__main__":
    # the table: model bytes/element per kernel and total, float32, shared k
    for B, N, sms in SHAPES:
        for bwd in (False, True):
            for causal in (False, True):
                t, kern, tr, p = measure(B, N, sms, bwd, causal)
                print(f"B={B} N={N} {'bwd' if bwd else 'fwd'} {'causal' if causal else 'two-sided'} {p}: "
                      f"total {sum(t.values()):.2f}")
                print("   tags", {x: round(y, 3) for x, y in t.items()})
                print("   kernels", {x: round(y, 3) for x, y in kern.items()})
                print("   not contiguous", tr.strided())
    # causal rows: before the look-back and now (model bytes/element, float32, shared k)
    print("causal        fwd (before/now)   bwd (before/now)   bwd, no grad k (before/now)   launches now")
    for B, N, sms in SHAPES:
        now = []
        for bwd, nk in ((False, True), (True, True), (True, False)):
            t, _, tr, p = measure(B, N, sms, bwd, True, need_k_grad=nk)
            now.append((sum(t.values()), len(tr.launches)))
        cb = CAUSAL_BEFORE[B]
        print(f"B={B:<5} C={p.C}  " + "   ".join(f"{cb[i]:6.2f} / {now[i][0]:6.2f}" for i in range(3))
              + f"   fwd {now[0][1]}, bwd {now[1][1]}")
