"""pyfast.pack's kernel: bit-exact casts, statistics and policies against torch and the reference,
on every test device."""

from __future__ import annotations

import pytest
import torch

import pyfast
from pyfast.ops.pack import pack_buffers
from pyfast.ops.reference import pack_reference

from backends import pyfast_env
from packs import assert_packs_like_reference, assert_same_bits

TARGETS = (torch.float16, torch.bfloat16)


def all_float16() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)


def halfway_float32() -> torch.Tensor:
    """float32 values exactly between neighbouring float16 values (normal and subnormal), the
    values either side of each, and the edges of the range."""
    h = all_float16().float()
    h = h[torch.isfinite(h)].unique()
    mids = (h[:-1].double() + h[1:].double()) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(-1e30, dtype=torch.float64)),
                      torch.nextafter(mids, torch.tensor(1e30, dtype=torch.float64))]).float()
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001,
                          2.0**-26, 3e-8, 6.1e-5, 1e-45, 3.4e38, float("inf"), float("nan")])
    return torch.cat([near, edges, -edges])


def random_bits_float32(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda: all_float16(), id="every-float16"),
        pytest.param(lambda: all_float16().float().to(torch.bfloat16), id="float16-as-bfloat16"),
        pytest.param(lambda: torch.arange(-(2**15), 2**15).to(torch.int16).view(torch.bfloat16), id="every-bfloat16"),
        pytest.param(halfway_float32, id="float32-halfway"),
        pytest.param(lambda: random_bits_float32(1 << 20), id="float32-random-bits"),
        pytest.param(lambda: halfway_float32().double(), id="float64-halfway"),
    ],
)
def test_bit_identical_to_torch_cast(device, source, target):
    x = source().to(device)
    buffer, _counts, _absmax = pack_buffers([x], target, saturate=False)
    assert buffer.device == x.device
    assert_same_bits(buffer, x.to(target).reshape(-1))


@pytest.fixture(params=["simd", "generic"])
def isa(request):
    """Runs a test with the AVX2 loops (where the CPU has them) and with the baseline-ISA loops."""
    from pyfast import _native

    generic = request.param == "generic"
    _native._C._pack_cpu_force_generic(generic)
    yield request.param
    _native._C._pack_cpu_force_generic(False)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("saturate", [False, True])
def test_both_cpu_code_paths_agree_with_reference(isa, target, saturate):
    inputs = mixed_inputs() + [halfway_float32(), random_bits_float32(4099)]
    assert_packs_like_reference(inputs, target, saturate)


@pytest.mark.parametrize("target", TARGETS)
def test_float64_rounds_through_float32_like_torch(device, target):
    # Doubles just above a float16/bfloat16 halfway point that round to the halfway point in
    # float32: a direct double -> 16-bit rounding would differ from torch's double -> float -> 16.
    base = halfway_float32().double()
    base = base[torch.isfinite(base)]
    x = torch.cat([base * (1 + 2.0**-40), base * (1 - 2.0**-40), torch.randn(10000, dtype=torch.float64) * 1e3])
    x = x.to(device)
    buffer, _, _ = pack_buffers([x], target, saturate=False)
    assert_same_bits(buffer, x.to(target))


def mixed_inputs():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1000, generator=g) * 3e4
    a[[3, 500]] = float("nan")
    a[7] = float("-inf")
    b = (torch.randn(70000, generator=g, dtype=torch.float64) * 1e5)
    c = torch.randn(33, 17, generator=g).to(torch.bfloat16) * 1e6
    d = torch.randn(5, generator=g).to(torch.float16)
    return [a, b, c, d, torch.empty(0), torch.tensor(-70000.0)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("saturate", [False, True])
def test_matches_reference_with_statistics(device, target, saturate):
    inputs = [t.to(device) for t in mixed_inputs()]
    buffer, counts, absmax = pack_buffers(inputs, target, saturate)
    ref_buffer, ref_counts, ref_absmax = pack_reference([t.cpu() for t in inputs], dtype=target, saturate=saturate)
    assert_same_bits(buffer, ref_buffer)
    counts, absmax = counts.cpu(), absmax.cpu()
    assert torch.equal(counts, ref_counts)
    assert torch.equal(absmax, ref_absmax)
    if target == torch.float16:
        assert counts[:, 0].tolist() == [3, 0, 0, 0, 0, 0]
        assert counts[0, 1] > 0 and counts[1, 1] > 0 and counts[5, 1] == 1
    else:
        assert counts[:, 1].sum() == 0  # nothing here is beyond bfloat16's range


def test_statistics_do_not_depend_on_thread_count():
    x = torch.randn(1 << 20) * 1e5
    x[::1000] = float("nan")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pack_buffers([x, x[:12345]], torch.float16, True)
        torch.set_num_threads(max(2, before))
        many = pack_buffers([x, x[:12345]], torch.float16, True)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.float16 else a, b.view(torch.int16) if b.dtype == torch.float16 else b)


