"""Incremental decoding (issue 19): every causal model's prefill + token-by-token logits equal its
full forward (float64 1e-10, float32 1e-5), ``generate`` (greedy == the full forward's argmax at
every step, sampling reproducible, eos padding), the cache's memory does not grow with the context,
gradients through cached calls are exact, and bad input raises clearly."""
import random

import pytest
import torch

from resnet_bk.models import (ACTLanguageModel, AdaptiveSequenceLengthWrapper, ConfigurableResNetBK,
                              EarlyExitLanguageModel, LanguageModel, ResNetBKConfig, SparseLanguageModel)
from resnet_bk.models.bucketing import LearnableBucketLandmark, attach_bucket_landmark
from resnet_bk.models.multi_scale import MultiScaleResNetBKBlock

from resnet_bk import ops

from helpers import rel_err

V, D, L, NSEQ = 50, 16, 2, 40
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _randomise(m):
    """Give the parameters that start at a neutral value (pool logits, position biases, the
    sparsity predictor) random values, so that the streamed windows and masks matter."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "pool_logits" in name or "position_bias" in name or "importance_predictor.weight" in name:
                p.normal_()
            if "importance_predictor.bias" in name:
                p.zero_()


def lm():
    return LanguageModel(V, D, L, NSEQ)


def act():
    # halting around the middle: tokens halt at different layers
    return ACTLanguageModel(V, D, 3, NSEQ, act_threshold=0.6, halt_bias_init=0.0)


def multi_scale(hier):
    return lambda: LanguageModel(V, D, L, NSEQ, block_factory=lambda i: MultiScaleResNetBKBlock(D, NSEQ, 4, hier))


def sparse(skip_ffn):
    return lambda: SparseLanguageModel(V, D, L, NSEQ, skip_ffn=skip_ffn)


def configurable(preset):
    return lambda: ConfigurableResNetBK(ResNetBKConfig.preset(preset, vocab_size=V, d_model=D, n_layers=L,
                                                              n_seq=NSEQ))


def with_landmarks():
    m = lm()
    attach_bucket_landmark(m.blocks[0], LearnableBucketLandmark(D, 4, max_positions=NSEQ, num_buckets=5))
    attach_bucket_landmark(m.layer_norm_final, LearnableBucketLandmark(D, 3, max_positions=NSEQ, num_buckets=3))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "bucket_width_logits" in name or "position_gates" in name:
                p.normal_()
            if name.endswith("bucket_landmark.scale"):
                p.fill_(1.0)
    return m


def early_exit():
    # a threshold at which tokens leave at different blocks (checked in test_early_exit_is_mixed)
    return EarlyExitLanguageModel(V, D, 4, NSEQ, confidence_threshold=0.05, use_early_exit=True)


MODELS = {
    "lm": lm, "act": act, "early_exit": early_exit, "multi_scale": multi_scale(False), "hierarchical": multi_scale(True),
    "sparse": sparse(True), "sparse_dense_ffn": sparse(False), "landmarks": with_landmarks,
    **{f"configurable_{p}": configurable(p) for p in ("baseline", "act", "multi_scale", "hierarchical", "sparse",
                                                      "memory_saving")},
}


def logits_of(m, x, cache=None):
    out = m(x, cache=cache) if cache is not None else m(x)
    return out[0] if isinstance(out, tuple) else out


# the fast lane (pytest -m "not slow") runs every model at B = 3 in float64; the rest is slow
CASES = [pytest.param(name, B, dt, id=f"{name}-{B}-{'f64' if dt == torch.float64 else 'f32'}",
                      marks=() if (B == 3 and dt == torch.float64) else pytest.mark.slow)
         for name in MODELS for B in (1, 3) for dt in (torch.float64, torch.float32)]


@pytest.mark.parametrize("name,B,dtype", CASES)
def test_cached_equals_full(name, B, dtype):
    torch.manual_seed(hash((name, B)) % 1000)
    m = MODELS[name]().to(dtype).eval()
    _randomise(m)
    N = 21
    x = torch.randint(0, V, (B, N))
    rng = random.Random(B)
    with torch.no_grad():
        full = logits_of(m, x)
        for trial in range(2):
            cache = m.init_cache(B, length=N)
            k = rng.randint(1, N - 1)  # a random prefill split, then chunks of 1 .. 3 and single tokens
            parts, p = [logits_of(m, x[:, :k], cache)], k
            while p < N:
                s = 1 if trial == 0 else min(N - p, rng.randint(1, 3))
                parts.append(logits_of(m, x[:, p:p + s], cache))
                p += s
            got = torch.cat(parts, 1)
            assert cache.position == N
            tol = TOL[dtype]
            if name == "configurable_memory_saving" and dtype == torch.float32:
                # bfloat16 autocast: the matmuls round to bf16, in other shapes on the two paths
                tol = ops.tolerance(torch.bfloat16)
            assert rel_err(got, full) < tol, (name, k)


def test_act_halts_the_same_tokens():
    """Mean layers executed, token-weighted over the cached calls, equals the full forward's, and
    per layer count of tokens run matches (the logits match too, above)."""
    torch.manual_seed(3)
    m = act().double().eval()
    x = torch.randint(0, V, (3, 24))
    with torch.no_grad():
        m(x)
        full = m.get_avg_layers_executed()
        assert 1.0 < full < 3.0  # tokens halt at different layers
        cache = m.init_cache(3)
        m(x[:, :5], cache=cache)
        total = m.get_avg_layers_executed() * 15
        for t in range(5, 24):
            m(x[:, t:t + 1], cache=cache)
            total += m.get_avg_layers_executed() * 3
    assert abs(total / 72 - full) < 1e-12


def test_early_exit_is_mixed():
    torch.manual_seed(0)
    m = early_exit().double().eval()
    with torch.no_grad():
        _, info = m(torch.randint(0, V, (3, 21)))
    assert 1.0 < info["avg_layers_executed"] < 4.0


def test_cache_memory_is_constant():
    m = MODELS["hierarchical"]().eval()
    cache = m.init_cache(2)
    x = torch.randint(0, V, (2, 36))
    sizes = []
    with torch.no_grad():
        m(x[:, :4], cache=cache)
        for t in range(4, 36):
            m(x[:, t:t + 1], cache=cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes[4:])) == 1, sizes


def test_generate_greedy_equals_full_argmax():
    torch.manual_seed(0)
    for name in ("lm", "act", "hierarchical", "sparse"):
        m = MODELS[name]().eval()
        _randomise(m)
        prompt = torch.randint(0, V, (2, 5))
        out = m.generate(prompt, 8)
        assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
        with torch.no_grad():
            for t in range(5, 13):
                assert torch.equal(logits_of(m, out[:, :t])[:, -1].argmax(-1), out[:, t]), (name, t)


def test_generate_sampling_and_eos():
    torch.manual_seed(0)
    m = lm().eval()
    prompt = torch.randint(0, V, (3, 4))
    kw = dict(do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    a = m.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **kw)
    b = m.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **kw)
    c = m.generate(prompt, 10, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k=1 sampling is greedy
    assert torch.equal(m.generate(prompt, 6, do_sample=True, top_k=1), m.generate(prompt, 6))
    # eos: every row that produced it is padded with it
    greedy = m.generate(prompt, 10)
    eos = int(greedy[0, 6])
    out = m.generate(prompt, 10, eos_token_id=eos)
    for row in out[:, 4:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == eos).all()
    assert m.generate(prompt, 0).shape == (3, 4)


def test_gradients_through_cached_calls_are_exact():
    torch.manual_seed(1)
    m = lm().double().eval()
    x = torch.randint(0, V, (2, 12))
    w = torch.randn(2, 12, V, dtype=torch.float64)
    m.zero_grad()
    (m(x) * w).sum().backward()
    full = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    cache = m.init_cache(2)
    out = torch.cat([m(x[:, :7], cache=cache), m(x[:, 7:8], cache=cache), m(x[:, 8:], cache=cache)], 1)
    (out * w).sum().backward()
    for n, g in full.items():
        assert rel_err(dict(m.named_parameters())[n].grad, g) < 1e-10, n


def test_bad_input():
    m = lm().eval()
    other = lm().eval()
    cache = m.init_cache(2)
    x = torch.randint(0, V, (2, 3))
    with pytest.raises(ValueError, match="cache: this cache was made by another model"):
        other(x, cache=cache)
    with pytest.raises(ValueError, match="x: expected batch size 2"):
        m(torch.randint(0, V, (3, 3)), cache=cache)
    with pytest.raises(TypeError, match="cache: expected a DecodeCache"):
        m(x, cache={})
    with pytest.raises(ValueError, match="n_seq=40"):
        m(torch.randint(0, V, (2, 41)), cache=m.init_cache(2))
    c2 = m.init_cache(2)
    m(torch.randint(0, V, (2, 39)), cache=c2)
    with pytest.raises(ValueError, match="cache is at position 39 .* past n_seq=40"):
        m(torch.randint(0, V, (2, 2)), cache=c2)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        m.init_cache(0)
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 0"):
        m.generate(x, -1)
    with pytest.raises(ValueError, match=r"top_p: expected a number in \(0, 1\]"):
        m.generate(x, 2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature: expected a value > 0 when sampling"):
        m.generate(x, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens: the prompt .* past n_seq=40"):
        m.generate(x, 38)
    with pytest.raises(ValueError, match="cache: LanguageModel was built with causal=False"):
        LanguageModel(V, D, L, NSEQ, causal=False).init_cache(1)
    wrapper = AdaptiveSequenceLengthWrapper(lm(), NSEQ)
    with pytest.raises(ValueError, match="cache: AdaptiveSequenceLengthWrapper cannot decode incrementally"):
        wrapper(x, cache=m.init_cache(2))
    lmk = with_landmarks().eval()
    with pytest.raises(ValueError, match="normalises positions by the sequence's total length"):
        lmk(x, cache=lmk.init_cache(2))
