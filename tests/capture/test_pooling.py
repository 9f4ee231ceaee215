"""--pool specs: parsing, which spec a layer gets, the dims by rank, and the reductions."""

import pytest
import torch

from pyfast.capture import CaptureError, parse_pool_spec
from pyfast.capture.pooling import PoolSpec, check_patterns, pool, pooled_shape, resolve, spec_for


def test_parse():
    assert parse_pool_spec("mean") == PoolSpec("mean", None, None, "mean")
    assert parse_pool_spec("encoder.*=max:1,2") == PoolSpec("max", (1, 2), "encoder.*", "encoder.*=max:1,2")
    assert parse_pool_spec(" cls:1 ").dims == (1,)
    for bad, message in [("avg", "unknown pooling 'avg'"), ("=mean", "empty layer pattern"),
                         ("mean:a", "must be integers"), ("mean:0", "0 is the batch"), ("max:1,1", "distinct"),
                         ("cls:1,2", "one dim"), ("none:1", "takes no dims")]:
        with pytest.raises(ValueError, match=message):
            parse_pool_spec(bad)


def test_the_last_matching_spec_wins_and_unmatched_patterns_are_errors():
    specs = [parse_pool_spec(t) for t in ("mean", "blocks.*=max", "blocks.1=none")]
    assert spec_for("stem", specs).kind == "mean"
    assert spec_for("blocks.0", specs).kind == "max"
    assert spec_for("blocks.1", specs).kind == "none"
    assert spec_for("x", []).kind == "none"
    with pytest.raises(CaptureError, match="no captured tensor matches 'blcks.\\*'.*blocks.0"):
        check_patterns([parse_pool_spec("blcks.*=max")], ["blocks.0", "blocks.1"])


def test_dims_follow_the_rank():
    mean, cls = parse_pool_spec("mean"), parse_pool_spec("cls")
    assert resolve(mean, "t", (2, 5, 8)) == ("mean", (1,))
    assert resolve(mean, "m", (2, 8, 4, 4)) == ("mean", (2, 3))
    assert resolve(mean, "v", (2, 8, 4, 4, 4)) == ("mean", (2, 3, 4))
    assert resolve(mean, "p", (2, 8)) == ("none", ())  # nothing to pool
    assert resolve(cls, "t", (2, 5, 8)) == ("cls", (1,))
    assert resolve(parse_pool_spec("mean:1,2"), "sam", (2, 4, 4, 8)) == ("mean", (1, 2))  # channels-last
    with pytest.raises(CaptureError, match="cls takes token 0"):
        resolve(cls, "m", (2, 8, 4, 4))
    with pytest.raises(CaptureError, match="no dim 3"):
        resolve(parse_pool_spec("max:3"), "t", (2, 5, 8))


def test_reductions_match_torch_in_float32():
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(pool(x, "mean", (1,)), x.double().mean(1).float(), rtol=1e-6, atol=1e-6)
    assert pool(x, "mean", (1,)).dtype == torch.float32  # means are not taken in bf16
    assert torch.equal(pool(x, "max", (1,)), x.amax(1))
    assert torch.equal(pool(x, "cls", (1,)), x[:, 0])
    assert pool(x, "none", ()) is x
    assert pooled_shape((3, 5, 7), "mean", (1,)) == (3, 7)
    nan = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    assert pool(nan, "max", (1,))[0].isnan() and pool(nan, "mean", (1,))[0].isnan()  # a NaN is not hidden
