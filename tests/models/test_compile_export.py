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
from resnet_bk.models import ConfigurableResNetBK, LanguageModel, SparseLanguageModel, SparseMoELayer, moe_aux_loss

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
