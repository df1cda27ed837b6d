"""Property-based tests: every op's Triton kernels (the interpreter on a CPU) against its float64 reference, forward
and all gradients, on shapes, strides, dtypes and values that hypothesis draws (T = 1, odd sizes, transposed and
sliced views, ties, tiny and huge magnitudes).

Bounded and reproducible: few examples per op, no deadline, derandomized (the same examples on every run, CI
included). Tensors come from a drawn seed; hypothesis draws the sizes, layouts and value kinds.
"""
from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import block_causal_attention, entmax15_attention, moe_top2, use_backend
from kernels import entmax, moe
from kernels.block_causal import (
    block_causal_attention_reference,
    block_causal_attention_varlen,
    block_causal_attention_varlen_reference,
    forced_tiles,
)
from kernels.entmax import Tiles, entmax15_attention_reference
from kernels.moe import MoETiles, moe_top2_reference

#: The largest |q k^T * scale| drawn for entmax (the kernel solves tau relative to the row maximum: any magnitude).
ENTMAX_KERNEL_SCORE_LIMIT = 1e30
#: Whether entmax examples may hold NaN/+-inf in q. Forward rows come out NaN on both sides (tests/
#: test_entmax_reference.py), but where the gradients of such a row turn NaN differs between the kernel and the
#: reference (dq of a one-key NaN row), so these examples stay off until that is defined.
ENTMAX_KERNEL_NON_FINITE_ROWS = False

