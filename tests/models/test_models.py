"""Tests for resnet_bk.models (base LM, ACT, multi-scale, configurable) and the training entry point.

Small shapes throughout: the whole file should run in well under a minute on 2 CPU cores.
"""
import math

import pytest
import torch
import torch.nn as nn

from resnet_bk.models import (ACTLanguageModel, AdaptiveResNetBKBlock, ConfigurableResNetBK,
                              HierarchicalMultiScaleLayer, LanguageModel, LearnedDownsampling,
                              LearnedUpsampling, MoEResNetBKLayer, MultiScaleResNetBKBlock,
                              MultiScaleResNetBKLayer, ResNetBKBlock, ResNetBKConfig, SparseMoELayer,
                              count_flops_multi_scale)
from resnet_bk.models.base import BKMixer
from resnet_bk.models.sparse import SparseMoEResNetBKLayer
from resnet_bk.training import ACTTrainer

V, D, L, NS = 64, 16, 2, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(kind, **kw):
    torch.manual_seed(0)
    if kind == "plain":
        return LanguageModel(V, D, L, NS, **kw)
    if kind == "act":
        return ACTLanguageModel(V, D, 3, NS, act_threshold=0.9, **kw)
    if kind in ("multiscale", "hierarchical"):
        h = kind == "hierarchical"
        return LanguageModel(V, D, L, NS, block_factory=lambda i: MultiScaleResNetBKBlock(D, NS, hierarchical=h), **kw)
    if kind.startswith("config-"):
        preset = kind[len("config-"):]
        return ConfigurableResNetBK(ResNetBKConfig.preset(preset, vocab_size=V, d_model=D, n_layers=L, n_seq=NS))
    raise ValueError(kind)


def _logits(m, x):
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


LMS = ["plain", "act", "multiscale", "hierarchical", "config-baseline", "config-act", "config-multi_scale",
       "config-hierarchical", "config-memory_saving"]


# ------------------------------------------------------------------------------------------------ base

def test_moe_router_gets_gradient_and_balance_loss():
    torch.manual_seed(0)
    for k in (1, 2, 4):
        moe = SparseMoELayer(D, num_experts=4, top_k=k, dropout_p=0.0)
        x = torch.randn(3, 10, D)
        y = moe(x)
        assert y.shape == x.shape
        (y.square().sum() + moe.aux_loss).backward()
        g = moe.gating_network.weight.grad
        assert g is not None and g.abs().sum() > 0, f"top_k={k}: router has no gradient"
        assert 0.9 < moe.aux_loss.item() < 4.0 + 1e-4


def test_moe_top1_matches_per_token_loop():
    torch.manual_seed(1)
    moe = SparseMoELayer(D, num_experts=3, top_k=1, dropout_p=0.0).eval()
    x = torch.randn(2, 7, D)
    y = moe(x)
    xf = x.reshape(-1, D)
    p = torch.softmax(moe.gating_network(xf), -1)
    ref = torch.stack([moe.experts[int(p[t].argmax())](xf[t]) * p[t].max() for t in range(xf.shape[0])])
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-6)


def test_layer_uses_laplacian_and_no_clamps():
    torch.manual_seed(0)
    layer = MoEResNetBKLayer(D, NS, dropout_p=0.0)
    assert layer.h0_super_base.shape == (1, NS - 1) and torch.all(layer.h0_diag_base == -2)
    v = torch.full((2, NS), 50.0)  # far beyond the original v clamp of 3
    f = layer.bk_features(v)
    # G of the causal variant is 1 / d_i; with v = 50 the pivots are ~ 48 - i, so |G| ~ 1/48, not a clamped value
    d = torch.empty(NS, dtype=torch.complex128)
    d[0] = 48 - 1j
    for i in range(1, NS):
        d[i] = 48 - 1j - 1 / d[i - 1]
    ref = torch.view_as_real((1 / d).to(torch.complex64))
    torch.testing.assert_close(f[0], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("N", [1, 2, 7, NS])
def test_base_shapes_variable_length(N):
    m = _lm("plain")
    x = torch.randint(0, V, (3, N))
    assert m(x).shape == (3, N, V)
    blk = ResNetBKBlock(D, NS)
    assert blk(torch.randn(2, N, D)).shape == (2, N, D)


def test_bad_input_errors():
    m = _lm("plain")
    with pytest.raises(ValueError, match="n_seq"):
        m(torch.randint(0, V, (2, NS + 1)))
    with pytest.raises(TypeError, match="x"):
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match="x"):
        MoEResNetBKLayer(D, NS)(torch.randn(2, 4, D + 1))


