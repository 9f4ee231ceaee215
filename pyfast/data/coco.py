"""COCO instances annotations over a folder of images.

Indexing reads the JSON and checks every entry before anything trains. What a bad entry costs:

- an annotation of an image or category the file does not define is dropped and reported (a
  finding); the image's other objects still train;
- an object whose bbox or segmentation cannot be used (missing, short, a polygon of fewer than 3
  points, an RLE of another size, ...) skips its image, counted against --max-skip-fraction;
- an image whose file_name is absolute or contains a `..` part is skipped, never read (a lexical
  check: symlinks placed inside images=, a common way to assemble an image folder, are followed);
- a repeated image entry or a file listed under several ids is a warning; an id listed twice with
  different entries skips that image, since its annotations cannot be attributed.

Masks decode exactly as pycocotools' `COCO.annToRLE` / `annToMask` decode them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PureWindowsPath
from typing import Dict, List, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from .findings import (
    DUPLICATE_IMAGE_ENTRY,
    FILE_LISTED_TWICE,
    MALFORMED_ENTRY,
    NO_CATEGORY,
    POLYGON_PART_IGNORED,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    Finding,
)
from .image_io import decode_image
from pyfast.cache.keys import file_key

from .compact import PackedBytes, PackedStrings
from .sample import BadSample, Sample
from .source import SkipImage, Source, SourcePathError, limit_count
from .validate import (
    CATEGORY_BAD_ANNOTATION,
    CATEGORY_BAD_MASKS,
    CATEGORY_CONFLICTING_ENTRIES,
    CATEGORY_UNREADABLE,
    CATEGORY_UNSAFE_FILE_NAME,
    MAX_BOX_IMAGE_SIZES,
    check_box_range,
    check_boxes,
    check_masks,
)

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_instances(ann_file: Path) -> Tuple[list, list, Optional[list]]:
    """(images, annotations, categories or None) of an instances file; ValueError naming the file."""
    where = f"COCO annotation file {str(ann_file)!r}"
    try:
        with open(ann_file, "rb") as handle:
            dataset = json.load(handle)
    except OSError as error:
        raise ValueError(f"cannot read {where}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(dataset, dict):
        raise ValueError(f"{where} holds {_json_type(dataset)}, expected an object with images, annotations, categories")
    images = dataset.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{where} has no 'images' array" + ("" if images is None else f" (it is {_json_type(images)})"))
    annotations = dataset.get("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{where}: 'annotations' is {_json_type(annotations)}, expected an array")
    categories = dataset.get("categories")
    if categories is not None and not isinstance(categories, list):
        raise ValueError(f"{where}: 'categories' is {_json_type(categories)}, expected an array")
    return images, annotations, categories


class _Unusable(Exception):
    """An annotation's bbox or segmentation cannot be used; the message says why."""


def _xyxy_from_bbox(bbox) -> Tuple[float, float, float, float]:
    """COCO [x, y, width, height] -> xyxy. Non-finite or negative values pass through: the load-time
    box checks report those, as for every source."""
    if bbox is None:
        raise _Unusable("bbox is missing")
    if not isinstance(bbox, list):
        raise _Unusable(f"bbox is {_json_type(bbox)}, expected [x, y, width, height]")
    if len(bbox) != 4:
        raise _Unusable(f"bbox has {len(bbox)} number(s), expected 4 (x, y, width, height)")
    for value in bbox:
        if not _is_number(value):
            raise _Unusable(f"bbox holds {value!r}, not a number")
    x, y, w, h = (float(value) for value in bbox)
    return (x, y, x + w, y + h)


