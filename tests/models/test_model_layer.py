"""The model layer as a user meets it (issue 20): dtype conversions, deepcopy, odd lengths, errors.

Every model the CLI offers (``resnet_bk.training.registry.MODELS``) at a tiny size.
"""
import copy
import io
import math

import pytest
import torch

from resnet_bk.models.base import _BKCoreMixin, moe_aux_loss
from resnet_bk.training.registry import MODELS

V, D, L, NS = 50, 16, 2, 16
NAMES = sorted(MODELS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _warn_always():
    """torch warns "Casting complex values to real" once per process; here at every cast."""
    prev = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    yield
    torch.set_warn_always(prev)


def _build(name, n_seq=NS, n_layers=L):
    torch.manual_seed(0)
    return MODELS[name](V, D, n_layers, n_seq)


def _logits(m, x):
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


def _tokens(n=NS, b=2):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(1))


def _zs(m):
    return [mod.z for mod in m.modules() if isinstance(mod, _BKCoreMixin) and not mod.learnable_z]


# ------------------------------------------------------------------------------- 1: .to(dtype)

NO_COMPLEX_CAST = pytest.mark.filterwarnings("error:Casting complex values to real")


@NO_COMPLEX_CAST
@pytest.mark.parametrize("name", NAMES)
def test_to_float64_equals_double(name):
    x = _tokens()
    ref = _build(name).double().eval()
    for convert in (lambda m: m.to(torch.float64), lambda m: m.to("cpu", torch.float64),
                    lambda m: m.to(device="cpu", dtype=torch.float64)):
        m = convert(_build(name)).eval()
        zs = _zs(m)
        assert zs and all(z.dtype == torch.complex128 and z.item() == 1j for z in zs)
        with torch.no_grad():
            got, want = _logits(m, x), _logits(ref, x)
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@NO_COMPLEX_CAST
@pytest.mark.parametrize("name", NAMES)
def test_to_float32_on_float32_model_changes_nothing(name):
    x = _tokens()
    m = _build(name).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        want = _logits(m, x)
    m2 = m.to(torch.float32).float()
    assert m2 is m
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    with torch.no_grad():
        assert torch.equal(_logits(m, x), want)


@NO_COMPLEX_CAST
@pytest.mark.parametrize("convert", ["half", "bfloat16", "float", "double", "to_half", "to_bf16", "to_f32",
                                     "double_then_float"])
def test_z_stays_complex_1j(convert):
    m = _build("plain")
    m = {"half": lambda: m.half(), "bfloat16": lambda: m.bfloat16(), "float": lambda: m.float(),
         "double": lambda: m.double(), "to_half": lambda: m.to(torch.float16),
         "to_bf16": lambda: m.to(torch.bfloat16), "to_f32": lambda: m.to(torch.float32),
         "double_then_float": lambda: m.double().float()}[convert]()
    want = torch.complex128 if convert == "double" else torch.complex64
    for z in _zs(m):
        assert z.dtype == want and z.dim() == 0 and z.item() == 1j


