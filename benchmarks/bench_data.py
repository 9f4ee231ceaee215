"""Samples/s of each data source through a DataLoader (letterboxed to 128, batches of 16).

    pytest benchmarks/bench_data.py --benchmark-only

The npz and COCO sets are generated once per session from the synthetic renderer (JPEG images,
compressed-RLE masks), so every source decodes comparable content.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

mask_utils = pytest.importorskip("pycocotools.mask")  # the COCO source's dependency

from pyfast.data import CocoSource, Letterbox, NpzSource, RobustDataset, SyntheticSource, collate

NUM_SAMPLES = 256
IMAGE_SIZE = 128
BATCH_SIZE = 16
WORKERS = (0, 2, 4)

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # 4 workers on a 2-core machine is one of the settings being measured.
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    synthetic = SyntheticSource(num_samples=NUM_SAMPLES, image_size=IMAGE_SIZE, seed=0)
    images_dir = root / "coco" / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    npz_dir = root / "npz"
    npz_dir.mkdir()
    for i in range(NUM_SAMPLES):
        sample = synthetic.load(i)
        np.savez_compressed(npz_dir / f"{i:05d}.npz", image=sample.image, boxes=sample.boxes, masks=sample.masks)
        file_name = f"{i:05d}.jpg"
        Image.fromarray(sample.image).save(images_dir / file_name, quality=90)
        images.append({"id": i + 1, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        for box, mask in zip(sample.boxes, sample.masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    ann_file = root / "coco" / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}))
    return {
        "synthetic": lambda: SyntheticSource(num_samples=NUM_SAMPLES, image_size=IMAGE_SIZE, seed=0),
        "npz": lambda: NpzSource(root / "npz"),
        "coco": lambda: CocoSource(ann_file, images_dir),
    }


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", ("synthetic", "npz", "coco"))
def test_source_throughput(benchmark, generated, kind, workers):
    dataset = RobustDataset([generated[kind]()], preprocess=Letterbox(IMAGE_SIZE))
    assert len(dataset) == NUM_SAMPLES

    def epoch():
        # One full pass, worker start-up included: what a training epoch pays.
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers, collate_fn=collate)
        good = skipped = 0
        for batch in loader:
            good += len(batch)
            skipped += len(batch.skipped)
        return good, skipped

    good, skipped = benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
    assert (good, skipped) == (NUM_SAMPLES, 0)
    # The median epoch: robust to a neighbour process stealing the CPU for one round.
    samples_per_s = NUM_SAMPLES / benchmark.stats.stats.median
    benchmark.extra_info.update({"source": kind, "workers": workers, "samples": NUM_SAMPLES, "samples_per_s": round(samples_per_s, 1)})