def test_non_contiguous_inputs_pack_like_contiguous_copies(device):
    base = torch.randn(64, 48, dtype=torch.float32, device=device)
    views = {"t": base.t(), "slice": base[::3, 5:40:2], "expand": torch.randn(1, 8, device=device).expand(16, 8),
             "neg": base[:, 7]}  # fmt: skip
    packed = pyfast.pack(views)
    for name, view in views.items():
        assert not view.is_contiguous()
        assert_same_bits(packed.unpack()[name], view.to(torch.float16))


def test_policies_raise_naming_tensor_and_count(device):
    good = torch.ones(4, device=device)
    with pytest.raises(ValueError, match=r"'bad' \(2 non-finite\)"):
        pyfast.pack({"good": good, "bad": torch.tensor([1.0, float("nan"), float("inf")], device=device)})
    with pytest.raises(OverflowError, match=r"'big' \(3 out of range\)"):
        pyfast.pack({"good": good, "big": torch.tensor([7e4, -1e5, 65520.0, 65519.0], device=device)})
    # inf is non-finite, not an overflow: with nonfinite="keep" it passes the overflow check
    kept = pyfast.pack({"x": torch.tensor([float("inf"), float("nan"), 1.0], device=device)}, nonfinite="keep")
    out = kept.unpack()["x"]
    assert out[0] == float("inf") and torch.isnan(out[1]) and out[2] == 1.0
    assert kept.stats["x"].nonfinite == 2 and kept.stats["x"].overflow == 0


def test_saturate_clamps_to_max_and_keeps_infinities(device):
    x = torch.tensor([7e4, -1e9, 65519.0, 65520.0, float("-inf"), 3.0], device=device)
    packed = pyfast.pack({"x": x}, overflow="saturate", nonfinite="keep")
    assert packed.unpack()["x"].tolist() == [65504.0, -65504.0, 65504.0, 65504.0, float("-inf"), 3.0]
    s = packed.stats["x"]
    assert (s.nonfinite, s.overflow, s.absmax) == (1, 3, 1e9)
    bf = pyfast.pack({"x": torch.tensor([1e39, -1e300], dtype=torch.float64, device=device)}, dtype=torch.bfloat16,
                     overflow="saturate")  # fmt: skip
    assert bf.unpack()["x"].tolist() == [torch.finfo(torch.bfloat16).max, -torch.finfo(torch.bfloat16).max]


