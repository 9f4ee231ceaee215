import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyfast.data import (
    Letterbox,
    LetterboxedSample,
    NpzSource,
    RobustDataset,
    Sample,
    SkippedSample,
    SkipTracker,
    SyntheticSource,
    collate,
)

from .builders import NPZ_GOOD, make_frame, write_npz


def test_global_indices_map_to_sources_and_bad_samples_become_records(npz_set):
    root, expected_bad = npz_set
    npz = NpzSource(root)
    synthetic = SyntheticSource(num_samples=5, image_size=32)
    dataset = RobustDataset([synthetic, npz])
    assert len(dataset) == 5 + len(npz)
    assert dataset.locate(4) == (synthetic, 4) and dataset.locate(5) == (npz, 0)
    assert dataset.locate(-1) == (npz, len(npz) - 1)
    with pytest.raises(IndexError):
        dataset[len(dataset)]

    items = [dataset[i] for i in range(len(dataset))]
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    assert {(r.file, r.category) for r in skipped} == set(expected_bad.items())
    assert all(r.source == npz.name for r in skipped)
    # index is the global index: the record points back at itself, not at a neighbour.
    for record in skipped:
        assert npz.describe(record.index - 5) == record.file
    assert sum(isinstance(item, Sample) for item in items) == 5 + len(NPZ_GOOD)


def test_preprocess_and_collate_build_flat_batches(npz_set):
    dataset = RobustDataset([NpzSource(npz_set[0]), SyntheticSource(num_samples=3, image_size=48)], preprocess=Letterbox(40))
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate(items)
    good = len(NPZ_GOOD) + 3
    assert len(batch) == good and len(batch.skipped) == len(npz_set[1])
    assert batch.images.shape == (good, 3, 40, 40) and batch.images.dtype == torch.uint8
    assert torch.equal(batch.image_rows, torch.arange(good)) and batch.cached == {}
    samples = [item for item in items if not isinstance(item, SkippedSample)]
    counts = [s.num_objects for s in samples]
    n = sum(counts)
    assert batch.boxes.shape == batch.prompt_boxes.shape == (n, 4) and batch.boxes.dtype == torch.float32
    assert batch.masks.shape == (n, 40, 40) and batch.masks.dtype == torch.bool
    assert batch.box_sample.tolist() == [i for i, k in enumerate(counts) for _ in range(k)]
    assert torch.equal(batch.boxes, torch.cat([s.boxes for s in samples]))
    assert torch.equal(batch.masks, torch.cat([s.masks for s in samples]))
    assert batch.indices.tolist() == [s.index for s in samples]
    assert all(dataset.locate(s.index)[0].describe(dataset.locate(s.index)[1]) == s.file for s in samples)
    assert len(batch.keys) == len(batch.files) == len(batch.sources) == good
    assert batch.cache_hits == batch.cache_misses == batch.cache_corrupt == 0  # no cache, no lookups


def test_collate_of_only_skipped_samples_is_an_empty_batch():
    record = SkippedSample(source="npz (x)", file="a.npz", reason="bad", index=3)
    batch = collate([record, record])
    assert len(batch) == 0 and batch.images is None and batch.num_boxes == 0 and batch.skipped == [record, record]


def test_collate_refuses_samples_that_were_not_brought_to_one_size(tmp_path):
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.npz": (10, 12), "b.npz": (14, 9)}.items():
        image, boxes, masks = make_frame(rng, h, w, 1)
        write_npz(tmp_path / name, image=image, boxes=boxes, masks=masks)
    dataset = RobustDataset([NpzSource(tmp_path)])
    with pytest.raises(TypeError, match="preprocessed to one size"):
        collate([dataset[0], dataset[1]])


def test_paired_supervision_reaches_the_batch(tmp_path):
    rng = np.random.default_rng(4)
    image1, boxes1, masks1 = make_frame(rng, 16, 16, 2)
    image2, boxes2, masks2 = make_frame(rng, 16, 16, 2)
    write_npz(tmp_path / "p.npz", image=image1, boxes=boxes1, masks=masks1, image2=image2, boxes2=boxes2, masks2=masks2)
    dataset = RobustDataset([NpzSource(tmp_path)], preprocess=Letterbox(16))  # size 16: no resampling
    batch = collate([dataset[0]])
    assert torch.equal(batch.images[0], torch.from_numpy(image2).permute(2, 0, 1))
    torch.testing.assert_close(batch.prompt_boxes, torch.from_numpy(boxes1))
    torch.testing.assert_close(batch.boxes, torch.from_numpy(boxes2))
    assert torch.equal(batch.masks, torch.from_numpy(masks2))