@pytest.mark.parametrize("kind", LMS)
def test_lm_causality_no_future_leak(kind):
    m = _lm(kind).eval()
    torch.manual_seed(3)
    N = NS - 3  # also exercises a length that is not a multiple of the multi-scale factors
    x = torch.randint(0, V, (2, N))
    base = _logits(m, x)
    for j in (0, 5, 10, N - 1):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 7) % V
        out = _logits(m, x2)
        # Not bitwise: the MoE groups tokens by expert, so a token's expert GEMM has as many rows as
        # its expert got tokens, and a changed later token can change that count. MKL's sgemm on
        # some CPUs (seen on AMD EPYC) rounds a row differently for different row counts: a few
        # float32 ulps. A real leak moves earlier logits by orders of magnitude more than that.
        early = (out[:, :j] - base[:, :j]).abs().max().item() if j else 0.0
        later = (out[:, j:] - base[:, j:]).abs().max().item()
        assert early <= 1e-5, f"{kind}: changing token {j} changed earlier logits by {early:.3g}"
        assert later > 1e-3, f"{kind}: token {j} has (almost) no effect: {later:.3g}"


def test_noncausal_lm_does_see_future():
    m = LanguageModel(V, D, L, NS, causal=False).eval()
    x = torch.randint(0, V, (1, NS))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % V
    assert (m(x)[:, :10] - m(x2)[:, :10]).abs().max() > 0


def test_learnable_z_gets_gradient():
    layer = MoEResNetBKLayer(D, NS, learnable_z=True)
    layer(torch.randn(2, NS, D)).sum().backward()
    assert layer.z_real.grad is not None and layer.z_log_imag.grad.abs() > 0


def test_float64_model():
    m = _lm("plain").double()
    assert m(torch.randint(0, V, (2, 9))).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ ACT

def _count_tokens(model):
    return sum(mm.tokens_processed for mm in model.modules() if isinstance(mm, SparseMoELayer))


def test_act_halted_tokens_skip_compute_and_avg_layers_is_counted():
    torch.manual_seed(0)
    m = ACTLanguageModel(V, D, 4, NS, act_threshold=0.5, halt_bias_init=0.0)
    # make some tokens halt after block 1 and others late: large per-token spread of p
    with torch.no_grad():
        for b in m.blocks:
            b.halting_unit[2].weight.mul_(20)
    x = torch.randint(0, V, (3, NS))
    before = _count_tokens(m)
    logits, ponder = m(x)
    processed = _count_tokens(m) - before
    avg = m.get_avg_layers_executed()
    assert math.isclose(avg, processed / x.numel(), rel_tol=0, abs_tol=1e-12)
    assert 1.0 <= avg < 4.0, "some tokens must have halted early in this setup"
    assert processed < 4 * x.numel()
    # ponder = mean(N + R) with R in (0, 1]: it exceeds the mean layer count by at most 1
    assert avg < ponder.item() <= avg + 1 + 1e-6


def test_act_layer_with_no_running_token_is_skipped():
    torch.manual_seed(0)
    m = ACTLanguageModel(V, D, 4, NS, act_threshold=0.5)
    with torch.no_grad():
        for b in m.blocks:
            b.halting_unit[2].bias.fill_(10.0)  # p ~ 1: every token halts after block 1
    x = torch.randint(0, V, (2, NS))
    before = [b.bk_layer.moe_ffn.tokens_processed for b in m.blocks]
    m(x)
    after = [b.bk_layer.moe_ffn.tokens_processed for b in m.blocks]
    assert [a - b for a, b in zip(after, before)] == [x.numel(), 0, 0, 0]
    assert m.get_avg_layers_executed() == 1.0 and m.layers_skipped == 3
    # skipped blocks must not carry a stale balance loss from an earlier forward into the loss
    with torch.no_grad():
        m.blocks[0].halting_unit[2].bias.fill_(-10.0)
    m.training_loss(x, x)[0].backward()
    with torch.no_grad():
        m.blocks[0].halting_unit[2].bias.fill_(10.0)
    m.training_loss(x, x)[0].backward()


