"""A SAM ViT-B image encoder as pyfast-train's frozen backbone at 1024 x 1024: cold s/batch (epoch 1:
the encoder runs on every sample and its features fill the cache), warm s/batch (epoch 2: every
feature comes from the cache), the cache hit rate from epoch 2, and the encoder's share of a cold step.

The encoder is transformers' `SamVisionModel` with `SamVisionConfig`'s defaults, SAM ViT-B's image
encoder (hidden 768, 12 blocks of which 4 attend globally, 16-pixel patches, 1024 x 1024 input, a
256-channel neck: 89.7 M parameters), random weights (seeded), wrapped by
`pyfast.models.hf.wrap_encoder` and handed to the training job as `--backbone bench_encoder:sam_vit_b`.
The run is the training job's own entry point (`pyfast.train.prepare` + `train`) in a fresh process,
on synthetic 1024 x 1024 images, CUDA when available (bf16 autocast, as `--precision auto`) else the
CPU (fp32). The encoder's time is taken by hooks on the backbone inside training steps (synchronized
on CUDA), so its share is of the steps' own wall time.

    python benchmarks/bench_encoder.py                        # prints the table row
    pytest benchmarks/bench_encoder.py --benchmark-only -s    # the same, and asserts the targets

Sizes: PYFAST_BENCH_ENCODER_SAMPLES (default 64 on CUDA, 5 on the CPU: 4 to train on, 1 to
validate), PYFAST_BENCH_ENCODER_BATCH (default 4), PYFAST_BENCH_ENCODER_EPOCHS (default 2 on CUDA, 3
on the CPU). On a 2-core CPU one 1024 x 1024 image through the encoder takes about a minute, so the
CPU run trains one cold batch and two warm ones and takes about six minutes, nearly all of them in
the encoder (once to probe its maps, then once per sample).

Targets: every lookup of epoch 2 a hit, warm at least 50x faster than cold, warm under 10 s/batch,
and on CUDA cold under 10 s/batch as well (on the CPU the encoder alone is far above that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
SEED = 0


def sam_vit_b():
    """SAM ViT-B's image encoder with seeded random weights, as a pyfast backbone (the --backbone callable)."""
    import torch
    import transformers

    from pyfast.models.hf import wrap_encoder

    torch.manual_seed(SEED)
    return wrap_encoder(transformers.SamVisionModel(transformers.SamVisionConfig()), name="SAM ViT-B encoder")


def settings() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    samples = int(os.environ.get("PYFAST_BENCH_ENCODER_SAMPLES", "64" if cuda else "5"))
    return {
        "samples": samples,
        "batch": int(os.environ.get("PYFAST_BENCH_ENCODER_BATCH", "4")),
        # on the CPU one warm batch an epoch: a third epoch gives two, one alone is at the mercy of the load
        "epochs": int(os.environ.get("PYFAST_BENCH_ENCODER_EPOCHS", "2" if cuda else "3")),
    }


class EncoderClock:
    """Seconds the backbone spends inside training steps (hooks; synchronized on CUDA)."""

    def __init__(self, backbone, device):
        import torch

        self.seconds, self.images, self.in_step, self._start = 0.0, 0, False, None
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        backbone.register_forward_pre_hook(self._before)
        backbone.register_forward_hook(self._after)

    def _before(self, module, args):
        if self.in_step:
            self._sync()
            self._start = time.perf_counter()

    def _after(self, module, args, output):
        if self.in_step:
            self._sync()
            self.seconds += time.perf_counter() - self._start
            self.images += args[0].shape[0]

    def around(self, step):
        def timed(*args, **kwargs):
            self.in_step = True
            try:
                return step(*args, **kwargs)
            finally:
                self.in_step = False

        return timed


def run_one(root: str) -> dict:
    """Two epochs through the training job in this process; the measurements as a dict."""
    import torch

    import pyfast.train.loop as loop
    from pyfast.train import build_config, prepare, train

    options = settings()
    config = build_config({
        "backbone": "bench_encoder:sam_vit_b", "data": [f"synthetic:,num_samples={options['samples']},image_size=1024"],
        "val_fraction": 1 / options["samples"] if options["samples"] <= 8 else 0.125,
        "batch_size": options["batch"], "epochs": options["epochs"], "out": os.path.join(root, "run"),
    })  # fmt: skip
    lines = []
    started = time.perf_counter()
    run = prepare(config, log=lines.append)
    setup_s = time.perf_counter() - started
    clock = EncoderClock(run.features.backbone, run.device)
    loop.train_step = clock.around(loop.train_step)
    summary = train(run, progress_bar=False)
    cold_steps_s = run.stats.cold.seconds
    return {
        "device": str(run.device), "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda"
        else "cpu", "threads": torch.get_num_threads(), "precision": run.precision, "image": config.image_size,
        "batch": config.batch_size, "train": len(run.data.train_indices), "val": len(run.data.val_indices),
        "epochs": config.epochs, "cold": summary["s_per_batch_cold"], "warm": summary["s_per_batch_warm"],
        "hit": summary["cache_hit_rate"], "lookups_warm": summary["cache_lookups_warm"],
        "encoder_share_cold": clock.seconds / cold_steps_s if cold_steps_s else None,
        "encoder_s_per_image": clock.seconds / clock.images if clock.images else None,
        "setup_s": setup_s, "wall_s": time.perf_counter() - started, "startup": lines,
    }  # fmt: skip


def run_in_fresh_process() -> dict:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([TREE, HERE, os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", root], env=env,
                                capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"bench_encoder: {result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def format_row(r: dict) -> str:
    speedup = r["cold"] / r["warm"] if r["warm"] else float("nan")
    return "\n".join([
        "| device | precision | image | batch | train / val | s/batch cold | s/batch warm | cold / warm | hit rate "
        "epoch 2 | encoder share of a cold step | encoder s/image |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['device_name']} ({r['threads']} threads) | {r['precision']} | {r['image']} | {r['batch']} | "
        f"{r['train']} / {r['val']} | {r['cold']:.2f} | {r['warm']:.4f} | {speedup:.0f}x | {r['hit']:.3f} | "
        f"{r['encoder_share_cold']:.1%} | {r['encoder_s_per_image']:.3f} |",
    ])  # fmt: skip


def test_sam_vit_b_cold_and_warm(benchmark):
    pytest.importorskip("transformers")
    result = {}
    benchmark.pedantic(lambda: result.update(run_in_fresh_process()), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "startup"})
    print("\n" + "\n".join(result["startup"]) + "\n" + format_row(result) + f"\nwall {result['wall_s']:.0f} s "
          f"(setup {result['setup_s']:.0f} s)")
    assert result["hit"] == 1.0 and result["lookups_warm"] > 0
    assert result["cold"] / result["warm"] >= 50, result
    assert result["warm"] < 10.0, result
    if result["device"].startswith("cuda"):
        assert result["cold"] < 10.0, result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2])))
        sys.exit(0)
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench_encoder needs transformers: pip install 'pyfast[hf]'")
    result = run_in_fresh_process()
    print("\n".join(result["startup"]))
    print(format_row(result))
    print(f"wall {result['wall_s']:.0f} s (setup {result['setup_s']:.0f} s)")