#: examples per op; more for a local search, e.g. OPS_PROPERTY_EXAMPLES=200 (CI keeps the default)
EXAMPLES = int(os.environ.get("OPS_PROPERTY_EXAMPLES", "8"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: relative tolerance per input dtype (forward, gradients) against float64, as in the op's own test files
TOLERANCE = {torch.float32: (2e-5, 5e-5), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 8e-2)}
LAYOUTS = ["contiguous", "transposed", "sliced"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]


def _tensor(shape, layout, values, generator, dtype, time_axis=-2):
    """A (..., T, X) tensor of ``values`` ((shape) -> float64 tensor) in ``dtype``: contiguous, a transposed view
    (time and the axis before it swapped in memory) or a view of every other element of a wider tensor."""
    if layout == "sliced":
        wide = values((*shape[:-1], 2 * shape[-1]), generator)
        return wide.to(dtype)[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        axis = time_axis % len(shape)
        other = axis - 1 if axis > 0 else axis + 1
        swapped = list(shape)
        swapped[axis], swapped[other] = swapped[other], swapped[axis]
        return values(tuple(swapped), generator).to(dtype).transpose(axis, other)
    return values(tuple(shape), generator).to(dtype)


def _values(kind):
    """(shape, generator) -> float64 tensor for a drawn kind: ``("normal", magnitude)``, or ``("lattice", e)``,
    integers in [-3, 3] times 2^e: exact in every dtype, so that products and sums are exact and ties exact."""
    name, parameter = kind
    if name == "normal":
        return lambda shape, generator: torch.randn(shape, generator=generator, dtype=torch.float64) * parameter
    return lambda shape, generator: torch.randint(-3, 4, shape, generator=generator).double() * 2.0 ** parameter


UNIT = ("normal", 1.0)


def _check(name, actual, expected, tolerance, magnitude=1.0):
    """max |actual - expected| <= tolerance * max(magnitude, max |expected|), NaN where (and only where) expected is
    NaN. ``magnitude`` bounds the terms that were summed when they can be much larger than the result."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN in different places"
    finite = ~expected.isnan()
    if not finite.any():
        return
    error = (actual[finite] - expected[finite]).abs().max().item()
    scale = max(magnitude, expected[finite].abs().max().item())
    assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance:.3g} x {scale:.3g}"


def _run_both(op, reference, inputs, seed):
    """(output, gradients) of the op on ``inputs`` and of the reference on float64 copies, and the random dO."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = op(*leaves)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    out64 = reference(*leaves64)
    if out64.numel() == 0:  # nothing flows back (the MoE reference's empty output is not even in the graph)
        return (out, grads), (out64, [torch.zeros_like(x) for x in leaves64]), do
    grads64 = torch.autograd.grad(out64, leaves64, do)
    return (out, grads), (out64, grads64), do


def _check_attention(results, q, k, v, scale, forward, backward):
    """Output and dq, dk, dv. In fp16/bf16 the kernels round P, dS and the output (which the backward's rowsum
    dO . O reads) to the input dtype, so gradient errors scale with the terms summed, up to
    Dv * |dO| * |v| * max(|q|, |k|) * scale, not with the (possibly cancelling) result."""
    (out, grads), (out64, grads64), do = results
    _check("out", out, out64, forward)
    magnitude = 1.0
    if q.dtype != torch.float32:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        largest = lambda x: x.detach().double().abs().max().item()  # noqa: E731
        magnitude = v.shape[-1] * largest(do) * largest(v) * max(largest(q), largest(k)) * scale
    for name, grad, grad64 in zip(("dq", "dk", "dv"), grads, grads64):
        _check(name, grad, grad64, backward, max(1.0, magnitude))


# ------------------------------------------------------------------------------------------------ entmax


@st.composite
def entmax_cases(draw):
    b, h, t = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 19))
    d, dv = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "lattice"]))
    if kind == "normal":
        values, scale = ("normal", draw(st.sampled_from([1e-3, 1.0, 4.0]))), None
    else:  # exact scores sum_d q_d k_d of magnitude up to the limit (|q_d k_d| <= 9 * 4^e); fp16 holds 3 * 2^14
        top = min(14, int(math.log2(ENTMAX_KERNEL_SCORE_LIMIT / (9 * d)) / 2))
        values, scale = ("lattice", draw(st.integers(-4, top))), 1.0
    poison = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]
                                  if ENTMAX_KERNEL_NON_FINITE_ROWS else [None]))
    return dict(shape=(b, h, t, d, dv), dtype=dtype, values=values, scale=scale, poison=poison,
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)], causal=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@PROPERTY_SETTINGS
@given(case=entmax_cases())
def test_entmax15_attention_kernel_matches_reference(case):
    b, h, t, d, dv = case["shape"]
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v = (_tensor(shape, layout, values, generator, case["dtype"])
               for shape, layout, values in zip(((b, h, t, d), (b, h, t, d), (b, h, t, dv)), case["layouts"],
                                                (_values(case["values"]), _values(case["values"]), _values(UNIT))))
    if case["poison"] is not None:
        q = q.clone()
        q[0, 0, t // 2, 0] = case["poison"]
    options = dict(causal=case["causal"], scale=case["scale"])
    tiles = Tiles(block_m=8, block_n=8, block_d=4, block_dv=4, row_block_m=4, row_block_n=8)
    with mock.patch.object(entmax, "_TILE_OVERRIDE", tiles), use_backend("triton"):
        results = _run_both(lambda *x: entmax15_attention(*x, **options),
                            lambda *x: entmax15_attention_reference(*x, **options), (q, k, v), case["seed"])
    _check_attention(results, q, k, v, case["scale"], *TOLERANCE[case["dtype"]])


# ----------------------------------------------------------------------------------------- block-causal


def _softmax_tolerances(dtype, q, k):
    """TOLERANCE plus the rounding of the fp32 log-sum-exp in absolute score units: ``s - lse`` loses about
    ulp(max |s|), which large scores (the lattice cases) turn into a relative error of P and of every gradient."""
    scores = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() * q.shape[-1] ** -0.5
    extra = 8 * 2.0 ** -23 * scores
    forward, backward = TOLERANCE[dtype]
    return forward + extra, backward + extra


@st.composite
def block_causal_cases(draw):
    return dict(
        b=draw(st.integers(1, 2)), h=draw(st.integers(1, 2)), t=draw(st.integers(1, 21)),
        d=draw(st.integers(1, 12)), dv=draw(st.integers(1, 12)), group_size=draw(st.integers(1, 5)),
        dtype=draw(st.sampled_from(DTYPES)), layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        values=draw(st.sampled_from([("normal", 1e-3), UNIT, ("normal", 4.0), ("lattice", -2), ("lattice", 3)])),
        seed=draw(st.integers(0, 2 ** 16)))


@PROPERTY_SETTINGS
@given(case=block_causal_cases())
def test_block_causal_attention_kernel_matches_reference(case):
    b, h, t, d, dv = (case[key] for key in ("b", "h", "t", "d", "dv"))
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v = (_tensor(shape, layout, values, generator, case["dtype"])
               for shape, layout, values in zip(((b, h, t, d), (b, h, t, d), (b, h, t, dv)), case["layouts"],
                                                (_values(case["values"]), _values(case["values"]), _values(UNIT))))
    group_size = case["group_size"]
    with forced_tiles(16, 16), use_backend("triton"):
        results = _run_both(lambda *x: block_causal_attention(*x, group_size=group_size),
                            lambda *x: block_causal_attention_reference(*x, group_size=group_size), (q, k, v),
                            case["seed"])
    _check_attention(results, q, k, v, None, *_softmax_tolerances(case["dtype"], q, k))


@st.composite
def varlen_cases(draw):
    return dict(
        lengths=draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)), h=draw(st.integers(1, 2)),
        d=draw(st.integers(1, 12)), dv=draw(st.integers(1, 12)), group_size=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(DTYPES)), layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        values=draw(st.sampled_from([UNIT, ("normal", 4.0), ("lattice", 2)])),
        strided_offsets=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@PROPERTY_SETTINGS
