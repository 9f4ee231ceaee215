"""The `pyfast` torch.library namespace and the one way an op is registered.

`define(schema, native=..., reference=..., fake=...)` makes an op out of four pieces:

- the schema. Every caller in pyfast passes its options by name (torch.ops accepts keywords for
  any schema argument); the kernels below receive them by name too (`named`). The schemas keep
  their arguments positional all the same: a keyword-only schema argument costs ~0.4 us per
  argument per dispatch (torch 2.13), ~18 us on a box-loss step whose three op calls all go through
  the dispatcher (as under a mode, or torch.compile tracing);
- `native`, the kernel that runs pyfast._C: registered for CPU and for CUDA where pyfast._C has
  kernels that can run there (pyfast._native.use_native);
- `reference`, the op's pure-PyTorch twin: registered as CompositeExplicitAutograd, the dispatcher's
  fallback for every device without a native kernel, so that `torch.ops.pyfast.*` fall back too.
  It warns once per device type, stays quiet under PYFAST_BACKEND=reference and raises under
  PYFAST_BACKEND=native;
- `fake`: output shapes and dtypes, for torch.compile and meta tensors.

`register_autograd` makes the op itself differentiable. The native registrations live in their own
Library so that `pyfast._native.reload_backend_setting()` can drop and redo them.

A plain call skips what the dispatcher would only pass through. Each entry into a Python kernel
costs microseconds (boxing every argument, converting it back), as much as a kernel's own work on a
few thousand boxes, and a training step would enter three times: the Autograd kernel, its
redispatch to the native kernel, the backward kernel. Where the dispatch keyset shows that the next
stop is a native kernel (`plain_route`: one device's backend with native kernels registered, and only
the keys whose kernels fall through for pyfast's ops), the layer calls that kernel itself. Any
other key (Python for FakeTensor and TorchDispatchMode, Functionalize, functorch, Autocast, Meta, a
second device, the reference fallback) goes through the dispatcher as before. The Autograd kernel
reads the keyset the dispatcher computed; pyfast's own calls (`caller`: the public functions, the
backward formulas) compute it as the dispatcher does, from the thread's include and exclude sets
and the tensors' keys. tests/ops/test_plain_calls.py holds both routes to the same results.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from pyfast import _native
from pyfast.ops._checks import acc_dtype

LIB = torch.library.Library("pyfast", "FRAGMENT")
_NATIVE: dict[str, Callable] = {}  # each op's native kernel as registered (arguments by position)
_NATIVE_BY_NAME: dict[str, Callable] = {}  # and as written (arguments by name)
_AUTOGRAD: dict[str, Callable] = {}  # the differentiable ops' Autograd kernels for plain calls
_DIFFERENTIABLE: set[str] = set()  # the ops given an autograd formula (the others fall through)
_native_lib: torch.library.Library | None = None
_warned: set[str] = set()
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_KEY = torch._C.DispatchKey
_KEYSET = torch._C.DispatchKeySet
_dispatch_keys = torch._C._dispatch_keys
_tls_include = torch._C._dispatch_tls_local_include_set
_tls_exclude = torch._C._dispatch_tls_local_exclude_set
# Per device type: its backend key and its Autograd key.
_DEVICE_KEYS = {"cpu": (_KEY.CPU, _KEY.AutogradCPU), "cuda": (_KEY.CUDA, _KEY.AutogradCUDA)}
# For each device with native kernels registered: every key a plain call may hold, its backend key
# and its Autograd key, each as the bits of a DispatchKeySet (raw_repr). Besides the backend and its
# Autograd key (the op's Autograd kernel, or a fallthrough), only ADInplaceOrView and BackendSelect,
# whose kernels fall through for ops that neither mutate nor create tensors from nothing (pyfast's).
# Bits, because set operations on Python ints cost a fraction of DispatchKeySet's.
_plain_keysets: list[tuple[int, int, int]] = []


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
    if differentiable:
        _DIFFERENTIABLE.add(name)
    else:
        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    _NATIVE_BY_NAME[name] = native
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
    _plain_keysets[:] = _native_plain_keysets()


def _native_plain_keysets() -> list[tuple[int, int, int]]:
    passing = _KEYSET(_KEY.ADInplaceOrView) | _KEYSET(_KEY.BackendSelect)
    return [
        ((_KEYSET(backend) | _KEYSET(autograd) | passing).raw_repr(), _KEYSET(backend).raw_repr(),
         _KEYSET(autograd).raw_repr())
        for device_type, (backend, autograd) in _DEVICE_KEYS.items()
        if _native.use_native(device_type)
    ]  # fmt: skip


def plain_route(keys: int) -> str | None:
    """Where the dispatcher sends a call with these dispatch keys (DispatchKeySet bits) when the call
    is plain: "autograd" (the op's Autograd kernel, or through it when it falls through) or
    "native"; None when it is not. Plain: the keys lie within one device's plain keys and hold its
    backend."""
    for plain, backend, autograd in _plain_keysets:
        if keys | plain == plain:
            if keys & backend != backend:
                return None
            return "autograd" if keys & autograd == autograd else "native"
    return None


def call_keys(tensors) -> int:
    """The dispatch keys (DispatchKeySet bits) of a call with these tensor arguments (None allowed),
    as the dispatcher computes them: the tensors' keys and the thread's included keys, less its
    excluded keys."""
    keys = _tls_include().raw_repr()
    for tensor in tensors:
        if tensor is not None:
            keys |= _dispatch_keys(tensor).raw_repr()
    return keys & ~_tls_exclude().raw_repr()


def caller(op: torch._ops.OpOverload) -> Callable:
    """`op` as pyfast's own code calls it (the public functions, the backward formulas): every
    argument by keyword, bound in Python (torch.ops parses keywords at ~0.1 us each).

    A plain call (module docstring) goes where the dispatcher would send it without the trip through
    it: the op's Autograd kernel when the keyset holds the device's Autograd key and the op has one,
    else its native kernel. Any other call goes through the dispatcher, as does every call while
    torch.compile traces (Dynamo cannot read dispatch keys).
    """
    name = op._schema.name.split("::", 1)[1]
    names = argument_names(op)
    tensors = [a.name for a in op._schema.arguments if str(a.type) in ("Tensor", "Optional[Tensor]")]
    if len(tensors) != sum("Tensor" in str(a.type) for a in op._schema.arguments):
        raise TypeError(f"caller() takes ops whose tensor arguments are Tensor or Tensor?, not {op._schema}")
    if name in _DIFFERENTIABLE and name not in _AUTOGRAD:
        raise RuntimeError(f"caller(pyfast::{name}) before register_autograd: its plain calls would record no graph")
    positional = ", ".join(names)
    by_name = ", ".join(f"{n}={n}" for n in names)
    if name in _AUTOGRAD:
        plain_call = f"autograd({positional}) if route == 'autograd' else native({by_name})"
    else:
        plain_call = f"native({by_name})"
    source = (
        f"def call(*, {positional}):\n"
        f"    if not is_compiling():\n"
        f"        route = plain_route(call_keys(({', '.join(tensors)},)))\n"
        f"        if route is not None:\n"
        f"            return {plain_call}\n"
        f"    return op({positional})\n"
    )
    scope = {"op": op, "native": _NATIVE_BY_NAME[name], "autograd": _AUTOGRAD.get(name), "plain_route": plain_route,
             "call_keys": call_keys, "is_compiling": torch.compiler.is_compiling}  # fmt: skip
    exec(compile(source, f"<pyfast::{name} caller>", "exec"), scope)
    call = scope["call"]
    call.__name__ = call.__qualname__ = name
    return call


_native.on_reload(_reregister_native)
_plain_keysets[:] = _native_plain_keysets()


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
    # The tensor inputs, the only ones a gradient can be asked for: the schema's leading arguments.
    tensors = tuple(a.name for a in op._schema.arguments if "Tensor" in str(a.type))
    if names[: len(tensors)] != tensors:
        raise TypeError(f"register_autograd takes ops whose tensor arguments come first, not {op._schema}")
    redispatch = op._handle.redispatch_boxed  # op.redispatch, without finding the handle per call
    native = _NATIVE[name]

    def redispatch_below_autograd(keyset, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return redispatch(keyset, *inputs)

    # The Function's forward and backward, generated from the schema with the names written out:
    #     def forward(ctx, pred, target, ..., keyset):
    #         if keyset is None:  # a plain call: the native kernel is next
    #             output = native(pred, target, ...)
    #         else:
    #             output = redispatch_below_autograd(keyset, pred, target, ...)
    #         setup_context(ctx, {"pred": pred, "target": target, ...}, output)
    #         return output
    #
    #     def backward_by_name(ctx, *grads):
    #         needs = ctx.needs_input_grad
    #         ctx.needs_grad = {"pred": needs[0], "target": needs[1], ...}
    #         by_name = backward(ctx, *grads)
    #         return (by_name.get("pred"), ..., None, ...)   # None for each other input and the keyset
    positional = ", ".join(names)
    source = (
        f"def forward(ctx, {positional}, keyset):\n"
        "    if keyset is None:\n"
        f"        output = native({positional})\n"
        "    else:\n"
        f"        output = redispatch_below_autograd(keyset, {positional})\n"
        f"    setup_context(ctx, {{{', '.join(f'{n!r}: {n}' for n in names)}}}, output)\n"
        "    return output\n"
        "\n"
        "def backward_by_name(ctx, *grads):\n"
        "    needs = ctx.needs_input_grad\n"
        f"    ctx.needs_grad = {{{', '.join(f'{n!r}: needs[{i}]' for i, n in enumerate(tensors))}}}\n"
        "    by_name = backward(ctx, *grads)\n"
        f"    return ({''.join(f'by_name.get({n!r}), ' for n in tensors)}{'None, ' * (len(names) + 1 - len(tensors))})\n"
    )
    scope = {"native": native, "redispatch_below_autograd": redispatch_below_autograd,
             "setup_context": setup_context, "backward": backward}  # fmt: skip
    exec(compile(source, f"<pyfast::{name} autograd>", "exec"), scope)
    forward, backward_by_name = scope["forward"], scope["backward_by_name"]

    function = type(
        "".join(word.capitalize() for word in name.split("_")),  # grad_fn: BoxLossForwardBackward
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_by_name)},
    )
    # Function.apply without its Python prelude, whose only work outside functorch transforms is
    # unwrapping dead functorch wrappers: a plain keyset holds no functorch key, so there are none.
    apply_plain = super(torch.autograd.Function, function).apply

    def autograd_plain(*args):
        # The Autograd kernel for a plain call. Nothing the native kernel runs is recorded: grad mode
        # is off inside forward, and outside it no input requires grad.
        if torch.is_grad_enabled():
            for value in args:
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    return apply_plain(*args, None)
        return native(*args)

    def autograd_kernel(keyset, *args):
        keyset = keyset & _AFTER_AUTOGRAD
        if plain_route(keyset.raw_repr()) is not None:
            return autograd_plain(*args)
        if torch.is_grad_enabled():
            for value in args:
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    return function.apply(*args, keyset)
        return redispatch_below_autograd(keyset, *args)

    _AUTOGRAD[name] = autograd_plain
    LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def for_upstream_gradient(gradients: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients an op computed in its forward for an upstream gradient of 1, for `grad_out`: as
    they are when it is exactly 1 (loss.backward() on that loss alone: no pass over them), else
    each scaled in float32 (float64 for float64) and cast back. grad_out is read only when it is a
    plain CPU tensor, which costs no host sync; anything else (a FakeTensor under torch.compile) is
    multiplied."""
    if type(grad_out) is torch.Tensor and grad_out.device.type == "cpu" and grad_out.item() == 1.0:
        return gradients
    return [(g * grad_out.to(acc_dtype(g.dtype))).to(g.dtype) for g in gradients]


def autograd_below_autograd():
    """A context in which autograd records again, for a reference kernel that differentiates its
    twin (torch.autograd.grad) while running below the Autograd key: an op whose outputs include
    gradients (box_loss_forward_with_grad) reaches its kernel from its own Autograd kernel, which
    excludes the Autograd keys for the call. Elsewhere it changes nothing."""
    exclude = _tls_exclude().remove(_KEY.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(_tls_include(), exclude)


class _NoSecondDerivative(torch.autograd.Function):
    """Ties a fused backward kernel's results to its inputs; differentiating them raises."""

    @staticmethod
    def forward(ctx, op_name, outputs, *inputs):
        ctx.op_name = op_name
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"pyfast.{ctx.op_name} has no second derivative: its gradient comes from a fused kernel, "
            "so double backward (create_graph=True, then differentiating the gradient) would silently "
            f"drop terms. Differentiate pyfast.ops.reference.{ctx.op_name}_reference for second-order terms."
        )


def first_order_only(op_name: str, outputs, *inputs):
    """outputs: what a backward formula's call of its backward kernel returned (a tensor or a list of
    them), `inputs` that call's tensors. Under create_graph=True (grad mode on inside a backward) the
    outputs come back tied to `inputs` so that differentiating them raises, naming the op, instead of
    quietly lacking the second-order terms; otherwise as they are."""
    if not torch.is_grad_enabled():
        return outputs
    if isinstance(outputs, list):  # a Tensor[] op's outputs
        return list(_NoSecondDerivative.apply(op_name, tuple(outputs), *inputs))
    return _NoSecondDerivative.apply(op_name, outputs, *inputs)
