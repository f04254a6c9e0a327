"""torch.export and torch.compile of the models (issue 20, item 4): export in eval equals eager;
torch.compile(fullgraph=True) traces the plain LM (the MoE dispatch has no host read while tracing)
and a compiled training step gives eager's logits and gradients; compiled models compile once per
shape (no recompiles from Python counters). Most cases use the "aot_eager" backend (Dynamo +
AOTAutograd, forward and backward traced, no Inductor code generation: fast on 2 cores); one case
runs Inductor (slow lane)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk import ops
from resnet_bk.models import (ACTLanguageModel, AdaptiveSequenceLengthWrapper, ConfigurableResNetBK, LanguageModel,
                              SparseLanguageModel, SparseMoELayer, moe_aux_loss)

V, D, N = 29, 16, 12


def _lm(**kw):
    torch.manual_seed(0)
    return LanguageModel(V, d_model=D, n_layers=2, n_seq=N, num_experts=4, dropout_p=0.0, **kw)


EXPORTABLE = {
    "lm_top1": lambda: _lm(),
    "lm_top2": lambda: _lm(top_k=2),
    "lm_float64": lambda: _lm().double(),
    "configurable": lambda: ConfigurableResNetBK(vocab_size=V, d_model=D, n_layers=2, n_seq=N, dropout_p=0.0),
    "configurable_multi_scale": lambda: ConfigurableResNetBK(vocab_size=V, d_model=D, n_layers=2, n_seq=N,
                                                             dropout_p=0.0, use_multi_scale=True),
    # the MoE runs on the kept positions only: a data-dependent token count while tracing
    "sparse_lm": lambda: _half_sparse(SparseLanguageModel(V, d_model=D, n_layers=2, n_seq=N, dropout_p=0.0)),
}


def _half_sparse(m):
    """Importance bias 0 (built at 2.0: every position kept): about half the positions are masked in
    eval, a different number for different tokens (17 and 15 of 36 for the two batches below)."""
    for layer in m.sparse_layers():
        nn.init.zeros_(layer.sparse_bk_core.importance_predictor.bias)
    return m


def _tokens(B=3, n=N, seed=1):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def _close(got, ref):
    ops.assert_close(got, ref, tol=ops.tolerance(ref.dtype))


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_in_eval_equals_eager(name, one_thread):
    torch.manual_seed(0)
    m = EXPORTABLE[name]().eval()
    x = _tokens()
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        ref = m(x)
        got = ep.module()(x)
        _close(got, ref)
        x2 = _tokens(seed=2)  # other tokens (other routing), same shape
        _close(ep.module()(x2), m(x2))
    # export leaves no traced tensor behind on the module
    assert all(getattr(mm, "aux_loss", None) is None for mm in m.modules() if isinstance(mm, SparseMoELayer))


def _act(top_k=1):
    """3 blocks, threshold 0.5, halting bias -0.5: tokens halt after 1, 2 or 3 blocks; for the
    batches below every token has halted before block 3 in one (block 3 not run) and not in the
    other."""
    torch.manual_seed(0)
    return ACTLanguageModel(V, d_model=D, n_layers=3, n_seq=N, num_experts=4, top_k=top_k, dropout_p=0.0,
                            act_threshold=0.5, halt_bias_init=-0.5)


def _act_configurable():
    torch.manual_seed(0)
    m = ConfigurableResNetBK(vocab_size=V, d_model=D, n_layers=3, n_seq=N, dropout_p=0.0,
                             use_adaptive_computation=True, act_threshold=0.5)
    with torch.no_grad():
        for b in m.model.blocks:
            b.halting_unit[2].bias.fill_(-0.5)
    return m


def _moe_counts(mod):
    """Tokens each MoE layer of the (eager or exported) module has run so far."""
    return [int(b) for n, b in sorted(mod.named_buffers()) if n.endswith("moe_ffn._tokens_seen")]


def _act_stats(mod):
    b = dict(mod.named_buffers())
    pre = "model." if "model._tokens_run" in b else ""
    return int(b[pre + "_tokens_run"]), int(b[pre + "_blocks_skipped"])


@pytest.mark.parametrize("name", ["act_top1", "act_top2", "configurable_act"])
def test_act_export_equals_eager_where_halting_differs(name, one_thread):
    """ACT exported in eval: the running-token compaction is in the graph (data-dependent sizes),
    so the exported program equals eager on batches that halt differently, runs the MoE on the
    same tokens as eager, and counts the same layers."""
    m = {"act_top1": lambda: _act(), "act_top2": lambda: _act(top_k=2), "configurable_act": _act_configurable}[name]()
    m.eval()
    ep = torch.export.export(m, (_tokens(seed=1),))
    mod = ep.module()
    seen = []
    for seed in (1, 3):
        x = _tokens(seed=seed)
        with torch.no_grad():
            before_e = _moe_counts(m)
            ref = m(x)
            stats = _act_stats(m)
            moe_e = [a - b for a, b in zip(_moe_counts(m), before_e)]
            for n, b in mod.named_buffers():  # (the exported module may share these tensors with m)
                if n.endswith(("_tokens_run", "_blocks_skipped")):
                    b.fill_(-1)
            before_x = _moe_counts(mod)
            got = mod(x)
            moe_x = [a - b for a, b in zip(_moe_counts(mod), before_x)]
        for g, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            _close(g, r)
        assert _act_stats(mod) == stats  # layers run / skipped, counted by the exported program
        assert moe_x == moe_e and moe_e[0] == x.numel() and moe_e[-1] < x.numel()  # compute saving kept
        seen.append((stats, moe_e))
    # the batches halt differently: other token counts per block, and block 3 skipped in one only
    assert seen[0] != seen[1]
    assert sorted(s[1] for s, _ in seen) == [0, 1]


def _length_wrapper():
    torch.manual_seed(0)
    base = LanguageModel(V, d_model=D, n_layers=2, n_seq=N, num_experts=4, dropout_p=0.0)
    w = AdaptiveSequenceLengthWrapper(base, N, num_length_bins=4)  # bins 3, 6, 9, 12
    with torch.no_grad():
        w.length_predictor.net[-1].weight.mul_(20.0)  # choices that differ between batches
    return w


def test_learned_length_export_equals_eager_where_lengths_differ(one_thread):
    """The length wrapper exported in eval: one base-model call per bin length on the rows that
    chose it (a data-dependent batch, possibly empty), equal to eager (which groups lengths into
    at most 2 calls) on batches with other lengths; the base model runs only the chosen lengths."""
    w = _length_wrapper().eval()
    B = 4
    ep = torch.export.export(w, (_tokens(B, seed=1),))
    mod = ep.module()
    lens = []
    for seed in (1, 2, 5):
        x = _tokens(B, seed=seed)
        with torch.no_grad():
            ref, info = w(x)
            before = _moe_counts(mod)
            got, ginfo = mod(x)
            moe = [a - b for a, b in zip(_moe_counts(mod), before)]
        _close(got, ref)
        assert torch.equal(ginfo["predicted_lengths"], info["predicted_lengths"])
        _close(ginfo["expected_length"], info["expected_length"])
        run = int(info["predicted_lengths"].sum())
        assert int(ginfo["tokens_processed"]) == run and moe == [run, run] and run < x.numel()
        lens.append((info["predicted_lengths"].tolist(), info["num_groups"], info["tokens_processed"]))
    assert len({tuple(l) for l, _, _ in lens}) == 3  # three batches, three different length choices
    # batch 1: three distinct lengths, merged by eager into 2 calls (a rectangle that runs more
    # tokens than chosen); batch 5: a single length (the other bins' calls run on 0 rows)
    assert len(set(lens[0][0])) == 3 and lens[0][1] == 2 and lens[0][2] > sum(lens[0][0])
    assert len(set(lens[2][0])) == 1


class _ForwardOnlyPredictor(nn.Module):
    """A custom predictor with only the documented forward (no bin_logits/choose)."""

    def __init__(self, bins):
        super().__init__()
        self.lin = nn.Linear(D, 3)
        self.length_bins = bins

    def forward(self, emb, return_distribution=False):
        p = torch.softmax(30.0 * self.lin(emb.mean(1)), -1)
        lengths = torch.tensor([2, 5, 12])[p.argmax(-1)]
        return (lengths, p) if return_distribution else lengths


def test_learned_length_export_custom_predictor_bins(one_thread):
    """A custom predictor's bins as a Python sequence are read on the host: export equals eager on
    batches choosing other lengths; bins only as a tensor (unreadable while exporting) raise,
    naming length_predictor."""
    torch.manual_seed(0)
    w = AdaptiveSequenceLengthWrapper(LanguageModel(V, d_model=D, n_layers=2, n_seq=N, dropout_p=0.0), N,
                                      num_length_bins=3).eval()
    w.length_predictor = _ForwardOnlyPredictor([2, 5, 12])
    ep = torch.export.export(w, (_tokens(4, seed=1),))
    chosen = set()
    for seed in (1, 2):
        x = _tokens(4, seed=seed)
        with torch.no_grad():
            ref, info = w(x)
            _close(ep.module()(x)[0], ref)
        chosen.add(tuple(info["predicted_lengths"].tolist()))
    assert len(chosen) == 2
    w.length_predictor = _ForwardOnlyPredictor(torch.tensor([2, 5, 12]))
    with pytest.raises(TypeError, match="length_predictor: torch.export needs the bin lengths on the host"):
        torch.export.export(w, (_tokens(4, seed=1),))


def test_act_and_length_wrapper_compile_without_recompiling_per_call(one_thread):
    """Plain torch.compile (graphs broken at the data-dependent gathers): after the second call
    (shapes go dynamic once) no batch adds a graph, and the models' statistics still count."""
    import torch._dynamo
    for make, B in ((_act, 3), (_length_wrapper, 4)):
        torch._dynamo.reset()
        m = make().eval()
        counter = _CountingBackend()
        cm = torch.compile(m, backend=counter)
        graphs = []
        for seed in range(5):
            x = _tokens(B, seed=seed)
            with torch.no_grad():
                got = cm(x)
                stats_c = m.get_length_statistics() if B == 4 else _act_stats(m)
                ref = m(x)
            _close(got[0], ref[0])
            if B == 3:
                assert stats_c == _act_stats(m)
            graphs.append(counter.graphs)
        assert graphs[2:] == [graphs[1]] * 3, graphs
        if B == 4:  # 5 compiled + 5 eager forwards recorded
            assert m.get_length_statistics()["total_predictions"] == 10 * B


