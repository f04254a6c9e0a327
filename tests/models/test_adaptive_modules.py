"""Learned sparsity, learned sequence length, learnable position bucketing, data-efficiency trainers."""
import copy

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import resnet_bk.ops as ops
from resnet_bk.models.base import LanguageModel
from resnet_bk.models.bucketing import LearnableBucketLandmark, attach_bucket_landmark
from resnet_bk.models.learned_length import AdaptiveSequenceLengthWrapper, SequenceLengthPredictor
from resnet_bk.models.sparse import SparseBKCore, SparseLanguageModel, SparseMoEResNetBKLayer, sparsity_loss
from resnet_bk.training.data_efficiency import (ActiveLearningSelector, CurriculumLearningScheduler,
                                                GradientCachingTrainer, model_logits)
from resnet_bk.training.learned_length import LearnedSequenceLengthTrainer
from resnet_bk.training.sparsity import AdaptiveSparsityScheduler

V, D, NSEQ = 64, 16, 32


# ----------------------------------------------------------------------------------------------
# Learned sparsity
# ----------------------------------------------------------------------------------------------
def test_sparse_core_shapes_and_exact_computed_positions():
    torch.manual_seed(0)
    core = SparseBKCore(D, NSEQ, causal=True).eval()
    core.importance_predictor.bias.data.zero_()  # about half the positions computed
    x = torch.randn(3, 21, D)  # N < n_seq
    v = torch.randn(3, 21)
    feats, mask, ratio = core(x, v, return_sparsity_ratio=True)
    assert feats.shape == (3, 21, 2) and mask.shape == (3, 21) and ratio.dim() == 0
    assert 0 < ratio.item() < 1
    he, sup, sub, z = core._h(v)
    exact = torch.view_as_real(ops.bk_core(he, sup, sub, z, causal=True))
    m = mask.bool()
    # Computed positions are the exact G_ii of the full H (no dropped couplings, per-row mask).
    torch.testing.assert_close(feats[m], exact[m], rtol=1e-5, atol=1e-6)
    # Skipped positions are the interpolator's estimate, not the exact value.
    assert not torch.allclose(feats[~m], exact[~m])


def test_sparse_core_one_batched_masked_call(monkeypatch):
    calls = []
    real = ops.bk_core_masked

    def spy(diag, sup, sub, z, mask, **kw):
        calls.append((tuple(diag.shape), tuple(mask.shape)))
        out = real(diag, sup, sub, z, mask, **kw)
        zero = mask.detach() == 0
        assert bool((out[zero] == 0).all()), "masked positions must be skipped (zero) by the op"
        return out

    monkeypatch.setattr(ops, "bk_core_masked", spy)
    core = SparseBKCore(D, NSEQ)
    core(torch.randn(5, NSEQ, D), torch.randn(5, NSEQ))
    assert calls == [((5, NSEQ), (5, NSEQ))]


def test_sparse_core_causal_interpolation():
    """Perturbing position t must not change features at positions < t (causal interpolator)."""
    torch.manual_seed(1)
    core = SparseBKCore(D, NSEQ, causal=True).eval()
    core.importance_predictor.bias.data.zero_()
    x = torch.randn(2, 20, D)
    v = torch.randn(2, 20)
    f1, _ = core(x, v)
    x2, v2 = x.clone(), v.clone()
    x2[:, 12:] += 3.0
    v2[:, 12:] -= 1.0
    f2, _ = core(x2, v2)
    torch.testing.assert_close(f1[:, :12], f2[:, :12])


def test_sparse_gradients_reach_importance_predictor():
    torch.manual_seed(0)
    core = SparseBKCore(D, NSEQ)
    core.importance_predictor.bias.data.zero_()
    feats, mask = core(torch.randn(2, NSEQ, D), torch.randn(2, NSEQ))
    feats.pow(2).sum().backward()
    g = core.importance_predictor.weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["l2", "l1", "kl", "adaptive"])
