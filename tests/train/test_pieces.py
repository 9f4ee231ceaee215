from types import SimpleNamespace

import pytest
import torch

from pyfast.train.features import FeatureProvider
from pyfast.train.jitter import VAL_EPOCH, jitter_boxes
from pyfast.train.loop import lr_lambda


def test_jitter_is_a_pure_function_of_seed_epoch_key():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0]])
    kw = dict(shift=0.15, scale=0.2, image_size=64)
    a = jitter_boxes(boxes, "k1", seed=0, epoch=1, **kw)
    assert torch.equal(a, jitter_boxes(boxes, "k1", seed=0, epoch=1, **kw))
    assert not torch.equal(a, jitter_boxes(boxes, "k1", seed=0, epoch=2, **kw))
    assert not torch.equal(a, jitter_boxes(boxes, "k2", seed=0, epoch=1, **kw))
    assert not torch.equal(a, jitter_boxes(boxes, "k1", seed=1, epoch=1, **kw))
    v = jitter_boxes(boxes, "k1", seed=0, epoch=VAL_EPOCH, **kw)
    assert (v[:, 2:] - v[:, :2] >= 2.0).all() and (v >= 0).all() and (v <= 64).all()
    assert torch.equal(jitter_boxes(boxes, "k", seed=0, epoch=0, shift=0, scale=0, image_size=64), boxes)


def test_schedule_warms_up_then_decays():
    f = lr_lambda(4, 20)
    assert f(0) == 0.25 and f(3) == 1.0
    assert f(10) < 1.0 and abs(f(20) - 0.05) < 1e-9


def test_features_beyond_float16_range_raise_instead_of_becoming_inf():
    provider = FeatureProvider(lambda images: images * 1e6, None, torch.device("cpu"))
    batch = SimpleNamespace(images=torch.ones(2, 3, 4, 4), keys=["a", "b"])
    with pytest.raises(OverflowError, match="'features'"):
        provider(batch)
    in_range = FeatureProvider(lambda images: images * 3.1, None, torch.device("cpu"))
    assert torch.equal(in_range(batch), (batch.images * 3.1).half().float())
