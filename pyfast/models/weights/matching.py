"""Matching a checkpoint's keys to a model's and loading what fits (`apply_state_dict`).

Key prefixes
    `module.` (DDP), `_orig_mod.` (torch.compile), `model.` (Lightning) and the caller's `prefixes`
    may lead the checkpoint's keys, in any chain; and a checkpoint of an inner module lacks the
    prefix all the model's keys share (`vision_encoder.` of SamVisionModel). Each way of stripping a
    leading chain seen in the file, with or without putting the model's shared prefix in its place,
    is scored by how many model keys it hits; the best one wins, a caller's prefix wins a tie, and a
    way that maps two checkpoint tensors onto one model key is never used. Two ways that hit equally
    many model keys with different tensors are an error: the file is ambiguous.

What is refused (WeightsError, one line, naming the file)
    a shape mismatch (unless `strict_shapes=False`: then the mismatched tensors are skipped,
    listed, and a warning is logged; a mismatched tensor is never loaded), a load that matched
    nothing (with examples of both key styles, so a prefix problem is plain to see), and a load
    under `min_fraction` of the model. The fraction is the smaller of the fraction of the model's
    tensors loaded and the fraction of its elements loaded, so neither "all the biases but none of
    the weights" nor "one big embedding and nothing else" passes. A model tensor tied to a loaded
    one (the same Parameter under two names) counts as loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from pyfast.models.weights.report import LoadReport, WeightsError, _shape, _some

DEFAULT_PREFIXES = ("module.", "_orig_mod.", "model.")
_MAX_STRATEGIES = 64


def _normalise_prefixes(prefixes: Iterable[str]) -> tuple:
    out = []
    for prefix in prefixes:
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise ValueError(f"prefixes must be non-empty strings, got {prefix!r}")
        out.append(prefix if prefix.endswith(".") else prefix + ".")
    return tuple(out)


def _leading_chain(key: str, prefixes: tuple) -> list:
    """The prefixes leading `key`, peeled greedily (longest first), e.g. ['module.', '_orig_mod.']."""
    chain = []
    ordered = sorted(prefixes, key=len, reverse=True)
    while True:
        for prefix in ordered:
            if key.startswith(prefix) and len(key) > len(prefix):
                chain.append(prefix)
                key = key[len(prefix):]
                break
        else:
            return chain


def strip_prefixes(state: Mapping, prefixes: Iterable[str] = DEFAULT_PREFIXES) -> dict:
    """`state` with every leading chain of `prefixes` removed from its keys (no matching involved)."""
    prefixes = _normalise_prefixes(prefixes)
    return {key[len("".join(_leading_chain(key, prefixes))):]: value for key, value in state.items()}


def _shared_prefixes(model_keys: Iterable[str]) -> list:
    """The dotted prefixes every model key starts with: `vision_encoder.` for SamVisionModel, whose
    encoder's own checkpoint lacks it."""
    keys = list(model_keys)
    parts = keys[0].split(".")[:-1] if keys else []
    out = []
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1]) + "."
        if not all(k.startswith(prefix) for k in keys):
            break
        out.append(prefix)
    return out


def _retarget(key: str, strip: str, add: str) -> str:
    return add + (key[len(strip):] if strip and key.startswith(strip) else key)


def _choose_prefixes(keys: list, model_keys: set, defaults: tuple, preferred: tuple, source: str) -> tuple:
    """(strip, add): the leading chain to remove from the checkpoint's keys and the model's shared
    prefix to put in its place that map the most checkpoint keys onto model keys (see the module doc)."""
    candidates = defaults + tuple(p for p in preferred if p not in defaults)
    counts: Counter = Counter()
    for key in keys:
        chain = _leading_chain(key, candidates)
        for j in range(1, len(chain) + 1):
            counts["".join(chain[:j])] += 1
    strips = [""] + [s for s, _ in counts.most_common(_MAX_STRATEGIES)]
    scored = []
    for strip in strips:
        uses_preferred = bool(strip) and any(p in preferred for p in _leading_chain(strip + "_", candidates))
        for add in [""] + _shared_prefixes(model_keys):
            pairs = {}
            for key in keys:
                target = _retarget(key, strip, add)
                if target in model_keys:
                    if target in pairs:  # two checkpoint tensors onto one model key: never this way
                        break
                    pairs[target] = key
            else:
                scored.append((len(pairs), uses_preferred, strip, add, pairs))
    best_hits = max(s[0] for s in scored)
    top = [s for s in scored if s[0] == best_hits]
    if any(s[1] for s in top):
        top = [s for s in top if s[1]]
    top.sort(key=lambda s: len(s[2]) + len(s[3]))
    for other in top[1:]:
        if best_hits and other[4] != top[0][4]:
            raise WeightsError(
                f"{source}: ambiguous keys: stripping {top[0][2]!r} or {other[2]!r} matches {best_hits} model "
                f"tensors with different checkpoint tensors; choose with prefixes=({top[0][2]!r},) or state_key=..."
            )
    return top[0][2], top[0][3]


