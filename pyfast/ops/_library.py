"""The `pyfast` torch.library namespace and the one way an op is registered.

`define(schema, native=..., reference=..., fake=...)` makes an op out of four pieces:

- the schema. Every caller in pyfast passes its options by name (torch.ops accepts keywords for
  any schema argument); the kernels below receive them by name too (`named`). The schemas keep
  their arguments positional all the same: a keyword-only schema argument costs ~0.4 us per
  argument per dispatch (torch 2.13), ~18 us on a box-loss step that crosses the dispatcher three
  times;
- `native`, the kernel that runs pyfast._C: registered for CPU and for CUDA where pyfast._C has
  kernels that can run there (pyfast._native.use_native);
- `reference`, the op's pure-PyTorch twin: registered as CompositeExplicitAutograd, the dispatcher's
  fallback for every device without a native kernel, so that `torch.ops.pyfast.*` fall back too.
  It warns once per device type, stays quiet under PYFAST_BACKEND=reference and raises under
  PYFAST_BACKEND=native;
- `fake`: output shapes and dtypes, for torch.compile and meta tensors.

`register_autograd` makes the op itself differentiable. The native registrations live in their own
Library so that `pyfast._native.reload_backend_setting()` can drop and redo them.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from pyfast import _native

LIB = torch.library.Library("pyfast", "FRAGMENT")
_NATIVE: dict[str, Callable] = {}
_native_lib: torch.library.Library | None = None
_warned: set[str] = set()
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def define(
    schema: str, *, native: Callable, reference: Callable, fake: Callable, differentiable: bool = True
) -> torch._ops.OpOverload:
    """Defines `pyfast::<schema>` with its native kernel, reference fallback and fake; returns the op.

    The three functions are called with every argument by name. A differentiable op gets its formula
    from register_autograd. The others (the backward kernels, mask_iou, pack_cast) pass autograd
    through: their outputs carry no gradient and no autograd bookkeeping is paid for them (a
    backward kernel's result is made to refuse differentiation by first_order_only instead).
    """
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    op = getattr(torch.ops.pyfast, name).default
    LIB.impl(name, named(op, _fallback(reference)), "CompositeExplicitAutograd")
    torch.library.register_fake(f"pyfast::{name}", named(op, fake), lib=LIB)
    if not differentiable:
        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _NATIVE[name] = named(op, native)
    _register_native(name, _NATIVE[name])
    return op


def argument_names(op: torch._ops.OpOverload) -> tuple[str, ...]:
    return tuple(argument.name for argument in op._schema.arguments)


def named(op: torch._ops.OpOverload, fn: Callable) -> Callable:
    """fn as a kernel of `op`: the dispatcher passes the schema's arguments by position, fn takes
    them by name. The trampoline is generated from the schema, `def kernel(pred, target, ...):
    return fn(pred=pred, target=target, ...)`: half the cost of building a dict per call."""
    names = argument_names(op)
    source = f"def kernel({', '.join(names)}):\n    return fn({', '.join(f'{n}={n}' for n in names)})\n"
    scope = {"fn": fn}
    exec(compile(source, f"<pyfast::{op._schema.name} kernel>", "exec"), scope)
    kernel = scope["kernel"]
    kernel.__name__ = kernel.__qualname__ = fn.__name__
    return kernel


def _register_native(name: str, kernel: Callable) -> None:
    global _native_lib
    if _native_lib is None:
        _native_lib = torch.library.Library("pyfast", "IMPL")
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if _native.use_native(device_type):
            _native_lib.impl(name, kernel, key)


def _reregister_native() -> None:
    global _native_lib
    if _native_lib is not None:
        _native_lib._destroy()
        _native_lib = None
    _warned.clear()
    for name, kernel in _NATIVE.items():
        _register_native(name, kernel)


_native.on_reload(_reregister_native)


def _first_tensor(args) -> torch.Tensor | None:
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None


def _fallback(reference: Callable) -> Callable:
    """The reference twin as the kernel for devices without a native one, saying so once."""

    def kernel(*args, **kwargs):
        tensor = _first_tensor(args)
        device_type = tensor.device.type if tensor is not None else "cpu"
        if _native._setting != "reference":
            reason = _native.unavailable_reason(device_type) or "its native kernels are not registered"
            if _native._setting == "native":
                raise RuntimeError(f"PYFAST_BACKEND=native, but pyfast has no native {device_type} kernels: {reason}")
            if device_type not in _warned:
                _warned.add(device_type)
                warnings.warn(
                    f"pyfast: no native {device_type} kernels ({reason}); using the PyTorch reference ops, "
                    "which are correct but slower",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return reference(*args, **kwargs)

    return kernel


def register_autograd(op: torch._ops.OpOverload, backward: Callable, *, setup_context: Callable) -> None:
    """Makes `op` differentiable, on the op itself: an Autograd kernel that records `backward`.

    torch.library.register_autograd's contract with names instead of positions:
    `setup_context(ctx, inputs, output)` gets the inputs as a dict by argument name and saves what
    the backward needs; `backward(ctx, *grads)` finds `ctx.needs_grad`, a dict by tensor input
    name, and returns a dict of gradients by the same names (inputs left out get none). It is
    registered as that function registers it, minus its per-call pass that fills in schema defaults
    (our schemas have none): with ten arguments that pass alone costs ~30 us per call (torch 2.13),
    a quarter of a box-loss step at N=4096.
    """
    name = op._schema.name.split("::", 1)[1]
    names = argument_names(op)
    # The tensor inputs, the only ones a gradient can be asked for, and their positions.
    tensors = {a.name: i for i, a in enumerate(op._schema.arguments) if "Tensor" in str(a.type)}
    redispatch = op._handle.redispatch_boxed  # op.redispatch, without finding the handle per call

    def forward(ctx, *args):
        keyset = args[-1]
        inputs = args[:-1]
        with torch._C._AutoDispatchBelowAutograd():
            output = redispatch(keyset & _AFTER_AUTOGRAD, *inputs)
        setup_context(ctx, dict(zip(names, inputs)), output)
        return output

    def backward_by_name(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_grad = {n: needs[i] for n, i in tensors.items()}
        grads_in = [None] * (len(names) + 1)  # one per input, and the trailing keyset
        for input_name, grad in backward(ctx, *grads).items():
            grads_in[tensors[input_name]] = grad
        return tuple(grads_in)

    function = type(
        "".join(word.capitalize() for word in name.split("_")),  # grad_fn: BoxLossForwardBackward
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_by_name)},
    )

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled():
            for value in args:
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return redispatch(keyset & _AFTER_AUTOGRAD, *args)

    LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


class _NoSecondDerivative(torch.autograd.Function):
    """Runs a fused backward kernel; differentiating its result raises."""

    @staticmethod
    def forward(ctx, op_name, compute, *inputs):
        ctx.op_name = op_name
        return compute()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pyfast.{ctx.op_name} has no second derivative: its gradient comes from a fused kernel, "
            "so double backward (create_graph=True, then differentiating the gradient) would silently "
            f"drop terms. Differentiate pyfast.ops.reference.{ctx.op_name}_reference for second-order terms."
        )


def first_order_only(op_name: str, compute: Callable, *inputs):
    """compute(): a backward formula's call of its backward kernel. Under create_graph=True (grad mode
    on inside a backward) the result is tied to `inputs` so that differentiating it raises, naming
    the op, instead of quietly lacking the second-order terms."""
    if not torch.is_grad_enabled():
        return compute()
    return _NoSecondDerivative.apply(op_name, compute, *inputs)
