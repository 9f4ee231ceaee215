"""Forward hooks that live exactly as long as a `with` block.

    with ActivationHooks(model, ["encoder.layers.*.mlp"]) as hooks:
        for images in batches:
            model(images)
            activations = hooks.take()   # {"encoder.layers.0.mlp": tensor, ...}

The hooks are registered on entering and removed on leaving the block, whether it ends normally,
by an exception or by Ctrl-C (KeyboardInterrupt). The buffer holds one forward at most: a hook on
the model clears it when a forward begins, and `take()` hands it over and empties it, so nothing
accumulates across batches even when a caller forgets to take.

Each output is copied when its module returns (`transform`; by default a detached clone): a later
in-place op in the forward (`ReLU(inplace=True)` after a conv) cannot change what was captured.
A module that runs several times in one forward is stored once per call: `name`, `name@1`, ...
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from pyfast.capture.errors import CaptureError
from pyfast.capture.layers import output_prefix, resolve_layers
from pyfast.capture.outputs import describe_leaf, is_storable, iter_leaves

Transform = Callable[[str, torch.Tensor], object]


def detached_copy(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


class ActivationHooks:
    """Forward hooks on the modules of `model` chosen by `layers` (patterns, see
    `pyfast.capture.layers`), as a context manager.

    transform(name, tensor) -> value: what the buffer keeps for each floating-point tensor of an
    output (the tensor is the module's own, detached; copy it if you keep it). Non-float leaves
    (integer tensors, numbers) are not stored; `ignored` maps their names to what they were.
    `origins` maps each stored name to the module it came from (`""`: the model itself).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], *, transform: Optional[Transform] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.module_names: List[str] = resolve_layers(model, layers)
        self.transform: Transform = transform or detached_copy
        self.ignored: Dict[str, str] = {}
        self.origins: Dict[str, str] = {}
        self._handles: list = []
        self._buffer: Dict[str, object] = {}
        self._calls: Dict[str, int] = {}

    # -- lifetime

    def __enter__(self) -> "ActivationHooks":
        if self._handles:
            raise RuntimeError("these hooks are already registered")
        modules = dict(self.model.named_modules())
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._forward_begins))
            for name in self.module_names:
                self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Removes every hook and drops the buffer (also what leaving the block does)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._buffer = {}
        self._calls = {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # -- the buffer

    def take(self) -> Dict[str, object]:
        """What the hooks captured since the last forward began (name -> transform's value), in the
        order the outputs were produced; the buffer is emptied."""
        out, self._buffer = self._buffer, {}
        self._calls = {}
        return out

    def _forward_begins(self, module, args) -> None:
        self._buffer = {}
        self._calls = {}

    def _make_hook(self, module_name: str):
        prefix = output_prefix(module_name)

        def hook(module, args, output):
            count = self._calls.get(module_name, 0)
            self._calls[module_name] = count + 1
            base = prefix if count == 0 else f"{prefix}@{count}"
            for name, leaf in iter_leaves(base, output):
                if not is_storable(leaf):
                    self.ignored[name] = describe_leaf(leaf)
                    continue
                if name in self._buffer:
                    raise CaptureError(
                        f"two captured outputs are both named {name!r} (a module's output field and another "
                        "module's output): select fewer layers"
                    )
                self.origins[name] = module_name
                self._buffer[name] = self.transform(name, leaf.detach())

        return hook
