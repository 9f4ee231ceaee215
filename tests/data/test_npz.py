import shutil

import numpy as np
import pytest

from pyfast.data import NpzSource, SourcePathError

from .builders import NPZ_GOOD, load_all, make_frame, write_npz


def test_every_planted_corruption_is_skipped_with_its_reason(npz_set):
    root, expected_bad = npz_set
    source = NpzSource(root)
    good, bad = load_all(source)
    assert sorted(good) == sorted(NPZ_GOOD)
    assert {file: error.category for file, error in bad.items()} == expected_bad
    assert "'boxes'" in bad["bad/missing_boxes.npz"].reason
    assert "rank 4" in bad["bad/image_rank4.npz"].reason
    assert "4 channels" in bad["bad/image_4_channels.npz"].reason
    assert "(2, 5)" in bad["bad/boxes_k5.npz"].reason
    assert "expected (2, 24, 32)" in bad["bad/masks_count.npz"].reason
    assert "boxes has 2 objects, boxes2 has 3" in bad["bad/paired_count.npz"].reason
    assert "not boxes2, masks2" in bad["bad/paired_partial.npz"].reason


def test_good_samples_have_the_contract_types(npz_set):
    good, _ = load_all(NpzSource(npz_set[0]))
    for sample in good.values():
        k = sample.boxes.shape[0]
        h, w = sample.image.shape[:2]
        assert sample.image.dtype == np.uint8 and sample.image.shape == (h, w, 3)
        assert sample.boxes.dtype == np.float32 and sample.prompt_boxes.shape == (k, 4)
        assert sample.masks.dtype == np.bool_ and sample.masks.shape == (k, h, w)
    assert good["mask255.npz"].masks.any()  # 0/255 masks read as foreground


def test_grayscale_is_expanded_to_three_identical_channels(tmp_path):
    rng = np.random.default_rng(1)
    image, boxes, masks = make_frame(rng, 10, 12, 1, grayscale=True)
    write_npz(tmp_path / "g.npz", image=image, boxes=boxes, masks=masks)
    sample = NpzSource(tmp_path).load(0)
    assert sample.image.shape == (10, 12, 3)
    for channel in range(3):
        np.testing.assert_array_equal(sample.image[:, :, channel], image)


def test_empty_sample_is_valid(tmp_path):
    write_npz(tmp_path / "e.npz", image=np.zeros((8, 9, 3), np.uint8), boxes=np.zeros((0, 4)), masks=np.zeros((0, 8, 9), bool))
    sample = NpzSource(tmp_path).load(0)
    assert sample.boxes.shape == (0, 4) and sample.prompt_boxes.shape == (0, 4) and sample.masks.shape == (0, 8, 9)


def test_paired_sample_prompts_with_frame1_and_supervises_frame2(tmp_path):
    rng = np.random.default_rng(2)
    image1, boxes1, masks1 = make_frame(rng, 20, 30, 3)
    image2, boxes2, masks2 = make_frame(rng, 20, 30, 3)
    assert not np.array_equal(boxes1, boxes2) and not np.array_equal(image1, image2)
    write_npz(tmp_path / "p.npz", image=image1, boxes=boxes1, masks=masks1, image2=image2, boxes2=boxes2, masks2=masks2)
    sample = NpzSource(tmp_path).load(0)
    np.testing.assert_array_equal(sample.image, image2)
    np.testing.assert_array_equal(sample.prompt_boxes, boxes1)
    np.testing.assert_array_equal(sample.boxes, boxes2)
    np.testing.assert_array_equal(sample.masks, masks2)


def test_keys_survive_a_move_and_change_with_the_file(tmp_path, npz_set):
    root, _ = npz_set
    before, _ = load_all(NpzSource(root))
    keys = {file: sample.key for file, sample in before.items()}
    assert len(set(keys.values())) == len(keys)
    assert all(str(tmp_path) not in key for key in keys.values())

    moved = tmp_path / "elsewhere" / "renamed"
    shutil.move(str(root), str(moved))
    after, _ = load_all(NpzSource(moved))
    assert {file: sample.key for file, sample in after.items()} == keys

    copied = tmp_path / "copy"
    shutil.copytree(moved, copied, copy_function=shutil.copyfile)  # fresh mtimes: content decides
    assert {file: s.key for file, s in load_all(NpzSource(copied))[0].items()} == keys

    rng = np.random.default_rng(3)
    image, boxes, masks = make_frame(rng, 24, 32, 2)
    write_npz(moved / "a.npz", image=image, boxes=boxes, masks=masks)
    changed, _ = load_all(NpzSource(moved))
    assert changed["a.npz"].key != keys["a.npz"]
    assert all(changed[file].key == keys[file] for file in keys if file != "a.npz")


def test_max_samples_and_file_list_storage(npz_set):
    root, _ = npz_set
    full = NpzSource(root)
    limited = NpzSource(root, max_samples=3)
    assert len(limited) == 3
    assert [limited.describe(i) for i in range(3)] == [full.describe(i) for i in range(3)]
    # The file list is numpy storage, not a Python list of str that workers would copy page by page.
    assert not any(isinstance(value, list) for value in vars(full).values())
    with pytest.raises(IndexError):
        full.load(len(full))


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        NpzSource(tmp_path / "nope")


def test_a_file_as_root_is_a_source_path_error_naming_it(tmp_path):
    path = write_npz(tmp_path / "one.npz", image=np.zeros((4, 4, 3), np.uint8), boxes=np.zeros((0, 4)),
                     masks=np.zeros((0, 4, 4), bool))
    with pytest.raises(SourcePathError, match="'.*one.npz' is not a folder; npz:PATH takes a folder of .npz files"):
        NpzSource(path)
    with pytest.raises(ValueError):  # what every command line reports as one line
        NpzSource(path)


def test_boxes_at_absurd_scales_skip_the_sample(tmp_path):
    rng = np.random.default_rng(0)
    image, boxes, masks = make_frame(rng, 10, 12, 2)
    for field, column, value in (("boxes", 2, 1e30), ("boxes", 0, -1e30), ("boxes2", 3, 1e30)):
        corrupt = boxes.copy()
        corrupt[1, column] = value
        arrays = {"image": image, "boxes": boxes, "masks": masks, "image2": image, "boxes2": boxes, "masks2": masks}
        arrays[field] = corrupt
        write_npz(tmp_path / "s.npz", **arrays)
        _, bad = load_all(NpzSource(tmp_path))
        assert bad["s.npz"].category == "boxes out of range" and bad["s.npz"].reason.startswith(f"{field} has 1 box")
