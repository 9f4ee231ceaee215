import pytest
import torch

from pyfast.cache import FeatureCache
from pyfast.data import Batch
from pyfast.models import FeatureMap
from pyfast.train.features import FeatureError, FeatureProvider
from pyfast.train.jitter import VAL_EPOCH, box_noise, jitter_boxes
from pyfast.train.setup import lr_lambda


def test_jitter_is_a_pure_function_of_seed_epoch_sample():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0]])
    kw = dict(shift=0.15, scale=0.2, image_size=64)

    def jitter(index, seed, epoch):
        return jitter_boxes(boxes, box_noise([index], [2], seed=seed, epoch=epoch), **kw)

    a = jitter(1, 0, 1)
    assert torch.equal(a, jitter(1, 0, 1))
    assert not torch.equal(a, jitter(1, 0, 2))
    assert not torch.equal(a, jitter(2, 0, 1))
    assert not torch.equal(a, jitter(1, 1, 1))
    v = jitter(1, 0, VAL_EPOCH)
    assert (v[:, 2:] - v[:, :2] >= 2.0).all() and (v >= 0).all() and (v <= 64).all()
    zero = box_noise([0], [2], seed=0, epoch=0)
    assert torch.equal(jitter_boxes(boxes, zero, shift=0, scale=0, image_size=64), boxes)
    # a batch's noise is its samples' noise, in order
    both = box_noise([5, 7], [1, 2], seed=3, epoch=4)
    assert torch.equal(both, torch.cat([box_noise([5], [1], seed=3, epoch=4), box_noise([7], [2], seed=3, epoch=4)]))


def test_schedule_warms_up_then_decays():
    f = lr_lambda(4, 20)
    assert f(0) == 0.25 and f(3) == 1.0
    assert f(10) < 1.0 and abs(f(20) - 0.05) < 1e-9


def _images_batch(n=2, size=4):
    return Batch(keys=[f"k{i}" for i in range(n)], sources=["s"] * n, files=[f"f{i}" for i in range(n)],
                 images=torch.full((n, 3, size, size), 255, dtype=torch.uint8), image_rows=torch.arange(n))


def test_features_beyond_float16_range_raise_naming_map_and_sample():
    layout = {"features": FeatureMap("features", 3, 4, 1)}
    provider = FeatureProvider(lambda images: images * 1e6, layout, ["features"], None, torch.device("cpu"))
    batch = _images_batch()
    features = provider(batch)  # without a cache the check is left to the step's one host read
    with pytest.raises(FeatureError, match="'features' of s: f0 has 48 values beyond"):
        provider.raise_if_bad(features.check, batch, [0, 1])
    in_range = FeatureProvider(lambda images: images * 3.1, layout, ["features"], None, torch.device("cpu"))
    out = in_range(batch)
    assert out.check.sum() == 0
    assert torch.equal(out.maps[0], (torch.ones(2, 3, 4, 4) * 3.1).half().float())


def test_with_a_cache_bad_features_raise_before_anything_is_stored(tmp_path):
    layout = {"features": FeatureMap("features", 3, 4, 1)}
    cache = FeatureCache(tmp_path, "fp")
    provider = FeatureProvider(lambda images: images * 1e6, layout, ["features"], cache, torch.device("cpu"))
    with pytest.raises(FeatureError, match="--cache-dtype bf16"):
        provider(_images_batch())
    assert cache.stats.puts == 0
