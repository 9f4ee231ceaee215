"""The boundary between the ops and pyfast._C: named arguments only, enums read from _C, one place
per option; and the choice of kernels per device (backend setting, driver probe, fallback)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import pyfast
from pyfast import _native
from pyfast.info import collect
from pyfast.ops import _checks, reference
from pyfast.ops.box_loss import BOX_OPTIONS as BOX_SCHEMA_OPTIONS
from pyfast.ops.mask_loss import MASK_OPTIONS as MASK_SCHEMA_OPTIONS

from backends import pyfast_env

_C = _native._C
BOX_OPTIONS = dict(mode="giou", box_format="xyxy", l1_weight=1.0, iou_weight=1.0, eps=1e-7)


def _schema_names(fragment: str) -> list[str]:
    return [part.split()[-1] for part in fragment.split(",")]


def test_python_reads_the_enums_that_c_defines():
    assert tuple(_C.BoxMode.__members__) == reference.BOX_MODES
    assert tuple(_C.BoxFormat.__members__) == reference.BOX_FORMATS
    assert tuple(_C.Reduction.__members__) == _checks.REDUCTIONS
    assert tuple(_C.MaskSum.__members__) == reference.MASK_SUMS
    assert set(_native.DTYPES) == set(_native.FLOAT_DTYPES) | {torch.uint8}
    for dtype, code in _native.DTYPES.items():
        assert str(dtype) == f"torch.{code.name}"


@pytest.mark.parametrize(
    "struct, fragment, public, twin",
    [
        ("BoxLossOptions", BOX_SCHEMA_OPTIONS, pyfast.box_loss, reference.box_loss_reference),
        ("MaskLossOptions", MASK_SCHEMA_OPTIONS, pyfast.mask_loss, reference.mask_loss_reference),
    ],
)
def test_each_option_is_named_once_per_layer(struct, fragment, public, twin):
    # An option is one named field of the C++ options struct, one name in the schema fragment, and
    # a keyword of the public function and of the reference twin; the ops pass it through by name.
    fields = list(getattr(_C, struct).fields)
    assert _schema_names(fragment) == fields
    for fn in (public, twin):
        assert set(fields) <= set(inspect.signature(fn).parameters), fn.__name__
    module = pyfast.BoxLoss if struct == "BoxLossOptions" else pyfast.MaskLoss
    assert set(fields) <= set(inspect.signature(module).parameters)


def test_argument_structs_take_every_field_by_name_only():
    options = _C.BoxLossOptions(**BOX_OPTIONS)
    with pytest.raises(TypeError):
        _C.BoxLossOptions("giou", "xyxy", 1.0, 1.0, 1e-7)
    with pytest.raises(TypeError, match="missing field 'eps'"):
        _C.BoxLossOptions(mode="giou", box_format="xyxy", l1_weight=1.0, iou_weight=1.0)
    with pytest.raises(TypeError, match="unexpected field 'beta'"):
        _C.BoxLossOptions(**BOX_OPTIONS, beta=1.0)
    with pytest.raises(ValueError, match=r"BoxLossOptions.mode must be one of \['iou', 'giou', 'diou', 'ciou'\]"):
        _C.BoxLossOptions(**{**BOX_OPTIONS, "mode": "xyxy"})
    with pytest.raises(TypeError, match="BoxLossOptions.mode cannot take a BoxFormat"):
        _C.BoxLossOptions(**{**BOX_OPTIONS, "mode": _C.BoxFormat.xyxy})
    with pytest.raises(TypeError, match="BoxLossOptions.l1_weight cannot take a str"):
        _C.BoxLossOptions(**{**BOX_OPTIONS, "l1_weight": "1"})
    x = torch.zeros(2, 4)
    fields = dict(options=options, n=2, dtype="float32", pred=x, target=x, weight_kind="none", weight=None,
                  output="loss", reduction="sum", avg_factor=0.0, out=torch.zeros(()), grad_pred=None,
                  grad_target=None)  # fmt: skip
    args = _C.BoxLossForward(**fields)
    assert args.pred == x.data_ptr() and args.weight == 0 and args.options.mode == _C.BoxMode.giou
    with pytest.raises(TypeError, match="BoxLossForward.n cannot take a bool"):
        _C.BoxLossForward(**{**fields, "n": True})
    with pytest.raises(TypeError, match="BoxLossForward.pred takes a tensor, an address or None"):
        _C.BoxLossForward(**{**fields, "pred": [1.0]})
    # The entry points take the struct and keyword-only launch arguments.
    with pytest.raises(TypeError):
        _C.box_loss_forward_cpu(args, 1)
    _C.box_loss_forward_cpu(args, threads=1)
    # Gradients from the forward exist for a reduced loss only; the kernel refuses the rest.
    unreduced = _C.BoxLossForward(**{**fields, "reduction": "none", "out": torch.zeros(2), "grad_pred": x.clone()})
    with pytest.raises(ValueError, match="gradients only for a reduced loss"):
        _C.box_loss_forward_cpu(unreduced, threads=1)
    with pytest.raises(TypeError):
        _C.box_loss_forward_cpu(_C.MaskIoU(n=0, m=0, dtype="float32", target_dtype="uint8", logits=None,
                                           targets=None, threshold=0.0, iou=None), threads=1)  # fmt: skip


def test_launch_runs_the_named_kernel():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    out = torch.empty(1)
    _native.launch("box_loss_forward", pred.device, options=dict(BOX_OPTIONS, mode="iou"), n=1, dtype="float32",
                   pred=pred, target=target, weight_kind="none", weight=None, output="variant", reduction="none",
                   avg_factor=0.0, out=out, grad_pred=None, grad_target=None)  # fmt: skip
    assert out.item() == pytest.approx(1 / 7, rel=1e-6)


def test_ops_have_autograd_registered_on_the_op():
    for name in ("box_loss_forward", "box_iou", "mask_loss_forward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfast::{name}", "Autograd"), name
    assert torch.ops.pyfast.box_loss_forward.default._schema.arguments[3].name == "mode"


def test_backend_setting_is_checked_and_rereadable():
    with pytest.raises(ValueError, match="PYFAST_BACKEND must be one of"), pyfast_env(backend="bogus"):
        pass
    with pyfast_env(backend="reference"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("pyfast::box_loss_forward", "CPU")
        assert not _native.use_native("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyfast::box_loss_forward", "CPU")
    assert _native.use_native("cpu")


@pytest.fixture
def cuda_build(monkeypatch):
    """pyfast._C as if built with the CUDA 13.0 runtime; the test sets the driver's version."""
    monkeypatch.setattr(_C, "with_cuda", True)
    monkeypatch.setattr(_C, "cuda_runtime_version", 13000)
    yield lambda version: monkeypatch.setattr(_native, "_probe_cuda_driver", lambda: version)
    monkeypatch.undo()
    _native.reload_backend_setting()


