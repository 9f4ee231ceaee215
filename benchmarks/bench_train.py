"""pyfast-train's s/batch, cold (epoch 1: backbone, cache filling) and warm (later epochs: cache
hits), and where a warm step's time goes (data loading, features, forward + loss, backward,
optimizer incl. the step's one host sync), for the --fast and default configurations and for a
heavier COCO-format set of 512x512 JPEG images, where decoding matters.

    python benchmarks/bench_train.py                              # this tree
    PYFAST_BENCH_BEFORE=/path/to/other/tree python benchmarks/bench_train.py
                                                                  # and another tree, same run, interleaved
    pytest benchmarks/bench_train.py -s                           # this tree; asserts hit rate 1, < 10 s/batch

Each configuration runs in its own process (`--one`), two epochs of a reduced set with the real
batch shapes: epoch 1 computes every feature with the backbone, epoch 2 reads them all from the
cache. With PYFAST_BENCH_BEFORE each configuration runs before, after, before, after, and the
table reports the better of the two runs of each tree, so both trees see the same machine load.
The other tree may be an older pyfast (its `Trainer` API is used when it has one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
SAMPLES = int(os.environ.get("PYFAST_BENCH_TRAIN_SAMPLES", "192"))
HEAVY_SIZE = 512
HEAVY_SAMPLES = int(os.environ.get("PYFAST_BENCH_TRAIN_HEAVY_SAMPLES", "64"))

CONFIGS = {
    "--fast": {"preset": "fast", "synthetic_samples": SAMPLES},
    "default": {"synthetic_samples": SAMPLES},
    f"coco {HEAVY_SIZE}": {"image_size": HEAVY_SIZE, "batch_size": 8, "heavy": True},
}


def make_heavy_set(root: str, count: int = HEAVY_SAMPLES, size: int = HEAVY_SIZE) -> str:
    """A COCO instances file over `count` JPEG images of size x size (quality 90), drawn by the synthetic generator."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from pyfast.data.synthetic import render_synthetic

    images_dir = os.path.join(root, "images")
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, boxes, masks = render_synthetic(7, i, size)
        name = f"{i:06d}.jpg"
        Image.fromarray(image).save(os.path.join(images_dir, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for box, mask in zip(boxes, masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            })  # fmt: skip
    path = os.path.join(root, "instances.json")
    with open(path, "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}, handle)
    return f"coco:{path},images={images_dir}"


def run_one(options: dict, root: str) -> dict:
    """One configuration, two epochs, in this process with whatever pyfast is importable."""
    import torch

    import pyfast.train as T

    layers = [dict(T.FAST)] if options.get("preset") == "fast" else []
    settings = {k: v for k, v in options.items() if k not in ("preset", "heavy", "data_spec")}
    if options.get("heavy"):
        settings["data"] = [options["data_spec"]]
    settings.update({"epochs": 2, "out": os.path.join(root, "run")})
    config = T.build_config(*layers, settings)
    if hasattr(T, "Trainer"):  # an older pyfast
        summary = T.Trainer(config, progress=False, log=lambda *a: None).run()
    else:
        summary = T.train(T.prepare(config, log=lambda *a: None), progress_bar=False)
    share = summary.get("warm_step_share") or {}
    return {
        "image": config.image_size, "batch": config.batch_size, "cold": summary["s_per_batch_cold"],
        "warm": summary["s_per_batch_warm"], "hit": summary["cache_hit_rate"], "threads": torch.get_num_threads(),
        **{k: share.get(k, 0.0) for k in ("data", "features", "forward_loss", "backward", "optimizer")},
    }  # fmt: skip


def run_in(tree: str, options: dict) -> dict:
    """run_one in a fresh process importing pyfast from `tree`."""
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONPATH": tree}
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(options), root],
                                env=env, capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"{tree}: {options}: {result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def run_all(before: str | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as data_root:
        heavy_spec = None
        for name, options in CONFIGS.items():
            if options.get("heavy"):
                heavy_spec = heavy_spec or make_heavy_set(data_root)
                options = {**options, "data_spec": heavy_spec}
            trees = [("after", TREE)] + ([("before", before)] if before else [])
            best: dict[str, dict] = {}
            for _round in range(2 if before else 1):
                for label, tree in reversed(trees):  # before first, then after
                    result = run_in(tree, options)
                    if label not in best or result["warm"] < best[label]["warm"]:
                        best[label] = result
            for label, _tree in reversed(trees):
                rows.append({"config": name, "code": label, **best[label]})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| config | code | image | batch | s/batch cold | s/batch warm | hit rate | warm step: data / features / "
        "forward+loss / backward / optimizer |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['code']} | {r['image']} | {r['batch']} | {r['cold']:.3f} | {r['warm']:.3f} | "
            f"{r['hit']:.3f} | {r['data']:.0%} / {r['features']:.0%} / {r['forward_loss']:.0%} / {r['backward']:.0%} / "
            f"{r['optimizer']:.0%} |"
        )
    by = {(r["config"], r["code"]): r for r in rows}
    for name in CONFIGS:
        if (name, "before") in by:
            b, a = by[(name, "before")], by[(name, "after")]
            lines.append(f"\n{name}: warm {b['warm'] / a['warm']:.2f}x faster, cold {b['cold'] / a['cold']:.2f}x faster after")
    return "\n".join(lines)


def test_train_s_per_batch():
    rows = run_all()
    print("\n" + format_rows(rows))
    for r in rows:
        assert r["hit"] == 1.0
        assert r["cold"] < 10.0 and r["warm"] < 10.0, r


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(run_one(json.loads(sys.argv[2]), sys.argv[3])))
        sys.exit(0)
    before = os.environ.get("PYFAST_BENCH_BEFORE")
    rows = run_all(before)
    print(f"{SAMPLES} synthetic samples (--fast, default), {HEAVY_SAMPLES} COCO JPEGs at {HEAVY_SIZE}x{HEAVY_SIZE}, "
          f"2 epochs, {rows[0]['threads']} torch threads")
    print(format_rows(rows))
