import pytest

from .builders import make_coco_set, make_npz_set


@pytest.fixture
def npz_set(tmp_path):
    """(root, {bad file: expected category})"""
    return make_npz_set(tmp_path / "npz")


@pytest.fixture
def coco_set(tmp_path):
    """(ann_file, images_dir, {bad file: expected category})"""
    return make_coco_set(tmp_path / "coco")