@pytest.mark.parametrize(
    "driver, reason",
    [
        (0, "no CUDA driver was found"),
        (12080, "the CUDA driver supports CUDA 12.8, older than the CUDA 13.0 runtime pyfast._C was built with"),
        (13000, None),
        (13020, None),
    ],
)
def test_cuda_needs_a_driver_as_new_as_the_runtime(cuda_build, driver, reason):
    cuda_build(driver)
    _native.reload_backend_setting()
    got = _native.unavailable_reason("cuda")
    assert (got is None) if reason is None else got.startswith(reason)
    assert pyfast.native_available("cuda") == (reason is None)
    # The ops register their CUDA kernels only where they can run: elsewhere the reference twins
    # (CompositeExplicitAutograd) take CUDA tensors, with one warning.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyfast::box_loss_forward", "CUDA") == (reason is None)
    info = collect()
    assert info["native cuda"] == (reason is None)
    assert (info["native cuda unavailable"] == "-") if reason is None else info["native cuda unavailable"] == got


def test_unavailable_reasons_without_the_probe(monkeypatch):
    monkeypatch.setattr(_C, "with_cuda", False)
    assert "built without CUDA" in _native.unavailable_reason("cuda")
    assert _native.unavailable_reason("mps") == "pyfast._C has no mps kernels"
    assert _native.unavailable_reason("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_old_driver_makes_cuda_ops_fall_back(cuda_build):
    cuda_build(11080)
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], device="cuda")
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]], device="cuda")
    with pyfast_env(backend="auto"):
        with pytest.warns(RuntimeWarning, match=re.escape("no native cuda kernels (the CUDA driver supports CUDA 11.8")):
            got = pyfast.box_iou(pred, target)
    assert got.item() == pytest.approx(1 / 7, rel=1e-6)


def test_info_shows_backends_and_reasons():
    info = collect()
    assert info["native cpu"] is True
    assert info["native cuda"] == pyfast.native_available("cuda")
    assert info["native cuda unavailable"] == (_native.unavailable_reason("cuda") or "-")


def test_mask_forward_refuses_a_gradient_of_an_unreduced_loss():
    # The gradient the forward writes is d out[0] / d logits: with reduction none there is no one
    # output to differentiate, and the kernel says so instead of writing something else.
    logits, targets = torch.randn(2, 16), torch.ones(2, 16, dtype=torch.uint8)
    options = dict(bce_weight=1.0, dice_weight=1.0, focal_weight=0.0, alpha=0.25, gamma=2.0, smooth=1.0)
    with pytest.raises(ValueError, match="reduction none"):
        _native.launch(
            "mask_loss_forward", logits.device, options=options, n=2, m=16, dtype=_native.DTYPES[torch.float32],
            target_dtype=_native.DTYPES[torch.uint8], logits=logits, targets=targets, reduction="none",
            avg_factor=0.0, sums=torch.empty(2, 6), out=torch.empty(2), grad_logits=torch.empty(2, 16),
        )  # fmt: skip
