import numpy as np
import pytest

from pyfast.data import GENERATOR_VERSION, SyntheticSource


def assert_same(a, b):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.key == b.key


def test_same_seed_gives_identical_samples_in_any_order():
    first = SyntheticSource(num_samples=12, image_size=64, seed=5)
    second = SyntheticSource(num_samples=12, image_size=64, seed=5)
    for i in reversed(range(12)):  # another order: each sample depends only on (seed, i)
        assert_same(first.load(i), second.load(i))


def test_different_seed_or_index_gives_different_samples():
    a = SyntheticSource(num_samples=4, image_size=64, seed=0)
    b = SyntheticSource(num_samples=4, image_size=64, seed=1)
    assert not np.array_equal(a.load(0).image, b.load(0).image)
    assert a.load(0).key != b.load(0).key
    assert not np.array_equal(a.load(0).image, a.load(1).image)


def test_keys_name_seed_index_size_and_generator_version():
    key = SyntheticSource(num_samples=4, image_size=64, seed=7).load(3).key
    assert f"v{GENERATOR_VERSION}" in key and "seed7" in key and "size64" in key and key.endswith("-3")
    assert SyntheticSource(num_samples=4, image_size=96, seed=7).load(3).key != key


def test_boxes_are_tight_around_visible_masks_with_contrast():
    source = SyntheticSource(num_samples=40, image_size=96, seed=0)
    counts = []
    for i in range(len(source)):
        sample = source.load(i)
        counts.append(sample.num_objects)
        assert sample.image.shape == (96, 96, 3) and sample.image.dtype == np.uint8
        assert sample.masks.dtype == np.bool_ and sample.masks.shape == (sample.num_objects, 96, 96)
        np.testing.assert_array_equal(sample.prompt_boxes, sample.boxes)
        assert not (sample.masks.sum(axis=0) > 1).any()  # visible parts do not overlap
        for box, mask in zip(sample.boxes, sample.masks):
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            # The object stands out from the background ring just outside its box.
            x0, y0, x1, y1 = box.astype(int)
            ring = np.zeros_like(mask)
            ring[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = True
            ring &= ~sample.masks.any(axis=0)
            if ring.sum() > 20:
                inside = sample.image[mask].astype(float).mean(axis=0)
                outside = sample.image[ring].astype(float).mean(axis=0)
                assert np.linalg.norm(inside - outside) > 30
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 4


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSource(image_size=8)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticSource(num_samples=0)
    with pytest.raises(TypeError, match="seed"):
        SyntheticSource(seed=1.5)
    assert len(SyntheticSource(num_samples=10, max_samples=3)) == 3
    assert SyntheticSource(num_samples=3).describe(2) == "synthetic[2]"
