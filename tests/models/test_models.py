import sys
import types

import pytest
import torch
from torch import nn

from pyfast.models import BackboneError, FeatureMap, Refiner, TinyBackbone, feature_maps, load_backbone, probe
from pyfast.models.refiner import decode, flatten_boxes


def test_tiny_backbone_is_seeded_frozen_and_probed():
    a, b = load_backbone(), load_backbone()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and not pa.requires_grad
    assert not a.training
    assert probe(a, 64) == {"features": FeatureMap("features", channels=64, size=16, stride=4)}
    assert not torch.equal(TinyBackbone(seed=1).body[0].weight, a.body[0].weight)


def test_load_backbone_spec_errors_and_plugin(monkeypatch):
    with pytest.raises(BackboneError, match="module:callable"):
        load_backbone("nocolon")
    with pytest.raises(BackboneError, match="cannot import"):
        load_backbone("no_such_module_xyz:f")
    mod = types.ModuleType("fake_bb")
    mod.make = lambda: nn.Conv2d(3, 5, 8, stride=8)
    mod.bad = lambda: nn.Flatten()
    mod.notmodule = lambda: 3
    monkeypatch.setitem(sys.modules, "fake_bb", mod)
    bb = load_backbone("fake_bb:make")
    assert probe(bb, 64) == {"features": FeatureMap("features", 5, 8, 8)}
    with pytest.raises(BackboneError, match=r"\(B, C, h, w\)"):
        probe(load_backbone("fake_bb:bad"), 32)
    with pytest.raises(BackboneError, match="nn.Module"):
        load_backbone("fake_bb:notmodule")
    with pytest.raises(BackboneError, match="no attribute"):
        load_backbone("fake_bb:missing")


def test_refiner_starts_as_identity_and_shapes():
    torch.manual_seed(0)
    model = Refiner(in_channels=8, stride=4, roi_size=6)
    feats = torch.randn(2, 8, 16, 16)
    boxes, index = flatten_boxes([torch.tensor([[4.0, 4.0, 20.0, 30.0]]), torch.tensor([[0.0, 0, 10, 10], [30, 30, 60, 50]])])
    assert index.tolist() == [0, 1, 1]
    out = model(feats, boxes, index)
    torch.testing.assert_close(out.refined, boxes, atol=1e-4, rtol=0)
    assert out.mask_logits.shape == (3, 12, 12) and out.iou_logits.shape == (3,)
    assert out.rois[:, 0].tolist() == [0, 1, 1]


def test_decode_moves_edges_in_window_units():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    out = decode(boxes, torch.tensor([[0.1, -0.1, 0.0, 0.5]]), context=2.0)  # window 20 x 40
    torch.testing.assert_close(out, torch.tensor([[2.0, -4.0, 10.0, 40.0]]))


class MultiLevel(nn.Module):
    """An encoder with an early and a late map, returned as a tuple or a dict."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.early = nn.Conv2d(3, 6, 4, stride=4)
        self.late = nn.Conv2d(6, 10, 2, stride=2)
        self.as_dict = as_dict

    def forward(self, x):
        early = self.early(x)
        late = self.late(early)
        return {"early": early, "late": late} if self.as_dict else (early, late)


def test_tuple_and_dict_outputs_are_named_and_each_map_probed():
    assert probe(MultiLevel(), 64) == {"0": FeatureMap("0", 6, 16, 4), "1": FeatureMap("1", 10, 8, 8)}
    assert list(probe(MultiLevel(as_dict=True), 64)) == ["early", "late"]
    t = torch.zeros(1, 2, 4, 4)
    assert list(feature_maps(t)) == ["features"]
    with pytest.raises(BackboneError, match="'1' must be a"):
        feature_maps((t, torch.zeros(1, 2)))
    with pytest.raises(BackboneError, match="tensor, a tuple or a dict"):
        feature_maps(3)
    with pytest.raises(BackboneError, match="map names"):
        feature_maps({0: t})
    odd = nn.Conv2d(3, 2, 3, stride=3)  # 64 -> 21: does not divide
    with pytest.raises(BackboneError, match="divides the input"):
        probe(odd, 64)


def test_refiner_pools_several_maps_at_their_strides():
    torch.manual_seed(0)
    model = Refiner(in_channels=[6, 10], stride=[4, 8], roi_size=4)
    boxes, index = flatten_boxes([torch.tensor([[4.0, 4.0, 40.0, 30.0]])])
    out = model([torch.randn(1, 6, 16, 16), torch.randn(1, 10, 8, 8)], boxes, index)
    assert out.refined.shape == (1, 4) and out.mask_logits.shape == (1, 8, 8)
    assert model.box_head.trunk[0].in_channels == 16
    with pytest.raises(ValueError, match="2 feature map"):
        model(torch.randn(1, 6, 16, 16), boxes, index)
    with pytest.raises(ValueError, match="same maps"):
        Refiner([6, 10], [4])