def _act_reference_forward(m, x):
    """The ACT forward through the full-state block API (AdaptiveResNetBKBlock.step): every state
    kept at (B, N); the model's compact path must give the same logits and ponder cost."""
    B, N = x.shape
    h = m.token_embedding(x) + m.position_embedding(torch.arange(N))
    cumsum = torch.zeros(B, N)
    running = torch.ones(B, N, dtype=torch.bool)
    frozen_v = torch.zeros(B, N)
    out = torch.zeros(B * N, m.d_model)
    ponder = torch.zeros(())
    for l, blk in enumerate(m.blocks):
        st = blk.step(h, cumsum, running, frozen_v, is_last=(l == len(m.blocks) - 1))
        if st is None:
            break
        out = out.index_add(0, st.idx, st.w_run.unsqueeze(-1) * st.h_run)
        ponder = ponder + torch.where(st.halted_now, st.remainder + (l + 1), torch.zeros_like(st.remainder)).sum()
        h, cumsum, running, frozen_v = st.h, st.cumsum, st.running, st.v
    return m.lm_head(m.layer_norm_final(out.view(B, N, -1))), ponder / (B * N)


def test_act_compact_path_matches_full_state_reference():
    torch.manual_seed(0)
    m = ACTLanguageModel(V, D, 4, NS, act_threshold=0.6, halt_bias_init=0.0, dropout_p=0.0).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.halting_unit[2].weight.mul_(20)  # a spread of halting layers
    x = torch.randint(0, V, (3, NS))
    logits, ponder = m(x)
    assert 1.0 < m.get_avg_layers_executed() < 4.0
    ref_logits, ref_ponder = _act_reference_forward(m, x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ponder, ref_ponder, rtol=1e-5, atol=1e-5)


def test_act_never_halting_tokens_get_remainder():
    torch.manual_seed(0)
    m = ACTLanguageModel(V, D, 3, NS, act_threshold=0.99)
    with torch.no_grad():
        for b in m.blocks:
            b.halting_unit[2].bias.fill_(-30.0)  # p ~ 0: nobody halts before the last block
    x = torch.randint(0, V, (2, 8))
    _, ponder = m(x)
    assert m.get_avg_layers_executed() == 3.0
    assert ponder.item() == pytest.approx(4.0, abs=1e-5)  # N = 3, R = 1 - sum p ~ 1


def test_act_ponder_gradient_reaches_halting_units():
    torch.manual_seed(0)
    m = ACTLanguageModel(V, D, 3, NS, act_threshold=0.99, halt_bias_init=-1.0)
    x = torch.randint(0, V, (2, NS))
    _, ponder = m(x)
    ponder.backward()
    grads = [b.halting_unit[2].bias.grad for b in m.blocks[:-1]]
    assert all(g is not None and g.item() < 0 for g in grads), grads  # raising p lowers N + R


def test_act_block_forward_signature_and_trainer():
    torch.manual_seed(0)
    blk = AdaptiveResNetBKBlock(D, NS, threshold=0.5)
    x = torch.randn(2, 10, D)
    h, c, r, w = blk(x)
    assert h.shape == x.shape and c.shape == r.shape == w.shape == (2, 10) and r.dtype == torch.bool
    m = ACTLanguageModel(V, D, 2, NS, act_threshold=0.9)
    tr = ACTTrainer(m, torch.optim.Adam(m.parameters(), 3e-3))
    x = torch.randint(0, V, (4, 12))
    res = tr.train_step(x, (x + 1) % V)
    assert set(res) == {"total_loss", "ce_loss", "ponder_cost", "avg_layers_executed"}
    avg = tr.get_average_metrics()
    assert avg["avg_ce_loss"] == pytest.approx(res["ce_loss"])
    logits = m(x, return_ponder_cost=False)
    total, ce, p = m.compute_loss(logits, (x + 1) % V, torch.tensor(2.0))
    assert total.item() == pytest.approx(ce.item() + 0.01 * 2.0)


# ------------------------------------------------------------------------------------------------ multi-scale

@pytest.mark.parametrize("hier", [False, True])
@pytest.mark.parametrize("N", [1, 3, 8, NS])
def test_multiscale_shapes(hier, N):
    blk = MultiScaleResNetBKBlock(D, NS, hierarchical=hier)
    assert blk(torch.randn(2, N, D)).shape == (2, N, D)