def test_sequence_names_and_empty_inputs():
    packed = pyfast.pack([torch.ones(2), torch.zeros(()), torch.empty(0, 3)])
    assert packed.names == ["0", "1", "2"]
    assert packed.shapes == {"0": (2,), "1": (), "2": (0, 3)}
    assert packed.nbytes == 6
    empty = pyfast.pack({})
    assert empty.nbytes == 0 and empty.unpack() == {}


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="tensor 'ids'"):
        pyfast.pack({"ids": torch.arange(3)})
    with pytest.raises(TypeError, match="dtype must be torch.float16 or torch.bfloat16"):
        pyfast.pack({"x": torch.ones(2)}, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        pyfast.pack({"x": torch.ones(2)}, overflow="clip")
    with pytest.raises(ValueError, match="nonfinite"):
        pyfast.pack({"x": torch.ones(2)}, nonfinite="drop")
    with pytest.raises(ValueError, match="tensor 'm' is on meta"):
        pyfast.pack({"x": torch.ones(2), "m": torch.ones(2, device="meta")})
    with pytest.raises(TypeError, match="mapping name -> tensor or a sequence"):
        pyfast.pack(torch.ones(3))
    with pytest.raises(ValueError, match="reserved"):
        pyfast.pack({"__metadata__": torch.ones(1)})


def test_reference_backend_gives_the_same_pack(device):
    inputs = {"a": torch.randn(100, device=device) * 1e5, "b": torch.randn(7, dtype=torch.float64, device=device)}
    native = pyfast.pack(inputs, overflow="saturate")
    with pyfast_env(backend="reference"):
        reference = pyfast.pack(inputs, overflow="saturate")
    assert torch.equal(native.buffer.view(torch.int16), reference.buffer.view(torch.int16))
    assert native.stats == reference.stats


def test_inputs_that_require_grad_are_packed_as_values():
    x = torch.randn(10, requires_grad=True)
    out = pyfast.pack({"x": x * 2}).unpack()["x"]
    assert not out.requires_grad and torch.equal(out, (x * 2).detach().half())


def test_opcheck(device):
    tensors = [torch.randn(5, 3, device=device), torch.randn(7, dtype=torch.float64, device=device)]
    torch.library.opcheck(torch.ops.pyfast.pack_cast.default, (tensors,), dict(dtype=torch.float16, saturate=False))
    torch.library.opcheck(torch.ops.pyfast.pack_cast.default, (tensors,), dict(dtype=torch.bfloat16, saturate=True))


def test_torch_compile_fullgraph(device):
    x = torch.randn(3, 5, device=device) * 1e5

    def cast(a, b):
        buffer, counts, absmax = torch.ops.pyfast.pack_cast([a, b], dtype=torch.float16, saturate=True)
        return buffer.float().sum() + counts.sum() + absmax.sum()

    torch.testing.assert_close(torch.compile(cast, fullgraph=True)(x, x[0]), cast(x, x[0]))


def test_pack_devices_round_trip(device):
    x = torch.randn(100, device=device)
    packed = pyfast.pack({"x": x, "y": x[::2]})
    assert packed.device == x.device
    assert_same_bits(packed.unpack()["y"], x[::2].half())
    on_cpu = packed.unpack(device="cpu", dtype=torch.float32)
    assert on_cpu["x"].device.type == "cpu" and torch.equal(on_cpu["x"], x.half().float().cpu())
    back = pyfast.pack({"x": x.cpu()}).unpack(device=device)
    assert back["x"].device == x.device and torch.equal(back["x"], x.half())


# ---- out=: packing into a preallocated buffer ----


def fresh_inputs(device, seed):
    """Random tensors of mixed dtypes and shapes, with the nasty values in the first."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3000, generator=g) * 3e4  # some beyond float16's range
    a[[5, 77]] = float("nan")
    a[9] = float("-inf")
    b = torch.randn(257, 3, generator=g, dtype=torch.float64)
    c = (torch.randn(40, generator=g) * 10).to(torch.bfloat16)
    return {"a": a.to(device), "b": b.to(device), "empty": torch.empty(0, 4, device=device), "c": c.to(device)}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_into_out_matches_the_reference(device, target, seed):
    inputs = fresh_inputs(device, seed)
    total = sum(t.numel() for t in inputs.values())
    out = torch.full((total,), 7.0, dtype=target, device=device)  # stale contents must all be replaced
    packed = pyfast.pack(inputs, dtype=target, overflow="saturate", nonfinite="keep", out=out)
    assert packed.buffer.data_ptr() == out.data_ptr()
    ref_buffer, ref_counts, ref_absmax = pack_reference([t.cpu() for t in inputs.values()], dtype=target, saturate=True)
    assert_same_bits(out, ref_buffer)
    want = {n: (int(c[0]), int(c[1]), float(m)) for n, c, m in zip(inputs, ref_counts, ref_absmax)}
    assert {n: (s.nonfinite, s.overflow, s.absmax) for n, s in packed.stats.items()} == want


def test_out_packed_is_reused_and_describes_the_new_tensors(device):
    first = pyfast.pack({"x": torch.randn(6, 4, device=device)})
    pointer = first.buffer.data_ptr()
    y = torch.tensor([1.0, float("inf"), 2.0], device=device)
    again = pyfast.pack({"y": y, "z": torch.arange(21.0, device=device)}, nonfinite="keep", out=first)
    assert again is first and first.buffer.data_ptr() == pointer
    assert first.names == ["y", "z"] and first.shapes == {"y": (3,), "z": (21,)}
    assert first.stats["y"].nonfinite == 1 and first.stats["z"].absmax == 20.0
    assert_same_bits(first.unpack()["y"], y.half())


def test_out_with_empty_inputs(device):
    out = torch.empty(0, dtype=torch.float16, device=device)
    packed = pyfast.pack({}, out=out)
    assert packed.buffer is out and packed.unpack() == {}
    packed = pyfast.pack({"e": torch.empty(0, 2, device=device)}, out=out)
    assert packed.shapes == {"e": (0, 2)} and packed.stats["e"].absmax == 0.0


def test_out_keeps_the_overflow_policy(device):
    x = torch.tensor([1.0, 7e4], device=device)
    out = torch.zeros(2, dtype=torch.float16, device=device)
    with pytest.raises(OverflowError, match=r"'x' \(1 out of range\)"):
        pyfast.pack({"x": x}, out=out)
    assert out.tolist() == [1.0, float("inf")]  # documented: overwritten even when a policy raises
    assert pyfast.pack({"x": x}, overflow="saturate", out=out).unpack()["x"].tolist() == [1.0, 65504.0]


def test_bad_out_names_out_and_what_is_wrong():
    x = {"x": torch.ones(2, 3)}
    cases = [
        (torch.empty(5, dtype=torch.float16), ValueError, "out holds 5 elements but the tensors have 6"),
        (torch.empty(7, dtype=torch.float16), ValueError, "out holds 7 elements"),
        (torch.empty(6, dtype=torch.bfloat16), TypeError, "out has dtype torch.bfloat16 but the pack's dtype is torch.float16"),
        (torch.empty(6, dtype=torch.float32), TypeError, "out has dtype torch.float32"),
        (torch.empty(6, dtype=torch.float16, device="meta"), ValueError, "out is on meta but the tensors are on cpu"),
        (torch.empty(2, 3, dtype=torch.float16), ValueError, "out must be a contiguous 1-D tensor"),
        (torch.empty(12, dtype=torch.float16)[::2], ValueError, "out must be a contiguous 1-D tensor"),
        (torch.empty(6, dtype=torch.float16, requires_grad=True), ValueError, "out requires grad"),
        ([0.0] * 6, TypeError, "out must be a torch.Tensor"),
    ]
    for out, error, message in cases:
        with pytest.raises(error, match=message):
            pyfast.pack(x, out=out)
    small = pyfast.pack({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="out holds 2 elements but the tensors have 6"):
        pyfast.pack(x, out=small)


def test_out_that_shares_memory_with_an_input_is_refused():
    storage = torch.zeros(8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"out shares memory with tensors\[0\]"):
        pyfast.pack([storage[:4]], out=storage[4:])


def test_reference_backend_packs_into_out_too(device):
    inputs = fresh_inputs(device, 3)
    total = sum(t.numel() for t in inputs.values())
    native = torch.empty(total, dtype=torch.float16, device=device)
    pyfast.pack(inputs, overflow="saturate", nonfinite="keep", out=native)
    with pyfast_env(backend="reference"):
        reference = torch.empty(total, dtype=torch.float16, device=device)
        stats = pyfast.pack(inputs, overflow="saturate", nonfinite="keep", out=reference).stats
    assert_same_bits(native, reference)
    assert stats == pyfast.pack(inputs, overflow="saturate", nonfinite="keep").stats


def test_opcheck_pack_into(device):
    tensors = [torch.randn(5, 3, device=device), torch.randn(7, dtype=torch.float64, device=device)]
    out = torch.empty(22, dtype=torch.float16, device=device)
    torch.library.opcheck(torch.ops.pyfast.pack_cast_into.default, (tensors,), dict(dtype=torch.float16, saturate=False, out=out))
