"""Issue 20 item 8: ``EarlyExitLanguageModel`` (seeds/000) with the design's names and signatures,
whose early exit really skips the exited tokens' work in the later blocks."""
import pytest
import torch
import torch.nn.functional as F

from resnet_bk.models import EarlyExitLanguageModel, EarlyExitResNetBKBlock

V, D, N, L = 40, 16, 24, 4


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return EarlyExitLanguageModel(V, D, L, N, dropout_p=0.0, **kw).eval()


def _reference(m, x, thr, confidence="softmax"):
    """Every block on every token (dense), with the early-exit semantics: an exited token keeps its
    state and its potential (frozen at its last block) and its logits are its exit's."""
    h = m.token_embedding(x) + m.position_embedding(torch.arange(x.shape[1]))
    B, n = x.shape
    running = torch.ones(B, n, dtype=torch.bool)
    v_frozen = torch.zeros(B, n)
    out = torch.zeros(B, n, V)
    layer = torch.full((B, n), L - 1)
    for l, block in enumerate(m.blocks):
        ffn, v = block.bk_layer.ffn_and_potential(block.layer_norm(h))
        v_used = torch.where(running, v, v_frozen)
        h_new = h + block.bk_layer.mix_output(ffn, block.bk_layer.bk_features(v_used))
        h = torch.where(running[..., None], h_new, h)
        v_frozen = v_used
        if l == L - 1:
            break
        lg = block.exit_classifier(h)
        score = (torch.softmax(lg, -1).amax(-1) if confidence == "softmax"
                 else torch.sigmoid(block.confidence_head(h).squeeze(-1)))
        ex = running & (score >= thr)
        out[ex] = lg[ex]
        layer[ex] = l
        running &= ~ex
    final = m.lm_head(m.layer_norm_final(h))
    out[running] = final[running]
    return out, layer


def _count_moe_rows(m):
    rows = []
    hooks = [b.bk_layer.moe_ffn.register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].reshape(-1, D).shape[0])) for b in m.blocks]
    return rows, hooks


def test_design_names_and_signatures():
    m = EarlyExitLanguageModel(V, d_model=D, n_layers=L, n_seq=N, num_experts=4, top_k=1, dropout_p=0.1,
                               confidence_threshold=0.9)
    assert isinstance(m.blocks[0], EarlyExitResNetBKBlock) and m.blocks[-1].exit_classifier is None
    x = torch.randint(0, V, (2, N))
    assert m(x).shape == (2, N, V)                               # use_early_exit=False: logits only
    logits, info = m(x, use_early_exit=True)
    assert logits.shape == (2, N, V)
    assert set(info) >= {"exit_layers", "exit_confidences", "exited_mask"}
    st = m.get_exit_statistics()
    assert set(st) >= {"avg_exit_layer", "exit_distribution", "speedup_estimate", "total_tokens_processed"}
    assert st["total_tokens_processed"] == 2 * N
    m.reset_exit_statistics()
    assert m.get_exit_statistics()["total_tokens_processed"] == 0
    h, exit_logits = m.blocks[0](torch.randn(2, N, D))
    assert h.shape == (2, N, D) and exit_logits.shape == (2, N, V)
    with pytest.raises(ValueError, match="confidence_threshold"):
        EarlyExitLanguageModel(V, D, L, N, confidence_threshold=0.0)


def test_no_confident_token_equals_the_full_forward():
    m = _model(confidence_threshold=1.0)
    x = torch.randint(0, V, (3, N))
    with torch.no_grad():
        full = m(x)
        early, info = m(x, use_early_exit=True)
    torch.testing.assert_close(early, full, rtol=1e-5, atol=1e-6)
    assert info["avg_layers_executed"] == L and not info["exited_mask"].any()


def test_exited_tokens_skip_the_later_blocks_and_match_the_dense_reference(one_thread):
    m = _model(1)
    x = torch.randint(0, V, (3, N))
    with torch.no_grad():
        c0 = torch.softmax(m.blocks[0].exit_classifier(m.blocks[0].process(m.embed(x))), -1).amax(-1)
        thr = float(c0.median())                                  # about half the tokens leave at block 0
        m.confidence_threshold = thr
        ref, ref_layer = _reference(m, x, thr)
        rows, hooks = _count_moe_rows(m)
        logits, info = m(x, use_early_exit=True)
        for h in hooks:
            h.remove()
    assert torch.equal(info["exit_layers"], ref_layer)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    exited0 = int((ref_layer == 0).sum())
    assert 0 < exited0 < 3 * N
    # The MoE FFN of blocks 1.. ran on the tokens still running only: real skipped work.
    assert rows[0] == 3 * N and rows[1] == 3 * N - exited0
    assert sum(rows) == info["tokens_run"] < L * 3 * N
    assert info["avg_layers_executed"] == pytest.approx(float((ref_layer + 1).float().mean()))
    # A low threshold: every token leaves at block 0 and the other blocks are not executed at all.
    m.confidence_threshold = 1e-6
    rows, hooks = _count_moe_rows(m)
    with torch.no_grad():
        _, info = m(x, use_early_exit=True)
    for h in hooks:
        h.remove()
    assert rows == [3 * N] and info["blocks_skipped"] == L - 1 and info["avg_layers_executed"] == 1.0


def test_learned_confidence_runs_the_exit_classifier_on_exiting_tokens_only(one_thread):
    m = _model(3, confidence="head")
    x = torch.randint(0, V, (3, N))
    with torch.no_grad():
        s0 = torch.sigmoid(m.blocks[0].confidence_head(m.blocks[0].process(m.embed(x))).squeeze(-1))
        thr = float(s0.median())
        m.confidence_threshold = thr
        ref, ref_layer = _reference(m, x, thr, confidence="head")
        rows, hooks = _count_moe_rows(m)
        exit_rows = []
        hooks += [b.exit_classifier.register_forward_hook(lambda mod, inp, out: exit_rows.append(inp[0].shape[0]))
                  for b in m.blocks[:-1]]
        logits, info = m(x, use_early_exit=True)
        for h in hooks:
            h.remove()
    assert torch.equal(info["exit_layers"], ref_layer)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    n_exited = int(info["exited_mask"].sum())
    assert 0 < n_exited and sum(exit_rows) == n_exited            # exit logits only for the tokens leaving
    assert sum(rows) == info["tokens_run"] < L * 3 * N
    with pytest.raises(ValueError, match="confidence"):
        EarlyExitLanguageModel(V, D, L, N, confidence="entropy")


def test_training_loss_trains_every_exit_and_early_exit_forward_has_gradient(one_thread):
    m = _model(2).train()
    x = torch.randint(0, V, (2, N))
    y = torch.randint(0, V, (2, N))
    loss, metrics = m.training_loss(x, y)
    assert set(metrics) >= {"ce_loss", "exit_ce_loss", "confidence_loss"}
    loss.backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, unused                                     # DDP-safe: every parameter takes part
    m.zero_grad()
    m.confidence_threshold = 1.5 / V            # some tokens exit early at initialisation
    logits, info = m(x, use_early_exit=True)
    F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    assert m.blocks[0].exit_classifier[1].weight.grad is not None


def test_use_early_exit_default_from_the_constructor():
    m = _model(use_early_exit=True, confidence_threshold=1.0)
    out = m(torch.randint(0, V, (1, N)))
    assert isinstance(out, tuple) and out[0].shape == (1, N, V)
    assert m(torch.randint(0, V, (1, N)), use_early_exit=False).shape == (1, N, V)