def _polygon_parts(segmentation: list, height: int, width: int) -> Tuple[List[list], List[str]]:
    """The polygon parts that describe an area, and a note for each degenerate part (fewer than 3
    points: no area, so leaving it out leaves the mask unchanged)."""
    if not segmentation:
        raise _Unusable("segmentation is an empty polygon list")
    low = (-MAX_BOX_IMAGE_SIZES * width, -MAX_BOX_IMAGE_SIZES * height)
    high = ((1 + MAX_BOX_IMAGE_SIZES) * width, (1 + MAX_BOX_IMAGE_SIZES) * height)
    parts, ignored = [], []
    for n, part in enumerate(segmentation):
        name = "polygon" if len(segmentation) == 1 else f"polygon part {n}"
        # numpy, not a Python loop over the numbers: COCO-sized files hold tens of millions of them.
        try:
            coords = np.array(part) if isinstance(part, list) else None
        except (ValueError, TypeError):  # nested lists of different lengths
            coords = None
        if coords is None or coords.ndim != 1 or coords.dtype.kind not in "iuf":
            raise _Unusable(f"{name} is not an array of numbers")
        if len(part) % 2:
            raise _Unusable(f"{name} has an odd count of numbers ({len(part)}); polygons are x, y pairs")
        if len(part):
            # Two reductions check everything (NaN propagates through min and max). Rasterizing walks
            # every pixel along each edge: a coordinate at 1e8 takes a minute, at 1e30 it overflows.
            points = coords.reshape(-1, 2)
            (x_low, y_low), (x_high, y_high) = points.min(axis=0).tolist(), points.max(axis=0).tolist()
            if not all(math.isfinite(value) for value in (x_low, y_low, x_high, y_high)):
                raise _Unusable(f"{name} holds a non-finite number")
            if x_low < low[0] or y_low < low[1] or x_high > high[0] or y_high > high[1]:
                raise _Unusable(
                    f"{name} has coordinates more than {MAX_BOX_IMAGE_SIZES:g} image sizes outside the "
                    f"{height}x{width} (HxW) image"
                )
        if len(part) < 6:
            message = f"{name} has {len(part)} numbers; a polygon needs at least 3 points (6 numbers)"
            if len(segmentation) == 1:
                raise _Unusable(message)
            ignored.append(message)
            continue
        parts.append(part)
    if not parts:
        raise _Unusable(f"every polygon part has fewer than 3 points (6 numbers): {'; '.join(ignored)}")
    return parts, ignored


def _segmentation_rle(segmentation, height: int, width: int) -> Tuple[dict, List[str]]:
    """The object's mask as a compressed RLE, as `COCO.annToRLE` makes it, and the notes of ignored
    degenerate polygon parts. Compressed RLE strings are decoded (and checked) at load."""
    if segmentation is None:
        raise _Unusable("segmentation is missing (every object needs a polygon or an RLE mask)")
    if isinstance(segmentation, list):
        parts, ignored = _polygon_parts(segmentation, height, width)
        return mask_utils.merge(mask_utils.frPyObjects(parts, height, width)), ignored
    if not isinstance(segmentation, dict):
        raise _Unusable(f"segmentation is {_json_type(segmentation)}, expected polygons (an array) or an RLE (an object)")
    counts, size = segmentation.get("counts"), segmentation.get("size")
    if counts is None or size is None:
        raise _Unusable("an RLE segmentation needs both 'counts' and 'size'")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(value) for value in size)):
        raise _Unusable(f"RLE size {size!r} is not [height, width]")
    if size != [height, width]:
        raise _Unusable(f"RLE size {size} does not match the image {height}x{width} (HxW)")
    if isinstance(counts, list):
        if not all(_is_int(value) and value >= 0 for value in counts):
            raise _Unusable("uncompressed RLE counts must be non-negative integers")
        # pycocotools decodes a short run list into uninitialized memory: check the total here.
        if sum(counts) != height * width:
            raise _Unusable(f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width} (height x width)")
        return mask_utils.frPyObjects({"size": size, "counts": counts}, height, width), []
    if isinstance(counts, str) and counts.isascii():
        return {"size": size, "counts": counts}, []
    raise _Unusable(f"RLE counts is {_json_type(counts)}, expected an array or an ASCII string")


def _file_name_problem(file_name) -> Optional[Tuple[str, str]]:
    """(reason, category) when the entry's file_name cannot be read safely inside images=."""
    if not isinstance(file_name, str) or not file_name:
        return "image entry has no file_name", CATEGORY_BAD_ANNOTATION
    if "\0" in file_name:
        return f"file_name {file_name!r} holds a NUL character", CATEGORY_BAD_ANNOTATION
    if file_name.startswith(("/", "\\")) or PureWindowsPath(file_name).drive:
        reason = f"file_name {file_name!r} is absolute; file names are relative to images= and nothing outside it is read"
        return reason, CATEGORY_UNSAFE_FILE_NAME
    if ".." in re.split(r"[\\/]", file_name):
        reason = f"file_name {file_name!r} contains '..'; file names stay inside images= and nothing outside it is read"
        return reason, CATEGORY_UNSAFE_FILE_NAME
    return None


def _file_of(info: dict) -> str:
    """How reports name an image: its file_name, or its id when it has no usable one."""
    file_name = info.get("file_name")
    return file_name if isinstance(file_name, str) and file_name else f"(image id {info.get('id')})"


def _entry_text(info: dict) -> str:
    return f"{info.get('file_name')!r} {info.get('height')}x{info.get('width')}"


def _same_entry(a: dict, b: dict) -> bool:
    return all(a.get(field) == b.get(field) for field in ("file_name", "height", "width"))