def test_sparsity_loss_has_gradient(loss_type):
    torch.manual_seed(0)
    layer = SparseMoEResNetBKLayer(D, NSEQ, target_sparsity=0.5, sparsity_loss_type=loss_type)
    layer.sparse_bk_core.importance_predictor.bias.data.fill_(3.0)  # ~0% sparsity: far from target
    layer(torch.randn(2, NSEQ, D))
    loss = layer.get_sparsity_loss()
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    g = layer.sparse_bk_core.importance_predictor.bias.grad
    # Raising sparsity towards the target means lowering the keep logits: d loss / d bias > 0.
    assert g is not None and g.item() > 0
    stats = layer.get_sparsity_stats()
    assert stats["num_positions"] == 2 * NSEQ and stats["target_sparsity"] == 0.5


def test_sparse_layer_skips_ffn_on_masked_positions():
    """skip_ffn: the MoE runs on exactly the kept positions (counted, machine-independent) and the
    output equals the dense reference (FFN on every position, then masked)."""
    torch.manual_seed(0)
    layer = SparseMoEResNetBKLayer(D, NSEQ, dropout_p=0.0).eval()
    layer.sparse_bk_core.importance_predictor.bias.data.zero_()  # about half the positions kept
    x = torch.randn(3, NSEQ, D)
    before = layer.moe_ffn.tokens_processed
    out = layer(x)
    kept = int(layer.last_mask_detached.sum())
    assert layer.moe_ffn.tokens_processed - before == kept
    assert 0 < kept < x.shape[0] * NSEQ
    layer.use_sparse_computation = False
    ref = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layer.use_sparse_computation = True
    layer.train()
    layer(x.requires_grad_()).sum().backward()
    assert layer.sparse_bk_core.importance_predictor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_interpolator_matmul_equals_its_convolutions(causal):
    torch.manual_seed(0)
    core = SparseBKCore(D, NSEQ, causal=causal)
    f, m = torch.randn(2, NSEQ, 2), (torch.rand(2, NSEQ) > 0.5).float()
    inp = torch.nn.functional.pad(torch.cat([f, m.unsqueeze(-1)], -1).transpose(1, 2), (2, 0) if causal else (1, 1))
    torch.testing.assert_close(core.interpolate(f, m), core.interpolator(inp).transpose(1, 2))


def test_sparsity_loss_values_and_bad_type():
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0]], requires_grad=True)  # sparsity 0.25
    assert sparsity_loss(m, 0.5, "l2").item() == pytest.approx(0.0625)
    assert sparsity_loss(m, 0.5, "l1").item() == pytest.approx(0.25)
    assert sparsity_loss(m, 0.5, "adaptive").item() == pytest.approx(0.1 * (0.25 - 0.05))
    with pytest.raises(ValueError, match="loss_type"):
        sparsity_loss(m, 0.5, "l3")


def test_sparse_lm_training_loss_and_scheduler():
    torch.manual_seed(0)
    lm = SparseLanguageModel(V, D, 2, NSEQ, sparsity_loss_weight=1.0)
    x = torch.randint(0, V, (2, 24))
    loss, metrics = lm.training_loss(x, x)
    loss.backward()
    assert lm.sparse_layers()[0].sparse_bk_core.importance_predictor.weight.grad is not None
    assert 0 <= metrics["sparsity"].item() <= 1
    sch = AdaptiveSparsityScheduler(0.1, 0.5, 0.001, 0.01, warmup_steps=4, schedule_type="linear",
                                    accuracy_threshold=0.5)
    held = sch.step(current_accuracy=0.1)
    assert held["progress"] == 0.0 and held["step"] == 1
    for _ in range(4):
        out = sch.step(current_accuracy=0.9)
    assert out["sparsity_target"] == pytest.approx(0.5) and out["loss_weight"] == pytest.approx(0.01)
    assert sch.apply_to(lm) == 2 and lm.sparse_layers()[1].target_sparsity == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# Learned sequence length
