import pytest

# A tiny configuration: the whole tests/train folder runs in well under a minute on 2 cores.
TINY = [
    "--data", "synthetic:,num_samples=40,image_size=32",
    "--image-size", "32",
    "--batch-size", "8",
    "--epochs", "2",
    "--no-progress",
]
TINY_CONFIG = {
    "data": ["synthetic:,num_samples=40,image_size=32"],
    "image_size": 32,
    "batch_size": 8,
    "epochs": 2,
    "roi_size": 4,
    "hidden": 8,
}


@pytest.fixture
def tiny_args():
    return list(TINY)


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("roi_size: 4\nhidden: 8\n")
    return str(path)