class _CountingBackend:
    def __init__(self, backend="aot_eager"):
        self.graphs = 0
        self.backend = backend

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.backend == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)


def _loss(model, logits, y):
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return ce + 0.01 * moe_aux_loss(model)


def _compiled_step_matches_eager(model_fn, backend, dtype=torch.float32):
    import torch._dynamo
    torch._dynamo.reset()
    eager = model_fn().to(dtype).train()
    comp = model_fn().to(dtype).train()
    comp.load_state_dict(eager.state_dict())
    counter = _CountingBackend(backend)
    cm = torch.compile(comp, backend=counter, fullgraph=True)
    x, y = _tokens(), _tokens(seed=3)
    for step in range(3):  # same shape every call: one graph, no recompile
        x = _tokens(seed=10 + step)
        le = eager(x)
        lc = cm(x)
        _close(lc, le)
        _loss(eager, le, y).backward()
        _loss(comp, lc, y).backward()
        for (n, pe), (_, pc) in zip(eager.named_parameters(), comp.named_parameters()):
            assert pc.grad is not None, n
            _close(pc.grad, pe.grad)
        eager.zero_grad(), comp.zero_grad()
    assert counter.graphs == 1
    moes = [mm for mm in comp.modules() if isinstance(mm, SparseMoELayer)]
    assert moes and all(mm.tokens_processed == 3 * x.numel() for mm in moes)