# ----------------------------------------------------------------------------------------------
def _wrapper(seed=0):
    torch.manual_seed(seed)
    base = LanguageModel(V, D, 1, NSEQ, dropout_p=0.0)
    return base, AdaptiveSequenceLengthWrapper(base, max_seq_len=NSEQ, num_length_bins=4, length_penalty=0.1)


def test_length_predictor_bins():
    p = SequenceLengthPredictor(D, 128, 8)
    assert p.length_bins.tolist() == [16, 32, 48, 64, 80, 96, 112, 128]
    lengths, probs = p.eval()(torch.randn(3, 50, D), return_distribution=True)
    assert lengths.shape == (3,) and probs.shape == (3, 8)


def test_learned_length_groups_run_shorter(monkeypatch):
    base, w = _wrapper()
    w.max_groups = None  # one group per distinct length
    w.eval()
    # Force distinct predictions: bins 8, 16, 24, 32 for the four sequences.
    with torch.no_grad():
        head = w.length_predictor.net[-1]
        head.weight.zero_()
        head.bias.zero_()
    seen = []
    real_forward = base.forward
    monkeypatch.setattr(base, "forward", lambda x: (seen.append(tuple(x.shape)), real_forward(x))[1])
    x = torch.randint(0, V, (4, NSEQ))
    forced = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 9.0, 0], [0, 0, 0, 9.0]])
    monkeypatch.setattr(w.length_predictor, "bin_logits", lambda emb: forced)
    logits, info = w(x)
    assert sorted(seen) == [(1, 8), (1, 16), (1, 24), (1, 32)]
    assert info["tokens_processed"] == 80 and info["speedup_estimate"] == pytest.approx(128 / 80)
    # Run positions equal the full model's logits (causal base), others are the zero placeholder.
    full = real_forward(x)
    torch.testing.assert_close(logits[0, :8], full[0, :8], rtol=1e-4, atol=1e-5)
    assert bool((logits[0, 8:] == 0).all()) and torch.isfinite(logits).all()
    # Dropped real tokens cost exactly log V each.
    y = torch.randint(0, V, (4, NSEQ))
    y_only_dropped = torch.full_like(y, -100)
    y_only_dropped[0, 8:] = y[0, 8:]
    _, ce, _ = w.compute_loss(logits, y_only_dropped, info)
    assert ce.item() == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=1e-5)
    stats = w.get_length_statistics()
    assert stats["total_predictions"] == 4 and stats["avg_predicted_length"] == 20.0


def test_learned_length_merged_groups_same_logits_fewer_calls(monkeypatch):
    """max_groups=2: the four predicted lengths 8, 16, 24, 32 run as two base-model calls at the
    token-minimising split (8+16 at 16, 24+32 at 32: 2*16 + 2*32 = 96 positions), and the logits
    are those of exact grouping (causal base)."""
    base, w = _wrapper()
    w.eval()
    forced = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 9.0, 0], [0, 0, 0, 9.0]])
    monkeypatch.setattr(w.length_predictor, "bin_logits", lambda emb: forced)
    x = torch.randint(0, V, (4, NSEQ))
    w.max_groups = None
    exact, _ = w(x)
    seen = []
    real_forward = base.forward
    monkeypatch.setattr(base, "forward", lambda x: (seen.append(tuple(x.shape)), real_forward(x))[1])
    w.max_groups = 2
    logits, info = w(x)
    assert sorted(seen) == [(2, 16), (2, 32)]
    assert info["num_groups"] == 2 and info["tokens_processed"] == 96
    assert info["avg_predicted_length"] == 20.0
    torch.testing.assert_close(logits, exact, rtol=1e-4, atol=1e-5)
    assert bool((logits[0, 8:] == 0).all())
    w.max_groups = 1
    seen.clear()
    w(x)
    assert seen == [(4, 32)]


