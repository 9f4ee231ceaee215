"""s/batch of pyfast-train's default and --fast configurations, cold vs warm feature cache, and
where a warm step's time goes (data loading, features from the cache, forward + loss, backward,
optimizer incl. the one host sync).

    python benchmarks/bench_train.py            # prints the table
    pytest benchmarks/bench_train.py -s         # same, and asserts s/batch < 10 s

Each configuration runs two epochs on a reduced synthetic set (the batch shapes are those of the
full configuration; only the number of batches per epoch is smaller): epoch 1 computes every
feature with the backbone (cold), epoch 2 reads them all from the cache (warm).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

try:
    from pyfast.train import FAST, Trainer, build_config
except ModuleNotFoundError as error:  # an optional dependency of the training job (pycocotools)
    if __name__ == "__main__":
        raise
    import pytest

    pytest.skip(f"needs {error.name}", allow_module_level=True)

CONFIGS = {
    "default": {},
    "--fast": FAST,
}
SAMPLES = int(os.environ.get("PYFAST_BENCH_TRAIN_SAMPLES", "192"))


def run_config(name: str, preset: dict, root: str) -> dict:
    cfg = build_config(preset, {"synthetic_samples": SAMPLES, "epochs": 2, "out": os.path.join(root, name.strip("-"))})
    trainer = Trainer(cfg, progress=False, log=lambda *a: None)
    summary = trainer.run()
    share = summary["warm_step_share"] or {}
    return {
        "config": name,
        "image": cfg.image_size,
        "batch": cfg.batch_size,
        "cold": summary["s_per_batch_cold"],
        "warm": summary["s_per_batch_warm"],
        "hit": summary["cache_hit_rate"],
        **{k: share.get(k, 0.0) for k in ("data", "features", "forward_loss", "backward", "optimizer")},
    }


def run_all() -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        return [run_config(name, preset, root) for name, preset in CONFIGS.items()]


def format_rows(rows: list[dict]) -> str:
    head = (f"{'config':<8} {'image':>5} {'batch':>5} {'s/batch cold':>12} {'s/batch warm':>12} {'hit rate':>8}  "
            "warm step share: data / features / forward+loss / backward / optimizer")
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {SAMPLES} samples, 2 epochs", head]
    for r in rows:
        lines.append(
            f"{r['config']:<8} {r['image']:>5} {r['batch']:>5} {r['cold']:>12.3f} {r['warm']:>12.3f} {r['hit']:>8.3f}  "
            f"{r['data']:.0%} / {r['features']:.0%} / {r['forward_loss']:.0%} / {r['backward']:.0%} / {r['optimizer']:.0%}"
        )
    return "\n".join(lines)


def test_train_s_per_batch():
    rows = run_all()
    print("\n" + format_rows(rows))
    for r in rows:
        assert r["hit"] == 1.0
        assert r["cold"] < 10.0 and r["warm"] < 10.0, r


if __name__ == "__main__":
    print(format_rows(run_all()))
    sys.exit(0)
