"""`pyfast-doctor checkpoint PATH [--model SPEC]`: what a weights file holds and whether it fits.

Without `--model` it describes the file: format, where the state dict was found, the config, the
tensors (count, elements, dtypes, key groups, examples). With `--model SPEC` (`hf:DIR[,options]`:
the architecture from DIR's config.json, DIR's own weights not read; or `module:callable`) it
loads the file into that model exactly as `pyfast.load_weights` / `--backbone-weights` would and
prints the report and the verdict. Nothing is trained and nothing is written.

Exit status: 0 the load is accepted (or the file was described), 1 the load is refused, 2 the file
or the model cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Callable, List

from torch import nn

from pyfast.models.weights import LoadReport, WeightsError, WeightsFile, apply_weights_file, read_weights

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def add_checkpoint_command(commands) -> argparse.ArgumentParser:
    """Register `checkpoint` on the doctor's subparsers."""
    parser = commands.add_parser("checkpoint", help="describe a weights file, or check that it loads into a model")
    parser.add_argument("path", metavar="PATH", help=".pt/.pth/.bin/.ckpt, .safetensors, *.index.json or a model directory")
    parser.add_argument("--model", metavar="SPEC", default=None,
                        help="hf:DIR[,options] (architecture from DIR/config.json) or module:callable")
    parser.add_argument("--prefix", action="append", default=[], metavar="P",
                        help="another key prefix to strip (module., _orig_mod., model. always are tried)")
    parser.add_argument("--state-key", default=None, metavar="KEY", help="where the state dict is (dotted path)")
    parser.add_argument("--min-fraction", type=float, default=1.0, metavar="F",
                        help="least fraction of the model that must load (default 1.0)")
    parser.add_argument("--allow-shape-mismatch", action="store_true",
                        help="skip shape-mismatched tensors instead of refusing the load")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="torch.load with weights_only=False: runs code from the file; only for files you trust")
    parser.add_argument("--examples", type=int, default=5, metavar="N", help="keys shown per list (default 5)")
    return parser


def _config_text(config, limit: int = 300) -> str:
    try:
        text = json.dumps(config, sort_keys=True, default=str)
    except (TypeError, ValueError):
        text = repr(config)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_groups(keys, depth: int, limit: int) -> str:
    groups = Counter(".".join(k.split(".")[:depth]) + "." for k in keys if k.count(".") >= depth)
    return ", ".join(f"{g} ({n})" for g, n in groups.most_common(limit)) or "none"


def describe_file(found: WeightsFile, limit: int = 5) -> List[str]:
    """The file part of the doctor's output."""
    state = found.state_dict
    where = f"under {found.state_key!r}" if found.state_key else "the whole file"
    if found.other_state_keys:
        where += f" (also found: {', '.join(found.other_state_keys)})"
    lines = [
        f"file         {found.path}",
        f"format       {found.format}",
        f"state dict   {where}",
        f"config       " + (f"{found.config_key}: {_config_text(found.config)}" if found.config_key else "none found"),
    ]
    if found.top_level and (found.state_key or found.ignored):
        shown = list(found.top_level.items())[: max(limit, 8)]
        more = f", ... ({len(found.top_level)} in all)" if len(found.top_level) > len(shown) else ""
        lines.append("top level    " + ", ".join(f"{k} ({d})" for k, d in shown) + more)
    if found.metadata:
        lines.append(f"metadata     {_config_text(found.metadata, 200)}")
    dtypes = ", ".join(f"{d} {n}" for d, n in found.dtypes.items())
    lines += [
        f"tensors      {len(state):,} tensors, {found.num_elements:,} elements ({dtypes or 'none'})",
        f"key groups   {_key_groups(state, 1, limit)}",
        f"             {_key_groups(state, 2, limit)}",
        "examples     " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:limit]),
    ]
    if found.ignored:
        lines.append(f"ignored      {len(found.ignored)} non-tensor entries: {', '.join(found.ignored[:limit])}")
    return lines


def build_model(spec: str) -> nn.Module:
    """The module a `--model SPEC` names, with its own initial weights (the file's are loaded next)."""
    if spec.startswith("hf:"):
        from pyfast.models.hf import build_encoder, parse_hf_spec, read_config, resolve_model_dir

        family, config, _ = read_config(resolve_model_dir(parse_hf_spec(spec).path))
        return build_encoder(family, config)
    from pyfast.models.backbone import load_backbone

    return load_backbone(spec)


def verdict(report: LoadReport) -> str:
    if report.complete:
        unused = f" ({len(report.unexpected):,} checkpoint tensors not used)" if report.unexpected else ""
        return f"OK: every tensor of the model loads from the checkpoint{unused}"
    return (
        f"OK with gaps: {report.matched_fraction:.1%} of the model loads (min_fraction {report.min_fraction:g}); "
        f"the rest keeps the model's own initial values"
    )


def _error(message: str) -> int:
    print(f"pyfast-doctor: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_checkpoint(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """`pyfast-doctor checkpoint`: print the description or the load report; return the exit status."""
    from pyfast.models.backbone import BackboneError

    if not 0.0 <= args.min_fraction <= 1.0:
        return _error(f"--min-fraction must be in [0, 1], got {args.min_fraction}")
    weights_only = not args.unsafe_pickle
    if args.unsafe_pickle:
        out("warning: --unsafe-pickle: torch.load(weights_only=False) may run code from the file")
    try:
        found = read_weights(args.path, state_key=args.state_key, weights_only=weights_only)
    except WeightsError as error:
        return _error(str(error))
    for line in describe_file(found, args.examples):
        out(line)
    if args.model is None:
        return EXIT_OK

    try:
        model = build_model(args.model)
    except (BackboneError, ValueError, ImportError) as error:
        return _error(f"--model {args.model}: {error}")
    own = model.state_dict()
    out(f"model        {args.model} ({type(model).__name__}): {len(own):,} tensors, "
        f"{sum(t.numel() for t in own.values() if hasattr(t, 'numel')):,} elements")
    try:
        report = apply_weights_file(
            model, found, prefixes=args.prefix, min_fraction=args.min_fraction,
            strict_shapes=not args.allow_shape_mismatch, log=None,
        )
    except WeightsError as error:
        if error.report is not None:
            for line in error.report.lines(args.examples):
                out(line)
        out(f"verdict      FAIL: {error}")
        return EXIT_REFUSED
    for line in report.lines(args.examples):
        out(line)
    out(f"verdict      {verdict(report)}")
    return EXIT_OK
