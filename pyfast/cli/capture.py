"""pyfast-capture: store the activations of chosen layers of a model over a data set, as fp16/bf16 shards.

Argument parsing and printing only; the work is pyfast.capture.capture. Rerunning the same command
continues a stopped capture; reading it back is `pyfast.ActivationDataset(OUT)`.

Exit status: 0 the capture is complete, 1 it failed on the way (a value out of range, too many bad
samples, a folder holding another capture), 2 it could not start (arguments, model, weights, data
sources, layer patterns), 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from pyfast.data import MissingSourceError, TooManyBadSamples, add_data_arguments

PROG = "pyfast-capture"
DEFAULT_IMAGE_SIZE = 128  # for models that do not say (no `input_size`): pyfast-train's default


def _pool_argument(text: str):
    from pyfast.capture import parse_pool_spec

    try:
        return parse_pool_spec(text)
    except ValueError as error:  # argparse would say only "invalid value"
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    from pyfast.capture.runner import DEFAULT_SHARD_MB, PRECISIONS, STORE_DTYPES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a data set through a model and store the outputs of chosen layers as fp16/bf16 "
        "safetensors shards with a manifest. Rerun the same command to continue a stopped capture.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="SPEC",
                       help="module:callable (returns an nn.Module taking (B, 3, S, S) images in [0, 1]) or hf:PATH[,options]")
    model.add_argument("--weights", metavar="PATH", default=None,
                       help="a checkpoint to load into the model (.pt/.ckpt/.safetensors/model directory); its report is printed")
    model.add_argument("--state-key", metavar="KEY", default=None, help="where the state dict is in the checkpoint (dotted path)")
    model.add_argument("--prefix", action="append", default=[], metavar="P",
                       help="another key prefix to strip (module., _orig_mod., model. always are tried)")
    model.add_argument("--unsafe-pickle", action="store_true",
                       help="torch.load with weights_only=False: runs code from the file; only for files you trust")

    layers = parser.add_argument_group("layers")
    layers.add_argument("--layers", action="append", default=[], metavar="PATTERNS",
                        help="module name patterns (fnmatch, over named_modules()), repeatable and comma-separated, "
                        "e.g. 'encoder.layer.*.mlp'; '.' is the model's own output")
    layers.add_argument("--pool", action="append", default=[], type=_pool_argument, metavar="[PATTERN=]KIND[:DIMS]",
                        help="pool tokens/maps before storing: none, mean, max or cls (token 0); PATTERN picks "
                        "layers (the last match wins); DIMS the dims to reduce (default: tokens of (B, T, C), "
                        "spatial dims of (B, C, H, W))")
    layers.add_argument("--list-layers", action="store_true",
                        help="print every module with what it would store, and exit")

    add_data_arguments(parser)

    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="the capture folder (created; a rerun continues it)")
    output.add_argument("--dtype", choices=tuple(STORE_DTYPES), default="fp16", help="stored dtype (default fp16)")
    output.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB, metavar="MB",
                        help="data bytes a shard holds, in MiB: also the memory the capture keeps (default %(default)s)")
    output.add_argument("--overflow", choices=("error", "saturate"), default="error",
                        help="values beyond the dtype's range: stop with an error (default), or clip to +-max and count them")
    output.add_argument("--nonfinite", choices=("keep", "error"), default="keep",
                        help="NaN/inf: store them as they are and count them (default), or stop with an error")
    output.add_argument("--verify", action="store_true",
                        help="on resume, verify the checksums of the shards already written (default: their sizes)")

    run = parser.add_argument_group("run")
    run.add_argument("--image-size", type=int, default=None, metavar="S",
                     help=f"images are letterboxed to S x S (default: the model's input_size, else {DEFAULT_IMAGE_SIZE})")
    run.add_argument("--batch-size", type=int, default=16, metavar="B", help="(default %(default)s)")
    run.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader workers (default 0)")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    run.add_argument("--precision", choices=PRECISIONS, default="fp32",
                     help="autocast of the forward (default fp32: the activations at full precision)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load_model(args):
    from pyfast.models import load_backbone

    options = {}
    if args.weights is not None:
        options = {"prefixes": tuple(args.prefix), "state_key": args.state_key, "weights_only": not args.unsafe_pickle}
    model = load_backbone(args.model, weights=args.weights, log=print, **options)
    report = getattr(model, "weights_report", None)
    if report is not None:
        print(f"weights: {report.source} ({report.format})")
        for line in report.lines():
            print(f"  {line}")
    return model, report


def _print_listing(listing) -> None:
    width = max(len(name) for name, _cls, _outs in listing)
    for name, cls, outputs in listing:
        stored = ", ".join(f"{n} {s} {d}" for n, s, d in outputs) or "-"
        print(f"{name:<{width}}  {cls:<24} {stored}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    from pyfast.capture import CaptureError, capture, images_dataset, resolve_layers
    from pyfast.capture.runner import STORE_DTYPES, autocast_context
    from pyfast.capture.table import layer_listing
    from pyfast.data import build_sources, data_specs_from_args
    from pyfast.models import BackboneError
    from pyfast.models.weights import WeightsError

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    if not args.list_layers:
        if not args.layers:
            return fail("--layers is required (or --list-layers to see the names)", 2)
        if not args.out:
            return fail("--out is required", 2)
    for flag, value, minimum in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                                 ("--image-size", args.image_size, 1)):
        if value is not None and value < minimum:
            return fail(f"{flag} must be >= {minimum}, got {value}", 2)
    if not args.shard_mb > 0 or args.shard_mb == float("inf"):
        return fail(f"--shard-mb must be a positive number, got {args.shard_mb}", 2)
    try:
        device = _device(args.device)
        model, report = _load_model(args)
        model.to(device)
        image_size = args.image_size or getattr(model, "input_size", None) or DEFAULT_IMAGE_SIZE
        if args.list_layers:
            _print_listing(layer_listing(model, image_size, device, autocast_context(device, args.precision)))
            return 0
        resolve_layers(model, args.layers)  # an unknown pattern is a usage error, before any data is read
        specs = data_specs_from_args(args)
        sources = build_sources(specs, log=print)
        dataset = images_dataset(sources, image_size)
    except BackboneError as error:  # the loader speaks of pyfast-train's --backbone; here it is --model
        return fail(str(error).replace("--backbone", "--model"), 2)
    except (WeightsError, MissingSourceError, CaptureError, ValueError, OSError) as error:
        return fail(str(error), 2)

    model_info = {"spec": args.model, "weights": args.weights}
    if report is not None:
        model_info["weights_report"] = report.to_dict()
    try:
        result = capture(
            model, dataset, args.out, layers=args.layers, pool=tuple(args.pool), image_size=image_size,
            batch_size=args.batch_size, dtype=STORE_DTYPES[args.dtype], shard_mb=args.shard_mb,
            precision=args.precision, device=str(device), workers=args.workers, overflow=args.overflow,
            nonfinite=args.nonfinite, max_skip_fraction=args.max_skip_fraction, verify_existing=args.verify,
            progress=False if args.no_progress else None, model_info=model_info,
            data_info={"specs": [spec.text or spec.kind + ":" for spec in specs]},
        )
    except (CaptureError, TooManyBadSamples, ValueError) as error:  # ValueError: also the model's own
        return fail(f"{error}", 1)
    except KeyboardInterrupt:
        return fail(f"interrupted; the shards written so far are kept: rerun the same command to continue ({args.out})", 130)
    for line in result.lines():
        print(line)
    print(f"read it with: pyfast.ActivationDataset({args.out!r})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