def test_learned_length_predictor_gets_gradient_and_trainer():
    base, w = _wrapper(1)
    opt = torch.optim.Adam(w.parameters(), lr=1e-3)
    tr = LearnedSequenceLengthTrainer(w, opt)
    x = torch.randint(0, V, (6, NSEQ))
    y = torch.randint(0, V, (6, NSEQ))
    logits, info = w(x)
    total, ce, cost = w.compute_loss(logits, y, info)
    total.backward()
    g = w.length_predictor.net[-1].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert cost.requires_grad
    opt.zero_grad()
    out = tr.train_step(x, y)
    assert set(out) >= {"total_loss", "ce_loss", "length_cost", "avg_predicted_length", "speedup_estimate"}
    ev = tr.evaluate([(x, y), (x[:2], y[:2])], measure_time=True)
    assert ev["total_predictions"] == 8 and ev["perplexity"] > 1
    assert ev["avg_speedup"] == pytest.approx(ev["tokens_total"] / ev["tokens_processed"])
    assert ev["measured_time_speedup"] > 0


def test_learned_length_learns_to_skip_padding():
    """Inputs with content in the first 8 positions and padding after: the predictor should learn
    to run short sequences (the padding costs CE nothing, the penalty charges length)."""
    torch.manual_seed(0)
    base = LanguageModel(V, D, 1, NSEQ, dropout_p=0.0)
    w = AdaptiveSequenceLengthWrapper(base, NSEQ, 4, length_penalty=1.0)
    with torch.no_grad():  # start by predicting the full length
        w.length_predictor.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))
    opt = torch.optim.Adam(w.length_predictor.parameters(), lr=0.05)
    tr = LearnedSequenceLengthTrainer(w, opt)
    x = torch.zeros(16, NSEQ, dtype=torch.long)
    x[:, :8] = torch.randint(1, V, (16, 8))
    y = torch.full((16, NSEQ), -100)
    y[:, :7] = x[:, 1:8]
    assert tr.evaluate([(x, y)])["avg_predicted_length"] == NSEQ
    for _ in range(15):
        tr.train_step(x, y)
    ev = tr.evaluate([(x, y)])
    assert ev["avg_predicted_length"] < 16, ev
    assert ev["avg_speedup"] > 2


def test_learned_length_drop_cost_gradient_is_exact(monkeypatch):
    """The predictor's gradient is that of the expected cost of its choice: sum over bins of
    p_b * (real targets at or past L_b) * (log V - mean CE) / real targets, plus the length penalty;
    the added term is zero in value."""
    base, w = _wrapper(2)
    w.train()
    lg = torch.randn(5, 4, requires_grad=True)
    monkeypatch.setattr(w.length_predictor, "bin_logits", lambda emb: lg)
    x = torch.randint(0, V, (5, NSEQ))
    y = torch.randint(0, V, (5, NSEQ))
    real = torch.tensor([3, 9, 17, 30, 32])
    y[torch.arange(NSEQ)[None, :] >= real[:, None]] = -100
    logits, info = w(x)
    total, ce, cost = w.compute_loss(logits, y, info)
    torch.testing.assert_close(total.detach(), (ce + cost).detach())
    (g,) = torch.autograd.grad(total, lg)
    lg2 = lg.detach().clone().requires_grad_()
    p = torch.softmax(lg2, -1)
    bins = w.length_predictor.length_bins                      # 8, 16, 24, 32
    dropped = torch.stack([((y != -100) & (torch.arange(NSEQ)[None, :] >= L)).sum(1) for L in bins], 1).float()
    want = (w.length_penalty * (p * bins.float()).sum(1).mean() / NSEQ
            + (p * dropped).sum() * (math.log(V) - float(ce.detach())) / float((y != -100).sum()))
    (g_want,) = torch.autograd.grad(want, lg2)
    torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-7)


