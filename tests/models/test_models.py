import sys
import types

import pytest
import torch
from torch import nn

from pyfast.models import BackboneError, Refiner, TinyBackbone, load_backbone, probe
from pyfast.models.refiner import decode, flatten_boxes, mask_targets


def test_tiny_backbone_is_seeded_frozen_and_probed():
    a, b = load_backbone(), load_backbone()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and not pa.requires_grad
    assert not a.training
    assert probe(a, 64) == (64, 4)
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
    assert probe(bb, 64) == (5, 8)
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


def test_mask_targets_crop_the_window():
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 8:16] = True  # left half of the window [8, 24) x [8, 24)
    t = mask_targets(masks, torch.tensor([[0, 8.0, 8.0, 24.0, 24.0]]), 8)
    assert t.dtype == torch.bool and t.shape == (1, 8, 8)
    assert t[0, :, :4].all() and not t[0, :, 4:].any()