@pytest.mark.parametrize("cls", [MultiScaleResNetBKLayer, HierarchicalMultiScaleLayer])
def test_multiscale_layer_causal_and_gradients(cls):
    torch.manual_seed(0)
    layer = cls(D, NS).eval()
    x = torch.randn(2, NS, D, requires_grad=True)
    y = layer(x)
    for t in (0, 3, 10, NS - 1):
        g, = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert bool((g[:, t + 1:] == 0).all()), f"output {t} depends on later inputs"
        assert g[:, t].abs().max() > 0
    y.sum().backward()
    for name, p in layer.named_parameters():
        if "z" not in name:
            assert p.grad is not None, name


def test_resamplers():
    down = LearnedDownsampling(D, NS, causal=True)
    up = LearnedUpsampling(D, NS // 2)
    x = torch.randn(2, 10, D)
    lo = down(x)
    assert lo.shape == (2, 5, D)
    assert up(lo).shape == (2, 10, D)
    assert up(lo, residual=x).shape == (2, 10, D)


def test_multiscale_flop_model_is_cheaper():
    assert count_flops_multi_scale(64, 128)["speedup"] > 1.2
    assert count_flops_multi_scale(64, 128, hierarchical=True)["speedup"] > 1.4


# ------------------------------------------------------------------------------------------------ configurable

def test_configurable_flags_change_structure():
    base = dict(vocab_size=V, d_model=D, n_layers=L, n_seq=NS)
    types = {}
    for flags in ({}, {"use_adaptive_computation": True}, {"use_multi_scale": True},
                  {"use_multi_scale": True, "multi_scale_hierarchical": True}):
        m = ConfigurableResNetBK(ResNetBKConfig(**base, **flags))
        types[tuple(flags)] = m
    assert isinstance(types[()].model.blocks[0], ResNetBKBlock)
    assert isinstance(types[("use_adaptive_computation",)].model.blocks[0], AdaptiveResNetBKBlock)
    ms = types[("use_multi_scale",)].model.blocks[0]
    assert isinstance(ms, MultiScaleResNetBKBlock) and isinstance(ms.layer, MultiScaleResNetBKLayer)
    hi = types[("use_multi_scale", "multi_scale_hierarchical")].model.blocks[0]
    assert isinstance(hi.layer, HierarchicalMultiScaleLayer)
    # keyword overrides (the documented signature) and per-instance backends (no global state)
    ref = ConfigurableResNetBK(**base, use_custom_kernels=False)
    assert ref.model.blocks[0].bk_layer.backend == "reference"
    assert types[()].model.blocks[0].bk_layer.backend is None
    ck = ConfigurableResNetBK(**base, use_gradient_checkpointing=True)
    assert type(ck.model.blocks[0]).__name__ == "_Checkpointed"
    x = torch.randint(0, V, (2, 10))
    for m in list(types.values()) + [ref, ck]:
        logits, aux = m(x, return_aux_loss=True)
        assert logits.shape == (2, 10, V) and aux.requires_grad


@pytest.mark.parametrize("flag", ["use_koopman", "use_quantization", "use_pruning", "use_curriculum_learning",
                                  "use_gradient_caching", "use_physics_informed"])
def test_configurable_unhonoured_flags_raise(flag):
    with pytest.raises(NotImplementedError, match=flag):
        ConfigurableResNetBK(ResNetBKConfig(vocab_size=V, d_model=D, n_layers=1, n_seq=NS, **{flag: True}))
    with pytest.raises(NotImplementedError, match="v_max"):
        ConfigurableResNetBK(ResNetBKConfig(vocab_size=V, d_model=D, n_layers=1, n_seq=NS, v_max=3.0))


def test_configurable_learned_sparsity_flag():
    cfg = ResNetBKConfig(vocab_size=V, d_model=D, n_layers=1, n_seq=NS, use_learned_sparsity=True)
    m = ConfigurableResNetBK(cfg)
    assert isinstance(m.model.blocks[0].bk_layer, SparseMoEResNetBKLayer)


def test_configurable_mixed_precision_runs():
    m = ConfigurableResNetBK(vocab_size=V, d_model=D, n_layers=1, n_seq=NS, use_mixed_precision=True)
    x = torch.randint(0, V, (2, 8))
    loss, _ = m.training_loss(x, x)
    loss.backward()
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ training

def test_corpus_is_deterministic_stdlib_bytes(tmp_path):
    from resnet_bk.training.train import load_corpus
    a = load_corpus(max_bytes=5000)
    assert len(a) == 5000 and a == load_corpus(max_bytes=5000)
    (tmp_path / "b.txt").write_bytes(b"world")
    (tmp_path / "a.txt").write_bytes(b"hello ")
    assert load_corpus(str(tmp_path), max_bytes=100) == b"hello \nworld\n"
    with pytest.raises(ValueError, match="data_dir"):
        load_corpus(str(tmp_path / "missing"))


@pytest.mark.parametrize("name", ["plain", "act", "multiscale", "hierarchical"])
def test_tiny_training_reduces_loss(name):
    from resnet_bk.training.train import train
    res = train(name, max_bytes=60_000, d_model=16, n_layers=2, n_seq=32, batch_size=8, steps=40, lr=1e-2,
                eval_batches=2, progress=False, threads=1)
    assert res["final_train_loss"] < res["first_loss"] - 0.5, res
    assert res["val_ppl"] < 256 and res["ms_per_train_step"] > 0


def test_registry_is_extensible():
    from resnet_bk.training import train as tmod
    tmod.register_model("tiny-test", lambda vocab_size, d_model, n_layers, n_seq, backend=None:
                        LanguageModel(vocab_size, d_model, 1, n_seq, backend=backend))
    try:
        res = tmod.train("tiny-test", max_bytes=20_000, d_model=8, n_seq=16, batch_size=4, steps=3,
                         eval_batches=1, progress=False, threads=1)
        assert res["steps"] == 3 and isinstance(res["model"], LanguageModel)
    finally:
        tmod.MODELS.pop("tiny-test")
    with pytest.raises(ValueError, match="model_name"):
        tmod.train("nope")


@pytest.mark.parametrize("cls", [MultiScaleResNetBKLayer, HierarchicalMultiScaleLayer])
@pytest.mark.parametrize("N", [NS, 7])
def test_multiscale_fused_paths_match_unfused_formula(cls, N):
    """The folded upsample bias / single-addmm mixer give the unfused formulas' values and gradients:
    u = ops.learned_upsample(W y + b, position_bias); out = u + mixer(x + u) (per level)."""
    from resnet_bk import ops
    from resnet_bk.models.multi_scale import _pad_to
    torch.manual_seed(1)
    layer = cls(D, NS).double().eval()
    for p in layer.parameters():  # non-trivial biases, scales and pooling weights
        torch.nn.init.normal_(p, std=0.3)

    def up_ref(up, y, residual=None):
        return ops.learned_upsample(up.upsample_transform(y), up.position_bias, residual=residual,
                                    backend="reference")

    def ref(x):
        n = x.shape[1]
        if cls is MultiScaleResNetBKLayer:
            u = up_ref(layer.up, layer.low_layer(layer.down(x)))[:, :n]
            return u + layer.full_mixer(x + u)
        d1 = _pad_to(layer.down1(x), 2)
        u1 = up_ref(layer.up1, layer.bottleneck(layer.down2(d1)), residual=d1)
        u1 = u1 + layer.mid_mixer(u1)
        u2 = up_ref(layer.up2, u1)[:, :n]
        return u2 + layer.full_mixer(x + u2)

    x = torch.randn(2, N, D, dtype=torch.float64, requires_grad=True)
    out, expect = layer(x), ref(x)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the in-place accumulation path; the input must be left untouched
        x0 = x.detach().clone()
        torch.testing.assert_close(layer(x), expect, rtol=1e-10, atol=1e-10)
        assert torch.equal(x, x0)
    g = torch.randn_like(out)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(expect, params, g, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_learned_upsampling_folded_bias_matches_op():
    torch.manual_seed(2)
    up = LearnedUpsampling(D, NS // 2)
    torch.nn.init.normal_(up.position_bias)
    y = torch.randn(3, 5, D)
    expect = ops_learned_upsample_ref(up.upsample_transform(y), up.position_bias)
    torch.testing.assert_close(up(y), expect)


def ops_learned_upsample_ref(z, bias):
    from resnet_bk import ops
    return ops.learned_upsample(z, bias, backend="reference")