class CocoSource(Source):
    """One sample per image of a COCO instances file (sorted by image id; images without objects
    included, K = 0). Boxes come from `bbox`, masks from the polygon or RLE `segmentation`; crowd
    annotations are ignored. When the file has a `categories` array, every annotation's
    `category_id` must be in it; without one, categories are not checked (the heads are
    class-agnostic).

    After indexing, everything `load` needs is numpy: the parsed JSON (a graph of Python dicts) is
    dropped, so forked DataLoader workers share these pages instead of copying them.
    """

    kind = "coco"
    loads_without_image = True

    def __init__(self, ann_file, images_dir, *, max_samples: Optional[int] = None, name: Optional[str] = None):
        ann_file, images_dir = Path(ann_file), Path(images_dir)
        if not ann_file.exists():
            raise FileNotFoundError(f"COCO annotation file {str(ann_file)!r} does not exist")
        if ann_file.is_dir():
            raise SourcePathError(
                f"COCO annotation path {str(ann_file)!r} is a folder; coco:PATH takes the instances JSON file "
                "(e.g. annotations/instances_val2017.json)"
            )
        if not images_dir.exists():
            raise FileNotFoundError(f"COCO image folder {str(images_dir)!r} does not exist")
        if not images_dir.is_dir():
            raise SourcePathError(
                f"COCO images= path {str(images_dir)!r} is not a folder; images= takes the folder the file_names are relative to"
            )
        super().__init__(name or f"coco ({ann_file})")
        self.images_dir = images_dir
        self._index(ann_file.name, *_read_instances(ann_file), max_samples)

    def _finding(self, kind: str, file: str, detail: str, **where) -> str:
        return json.dumps(Finding(kind, self.name, file, detail, **where).as_record())

    def _index(self, ann_name: str, images: list, annotations: list, categories: Optional[list],
               max_samples: Optional[int]) -> None:
        findings: List[str] = []  # JSON records: packed below like everything else the source keeps

        entries: Dict[int, dict] = {}  # image id -> its first entry
        repeats: Dict[int, List[dict]] = {}
        for n, info in enumerate(images):
            image_id = info.get("id") if isinstance(info, dict) else None
            if not _is_int(image_id):
                findings.append(self._finding(MALFORMED_ENTRY, ann_name, f"images[{n}] has no integer id; not used"))
            elif image_id in entries:
                repeats.setdefault(image_id, []).append(info)
            else:
                entries[image_id] = info
        image_ids = sorted(entries)
        image_ids = image_ids[: limit_count(len(image_ids), max_samples)]
        used = set(image_ids)

        category_ids = None
        if categories is not None:
            category_ids = {c.get("id") for c in categories if isinstance(c, dict) and isinstance(c.get("id"), (int, str))}
        by_image: Dict[int, List[dict]] = {}
        for n, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                findings.append(self._finding(MALFORMED_ENTRY, ann_name, f"annotations[{n}] is {_json_type(annotation)}; not used"))
                continue
            annotation_id = annotation.get("id") if _is_int(annotation.get("id")) else None
            image_id = annotation.get("image_id")
            if not (_is_int(image_id) and image_id in entries):
                detail = "no image_id" if image_id is None else f"image_id {image_id!r} is not among the images"
                findings.append(self._finding(UNKNOWN_IMAGE, ann_name, f"{detail}; not used", annotation=annotation_id))
                continue
            if image_id not in used:
                continue  # beyond max_samples
            if category_ids is not None:
                file = _file_of(entries[image_id])
                category = annotation.get("category_id")
                if category is None:
                    findings.append(self._finding(NO_CATEGORY, file, "no category_id; not used", annotation=annotation_id))
                    continue
                if not isinstance(category, (int, str)) or category not in category_ids:
                    findings.append(self._finding(
                        UNKNOWN_CATEGORY, file, f"category_id {category!r} is not among the categories; not used",
                        annotation=annotation_id,
                    ))
                    continue
            by_image.setdefault(image_id, []).append(annotation)

        file_names, sizes, boxes, annotation_ids, rle_counts, rle_sizes = [], [], [], [], [], []
        annotation_offsets = [0]
        errors: Dict[int, Tuple[str, str]] = {}  # sample position -> (reason, category)
        listed: Dict[str, List[int]] = {}  # file_name -> image ids
        for position, image_id in enumerate(image_ids):
            info = entries[image_id]
            file = _file_of(info)
            file_names.append(file)
            height, width = info.get("height"), info.get("width")
            if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
                errors[position] = ("image entry lacks a valid height/width", CATEGORY_BAD_ANNOTATION)
                height = width = 0
            sizes.append((height, width))
            problem = _file_name_problem(info.get("file_name"))
            if problem is not None:
                errors.setdefault(position, problem)
            listed.setdefault(file, []).append(image_id)
            if image_id in repeats:
                copies = 1 + len(repeats[image_id])
                if all(_same_entry(info, other) for other in repeats[image_id]):
                    findings.append(self._finding(
                        DUPLICATE_IMAGE_ENTRY, file, f"image id {image_id} is listed {copies} times; used once"))
                else:
                    texts = ", ".join(_entry_text(entry) for entry in [info] + repeats[image_id])
                    errors.setdefault(position, (
                        f"image id {image_id} is listed {copies} times with different entries ({texts}); "
                        "its annotations cannot be attributed", CATEGORY_CONFLICTING_ENTRIES))

            objects = []  # (xyxy, annotation id, rle), committed only when every object is usable
            notes = []
            if position not in errors:
                for annotation in by_image.get(image_id, ()):
                    if annotation.get("iscrowd", 0):
                        continue  # crowd regions are not objects to refine
                    annotation_id = annotation.get("id") if _is_int(annotation.get("id")) else None
                    try:
                        box = _xyxy_from_bbox(annotation.get("bbox"))
                        rle, ignored = _segmentation_rle(annotation.get("segmentation"), height, width)
                    except _Unusable as problem:
                        errors[position] = (f"annotation {annotation.get('id')}: {problem}", CATEGORY_BAD_ANNOTATION)
                        break
                    except MemoryError:
                        raise
                    except Exception as error:  # whatever else pycocotools rejects
                        errors[position] = (
                            f"annotation {annotation.get('id')}: cannot decode segmentation: {type(error).__name__}: {error}",
                            CATEGORY_BAD_ANNOTATION,
                        )
                        break
                    notes.extend((len(objects), annotation_id, note) for note in ignored)
                    objects.append((box, annotation_id, rle))
            if position not in errors:
                for obj, annotation_id, note in notes:
                    findings.append(self._finding(
                        POLYGON_PART_IGNORED, file, f"{note}; that part is left out", object=obj, annotation=annotation_id))
                for box, annotation_id, rle in objects:
                    counts = rle["counts"]
                    rle_counts.append(counts.encode("ascii") if isinstance(counts, str) else bytes(counts))
                    rle_sizes.append(tuple(int(v) for v in rle["size"]))
                    boxes.append(box)
                    annotation_ids.append(-1 if annotation_id is None else annotation_id)
            annotation_offsets.append(len(boxes))
        for file, ids in listed.items():
            if len(ids) > 1:
                findings.append(self._finding(
                    FILE_LISTED_TWICE, file, f"image ids {ids} all name this file; each is its own sample"))

        self._image_ids = np.asarray(image_ids, dtype=np.int64)
        self._file_names = PackedStrings(file_names)
        self._image_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self._annotation_offsets = np.asarray(annotation_offsets, dtype=np.int64)
        self._boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self._annotation_ids = np.asarray(annotation_ids, dtype=np.int64)
        self._rle_counts = PackedBytes(rle_counts)
        self._rle_sizes = np.asarray(rle_sizes, dtype=np.int64).reshape(-1, 2)
        positions = sorted(errors)
        self._error_positions = np.asarray(positions, dtype=np.int64)
        self._error_reasons = PackedStrings(errors[p][0] for p in positions)
        self._error_categories = PackedStrings(errors[p][1] for p in positions)
        self._findings = PackedStrings(findings)

    def __len__(self) -> int:
        return len(self._image_ids)

    def describe(self, index: int) -> str:
        return self._file_names[self._check_index(index)]

    def image_id(self, index: int) -> int:
        return int(self._image_ids[self._check_index(index)])

    def annotation_ids(self, index: int) -> np.ndarray:
        """The sample's annotation ids in `boxes` order (-1 for an annotation without an integer id)."""
        index = self._check_index(index)
        start, stop = (int(v) for v in self._annotation_offsets[index : index + 2])
        return self._annotation_ids[start:stop].copy()

    def index_findings(self) -> List[Finding]:
        return [Finding.from_record(json.loads(self._findings[i])) for i in range(len(self._findings))]

    def _index_error(self, index: int) -> Optional[BadSample]:
        at = int(np.searchsorted(self._error_positions, index))
        if at < len(self._error_positions) and self._error_positions[at] == index:
            return BadSample(self._error_reasons[at], category=self._error_categories[at])
        return None

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
        error = self._index_error(index)
        if error is not None:
            raise error  # before any read: an unsafe file_name is never opened
        key = self.key(index)
        height, width = (int(v) for v in self._image_sizes[index])
        start, stop = (int(v) for v in self._annotation_offsets[index : index + 2])
        boxes = check_box_range(check_boxes(self._boxes[start:stop], "bbox"), height, width, "bbox")
        masks = check_masks(self._decode_masks(start, stop, height, width), boxes.shape[0], height, width, "segmentation")
        if skip_image is not None and skip_image(key):
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