@given(case=varlen_cases())
def test_block_causal_attention_varlen_kernel_matches_reference(case):
    total, h, d, dv = sum(case["lengths"]), case["h"], case["d"], case["dv"]
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v = (_tensor(shape, layout, values, generator, case["dtype"], time_axis=0)
               for shape, layout, values in zip(((total, h, d), (total, h, d), (total, h, dv)), case["layouts"],
                                                (_values(case["values"]), _values(case["values"]), _values(UNIT))))
    offsets = torch.tensor([0] + case["lengths"], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_seqlens = offsets
    if case["strided_offsets"]:  # every other element of an interleaved tensor
        cu_seqlens = torch.stack([offsets, torch.full_like(offsets, 999)], dim=1).flatten()[::2]
    group_size = case["group_size"]
    with forced_tiles(16, 16), use_backend("triton"):
        results = _run_both(lambda *x: block_causal_attention_varlen(*x, cu_seqlens, group_size=group_size),
                            lambda *x: block_causal_attention_varlen_reference(*x, offsets, group_size=group_size),
                            (q, k, v), case["seed"])
    _check_attention(results, q, k, v, None, *_softmax_tolerances(case["dtype"], q.transpose(0, 1),
                                                                    k.transpose(0, 1)))


# ---------------------------------------------------------------------------------------------------- MoE


@st.composite
def moe_cases(draw):
    return dict(
        n=draw(st.integers(0, 21)), experts=draw(st.integers(2, 7)), d=draw(st.integers(1, 11)),
        h=draw(st.integers(1, 11)), d_out=draw(st.integers(1, 11)), dtype=draw(st.sampled_from(DTYPES)),
        x_layout=draw(st.sampled_from(LAYOUTS)), gate_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        values=draw(st.sampled_from([("normal", 1e-2), UNIT, ("normal", 16.0), ("lattice", 0), ("lattice", -3)])),
        tied_gate_rows=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@PROPERTY_SETTINGS
@given(case=moe_cases())
def test_moe_top2_kernel_matches_reference(case):
    n, e, d, h, d_out, dtype = (case[key] for key in ("n", "experts", "d", "h", "d_out", "dtype"))
    generator = torch.Generator().manual_seed(case["seed"])
    x = _tensor((n, d), case["x_layout"], _values(case["values"]), generator, dtype)
    gate = _values(case["values"])((e, d), generator)
    if case["tied_gate_rows"]:  # the last expert's logits equal the first's bit for bit
        gate[-1] = gate[0]
    gate_weight = gate.to(dtype).t().contiguous().t() if case["gate_layout"] == "transposed" else gate.to(dtype)
    weights = [(torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
               for shape, scale in (((e, d, h), d ** -0.5), ((e, h), 0.5), ((e, h, d_out), h ** -0.5),
                                    ((e, d_out), 0.5))]
    inputs = (x, gate_weight, *weights)
    tiles = MoETiles(block_m=16, block_n=16, block_k=16, block_rows=4, num_warps=1, num_stages=1)
    chosen = {}

    def routed(op, name):
        def run(*args):
            y, routing = op(*args, return_routing=True)
            chosen[name] = routing.experts
            return y
        return run

    with mock.patch.object(moe, "TILES", {key: (tiles,) for key in moe.TILES}), use_backend("triton"):
        (out, grads), (out64, grads64), _ = _run_both(routed(moe_top2, "kernel"),
                                                      routed(moe_top2_reference, "reference"), inputs, case["seed"])
    assert torch.equal(chosen["kernel"], chosen["reference"]), "different experts chosen"
    forward, backward = TOLERANCE[dtype]
    _check("y", out, out64, forward)
    for name, grad, grad64 in zip(("dx", "dgate", "dw1", "db1", "dw2", "db2"), grads, grads64):
        _check(name, grad, grad64, backward)
