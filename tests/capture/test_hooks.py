"""Layer patterns, the hooks' lifetime and buffer, and flattening of structured outputs."""

import pytest
import torch
from torch import nn

from pyfast.capture import ActivationHooks, CaptureError, resolve_layers
from pyfast.capture.layers import split_patterns

from .helpers import ConvNet, StructuredNet, TokenNet, hooks_left


def test_patterns_select_modules_in_model_order():
    model = TokenNet(depth=3)
    assert resolve_layers(model, ["blocks.*.1"]) == ["blocks.0.1", "blocks.1.1", "blocks.2.1"]
    assert resolve_layers(model, ["blocks.2, embed", "blocks.0"]) == ["embed", "blocks.0", "blocks.2"]
    assert resolve_layers(model, ["."]) == [""]
    assert resolve_layers(model, ["blocks.?"]) == ["blocks.0", "blocks.1", "blocks.2"]
    assert split_patterns(["a,b", "a", " c ,"]) == ["a", "b", "c"]


def test_unknown_pattern_lists_close_names():
    model = TokenNet(depth=2)
    with pytest.raises(CaptureError) as error:
        resolve_layers(model, ["blocks.0", "block.*.O"])
    message = str(error.value)
    assert "'block.*.O'" in message and "close names" in message and "blocks.0.0" in message
    with pytest.raises(CaptureError, match=r"did you mean '\*blocks.0'"):
        resolve_layers(nn.Sequential(TokenNet()), ["blocks.0"])  # a wrapper added the prefix "0."
    with pytest.raises(CaptureError, match="no layer pattern"):
        resolve_layers(model, [" , "])


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_are_removed_after_an_error_or_ctrl_c(failure):
    model = ConvNet()
    before = hooks_left(model)

    class Failing(nn.Module):
        def forward(self, x):
            raise failure

    model.act2 = Failing()
    with pytest.raises(type(failure)):
        with ActivationHooks(model, ["conv*", "."]) as hooks:
            assert hooks.active and hooks_left(model) == before + 4  # three layers + the forward-begins hook
            model(torch.rand(2, 3, 8, 8))
    assert hooks_left(model) == before and not hooks.active


def test_hooks_are_removed_after_success_and_an_error_in_the_block():
    model = ConvNet()
    with ActivationHooks(model, ["conv1"]) as hooks:
        model(torch.rand(1, 3, 8, 8))
    assert hooks_left(model) == 0
    with pytest.raises(ValueError):
        with ActivationHooks(model, ["conv1"]):
            raise ValueError("in the caller's code")
    assert hooks_left(model) == 0
    assert hooks.take() == {}


def test_buffer_holds_one_forward_and_copies_before_in_place_ops():
    model = ConvNet().eval()
    x1, x2 = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    with torch.no_grad(), ActivationHooks(model, ["conv1", "act1"]) as hooks:
        model(x1)
        model(x2)  # no take() in between: the first forward's tensors are dropped, not accumulated
        got = hooks.take()
        assert hooks.take() == {}
    ref = model.reference(x2)
    assert list(got) == ["conv1", "act1"]
    # conv1's output was rewritten in place by the ReLU after the hook ran: the copy kept the original
    assert torch.equal(got["conv1"], ref["conv1"]) and got["conv1"].min() < 0
    assert torch.equal(got["act1"], ref["act1"])


def test_a_module_called_twice_is_stored_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.shared(x))

    model = Twice()
    x = torch.rand(3, 4)
    with torch.no_grad(), ActivationHooks(model, ["shared"]) as hooks:
        model(x)
        got = hooks.take()
    first = model.shared(x)
    assert list(got) == ["shared", "shared@1"]
    assert torch.equal(got["shared"], first) and torch.equal(got["shared@1"], model.shared(first))


def test_structured_outputs_flatten_to_stable_names():
    model = StructuredNet().eval()
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad(), ActivationHooks(model, ["dict_out", "tuple_out", "dataclass_out", "named_out", "."]) as hooks:
        model(x)
        got = hooks.take()
        ref = model.reference(x)
    assert list(got) == list(ref)
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
    # integers and bool tensors are reported, None fields are absences
    assert hooks.ignored == {"dict_out.count": "int", "tuple_out.1.1": "int64 tensor (2, 6, 6)",
                             "dataclass_out.mask": "bool tensor (2, 4, 6, 6)"}


def test_model_output_of_transformers_flattens_by_field():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Encoder(nn.Module):
        def forward(self, x):
            return BaseModelOutputWithPooling(last_hidden_state=x * 2, pooler_output=x[:, 0], hidden_states=(x, x + 1))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

        def forward(self, x):
            return self.encoder(x).last_hidden_state

    model = Wrapper()
    x = torch.rand(2, 5, 3)
    with torch.no_grad(), ActivationHooks(model, ["encoder"]) as hooks:
        model(x)
        got = hooks.take()
    assert list(got) == ["encoder.last_hidden_state", "encoder.pooler_output", "encoder.hidden_states.0",
                         "encoder.hidden_states.1"]
    assert torch.equal(got["encoder.pooler_output"], x[:, 0]) and torch.equal(got["encoder.hidden_states.1"], x + 1)


def test_two_outputs_with_one_name_are_an_error():
    class Head(nn.Module):
        def forward(self, x):
            return {"x": x + 1}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.output = Head()  # stored as output.x, as is the model's own output {"x": ...}

        def forward(self, x):
            return {"x": self.output(x)["x"] * 2}

    model = Model()
    with pytest.raises(CaptureError, match="both named 'output.x'"):
        with ActivationHooks(model, ["output", "."]):
            model(torch.rand(1, 2))
    assert hooks_left(model) == 0