@NO_COMPLEX_CAST
def test_to_bfloat16_equals_bfloat16():
    x = _tokens()
    a, b = _build("plain").bfloat16().eval(), _build("plain").to(torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(_logits(a, x), _logits(b, x))


def test_converted_model_loads_a_float32_state_dict():
    sd = _build("plain").state_dict()
    assert sd["blocks.0.bk_layer.z"].dtype == torch.complex64  # the checkpoint format is unchanged
    m = MODELS["plain"](V, D, L, NS).to(torch.float64)
    m.load_state_dict(sd)
    ref = _build("plain").double().eval()
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(_logits(m.eval(), x), _logits(ref, x), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- 2: copy.deepcopy

@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_after_forward_backward(name):
    x = _tokens()
    m = _build(name).train()
    _logits(m, x).float().square().mean().backward()
    aux = moe_aux_loss(m)
    assert aux is not None and aux.grad_fn is not None
    c = copy.deepcopy(m)
    assert moe_aux_loss(c) is None  # the last forward's graph is not copied ...
    assert torch.equal(moe_aux_loss(m), aux)  # ... and the original keeps it
    m.eval(), c.eval()
    with torch.no_grad():
        assert torch.equal(_logits(c, x), _logits(m, x))
    for (k, p), (k2, q) in zip(m.named_parameters(), c.named_parameters()):
        assert k == k2 and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    # torch.save of the whole module (pickle) after a forward with grad, too
    buf = io.BytesIO()
    torch.save(m.train(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(_logits(loaded, x), _logits(m.eval(), x))


# ------------------------------------------------------------------- 3: hierarchical, any n_seq

ODD_NSEQ = [130, 126, 10, 6, 5, 2, 1]


@pytest.mark.parametrize("n_seq", ODD_NSEQ + [8, 7, 3])
def test_hierarchical_any_n_seq_forward_backward(n_seq):
    m = _build("hierarchical", n_seq=n_seq, n_layers=1).train()
    for n in sorted({n_seq, max(1, n_seq - 1), max(1, n_seq // 2)}):
        x = _tokens(n)
        out = _logits(m, x)
        assert out.shape == (2, n, V) and bool(out.isfinite().all())
        out.square().mean().backward()
        g = m.blocks[0].layer.down1.pool_logits.grad
        assert g is not None and bool(g.isfinite().all())
        m.zero_grad()


def test_hierarchical_causal_at_n_seq_130():
    m = _build("hierarchical", n_seq=130, n_layers=1).eval()
    x = _tokens(130)
    y = x.clone()
    y[:, 100:] = (y[:, 100:] + 1) % V
    with torch.no_grad():
        a, b = _logits(m, x), _logits(m, y)
    torch.testing.assert_close(a[:, :100], b[:, :100], rtol=1e-5, atol=1e-5)  # causal
    assert (a[:, 100:] - b[:, 100:]).abs().max() > 1e-2


def test_hierarchical_cli_train_n_seq_130():
    """The path of ``python -m resnet_bk.training.train --model hierarchical --n-seq 130``."""
    from resnet_bk.training.train import train
    res = train("hierarchical", max_bytes=20_000, d_model=8, n_layers=1, n_seq=130, batch_size=2, steps=2,
                eval_batches=1, progress=False, threads=1)
    assert res["n_seq"] == 130
    assert math.isfinite(res["first_loss"]) and math.isfinite(res["final_train_loss"])


@pytest.mark.parametrize("n_seq", [130, 10, 5, 8])
def test_hierarchical_loads_state_dict_with_old_mid_level_buffers(n_seq):
    """Checkpoints written before the fix: the middle level's H0 buffers had ceil(n_seq/2) entries."""
    src = _build("hierarchical", n_seq=n_seq, n_layers=1).eval()
    sd = src.state_dict()
    n2_old = -(-n_seq // 2)
    for k in [k for k in sd if ".mid_mixer.h0_" in k]:
        sd[k] = sd[k][:, :n2_old - (0 if k.endswith("h0_diag_base") else 1)].clone()
    dst = MODELS["hierarchical"](V, D, 1, n_seq).eval()
    dst.load_state_dict(sd)
    x = _tokens(n_seq - 1 if n_seq > 1 else 1)
    with torch.no_grad():
        assert torch.equal(_logits(dst, x), _logits(src, x))


# ----------------------------------------------------------------------------- 4: clear errors

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [V, V + 7, -1])
def test_token_id_out_of_range_names_argument_range_and_value(name, bad):
    m = _build(name)
    x = _tokens()
    x[1, 3] = bad
    with pytest.raises(ValueError, match=rf"^x: expected token ids in \[0, vocab_size={V}\), got {bad}$"):
        m(x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.float32])
def test_token_dtype_other_than_int64_int32_names_argument(name, dtype):
    """nn.Embedding takes int64/int32 ids only: other dtypes get the model's clear error, not
    torch's "Expected tensor for argument #1 'indices'"."""
    m = _build(name)
    with pytest.raises(TypeError, match=rf"^x: expected integer token ids of dtype torch.int64 or torch.int32, "
                                         rf"got dtype {dtype}$"):
        m(_tokens().to(dtype))


def _float_layers():
    from resnet_bk.models import (AdaptiveResNetBKBlock, HierarchicalMultiScaleLayer, LearnedUpsampling,
                                  MoEResNetBKLayer, MultiScaleResNetBKBlock, MultiScaleResNetBKLayer,
                                  ResNetBKBlock, SparseMoELayer)
    from resnet_bk.models.base import BKMixer
    from resnet_bk.models.sparse import SparseMoEResNetBKLayer
    return {"MoEResNetBKLayer": lambda: MoEResNetBKLayer(D, NS), "SparseMoELayer": lambda: SparseMoELayer(D),
            "ResNetBKBlock": lambda: ResNetBKBlock(D, NS), "BKMixer": lambda: BKMixer(D, NS),
            "MultiScaleResNetBKLayer": lambda: MultiScaleResNetBKLayer(D, NS),
            "HierarchicalMultiScaleLayer": lambda: HierarchicalMultiScaleLayer(D, NS),
            "MultiScaleResNetBKBlock": lambda: MultiScaleResNetBKBlock(D, NS, hierarchical=True),
            "LearnedUpsampling": lambda: LearnedUpsampling(D, NS),
            "AdaptiveResNetBKBlock": lambda: AdaptiveResNetBKBlock(D, NS),
            "SparseMoEResNetBKLayer": lambda: SparseMoEResNetBKLayer(D, NS)}


@pytest.mark.parametrize("layer", sorted(_float_layers()))
@pytest.mark.parametrize("layer_dtype,x_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                 (torch.float32, torch.bfloat16)])
def test_float_input_of_wrong_dtype_names_argument_and_dtypes(layer, layer_dtype, x_dtype):
    torch.manual_seed(0)
    m = _float_layers()[layer]().to(layer_dtype)
    arg = "y" if layer == "LearnedUpsampling" else "x"
    x = torch.randn(2, 8, D, dtype=x_dtype)
    with pytest.raises(TypeError, match=rf"^{arg}: expected dtype {layer_dtype} .*got {x_dtype}$"):
        m(x)
    out = m(x.to(layer_dtype))  # the matching dtype runs
    assert (out[0] if isinstance(out, tuple) else out).dtype == layer_dtype


def test_autocast_still_accepts_other_dtypes():
    from resnet_bk.models import MoEResNetBKLayer
    torch.manual_seed(0)
    m = MoEResNetBKLayer(D, NS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(2, 8, D, dtype=torch.bfloat16)).shape == (2, 8, D)
