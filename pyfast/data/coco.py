"""COCO instances annotations (pycocotools) over a folder of images."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .image_io import decode_image
from pyfast.cache.keys import file_key

from .compact import PackedBytes, PackedStrings
from .sample import BadSample, Sample
from .source import SkipImage, Source, limit_count
from .validate import CATEGORY_BAD_ANNOTATION, CATEGORY_BAD_MASKS, CATEGORY_UNREADABLE, check_boxes, check_masks


def _load_coco(ann_file: Path) -> COCO:
    # COCO() prints progress lines; keep start-up output to the source table.
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (OSError, ValueError, AssertionError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read COCO annotation file {str(ann_file)!r}: {type(error).__name__}: {error}") from None


def _xywh_to_xyxy(bbox) -> Tuple[float, float, float, float]:
    """COCO bbox -> xyxy; a malformed bbox becomes NaN so that validation reports it at load time."""
    try:
        x, y, w, h = (float(value) for value in bbox)
    except (TypeError, ValueError):
        return (math.nan,) * 4
    return (x, y, x + w, y + h)


class CocoSource(Source):
    """One sample per image of a COCO instances file (sorted by image id; images without objects
    included, K = 0). Boxes come from `bbox`, masks from the polygon or RLE `segmentation` exactly as
    pycocotools' `annToMask` decodes them; crowd annotations are ignored.

    After indexing, everything `load` needs is numpy: the COCO object (a graph of Python dicts) is
    dropped, so forked DataLoader workers share these pages instead of copying them.
    """

    kind = "coco"
    loads_without_image = True

    def __init__(self, ann_file, images_dir, *, max_samples: Optional[int] = None, name: Optional[str] = None):
        ann_file, images_dir = Path(ann_file), Path(images_dir)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {str(ann_file)!r} does not exist")
        if not images_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {str(images_dir)!r} does not exist")
        super().__init__(name or f"coco ({ann_file})")
        self.images_dir = images_dir
        self._index(_load_coco(ann_file), max_samples)

    def _index(self, coco: COCO, max_samples: Optional[int]) -> None:
        image_ids = sorted(coco.getImgIds())
        image_ids = image_ids[: limit_count(len(image_ids), max_samples)]
        file_names, sizes, boxes, rle_counts, rle_sizes = [], [], [], [], []
        annotation_offsets = [0]
        # Images whose annotations cannot be decoded; few, so a small dict is fine here.
        self._index_errors: Dict[int, str] = {}
        for position, image_id in enumerate(image_ids):
            info = coco.imgs[image_id]
            file_names.append(str(info.get("file_name", "")))
            try:
                sizes.append((int(info["height"]), int(info["width"])))
            except (KeyError, TypeError, ValueError):
                sizes.append((0, 0))
                self._index_errors[position] = "image entry lacks a valid height/width"
            for annotation in coco.imgToAnns.get(image_id, []):
                if annotation.get("iscrowd", 0):
                    continue  # crowd regions are not objects to refine
                if position in self._index_errors:
                    break
                try:
                    rle = coco.annToRLE(annotation)
                except MemoryError:
                    raise
                except Exception as error:  # pycocotools raises bare Exception for bad polygons
                    self._index_errors[position] = (
                        f"annotation {annotation.get('id')}: cannot decode segmentation: {type(error).__name__}: {error}"
                    )
                    break
                counts = rle["counts"]
                rle_counts.append(counts.encode("ascii") if isinstance(counts, str) else bytes(counts))
                rle_sizes.append(tuple(int(v) for v in rle["size"]))
                boxes.append(_xywh_to_xyxy(annotation.get("bbox")))
            annotation_offsets.append(len(boxes))
            if position in self._index_errors:
                # Drop this image's partial annotations so the arrays stay aligned.
                del boxes[annotation_offsets[-2] :], rle_counts[annotation_offsets[-2] :], rle_sizes[annotation_offsets[-2] :]
                annotation_offsets[-1] = annotation_offsets[-2]

        self._image_ids = np.asarray(image_ids, dtype=np.int64)
        self._file_names = PackedStrings(file_names)
        self._image_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self._annotation_offsets = np.asarray(annotation_offsets, dtype=np.int64)
        self._boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self._rle_counts = PackedBytes(rle_counts)
        self._rle_sizes = np.asarray(rle_sizes, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._image_ids)

    def describe(self, index: int) -> str:
        return self._file_names[self._check_index(index)]

    def image_id(self, index: int) -> int:
        return int(self._image_ids[self._check_index(index)])

    def key(self, index: int) -> str:
        """The image's cache key without reading it: its path relative to the image folder, size and
        mtime (`pyfast.file_key`), and the annotated height x width (a changed annotation size
        must not be served features checked against the old one)."""
        file = self.describe(index)
        try:
            stamp = file_key(self.images_dir / file, self.images_dir)
        except OSError as error:
            raise BadSample(f"cannot read image: {error.strerror or error}", category=CATEGORY_UNREADABLE) from None
        except ValueError as error:  # a file_name that leaves the image folder
            raise BadSample(f"cannot read image: {error}", category=CATEGORY_UNREADABLE) from None
        height, width = (int(v) for v in self._image_sizes[index])
        return f"coco:{stamp}|hw={height}x{width}"

    def load(self, index: int, skip_image: SkipImage = None) -> Sample:
        file = self.describe(index)
        if index in self._index_errors:
            raise BadSample(self._index_errors[index], category=CATEGORY_BAD_ANNOTATION)
        key = self.key(index)
        height, width = (int(v) for v in self._image_sizes[index])
        start, stop = (int(v) for v in self._annotation_offsets[index : index + 2])
        if skip_image is not None and skip_image(key):
            boxes = check_boxes(self._boxes[start:stop], "bbox")
            masks = check_masks(self._decode_masks(start, stop, height, width), boxes.shape[0], height, width, "segmentation")
            return Sample(image=None, prompt_boxes=boxes, boxes=boxes.copy(), masks=masks, key=key, source=self.name,
                          file=file, image_size=(height, width))
        try:
            data = (self.images_dir / file).read_bytes()
        except OSError as error:
            raise BadSample(f"cannot read image: {error.strerror or error}", category=CATEGORY_UNREADABLE) from None
        image = decode_image(data)
        if image.shape[:2] != (height, width):
            raise BadSample(
                f"image is {image.shape[0]}x{image.shape[1]} (HxW) but the annotation file says {height}x{width}",
                category=CATEGORY_BAD_ANNOTATION,
            )
        boxes = check_boxes(self._boxes[start:stop], "bbox")
        masks = check_masks(self._decode_masks(start, stop, height, width), boxes.shape[0], height, width, "segmentation")
        return Sample(image=image, prompt_boxes=boxes, boxes=boxes.copy(), masks=masks, key=key, source=self.name, file=file)

    def _decode_masks(self, start: int, stop: int, height: int, width: int) -> np.ndarray:
        if stop == start:
            return np.zeros((0, height, width), dtype=bool)
        rles = [
            {"size": [int(h), int(w)], "counts": self._rle_counts[i]}
            for i, (h, w) in zip(range(start, stop), self._rle_sizes[start:stop])
        ]
        if any(rle["size"] != [height, width] for rle in rles):
            sizes = sorted({tuple(rle["size"]) for rle in rles})
            raise BadSample(
                f"segmentation size(s) {sizes} do not match the image {height}x{width}", category=CATEGORY_BAD_MASKS
            )
        try:
            decoded = mask_utils.decode(rles)  # (H, W, K), Fortran order
        except MemoryError:
            raise
        except Exception as error:  # malformed RLE counts
            raise BadSample(f"cannot decode RLE: {type(error).__name__}: {error}", category=CATEGORY_BAD_MASKS) from None
        return np.ascontiguousarray(decoded.transpose(2, 0, 1)) != 0