@pytest.mark.parametrize("top_k", [1, 2])
def test_fullgraph_compiled_train_step_equals_eager(top_k, one_thread):
    _compiled_step_matches_eager(lambda: _lm(top_k=top_k, learnable_z=True), "aot_eager")


def test_fullgraph_compiled_train_step_float64(one_thread):
    _compiled_step_matches_eager(lambda: _lm(), "aot_eager", torch.float64)


def test_fullgraph_inductor_train_step_equals_eager(one_thread):
    _compiled_step_matches_eager(lambda: _lm(), "inductor")


def test_compile_once_per_shape_and_counter_counts(one_thread):
    """Plain torch.compile: one graph for a shape whatever the routing, the counter still counts."""
    import torch._dynamo
    torch._dynamo.reset()
    m = _lm().eval()
    counter = _CountingBackend()
    cm = torch.compile(m, backend=counter)
    for seed in range(4):
        x = _tokens(seed=seed)
        with torch.no_grad():
            _close(cm(x), m(x))
    assert counter.graphs == 1
    moe = m.blocks[0].bk_layer.moe_ffn
    assert moe.tokens_processed == 2 * 4 * x.numel()  # compiled and eager calls
    moe.tokens_processed = 0
    assert moe.tokens_processed == 0


class _CustomExpert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("custom", [False, True])
def test_moe_layer_traced_dispatch_equals_eager_with_an_idle_expert(top_k, custom, one_thread):
    """The layer traced with fullgraph=True (the op, or the masked dense form for custom experts)
    against eager, output and every gradient, with a router that leaves expert 3 without tokens."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = SparseMoELayer(8, 4, top_k, 0.0).double()
    if custom:
        m.experts = nn.ModuleList([_CustomExpert(8) for _ in range(4)]).double()
    with torch.no_grad():
        m.gating_network.bias[3] = -100.0  # expert 3 never chosen
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    ref = m(x)
    gref = torch.autograd.grad((ref * ref).sum(), [x] + list(m.parameters()), allow_unused=True)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = cm(x)
    ggot = torch.autograd.grad((got * got).sum(), [x] + list(m.parameters()), allow_unused=True)
    _close(got, ref)
    for a, b in zip(ggot, gref):
        assert a is not None and b is not None  # every parameter is in the graph, idle expert included
        _close(a, b)
    idle = list(m.experts[3].parameters())
    assert all(float(g.abs().max()) == 0 for g, p in zip(gref[1:], m.parameters()) if any(p is q for q in idle))


def test_compile_new_shapes_go_dynamic_not_one_graph_each(one_thread):
    """A second batch size and a second length each recompile once (Dynamo's automatic dynamic
    shapes, through the MoE op's fake kernel and the buffer counter); later shapes reuse the graph."""
    import torch._dynamo
    torch._dynamo.reset()
    m = _lm().eval()
    counter = _CountingBackend()
    cm = torch.compile(m, backend=counter)
    graphs = []
    for shape in [(2, 12), (3, 12), (3, 8), (4, 10), (5, 12), (2, 3)]:
        x = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            _close(cm(x), m(x))
        graphs.append(counter.graphs)
    assert graphs == [1, 2, 3, 3, 3, 3]
