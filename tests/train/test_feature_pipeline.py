"""The feature cache inside the data pipeline: hits are served by the dataset (in DataLoader
workers) without the image being decoded, outcomes travel with the batch, fresh features are cast
once per batch and stored as they were cast."""

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import pyfast.cache.store
import pyfast.data.coco
import pyfast.data.npz
import pyfast.data.synthetic
import pyfast.train.features
from pyfast.cache import FeatureCache
from pyfast.data import CocoSource, Letterbox, NpzSource, RobustDataset, SyntheticSource, collate
from pyfast.models import TinyBackbone, probe
from pyfast.train import build_config, prepare, train
from pyfast.train.features import CachedFeatures, FeatureProvider
from pyfast.train.metrics import read_jsonl

SIZE = 32


def _pipeline(tmp_path, sources, backbone=None):
    backbone = backbone or TinyBackbone(channels=(4, 6), strides=(2, 2))
    layout = probe(backbone, SIZE)
    use = [list(layout)[-1]]
    cache = FeatureCache(tmp_path / "cache", "test-fingerprint")
    dataset = RobustDataset(sources, preprocess=Letterbox(SIZE), features=CachedFeatures(cache, layout, use))
    provider = FeatureProvider(backbone, layout, use, cache, torch.device("cpu"))
    return dataset, provider, cache


def _loader(dataset, workers, batch_size=4):
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)


def _fill(dataset, provider):
    for batch in _loader(dataset, 0):
        provider(batch)


def test_cached_samples_come_from_the_workers_without_their_images(tmp_path, monkeypatch):
    dataset, provider, cache = _pipeline(tmp_path, [SyntheticSource(num_samples=10, image_size=SIZE)])
    cold = [provider(batch).maps[0] for batch in _loader(dataset, 2)]  # epoch 1: images from the workers, backbone, puts
    assert provider.computed == 10 and cache.stats.puts == 10

    def no_painting(*args, **kwargs):
        raise AssertionError("an image was drawn for a cached sample")

    monkeypatch.setattr(pyfast.data.synthetic, "_background", no_painting)  # forked workers inherit it
    warm, hits = [], 0
    for batch in _loader(dataset, 2):
        assert batch.images is None and batch.cached["features"].dtype == torch.float16
        hits += batch.cache_hits
        assert batch.cache_misses == batch.cache_corrupt == 0
        warm.append(provider(batch).maps[0])
    assert hits == 10 and provider.computed == 10
    assert cache.stats.hits == 0  # every lookup happened in a worker: the counts came with the batches
    for a, b in zip(cold, warm):  # the heads see bit-identical features cold and warm
        assert torch.equal(a, b)


def test_npz_and_coco_hits_skip_the_image(tmp_path, monkeypatch, npz_dir, coco_dir):
    npz, coco = NpzSource(npz_dir), CocoSource(*coco_dir)
    dataset, provider, _ = _pipeline(tmp_path, [npz, coco])
    _fill(dataset, provider)
    before = [dataset[i] for i in range(len(dataset))]

    def boom(*args, **kwargs):
        raise AssertionError("image decoded for a cached sample")

    monkeypatch.setattr(pyfast.data.coco, "decode_image", boom)
    monkeypatch.setattr(pyfast.data.npz, "check_image", boom)
    for i, old in enumerate(before):
        new = dataset[i]
        assert new.cache == "hit" and new.image is None and new.features is not None
        assert torch.equal(new.boxes, old.boxes) and torch.equal(new.prompt_boxes, old.prompt_boxes)
        assert torch.equal(new.masks, old.masks) and new.key == old.key


def test_a_corrupt_entry_is_counted_and_recomputed(tmp_path):
    dataset, provider, cache = _pipeline(tmp_path, [SyntheticSource(num_samples=4, image_size=SIZE)])
    _fill(dataset, provider)
    path = cache.path(dataset[2].key)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    (batch,) = list(_loader(dataset, 0))
    assert (batch.cache_hits, batch.cache_misses, batch.cache_corrupt) == (3, 1, 1)
    assert batch.image_rows.tolist() == [2] and batch.cached_rows.tolist() == [0, 1, 3]
    features = provider(batch)  # the mixed batch: cached rows and the recomputed one, in batch order
    assert features.maps[0].shape[0] == 4
    assert dataset[2].cache == "hit"  # the fresh features were stored again


