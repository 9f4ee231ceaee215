"""Frozen encoders as pyfast backbones, in two parts.

SAM ViT-B at 1024 x 1024 (`test_sam_vit_b_cold_and_warm`, `bench_encoder.py sam-vit-b`): the encoder
as pyfast-train's frozen backbone, cold s/batch (epoch 1: the encoder runs on every sample and its
features fill the cache), warm s/batch (later epochs: every feature comes from the cache), the cache
hit rate from epoch 2, and the encoder's share of a cold step.

The encoder is transformers' `SamVisionModel` with `SamVisionConfig`'s defaults, SAM ViT-B's image
encoder (hidden 768, 12 blocks of which 4 attend globally, 16-pixel patches, 1024 x 1024 input, a
256-channel neck: 89.7 M parameters), random weights (seeded), wrapped by
`pyfast.models.hf.wrap_encoder` and handed to the training job as `--backbone bench_encoder:sam_vit_b`.
The run is the training job's own entry point (`pyfast.train.prepare` + `train`) in a fresh process,
on synthetic 1024 x 1024 images, CUDA when available (bf16 autocast, as `--precision auto`) else the
CPU (fp32). The encoder's time is taken by hooks on the backbone inside training steps (synchronized
on CUDA), so its share is of the steps' own wall time.

Small encoders (`test_small_encoders_forward_and_extraction`, `bench_encoder.py small`): SAM, DINOv2
and ViT at small configs of their real architectures (6 blocks of width 384), in one fresh process:
the forward of the transformers model on normalized pixels next to the pyfast backbone's (which
normalizes and turns tokens into maps) on the same batch, then feature extraction through the data
pipeline and the FeatureProvider twice over the same samples: cold (decode, encoder, fp16 cast, one
cache entry written per sample) and warm (every sample a cache hit), in images/s.

    python benchmarks/bench_encoder.py [all|small|sam-vit-b]   # prints the tables
    pytest benchmarks/bench_encoder.py --benchmark-only -s     # the same, and asserts the targets

Sizes: PYFAST_BENCH_ENCODER_SAMPLES (SAM ViT-B; default 64 on CUDA, 5 on the CPU: 4 to train on, 1 to
validate), PYFAST_BENCH_ENCODER_BATCH (default 4, both parts), PYFAST_BENCH_ENCODER_EPOCHS (default 2
on CUDA, 3 on the CPU), PYFAST_BENCH_ENCODER_REPEATS (small encoders: forward repeats and batches per
pass, default 3). On a 2-core CPU one 1024 x 1024 image through SAM ViT-B takes one to two minutes,
so the CPU run takes many minutes, nearly all of them in the encoder (once to probe its maps, then
once per sample).

Targets: every lookup of epoch 2 a hit, warm at least 50x faster than cold, warm under 10 s/batch,
and on CUDA cold under 10 s/batch as well (on the CPU the encoder alone is far above that); for the
small encoders, every warm lookup a hit and warm extraction faster than cold.
"""

from __future__ import annotations

import contextlib
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


# ------------------------------------------------------------ forward and feature extraction per family

# Small configs of the real architectures (random weights, seeded): SAM's windowed + global-attention
# ViT with its neck, DINOv2 and ViT, each 6 blocks of width 384 (ViT-S's width, half its depth).
SMALL = {
    "SAM": ("SamVisionModel", "SamVisionConfig", dict(hidden_size=384, output_channels=256, num_hidden_layers=6,
            num_attention_heads=6, mlp_dim=1536, image_size=512, patch_size=16, window_size=14,
            global_attn_indexes=[1, 3, 5])),
    "DINOv2": ("Dinov2Model", "Dinov2Config", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
               intermediate_size=1536, image_size=224, patch_size=14)),
    "ViT": ("ViTModel", "ViTConfig", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
            intermediate_size=1536, image_size=224, patch_size=16)),
}  # fmt: skip


def small_encoder(family: str):
    import torch
    import transformers

    from pyfast.models.hf import wrap_encoder

    model_class, config_class, options = SMALL[family]
    torch.manual_seed(SEED)
    return wrap_encoder(getattr(transformers, model_class)(getattr(transformers, config_class)(**options)), name=family)