def test_learned_length_learns_short_and_keeps_long():
    """Mixed inputs, half with content in the first 8 positions and half full: the predictor learns
    to run the short ones short and keeps the long ones whole (no real target dropped)."""
    torch.manual_seed(0)
    base = LanguageModel(V, D, 1, NSEQ, dropout_p=0.0)
    w = AdaptiveSequenceLengthWrapper(base, NSEQ, 4, length_penalty=1.0)
    opt = torch.optim.Adam(w.parameters(), lr=0.03)
    tr = LearnedSequenceLengthTrainer(w, opt)
    # a learnable text (each token is the previous + 1), so that a dropped token costs log(V) minus
    # a cross-entropy well below it
    x = (torch.randint(0, V - 1, (16, 1)) + torch.arange(NSEQ)[None, :]) % (V - 1) + 1
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    x[:8, 8:] = 0
    y[:8, 7:] = -100
    for _ in range(60):
        tr.train_step(x, y)
    w.eval()
    with torch.no_grad():
        _, info = w(x)
    assert (info["predicted_lengths"][:8] <= 8).all(), info["predicted_lengths"]
    assert (info["predicted_lengths"][8:] == NSEQ).all(), info["predicted_lengths"]


# ----------------------------------------------------------------------------------------------
# Bucketing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [128, 1024])
def test_bucketing_spreads_positions(seq_len):
    lm = LearnableBucketLandmark(D, num_landmarks=4, max_positions=32768, num_buckets=32)
    w = lm.bucket_weights(seq_len)
    torch.testing.assert_close(w.sum(1), torch.ones(seq_len))
    assert bool((w >= 0).all())
    assert w.argmax(1).unique().numel() >= 24
    eff = (1.0 / (w ** 2).sum(1)).mean()
    assert eff < 3.0  # sharp assignments (the original smeared over ~16 buckets)


def test_bucketing_boundaries_gradient_and_state():
    torch.manual_seed(0)
    lm = LearnableBucketLandmark(D, num_landmarks=4, max_positions=2048, num_buckets=8)
    b = lm.bucket_boundaries
    assert bool((b[1:] > b[:-1]).all()) and b.min() > 0 and b.max() < 1
    h = torch.randn(2, 100, D)
    out = lm(h)
    assert out.shape == h.shape
    out.pow(2).sum().backward()
    assert lm.bucket_width_logits.grad is not None and lm.bucket_width_logits.grad.abs().sum() > 0
    assert "bucket_width_logits" in lm.state_dict()
    torch.testing.assert_close(lm.get_learned_boundaries(100), b.detach() * 100)
    # An original state dict (bucket_boundaries) loads and gives the same boundaries.
    sd = {k: v for k, v in lm.state_dict().items() if k != "bucket_width_logits"}
    sd["bucket_boundaries"] = b.detach().flip(0)
    lm2 = LearnableBucketLandmark(D, num_landmarks=4, max_positions=2048, num_buckets=8)
    lm2.load_state_dict(sd)
    torch.testing.assert_close(lm2.bucket_boundaries, b.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_size"):
        lm(torch.randn(1, 4, D + 1))


def test_bucketing_hook_idempotent_and_removable():
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D))
    ln = host[1]
    lm = LearnableBucketLandmark(D, num_landmarks=4, max_positions=512, num_buckets=8)
    with torch.no_grad():
        lm.scale.fill_(1.0)
    x = torch.randn(2, 40, D)
    before = host(x)
    keys_before = set(host.state_dict())
    h1 = attach_bucket_landmark(ln, lm)
    h2 = attach_bucket_landmark(ln, lm)
    assert h1 is h2
    attached = host(x)
    torch.testing.assert_close(attached, lm(before))  # applied exactly once
    assert any(k.endswith("bucket_landmark.bucket_width_logits") for k in host.state_dict())
    with pytest.raises(RuntimeError, match="already attached"):
        attach_bucket_landmark(ln, LearnableBucketLandmark(D, 4, 512, 8))
    h1.remove()
    assert torch.equal(host(x), before)
    assert set(host.state_dict()) == keys_before


