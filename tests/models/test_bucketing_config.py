"""Issue 20 item 8: HyLoRADA-style configuration of the bucketing (seeds/004,
``landmark_bucketing = "fixed" | "learnable"``) with its fixed-bucket baseline."""
import pytest
import torch

from resnet_bk.models import (HyLoRADAConfig, LanguageModel, LearnableBucketLandmark, PositionAdaptiveLandmark,
                              attach_bucket_landmark)

H = 16


def test_config_builds_the_fixed_baseline_and_the_learnable_bucketing():
    fixed = HyLoRADAConfig().build_landmark(H)                       # the design's default: "fixed"
    learn = HyLoRADAConfig(landmark_bucketing="learnable", bucket_temperature=0.5).build_landmark(H)
    assert isinstance(fixed, PositionAdaptiveLandmark) and fixed.spacing == "log"
    assert isinstance(learn, LearnableBucketLandmark) and learn.temperature == 0.5
    n_fixed = sum(p.numel() for p in fixed.parameters())
    n_learn = sum(p.numel() for p in learn.parameters())
    assert n_learn - n_fixed == 32                                   # only the boundary parameters differ
    assert not any("bucket" in n for n, _ in fixed.named_parameters())
    x = torch.randn(2, 40, H)
    assert fixed(x).shape == learn(x).shape == (2, 40, H)


@pytest.mark.parametrize("spacing", ["log", "uniform"])
def test_fixed_buckets_are_hard_monotone_and_cover_the_sequence(spacing):
    lm = PositionAdaptiveLandmark(H, num_buckets=8, max_positions=512, spacing=spacing)
    S = 256
    idx = lm.bucket_index(S)
    w = lm.bucket_weights(S)
    assert w.shape == (S, 8) and torch.equal(w.sum(1), torch.ones(S)) and set(w.unique().tolist()) == {0.0, 1.0}
    assert bool((idx[1:] >= idx[:-1]).all()) and idx[-1] == 7
    sizes = torch.bincount(idx, minlength=8)
    if spacing == "uniform":
        assert sizes.tolist() == [32] * 8
    else:  # logarithmic: narrow buckets at the start, wide at the end
        assert sizes[1] < sizes[-1] and sizes[-1] > S // 4
    torch.testing.assert_close(lm.get_boundaries(S)[3], torch.tensor(
        float(S) * 4 / 8 if spacing == "uniform" else (S + 1) ** 0.5 - 1, dtype=torch.float64))


def test_fixed_landmark_trains_and_attaches_to_a_model():
    torch.manual_seed(0)
    model = LanguageModel(30, H, 1, 32, dropout_p=0.0)
    handle = HyLoRADAConfig(num_buckets=4, max_positions=32).attach(model.layer_norm_final, H)
    assert isinstance(handle.landmark, PositionAdaptiveLandmark)
    assert any(k.startswith("layer_norm_final.bucket_landmark.") for k in model.state_dict())
    x = torch.randint(0, 30, (2, 32))
    model(x).sum().backward()
    assert handle.landmark.position_gates.grad.abs().sum() > 0
    handle.remove()
    with attach_bucket_landmark(model.layer_norm_final, PositionAdaptiveLandmark(H, max_positions=32)):
        pass


@pytest.mark.parametrize("field, value", [("landmark_bucketing", "soft"), ("fixed_bucket_spacing", "cubic"),
                                          ("num_buckets", 0), ("landmark_dropout", 1.0),
                                          ("bucket_temperature", 0.0)])
def test_bad_config_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HyLoRADAConfig(**{field: value})
