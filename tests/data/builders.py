"""Small npz and COCO data sets with planted corruption, built in a test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from pyfast.data import BadSample
from pycocotools import mask as mask_utils


def make_frame(rng: np.random.Generator, height: int, width: int, count: int, grayscale: bool = False):
    """A random image with `count` rectangles: exact boxes (xyxy) and masks."""
    image = rng.integers(0, 256, (height, width) if grayscale else (height, width, 3), dtype=np.uint8)
    boxes = np.zeros((count, 4), dtype=np.float32)
    masks = np.zeros((count, height, width), dtype=bool)
    for k in range(count):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(2, width // 2)), y0 + int(rng.integers(2, height // 2))
        boxes[k] = (x0, y0, x1, y1)
        masks[k, y0:y1, x0:x1] = True
    return image, boxes, masks


def write_npz(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


# file -> expected skip category, for every planted bad npz file.
NPZ_BAD: Dict[str, str] = {
    "bad/truncated.npz": "unreadable file",
    "bad/garbage.npz": "unreadable file",
    "bad/corrupt_member.npz": "unreadable file",
    "bad/object_array.npz": "unreadable file",
    "bad/missing_boxes.npz": "missing key",
    "bad/image_rank4.npz": "bad image",
    "bad/image_4_channels.npz": "bad image",
    "bad/image_float.npz": "bad image",
    "bad/boxes_k5.npz": "bad boxes",
    "bad/boxes_nan.npz": "non-finite boxes",
    "bad/boxes_inverted.npz": "inverted boxes",
    "bad/masks_count.npz": "bad masks",
    "bad/masks_size.npz": "bad masks",
    "bad/paired_partial.npz": "inconsistent paired fields",
    "bad/paired_count.npz": "inconsistent paired fields",
    "bad/paired_size.npz": "inconsistent paired fields",
}
NPZ_GOOD = ("a.npz", "b.npz", "sub/c.npz", "sub/deeper/d.npz", "gray.npz", "empty.npz", "paired.npz", "mask255.npz")


def make_npz_set(root: Path, seed: int = 0) -> Tuple[Path, Dict[str, str]]:
    """Good samples (RGB, nested, grayscale, empty, paired, 0/255 masks) and one file per kind of corruption."""
    rng = np.random.default_rng(seed)
    H, W = 24, 32

    def frame(count=2, **kw):
        image, boxes, masks = make_frame(rng, H, W, count, **kw)
        return {"image": image, "boxes": boxes, "masks": masks}

    for name in ("a.npz", "b.npz", "sub/c.npz", "sub/deeper/d.npz"):
        write_npz(root / name, **frame(int(rng.integers(1, 4))))
    write_npz(root / "gray.npz", **frame(1, grayscale=True))
    write_npz(root / "empty.npz", image=frame()["image"], boxes=np.zeros((0, 4), np.float32), masks=np.zeros((0, H, W), bool))
    f1, f2 = frame(2), frame(2)
    write_npz(root / "paired.npz", image=f1["image"], boxes=f1["boxes"], masks=f1["masks"],
              image2=f2["image"], boxes2=f2["boxes"], masks2=f2["masks"])
    good = frame(2)
    write_npz(root / "mask255.npz", image=good["image"], boxes=good["boxes"], masks=good["masks"].astype(np.uint8) * 255)

    full = write_npz(root / "bad/truncated.npz", **frame(3))
    full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (root / "bad/garbage.npz").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    corrupt = write_npz(root / "bad/corrupt_member.npz", **frame(3))
    data = bytearray(corrupt.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(64)  # zero a stretch of compressed payload: CRC/zlib failure
    corrupt.write_bytes(bytes(data))
    obj = frame()
    np.savez(root / "bad/object_array.npz", image=obj["image"], boxes=np.array([[0, 0, 1, 1]], dtype=object), masks=obj["masks"][:1])
    write_npz(root / "bad/missing_boxes.npz", image=obj["image"], masks=obj["masks"])
    f = frame(); write_npz(root / "bad/image_rank4.npz", **{**f, "image": f["image"][..., None]})
    f = frame(); write_npz(root / "bad/image_4_channels.npz", **{**f, "image": np.zeros((H, W, 4), np.uint8)})
    f = frame(); write_npz(root / "bad/image_float.npz", **{**f, "image": f["image"].astype(np.float32)})
    f = frame(); write_npz(root / "bad/boxes_k5.npz", **{**f, "boxes": np.zeros((2, 5), np.float32)})
    f = frame(); f["boxes"][1, 2] = np.nan; write_npz(root / "bad/boxes_nan.npz", **f)
    f = frame(); f["boxes"][0] = (20, 5, 10, 15); write_npz(root / "bad/boxes_inverted.npz", **f)
    f = frame(); write_npz(root / "bad/masks_count.npz", **{**f, "masks": np.zeros((3, H, W), bool)})
    f = frame(); write_npz(root / "bad/masks_size.npz", **{**f, "masks": np.zeros((2, H + 1, W), bool)})
    f = frame(); write_npz(root / "bad/paired_partial.npz", **f, image2=f["image"])
    f, g = frame(2), frame(3)
    write_npz(root / "bad/paired_count.npz", **f, image2=g["image"], boxes2=g["boxes"], masks2=g["masks"])
    f = frame(2)
    write_npz(root / "bad/paired_size.npz", **f, image2=np.zeros((H, W + 2, 3), np.uint8), boxes2=f["boxes"],
              masks2=np.zeros((2, H, W + 2), bool))
    return root, dict(NPZ_BAD)


def _polygon(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


# file -> expected skip category for the planted bad COCO images.
COCO_BAD: Dict[str, str] = {
    "missing.png": "unreadable file",
    "truncated.jpg": "unreadable file",
    "wrong_size.png": "bad annotation",
    "bad_polygon.png": "bad annotation",
    "negative_width.png": "inverted boxes",
}
COCO_GOOD = ("polygons.png", "gray.png", "rle_uncompressed.png", "rle_compressed.png", "empty.png")


def make_coco_set(root: Path, seed: int = 0) -> Tuple[Path, Path, Dict[str, str]]:
    """A COCO instances file with polygons (single and multi-part), uncompressed and compressed RLE,
    a crowd annotation, a grayscale image, an image without objects, and planted bad images."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    H, W = 40, 60
    images, annotations = [], []

    def add_image(file_name, height=H, width=W, mode="RGB", write=True):
        image_id = len(images) + 10  # ids not equal to positions
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if write:
            shape = (height, width) if mode == "L" else (height, width, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(images_dir / file_name)
        return image_id

    def add_annotation(image_id, segmentation, bbox, iscrowd=0):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + len(annotations) % 2,
                            "segmentation": segmentation, "bbox": bbox, "iscrowd": iscrowd,
                            "area": float(bbox[2] * bbox[3])})

    def rle_of(mask):
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

    def uncompressed(mask):
        # Column-major run lengths starting with a background run, as COCO's crowd annotations use.
        flat = mask.astype(np.uint8).flatten(order="F")
        changes = np.flatnonzero(np.diff(flat)) + 1
        bounds = np.concatenate([[0], changes, [flat.size]])
        counts = np.diff(bounds).tolist()
        if flat[0] == 1:
            counts = [0] + counts
        return {"size": list(mask.shape), "counts": counts}

    image_id = add_image("polygons.png")
    add_annotation(image_id, [_polygon(2, 3, 20, 15)], [2, 3, 18, 12])
    add_annotation(image_id, [[30, 5, 50, 5, 40, 25], _polygon(45, 28, 58, 38)], [30, 5, 28, 33])
    crowd = np.zeros((H, W), bool); crowd[20:39, 0:25] = True
    add_annotation(image_id, uncompressed(crowd), [0, 20, 25, 19], iscrowd=1)

    image_id = add_image("gray.png", mode="L")
    add_annotation(image_id, [_polygon(5, 5, 25, 30)], [5, 5, 20, 25])

    image_id = add_image("rle_uncompressed.png")
    mask = np.zeros((H, W), bool); mask[10:30, 12:40] = True; mask[15:20, 20:25] = False
    add_annotation(image_id, uncompressed(mask), [12, 10, 28, 20])

    image_id = add_image("rle_compressed.png")
    mask = np.zeros((H, W), bool); mask[1:9, 40:59] = True
    rle = rle_of(mask); rle["counts"] = rle["counts"].decode("ascii")
    add_annotation(image_id, rle, [40, 1, 19, 8])
    add_annotation(image_id, [_polygon(3, 3, 9, 9)], [3, 3, 6, 6])

    add_image("empty.png")

    image_id = add_image("missing.png", write=False)
    add_annotation(image_id, [_polygon(2, 3, 20, 15)], [2, 3, 18, 12])
    image_id = add_image("truncated.jpg", write=False)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images_dir / "truncated.jpg", quality=90)
    data = (images_dir / "truncated.jpg").read_bytes()
    (images_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    image_id = add_image("wrong_size.png", write=False)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(images_dir / "wrong_size.png")
    image_id = add_image("bad_polygon.png")
    add_annotation(image_id, [[1.0, 2.0]], [1, 2, 1, 1])
    image_id = add_image("negative_width.png")
    add_annotation(image_id, [_polygon(2, 3, 20, 15)], [20, 3, -18, 12])

    ann_file = root / "instances.json"
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, images_dir, dict(COCO_BAD)


def load_all(source):
    good, bad = {}, {}
    for i in range(len(source)):
        try:
            good[source.describe(i)] = source.load(i)
        except BadSample as error:
            bad[source.describe(i)] = error
    return good, bad


# Planted data that loads but looks wrong: file -> {(finding kind, object index)}.
NPZ_FINDINGS = {
    "partly_outside.npz": {("box partly outside the image", 1)},
    "outside.npz": {("box outside the image", 0)},
    "zero_area.npz": {("zero-area box", 1)},
    "empty_mask.npz": {("empty mask", 0)},
    "mismatch.npz": {("mask disagrees with its box", 1)},
    "sub/copy_of_clean.npz": {("duplicate sample", None)},
}
# Planted errors among them: file -> expected skip category.
NPZ_FINDINGS_BAD = {"absurd.npz": "boxes out of range", "absurd_prompt.npz": "boxes out of range"}


def make_npz_findings_set(root: Path, seed: int = 0) -> Path:
    """A clean sample, one sample per kind of per-object warning (NPZ_FINDINGS), boxes at 1e30 in a
    single and in a paired sample (NPZ_FINDINGS_BAD)."""
    rng = np.random.default_rng(seed)
    H, W = 24, 32

    def boxed(*boxes):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        masks = np.zeros((len(boxes), H, W), dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(np.clip(boxes, -1e6, 1e6).astype(int)):
            masks[k, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
        return {"image": image, "boxes": boxes, "masks": masks}

    clean = boxed((2, 3, 12, 15), (14, 2, 30, 20))
    write_npz(root / "clean.npz", **clean)
    write_npz(root / "sub/copy_of_clean.npz", **clean)
    write_npz(root / "partly_outside.npz", **boxed((2, 3, 12, 15), (20, 4, 37, 20)))  # 5 px past W = 32
    write_npz(root / "outside.npz", **boxed((40, 2, 50, 10), (2, 2, 10, 10)))
    write_npz(root / "zero_area.npz", **boxed((2, 3, 12, 15), (5, 5, 5, 12)))
    f = boxed((2, 3, 12, 15)); f["masks"][:] = False
    write_npz(root / "empty_mask.npz", **f)
    f = boxed((2, 3, 12, 15), (14, 2, 30, 20)); f["masks"][1] = False; f["masks"][1, 0:4, 0:4] = True
    write_npz(root / "mismatch.npz", **f)
    write_npz(root / "absurd.npz", **boxed((2, 3, 12, 15), (2, 3, 1e30, 1e30)))
    f, g = boxed((2, 3, 12, 15)), boxed((3, 4, 13, 16))
    write_npz(root / "absurd_prompt.npz", image=f["image"], boxes=np.array([[2, 3, 1e30, 15]], np.float32),
              masks=f["masks"], image2=g["image"], boxes2=g["boxes"], masks2=g["masks"])
    return root


def make_coco_findings_set(root: Path, seed: int = 0) -> Tuple[Path, Path]:
    """A COCO file with planted entry problems (see the tests that use it): unknown image and
    category, no category_id, duplicate and conflicting image entries, a file under two ids,
    unsafe file_names (with a real image behind the `..` one), missing and short bboxes, polygons of
    2 points alone and beside a good part, and a box at 1e30."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    H, W = 40, 60
    images, annotations = [], []

    def write_image(path):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)

    def add_image(image_id, file_name, write=True):
        images.append({"id": image_id, "file_name": file_name, "height": H, "width": W})
        if write:
            write_image(images_dir / file_name)

    def add_annotation(annotation_id, image_id, **fields):
        entry = {"id": annotation_id, "image_id": image_id, "category_id": 1,
                 "segmentation": [_polygon(2, 3, 20, 15)], "bbox": [2, 3, 18, 12], "iscrowd": 0, "area": 216.0}
        entry.update(fields)
        annotations.append({key: value for key, value in entry.items() if value is not None})

    add_image(1, "kept.png")
    add_annotation(101, 1)
    add_annotation(102, 1, category_id=None)  # dropped: no category_id
    add_annotation(103, 1, category_id=7)  # dropped: unknown category
    add_annotation(105, 99)  # dropped: unknown image
    add_image(2, "degenerate_part.png")
    add_annotation(201, 2, segmentation=[[30, 5, 50, 5, 40, 25], [1.0, 2.0, 3.0, 4.0]], bbox=[30, 5, 20, 20])
    add_image(3, "dup_entry.png")
    images.append(dict(images[-1]))  # the same entry again: a warning
    add_image(4, "conflict_a.png")
    add_image(4, "conflict_b.png")  # same id, another file: skipped
    add_image(5, "kept.png", write=False)  # the file of image 1 again: a warning
    add_image(6, "/etc/hostname", write=False)
    add_image(7, "../outside.png", write=False)
    write_image(root / "outside.png")  # exists, and must never be read through images=
    add_image(8, "no_bbox.png")
    add_annotation(801, 8, bbox=None)
    add_image(9, "short_bbox.png")
    add_annotation(901, 9, bbox=[2, 3, 18])
    add_image(10, "polygon_4.png")
    add_annotation(1001, 10, segmentation=[[1.0, 2.0, 3.0, 4.0]])
    add_image(11, "absurd.png")
    add_annotation(1101, 11, bbox=[2, 3, 1e30, 12])
    add_image(12, "odd_polygon.png")
    add_annotation(1201, 12, segmentation=[[30, 5, 50, 5, 40, 25], [5, 5, 9]], bbox=[30, 5, 20, 20])

    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "a"}]}))
    return ann_file, images_dir
