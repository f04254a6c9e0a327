"""Issue 20 item 7: the learned-length customisations of the design document (seeds/000).

Custom bins (``length_bins = tensor([8, 16, 32, 64, 128]); num_length_bins = 5``) resize the
predictor's head; a mismatched head raises a clear error; a custom predictor with only ``forward``
(the design's interface) works and learns; one that breaks the interface gets a clear error."""
import pytest
import torch
import torch.nn as nn

from resnet_bk.models import AdaptiveSequenceLengthWrapper, LanguageModel, SequenceLengthPredictor

V, D, N = 40, 16, 128


def _wrapper(seed=0, **kw):
    torch.manual_seed(seed)
    return AdaptiveSequenceLengthWrapper(LanguageModel(V, D, 1, N, dropout_p=0.0), N, 8, 0.01, **kw)


def _xy(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, N), generator=g), torch.randint(0, V, (B, N), generator=g)


def test_design_custom_bins_resize_the_head_and_train(one_thread):
    w = _wrapper()
    w.length_predictor.length_bins = torch.tensor([8, 16, 32, 64, 128])
    w.length_predictor.num_length_bins = 5
    assert w.length_predictor.net[-1].out_features == 5
    assert w.length_predictor.num_length_bins == 5
    x, y = _xy()
    logits, info = w(x)
    assert set(info["predicted_lengths"].tolist()) <= {8, 16, 32, 64, 128}
    assert info["length_probs"].shape == (6, 5)
    total, _, _ = w.compute_loss(logits, y, info)
    total.backward()
    assert w.length_predictor.net[-1].weight.grad.abs().sum() > 0
    st = w.get_length_statistics()
    assert st["length_bins"] == [8, 16, 32, 64, 128] and len(st["length_distribution"]) == 5
    assert st["total_predictions"] == 6


def test_custom_bins_at_construction_and_num_length_bins_alone():
    w = _wrapper(length_bins=[4, 32, 128])
    assert w.length_predictor.length_bins.tolist() == [4, 32, 128]
    assert w.length_predictor.net[-1].out_features == 3
    p = SequenceLengthPredictor(D, 128, 8)
    p.num_length_bins = 4          # the default spacing for 4 bins
    assert p.length_bins.tolist() == [32, 64, 96, 128] and p.net[-1].out_features == 4
    lengths, probs = p.eval()(torch.randn(2, 10, D), return_distribution=True)
    assert probs.shape == (2, 4) and set(lengths.tolist()) <= {32, 64, 96, 128}


@pytest.mark.parametrize("bins, err", [([16, 8, 32], "strictly increasing"), ([8, 256], "max_seq_len=128"),
                                       ([0, 8], "strictly increasing"), ([], "non-empty"),
                                       ([8.5, 16], "integer")])
def test_bad_bins_raise_naming_length_bins(bins, err):
    p = SequenceLengthPredictor(D, 128, 8)
    with pytest.raises((ValueError, TypeError), match=err) as e:
        p.length_bins = torch.tensor(bins) if bins else torch.tensor([], dtype=torch.long)
    assert "length_bins" in str(e.value)
    assert p.length_bins.numel() == 8 and p.net[-1].out_features == 8   # unchanged


def test_head_that_does_not_match_the_bins_raises_a_clear_error():
    w = _wrapper()
    w.length_predictor.net[-1] = nn.Linear(w.length_predictor.net[0].out_features, 5)   # 8 bins, 5 outputs
    with pytest.raises(ValueError, match=r"length_predictor.net: expected 8 outputs"):
        w(_xy()[0])


def test_customised_state_dict_loads_into_a_default_built_wrapper():
    w = _wrapper(seed=0)
    w.length_predictor.length_bins = torch.tensor([8, 16, 32, 64, 128])
    w.eval()
    w2 = _wrapper(seed=5).eval()
    w2.load_state_dict(w.state_dict())
    assert w2.length_predictor.length_bins.tolist() == [8, 16, 32, 64, 128]
    x, _ = _xy()
    with torch.no_grad():
        a, ia = w(x)
        b, ib = w2(x)
    torch.testing.assert_close(a, b)
    assert torch.equal(ia["predicted_lengths"], ib["predicted_lengths"])


class _DesignPredictor(nn.Module):
    """The design's custom predictor: only ``forward(x_embedded, return_distribution=False)``."""

    def __init__(self, d_model, max_seq_len, num_length_bins, bins=None):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, num_heads=4, batch_first=True)
        self.predictor = nn.Linear(d_model, num_length_bins)
        self._bins = bins if bins is not None else torch.linspace(
            max_seq_len / num_length_bins, max_seq_len, num_length_bins).round().long()

    def forward(self, x_embedded, return_distribution=False):
        a, _ = self.attention(x_embedded, x_embedded, x_embedded)
        probs = torch.softmax(self.predictor(a.mean(1)), dim=-1)
        lengths = self._bins[probs.argmax(-1)]
        return (lengths, probs) if return_distribution else lengths


def test_design_custom_predictor_with_only_forward_works_and_learns(one_thread):
    w = _wrapper()
    w.length_predictor = _DesignPredictor(D, N, 4)            # default spacing for 4 bins: 32 .. 128
    x, y = _xy()
    logits, info = w(x)
    assert set(info["predicted_lengths"].tolist()) <= {32, 64, 96, 128}
    total, _, cost = w.compute_loss(logits, y, info)
    assert cost.requires_grad
    total.backward()
    assert w.length_predictor.predictor.weight.grad.abs().sum() > 0
    assert w.get_length_statistics()["length_bins"] == [32, 64, 96, 128]


def test_custom_predictor_with_its_own_length_bins():
    w = _wrapper()
    pred = _DesignPredictor(D, N, 3, bins=torch.tensor([5, 50, 100]))
    pred.length_bins = torch.tensor([5, 50, 100])
    w.length_predictor = pred
    _, info = w(_xy()[0])
    assert set(info["predicted_lengths"].tolist()) <= {5, 50, 100}


def test_custom_predictor_breaking_the_interface_raises_clearly():
    w = _wrapper()
    w.length_predictor = _DesignPredictor(D, N, 3, bins=torch.tensor([5, 50, 100]))   # no length_bins
    with pytest.raises(ValueError, match=r"length_predictor: returned lengths .* not in length_bins"):
        w(_xy()[0])

    class LengthsOnly(nn.Module):
        def forward(self, x_embedded, return_distribution=False):
            return torch.full((x_embedded.shape[0],), 64, dtype=torch.long)
    w.length_predictor = LengthsOnly()
    with pytest.raises(TypeError, match=r"length_predictor: forward\(x_emb, return_distribution=True\) must return"):
        w(_xy()[0])