def test_fresh_features_are_cast_once_and_stored_without_a_second_pack(tmp_path, monkeypatch):
    dataset, provider, cache = _pipeline(tmp_path, [SyntheticSource(num_samples=8, image_size=SIZE)])
    casts = []
    real = pyfast.train.features.pack_buffers
    monkeypatch.setattr(pyfast.train.features, "pack_buffers", lambda *a, **k: casts.append(1) or real(*a, **k))

    def second_pack(*args, **kwargs):
        raise AssertionError("the cache packed the features again")

    monkeypatch.setattr(pyfast.cache.store, "pack", second_pack)
    batches = list(_loader(dataset, 0))
    for batch in batches:
        provider(batch)
    assert len(casts) == len(batches) == 2 and cache.stats.puts == 8
    entry = cache.get(dataset[5].key)
    fresh = provider.compute(collate([dataset.preprocess(dataset.sources[0].load(5))]).images)["features"]
    assert torch.equal(entry["features"], fresh[0].half())


class TwoLevel(nn.Module):
    """A multi-level encoder: an early and a late map, as a dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.early = nn.Conv2d(3, 4, 2, stride=2)
        self.late = nn.Conv2d(4, 6, 2, stride=2)

    def forward(self, x):
        early = torch.relu(self.early(x))
        return {"early": early, "late": self.late(early)}


def test_every_map_is_cached_in_one_entry_and_the_heads_pick_theirs(tmp_path, monkeypatch, tiny_config):
    module = types.ModuleType("pyfast_test_backbones")
    module.TwoLevel = TwoLevel
    monkeypatch.setitem(sys.modules, "pyfast_test_backbones", module)
    common = {**tiny_config, "backbone": "pyfast_test_backbones:TwoLevel", "cache_dir": str(tmp_path / "cache"), "epochs": 1}
    first = prepare(build_config(common, {"out": str(tmp_path / "late")}), log=lambda *a: None)
    assert first.features.use == ["late"] and first.model.strides == (4,)
    train(first, progress_bar=False)
    entry = first.features.cache.get(first.data.dataset[0].key)
    assert {name: tuple(t.shape) for name, t in entry.items()} == {"early": (4, 16, 16), "late": (6, 8, 8)}

    both = prepare(build_config(common, {"out": str(tmp_path / "both"), "feature_maps": ["early", "late"]}),
                   log=lambda *a: None)
    assert both.model.strides == (2, 4) and both.model.channels == (4, 6)
    train(both, progress_bar=False)
    assert both.features.computed == 0  # the first run cached every map: the second never ran the backbone
    assert [r["cache_hit_rate"] for r in read_jsonl(tmp_path / "both" / "metrics.jsonl")] == [1.0] * 5
    with pytest.raises(Exception, match="no map 'middle'"):
        prepare(build_config(common, {"out": str(tmp_path / "bad"), "feature_maps": ["middle"]}), log=lambda *a: None)
    assert not (tmp_path / "bad").exists()


@pytest.fixture
def npz_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "npz"
    root.mkdir()
    for name in ("a", "b"):
        image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        masks = np.zeros((1, 20, 24), bool)
        masks[0, 2:10, 3:15] = True
        np.savez(root / f"{name}.npz", image=image, boxes=np.array([[3, 2, 15, 10]], np.float32), masks=masks)
    return root


@pytest.fixture
def coco_dir(tmp_path):
    import json

    from PIL import Image

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(root / "images" / "x.png")
    ann = {
        "images": [{"id": 1, "file_name": "x.png", "height": 30, "width": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 5, 10, 12], "iscrowd": 0, "area": 120,
                         "segmentation": [[4, 5, 14, 5, 14, 17, 4, 17]]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "instances.json").write_text(json.dumps(ann))
    return root / "instances.json", root / "images"
