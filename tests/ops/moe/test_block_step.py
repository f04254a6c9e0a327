"""``ops.moe_bk_block_step`` (a MoE ResNet-BK block's cached decode step as one op): the cpp kernel
equals the reference twin and the block's module path; ``LanguageModel``'s decode step takes it only
when it may (and then gives the full forward's logits); bad arguments raise, naming the argument."""
import pytest
import torch
import torch.nn.functional as F

from resnet_bk import ops
from resnet_bk.models import LanguageModel
from resnet_bk.models.base import MoEResNetBKLayer

pytestmark = pytest.mark.skipif("moe_bk_block_step" not in dir(torch.ops.resnet_bk)
                                or "cpp" not in ops.available_backends(), reason="compiled extension not built")


def _layer(D=16, E=4, n_seq=40, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    L = MoEResNetBKLayer(D, n_seq, num_experts=E).to(dtype).eval()
    with torch.no_grad():  # a non-trivial H0, scale and LayerNorm, so each term shows
        L.h0_diag_base.uniform_(-3, -1)
        L.h0_super_base.uniform_(0.5, 1.5)
        L.h0_sub_base.uniform_(0.5, 1.5)
        L.bk_scale.fill_(0.7)
    ln = torch.nn.LayerNorm(D).to(dtype)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    return L, ln


def _args(L, ln, h, p, state):
    moe = L.moe_ffn
    return [h, ln.weight, ln.bias, ln.eps, *moe._top1_plain_weights(h.dtype), L.v_proj.weight, L.v_proj.bias,
            L.h0_diag_base, L.h0_super_base, L.h0_sub_base, p, L.get_z(), state, L.bk_scale, L.output_proj.weight,
            L.output_proj.bias]


def _module_step(L, ln, h, p, state):
    """The block's step through the modules: h + L(ln(h)) at position p with the cached pivot."""
    slot = {"pos": p, "d": state}
    ffn = L.moe_ffn(ln(h)[:, None])[:, 0]
    v = L.v_proj(ffn)[:, 0]
    y, dtype = L._decode_step(v, slot)
    return h + L.mix_output(ffn, torch.view_as_real(y).to(dtype)), slot["d"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 40])  # 40 tokens: groups above 16 take the GEMM branch
@pytest.mark.parametrize("with_state", [True, False])
def test_block_step_matches_reference_and_modules(dtype, B, with_state):
    L, ln = _layer(dtype=dtype, seed=B)
    p = 7 if with_state else 0
    g = torch.Generator().manual_seed(B)
    h = torch.randn(B, 16, generator=g, dtype=dtype)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    state = torch.complex(torch.randn(B, generator=g), torch.randn(B, generator=g)).to(cdt) if with_state else None
    with torch.no_grad():
        cpp_h, cpp_d = ops.moe_bk_block_step(*_args(L, ln, h, p, state), backend="cpp")
        ref_h, ref_d = ops.moe_bk_block_step(*_args(L, ln, h, p, state), backend="reference")
        tol = ops.tolerance(dtype)
        ops.assert_close(cpp_h, ref_h, tol=tol)
        ops.assert_close(cpp_d, ref_d, tol=tol)
        if with_state:
            mod_h, mod_d = _module_step(L, ln, h, p, state)
            ops.assert_close(cpp_h, mod_h, tol=tol)
            ops.assert_close(cpp_d, mod_d, tol=tol)
    assert cpp_h.dtype == dtype and cpp_d.dtype == cdt and cpp_h.shape == (B, 16) and cpp_d.shape == (B,)


def test_block_step_inf_pivot_gives_zero_features():
    """A state of infinite modulus decouples the position (bk_math.h: 1/inf = 0), in both backends."""
    L, ln = _layer()
    h = torch.randn(2, 16)
    state = torch.tensor([complex(float("inf"), 0.0), 1 + 1j], dtype=torch.complex64)
    with torch.no_grad():
        got = ops.moe_bk_block_step(*_args(L, ln, h, 5, state), backend="cpp")
        ref = ops.moe_bk_block_step(*_args(L, ln, h, 5, state), backend="reference")
        alone = ops.moe_bk_block_step(*_args(L, ln, h[:1], 0, None), backend="cpp")
    for a, b in zip(got, ref):
        assert torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all()
        ops.assert_close(a, b, tol=ops.tolerance(torch.float32))
    # position 5 with an infinite previous pivot has no coupling, but the diagonal of position 5
    assert not torch.equal(got[0][0], alone[0][0])