# ----------------------------------------------------------------------------------------------
# Data efficiency
# ----------------------------------------------------------------------------------------------
class _ToyLM(nn.Module):
    """Returns (logits, extra) like ACT models do."""

    def __init__(self):
        super().__init__()
        self.vocab_size = V
        self.token_embedding = nn.Embedding(V, D)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.drop(self.token_embedding(x))), torch.zeros(())


def _data(n=24, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, N), generator=g), torch.randint(0, V, (n, N), generator=g)


def test_model_logits_handles_tuples():
    t = torch.randn(1, 2, 3)
    assert model_logits((t, 1.0)) is t and model_logits(t) is t
    with pytest.raises(TypeError):
        model_logits({"x": t})


def test_curriculum_batched_and_growing(monkeypatch):
    torch.manual_seed(0)
    model = _ToyLM()
    X, Y = _data()
    ds = TensorDataset(X, Y)
    calls = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (calls.append(x.shape[0]), real(x))[1])
    cur = CurriculumLearningScheduler(ds, model, "loss")
    d = cur.compute_difficulties(batch_size=8)
    assert calls == [8, 8, 8]  # batched, not one forward per example
    assert d.shape == (24,) and model.training  # mode restored
    # Matches per-example CE.
    model.eval()
    ref = torch.nn.functional.cross_entropy(model_logits(model(X[:1]))[0], Y[0])
    assert d[0].item() == pytest.approx(ref.item(), rel=1e-5)
    sizes = [len(cur.get_curriculum_dataloader(e, 4, 8).dataset) for e in range(4)]
    assert sizes == [6, 12, 18, 24]
    first = cur.get_curriculum_dataloader(0, 4, 8).dataset.indices
    assert max(d[first]) <= min(d[i] for i in range(24) if i not in first)
    st = cur.get_difficulty_statistics()
    assert st["min"] <= st["q25"] <= st["median"] <= st["q75"] <= st["max"]


@pytest.mark.parametrize("strategy", ActiveLearningSelector.STRATEGIES)
def test_active_selection(strategy):
    torch.manual_seed(0)
    model = _ToyLM()
    X, Y = _data()
    sel = ActiveLearningSelector(model, strategy)
    idx, unc = sel.select_examples(TensorDataset(X, Y), 5, batch_size=7)
    assert idx.shape == (5,) and unc.shape == (5,) and bool((unc[:-1] >= unc[1:]).all())
    all_u = sel.compute_uncertainties_batch(TensorDataset(X, Y), batch_size=7)
    if strategy != "variation_ratio":  # deterministic strategies: top-k of the whole pool
        assert torch.equal(torch.topk(all_u, 5).indices, idx)
        assert sel.compute_uncertainty(X[idx[0]]) == pytest.approx(unc[0].item(), rel=1e-5)
    with pytest.raises(ValueError, match="num_select"):
        sel.select_examples(TensorDataset(X, Y), 25)


def test_gradient_cache_hits_only_repeated_batches():
    torch.manual_seed(0)
    model = _ToyLM()
    model.drop.p = 0.0
    X, Y = _data(n=40, N=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    gc = GradientCachingTrainer(model, cache_size=20, similarity_threshold=0.9)
    for j in range(10):  # 10 unrelated random batches: no real hits
        _, used = gc.train_step(X[4 * j:4 * j + 4], Y[4 * j:4 * j + 4], opt, crit)
        assert not used
    snapshot = copy.deepcopy(model.state_dict())
    loss, used = gc.train_step(X[:4], Y[:4], opt, crit)  # repeat of batch 0: a real hit
    assert used
    assert not torch.equal(snapshot["head.weight"], model.state_dict()["head.weight"])  # update applied
    _, used_again = gc.train_step(X[:4], Y[:4], opt, crit)  # max_reuse=1: recomputed
    assert not used_again
    st = gc.get_cache_statistics()
    assert st["cache_hits"] == 1 and st["cache_misses"] == 11 and st["total_queries"] == 12
    assert st["hit_rate"] == pytest.approx(1 / 12) and st["cache_size"] == 11