def _median_seconds(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_extraction(family: str, root: str, batch: int, repeats: int) -> dict:
    """One family's encoder, the pyfast way and transformers' own, in this process:

    - forward: the transformers model on normalized pixels (eager reference) vs the pyfast backbone
      (normalization inside, tokens to maps) on the same [0, 1] batch; median of `repeats`
    - extraction, cold: the data pipeline's cache miss (decode + letterbox + collate) and the
      FeatureProvider (encoder, one cast to fp16, an entry per sample written), images/s
    - extraction, warm: the same batches again, every sample a cache hit (entry read + collate,
      then the provider's upload), images/s; the hit rate of that pass
    """
    import torch

    from pyfast.cache import FeatureCache
    from pyfast.data import Letterbox, RobustDataset, build_sources, collate, parse_data_spec
    from pyfast.models import probe
    from pyfast.train.features import CachedFeatures, FeatureProvider, feature_fingerprint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    backbone = small_encoder(family).to(device)
    size = backbone.input_size
    layout = probe(backbone, size, device)
    use = [list(layout)[-1]]

    x = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(SEED))
    pixels = backbone.normalize(x)  # what the model's image processor would hand it
    with torch.no_grad(), (autocast or contextlib.nullcontext)():
        eager = _median_seconds(lambda: backbone.model(pixel_values=pixels), repeats, sync)
        wrapped = _median_seconds(lambda: backbone(x), repeats, sync)

    samples = batch * repeats
    sources = build_sources([parse_data_spec(f"synthetic:,num_samples={samples},image_size={size}")], log=lambda _: None)
    dataset = RobustDataset(sources, preprocess=Letterbox(size))
    cache = FeatureCache(os.path.join(root, family), feature_fingerprint(
        backbone, dataset.preprocess.fingerprint(), size, "bf16" if autocast else "fp32", torch.float16))
    dataset.features = CachedFeatures(cache, layout, use)
    provider = FeatureProvider(backbone, layout, use, cache, device, autocast, torch.float16)
    batches = [list(range(i, i + batch)) for i in range(0, samples, batch)]

    def one_pass():
        data_s = provider_s = 0.0
        for indices in batches:
            start = time.perf_counter()
            collated = collate([dataset[i] for i in indices])
            middle = time.perf_counter()
            provider(collated)
            sync()
            data_s, provider_s = data_s + middle - start, provider_s + time.perf_counter() - middle
        return data_s, provider_s

    cold_data, cold_provider = one_pass()
    before = cache.stats.hits, cache.stats.misses
    warm_data, warm_provider = one_pass()
    hits, misses = cache.stats.hits - before[0], cache.stats.misses - before[1]
    maps = {name: list(m.shape) for name, m in layout.items()}
    return {
        "family": family, "device": str(device), "precision": "bf16" if autocast else "fp32", "image": size,
        "batch": batch, "maps": maps, "params_m": sum(p.numel() for p in backbone.parameters()) / 1e6,
        "forward_eager_s": eager, "forward_pyfast_s": wrapped,
        "cold_images_per_s": samples / (cold_data + cold_provider), "cold_provider_s": cold_provider,
        "cold_data_s": cold_data,
        "warm_images_per_s": samples / (warm_data + warm_provider), "warm_provider_s": warm_provider,
        "warm_data_s": warm_data, "warm_hit_rate": hits / (hits + misses) if hits + misses else None,
        "entry_kb": cache.disk_usage() / samples / 1024,
    }  # fmt: skip


def extraction_in_fresh_process() -> list[dict]:
    batch = int(os.environ.get("PYFAST_BENCH_ENCODER_BATCH", "4"))
    repeats = int(os.environ.get("PYFAST_BENCH_ENCODER_REPEATS", "3"))
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([TREE, HERE, os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--extraction", root, str(batch),
                                 str(repeats)], env=env, capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"bench_encoder: {result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def format_extraction(rows: list[dict]) -> str:
    lines = [
        "| encoder | params | image | maps | forward eager (transformers) | forward pyfast | pyfast / eager | "
        "cold images/s | warm images/s | warm / cold | hit rate warm | entry |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        maps = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in r["maps"].items())
        lines.append(
            f"| {r['family']} | {r['params_m']:.1f} M | {r['image']} | {maps} | {r['forward_eager_s'] * 1e3:.0f} ms | "
            f"{r['forward_pyfast_s'] * 1e3:.0f} ms | {r['forward_pyfast_s'] / r['forward_eager_s']:.2f} | "
            f"{r['cold_images_per_s']:.1f} | {r['warm_images_per_s']:.0f} | "
            f"{r['warm_images_per_s'] / r['cold_images_per_s']:.0f}x | {r['warm_hit_rate']:.3f} | "
            f"{r['entry_kb']:.0f} KiB |")
    return "\n".join(lines)


def test_small_encoders_forward_and_extraction(benchmark):
    pytest.importorskip("transformers")
    rows = []
    benchmark.pedantic(lambda: rows.extend(extraction_in_fresh_process()), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    print("\n" + format_extraction(rows))
    for r in rows:
        assert r["warm_hit_rate"] == 1.0, r
        assert r["warm_images_per_s"] > r["cold_images_per_s"], r


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
    if len(sys.argv) == 5 and sys.argv[1] == "--extraction":
        root, batch, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps([measure_extraction(family, root, batch, repeats) for family in SMALL]))
        sys.exit(0)
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench_encoder needs transformers: pip install 'pyfast[hf]'")
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which not in ("all", "small", "sam-vit-b"):
        sys.exit("usage: bench_encoder.py [all|small|sam-vit-b]")
    if which in ("all", "small"):
        print(format_extraction(extraction_in_fresh_process()))
    if which in ("all", "sam-vit-b"):
        result = run_in_fresh_process()
        print("\n".join(result["startup"]))
        print(format_row(result))
        print(f"wall {result['wall_s']:.0f} s (setup {result['setup_s']:.0f} s)")