def test_two_workers_two_epochs_each_good_sample_once_and_each_bad_counted_once(npz_set, tmp_path):
    root, expected_bad = npz_set
    dataset = RobustDataset([SyntheticSource(num_samples=6, image_size=32), NpzSource(root)], preprocess=Letterbox(32))
    tracker = SkipTracker(len(dataset), max_fraction=1.0, log_path=tmp_path / "run" / "skipped.jsonl")
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    seen_skips = 0
    for _epoch in range(2):
        files = Counter()
        for batch in loader:
            files.update(zip(batch.sources, batch.files))
            tracker.record(batch.skipped)
            seen_skips += len(batch.skipped)
        assert len(files) == 6 + len(NPZ_GOOD) and set(files.values()) == {1}
    assert seen_skips == 2 * len(expected_bad)
    assert tracker.count == len(expected_bad)
    lines = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(line["file"] for line in lines) == sorted(expected_bad)
    assert all({"source", "file", "reason"} <= set(line) for line in lines)


def test_letterbox_scales_boxes_pads_and_fingerprints():
    image = np.full((40, 60, 3), 200, np.uint8)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, 10:20, 30:60] = True
    boxes = np.array([[30, 10, 60, 20]], np.float32)
    sample = Sample(image=image, prompt_boxes=boxes + 1, boxes=boxes, masks=masks, key="k", source="s", file="f")
    out = Letterbox(30)(sample)
    assert isinstance(out, LetterboxedSample)
    assert out.image.shape == (3, 30, 30) and out.image.dtype == torch.uint8
    assert out.scale == (0.5, 0.5) and out.original_size == (40, 60)
    torch.testing.assert_close(out.boxes, torch.tensor([[15.0, 5.0, 30.0, 10.0]]))
    torch.testing.assert_close(out.prompt_boxes, torch.tensor([[15.5, 5.5, 30.5, 10.5]]))
    assert (out.image[:, :20] == 200).all()  # the resized image
    assert (out.image[:, 20:] == 0).all()  # bottom padding
    # without its image (features cached), a sample gets the same boxes and masks
    bare = Letterbox(30)(Sample(image=None, prompt_boxes=boxes + 1, boxes=boxes, masks=masks, key="k", source="s",
                                file="f", image_size=(40, 60)))
    assert bare.image is None and torch.equal(bare.masks, out.masks) and torch.equal(bare.boxes, out.boxes)
    expected = np.zeros((30, 30), bool)
    expected[5:10, 15:30] = True
    assert torch.equal(out.masks[0], torch.from_numpy(expected))
    assert Letterbox(30).fingerprint() == Letterbox(30).fingerprint()
    assert Letterbox(30).fingerprint() != Letterbox(32).fingerprint()
    assert Letterbox(30).fingerprint()["size"] == 30
    with pytest.raises(ValueError, match="size"):
        Letterbox(0)


def test_batch_maps_every_tensor_and_keeps_the_records():
    dataset = RobustDataset([SyntheticSource(num_samples=2, image_size=32)], preprocess=Letterbox(32))
    record = SkippedSample(source="npz (x)", file="a.npz", reason="bad", index=9)
    batch = collate([dataset[0], record, dataset[1]])
    batch.cached = {"features": torch.zeros(0, 4, 2, 2, dtype=torch.float16)}
    seen = []
    moved = batch._map_tensors(lambda t: seen.append(t) or t.clone())  # what pin_memory() and to() apply
    tensors = [batch.indices, batch.prompt_boxes, batch.boxes, batch.masks, batch.box_sample, batch.cached["features"],
               batch.cached_rows, batch.images, batch.image_rows]
    assert len(seen) == len(tensors) and all(any(t is s for s in seen) for t in tensors)
    assert moved.images.shape == (2, 3, 32, 32) and moved.skipped == [record] and moved.keys == batch.keys
    assert moved.to("cpu").boxes.shape == batch.boxes.shape