def _key_groups(keys: Iterable[str], limit: int = 3) -> str:
    groups = Counter(k.split(".", 1)[0] + "." for k in keys if "." in k)
    return ", ".join(f"{g!r} ({n})" for g, n in groups.most_common(limit))


def _is_transformers_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def apply_state_dict(
    module: nn.Module,
    state: Mapping,
    *,
    prefixes: Iterable[str] = (),
    min_fraction: float = 1.0,
    strict_shapes: bool = True,
    rename: Optional[Callable[[str], Optional[str]]] = None,
    source: str = "state dict",
    log: Optional[Callable[[str], None]] = print,
    report: Optional[LoadReport] = None,
) -> LoadReport:
    """Load what fits of the flat `state` into `module` and report; the matching and refusals of the
    module doc. `rename(key) -> key or None` maps (or drops) checkpoint keys before prefixes are
    considered, for checkpoints in another library's naming (default for a transformers model:
    transformers' own rules from the names it saves to the names of its modules, and its
    `base_model_prefix` as a prefix). `log` receives one warning line when the
    load is partial (missing or skipped mismatched tensors)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    preferred = _normalise_prefixes(prefixes)
    if rename is None and _is_transformers_model(module):
        from pyfast.models.hf import transformers_key_renamer

        rename = transformers_key_renamer(module)
        base = getattr(module, "base_model_prefix", "")
        preferred += (f"{base}.",) if base and f"{base}." not in preferred else ()
    report = report or LoadReport(source=source)
    report.min_fraction = min_fraction

    tensors, origin = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            report.ignored.append(str(key))
            continue
        name = str(key)
        if rename is not None:
            try:
                name = rename(name)
            except WeightsError as error:
                raise WeightsError(f"{source}: {error}") from None
            if name is None:
                report.ignored.append(str(key))
                continue
        if name in tensors:
            raise WeightsError(f"{source}: checkpoint keys {origin[name]!r} and {key!r} both name {name!r}")
        tensors[name], origin[name] = value, key
    report.checkpoint_tensors = len(tensors)
    report.checkpoint_elements = sum(t.numel() for t in tensors.values())
    report.checkpoint_dtypes = dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors.values()))

    own = {k: v for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    report.model_tensors = len(own)
    report.model_elements = sum(v.numel() for v in own.values())
    strip, add = (_choose_prefixes(list(tensors), set(own), DEFAULT_PREFIXES, preferred, source)
                  if tensors and own else ("", ""))
    report.prefix, report.added_prefix = strip, add

    usable = {}
    claimed = set()
    for key, value in tensors.items():
        target = _retarget(key, strip, add)
        if target not in own or target in claimed:
            report.unexpected.append(key)
        elif _shape(value) != _shape(own[target]):
            report.mismatched.append((target, _shape(value), _shape(own[target])))
            claimed.add(target)
        else:
            usable[target] = value
            claimed.add(target)
    loaded_ids = {id(own[k]) for k in usable}
    mismatched_keys = {k for k, _, _ in report.mismatched}
    for key, value in own.items():
        if key in usable:
            report.loaded.append(key)
            report.loaded_elements += value.numel()
        elif id(value) in loaded_ids and key not in mismatched_keys:
            report.tied.append(key)
            report.loaded_elements += value.numel()
        elif key not in mismatched_keys:
            report.missing.append(key)

    if report.mismatched and strict_shapes:
        key, theirs, ours = report.mismatched[0]
        rest = f"strict_shapes=False loads the other {len(usable)}" if usable else "no tensor fits"
        raise WeightsError(
            f"{source}: {len(report.mismatched)} of the model's {report.model_tensors} tensors have another shape "
            f"in the checkpoint (e.g. {key}: checkpoint {theirs} vs model {ours}): was it made with another "
            f"config? ({rest})",
            report,
        )
    if own and not usable:
        hint = (
            f"; {len(report.mismatched)} matched by name but have other shapes" if report.mismatched else
            f"; checkpoint keys look like {next(iter(tensors))!r} ({_key_groups(tensors)}), model keys like "
            f"{next(iter(own))!r}: pass prefixes=... or state_key=..." if tensors else "; the checkpoint holds no tensors"
        )
        raise WeightsError(f"{source}: checkpoint matches too little of the model: nothing matched{hint}", report)
    if report.matched_fraction < min_fraction:
        missing = f"; missing e.g. {_some(report.missing, 3)}" if report.missing else ""
        if report.mismatched:
            key, theirs, ours = report.mismatched[0]
            missing += (f"; {len(report.mismatched)} have another shape in the checkpoint (shape mismatch, e.g. "
                        f"{key}: checkpoint {theirs} vs model {ours})")
        raise WeightsError(
            f"{source}: checkpoint matches too little of the model: {len(report.loaded) + len(report.tied)} "
            f"of {report.model_tensors} tensors ({report.tensor_fraction:.1%}), {report.element_fraction:.1%} of the "
            f"elements; need {min_fraction:.0%} (min_fraction){missing}",
            report,
        )
    module.load_state_dict(usable, strict=False)
    report.applied = True
    if log is not None and not report.complete:
        log(f"warning: {source}: partial load: {report.describe()}")
    return report