def _lm(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return LanguageModel(37, d_model=16, n_layers=2, n_seq=48, dropout_p=0.0, **kw).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3])
def test_lm_decode_uses_fused_step_and_equals_full_forward(dtype, B, monkeypatch):
    m = _lm(dtype)
    calls = []
    real = torch.ops.resnet_bk.moe_bk_block_step

    class Counting:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(torch.ops.resnet_bk, "moe_bk_block_step", Counting())
    x = torch.randint(0, 37, (B, 30), generator=torch.Generator().manual_seed(B))
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(B)
        outs = [m(x[:, :11], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(11, 30)]
    ops.assert_close(torch.cat(outs, 1), full, tol=ops.tolerance(dtype))
    assert len(calls) == 19 * 2  # every decode step of both blocks


def test_lm_decode_takes_module_path_when_a_module_is_hooked(monkeypatch):
    """A hook on an expert (or a forced backend) must be honoured: the fused op is not used."""
    m = _lm()
    seen = []
    m.blocks[1].bk_layer.moe_ffn.experts[0].register_forward_hook(lambda mod, i, o: seen.append(1))
    m.blocks[0].bk_layer.backend = "reference"
    calls = []
    real = torch.ops.resnet_bk.moe_bk_block_step
    monkeypatch.setattr(torch.ops.resnet_bk, "moe_bk_block_step", lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 37, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(x)
        cache = m.init_cache(2)
        outs = [m(x[:, :5], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(5, 20)]
    ops.assert_close(torch.cat(outs, 1), full, tol=ops.tolerance(torch.float32))
    assert calls == []


def test_block_step_bad_arguments():
    L, ln = _layer()
    h = torch.randn(2, 16)
    state = torch.ones(2, dtype=torch.complex64)
    good = _args(L, ln, h, 3, state)

    def call(i, value, exc, match):
        a = list(good)
        a[i] = value
        with torch.no_grad(), pytest.raises(exc, match=match):
            ops.moe_bk_block_step(*a)

    call(0, torch.randn(2, 3, 16), ValueError, r"h: expected .* shape \(B, D\)")
    call(1, torch.ones(15), ValueError, r"ln_weight: expected shape \(16,\)")
    call(10, torch.ones(2, 16), ValueError, r"v_weight: expected shape \(1, 16\)")
    call(19, torch.ones(16, 3), ValueError, r"out_weight: expected shape \(16, 2\)")
    call(18, torch.ones(2), ValueError, "bk_scale: expected one")
    call(15, 3.0, TypeError, "position: expected an int")
    call(15, 40, ValueError, r"position: expected 0 <= position < 40")
    call(15, 0, ValueError, "position: a state couples")
    call(16, torch.tensor(1j, dtype=torch.complex128), TypeError, "z: expected one complex64")
    call(17, torch.ones(3, dtype=torch.complex64), ValueError, r"state: expected a torch.complex64 tensor of shape \(2,\)")
    call(12, torch.ones(1, 40, dtype=torch.float64), TypeError, "h0_diag: expected a float32")
    with pytest.raises(ValueError, match=r"w1\[1\]: expected shape"):
        a = list(good)
        a[6] = [a[6][0], torch.ones(3, 16)] + a[6][2:]
        with torch.no_grad():
            ops.moe_bk_block_step(*a)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.moe_bk_block_step(*good)  # parameters require grad, grad mode on
    # the kernel's own checks (the model's fast path calls it directly)
    with torch.no_grad(), pytest.raises(RuntimeError, match="state: expected"):
        torch.ops.resnet_bk.moe_bk_block_step(*[*good[:6], *good[6:10], *good[10:17], torch.ones(3, dtype=torch.complex64),
                                               *good[18:]])
    with torch.no_grad():
        assert ops.explain(ops.moe_bk_block_step, *good).backend == "cpp"
