"""Randomized checks of the fused ops against float64 references, sized for CI.

Each case draws its shapes from its seed (reproducible: the test id names the seed) and crosses the layouts (whole,
packed, padded, strided) with value kinds that have broken kernels before: scores so large the weights are one-hot,
magnitudes far from 1, and a key that every query scores -inf (a key of probability zero). Forward and every gradient
are compared with the float64 reference on the same inputs. Errors are measured against an absolute floor scaled
by the largest expected magnitude, plus a relative term: exact zeros (the gradients of a row that sees one key) are
compared absolutely, never relatively. The tolerance grows with the largest score, whose fp32 rounding the
probabilities inherit.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from kernels import (BlockCausalMultiheadAttention, FusedEntmaxCausalAttention, entmax15_attention, moe, moe_top2,
                     reference, use_backend)
from kernels.block_causal import (block_causal_attention, block_causal_attention_reference,
                                  block_causal_attention_varlen, block_causal_attention_varlen_reference, forced_tiles)
from kernels.entmax import entmax15_attention_varlen, entmax15_attention_varlen_reference
from kernels.moe import MoETiles, moe_top2_reference

pytestmark = [  # the interpreter multiplies the -inf key by the zero-filled rows past a tile's end, then masks them
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),  # hidden scores, masked after exp2
]

#: fp32 in the interpreter is exact fp32 arithmetic: the error budgets (output, gradients) of scores of magnitude up
#: to SCORE_UNIT. Gradients get more: the backward recomputes P from the rounded log-sum-exp, and on peaked rows
#: dS = P (dP - delta) cancels, so P's relative error ~ |s| eps reaches dS scaled by |dP|
TOLERANCE, GRAD_TOLERANCE = 3e-5, 1e-4
SCORE_UNIT = 16.0
VALUE_KINDS = ("normal", "peaked", "large", "minus-inf-key")
#: (layout, values, strided) per case index: every layout meets every value kind; a third of the cases strided
ATTENTION_CASES = [(layout, values, i % 3 == 0)
                   for i, (layout, values) in enumerate(itertools.product(("whole", "packed"), VALUE_KINDS))]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """|actual - expected| <= tol * (max(1, max|expected|) + |expected|), NaN nowhere but where expected."""
    expected = expected.detach().double()
    finite = expected[expected.isfinite()]
    floor = tol * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    torch.testing.assert_close(actual.detach().double(), expected, atol=floor, rtol=tol, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def float64_outputs_and_grads(op, inputs, do):
    """op on float64 copies of ``inputs``: (output, *gradients of every input) under the upstream gradient do."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = op(*leaves)
    return (out, *torch.autograd.grad(out, leaves, do.double()))


def score_factor(q: torch.Tensor, k: torch.Tensor, scale: float, time_dim: int) -> float:
    """How much to widen the tolerances: the largest finite score |q . k| * scale in units of SCORE_UNIT (>= 1)."""
    q, k = (x.detach().double().movedim(time_dim, -2) for x in (q, k))
    scores = (q @ k.transpose(-1, -2)).abs() * scale
    return max(1.0, scores[scores.isfinite()].max().item() / SCORE_UNIT)


def sequence_bounds(rng: random.Random, total_max: int) -> list[int]:
    """cu_seqlens of 1 to 4 sequences, 1 to total_max // 2 rows each."""
    lengths = [rng.randint(1, total_max // 2) for _ in range(rng.randint(1, 4))]
    return [0, *itertools.accumulate(lengths)]


def make_extreme(values: str, q, k, v, bounds: list[int], time_dim: int, first_group: int, rng: random.Random):
    """Apply a value kind in place (on leaf-free tensors); returns the scale to use (None: D ** -0.5).

    ``minus-inf-key``: feature 0 of q is positive and one key, outside its sequence's first ``first_group`` rows
    (which every row sees, so no row is left with -inf scores only), holds -inf in feature 0."""
    if values == "peaked":
        return rng.choice([6.0, 20.0])
    if values == "large":
        q.mul_(5.0)
        k.mul_(5.0)
        v.mul_(1e3)
    if values == "minus-inf-key":
        q.select(-1, 0).abs_().add_(0.5)
        candidates = [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end - start > first_group]
        if candidates:
            start, end = rng.choice(candidates)
            k.select(time_dim, rng.randrange(start + first_group, end))[..., 0] = float("-inf")
    return None


def attention_inputs(rng: random.Random, layout: str, strided: bool, h: int, d: int, dv: int, rows: int,
                     batch: int):
    """q, k (.., D) and v (.., Dv): (B, H, T, .) whole or (total, H, .) packed; strided views when asked."""
    if layout == "whole":
        if not strided:
            return [torch.randn(batch, h, rows, n) for n in (d, d, dv)]
        return [torch.randn(batch, rows, h, d).transpose(1, 2),  # (B, T, H, D) storage
                torch.randn(batch, h, rows, d + 3)[..., :d],  # rows wider than D
                torch.randn(batch, h, rows, 2 * dv)[..., ::2]]  # a strided head dim (copied once)
    if not strided:
        return [torch.randn(rows, h, n) for n in (d, d, dv)]
    return [torch.randn(h, rows, d).transpose(0, 1), torch.randn(rows, h, d + 2)[..., :d],
            torch.randn(rows, 2 * h, dv)[:, ::2]]


# ------------------------------------------------------------------------------------------------- block-causal


@pytest.mark.parametrize("seed", range(len(ATTENTION_CASES)))
def test_block_causal_random_cases(triton_backend, seed):
    layout, values, strided = ATTENTION_CASES[seed]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    group_size = rng.choice([1, 1, 2, 3, 5])
    h, d, dv = rng.randint(1, 2), rng.choice([1, 4, 8, 16]), rng.choice([1, 5, 16])
    tiles = rng.choice([(16, 16), (16, 32), (32, 16)])
    if layout == "whole":
        batch, rows = rng.randint(1, 2), rng.randint(1, 24)
        bounds, time_dim = [0, rows], -2
    else:
        bounds = sequence_bounds(rng, 40)
        batch, rows, time_dim = 1, bounds[-1], 0
    q, k, v = attention_inputs(rng, layout, strided, h, d, dv, rows, batch)
    scale = make_extreme(values, q, k, v, bounds, time_dim, group_size, rng)
    widen = score_factor(q, k, d ** -0.5 if scale is None else scale, time_dim)
    if layout == "whole":
        call = lambda q, k, v: block_causal_attention(q, k, v, group_size=group_size, scale=scale)  # noqa: E731
        truth = lambda q, k, v: block_causal_attention_reference(q, k, v, group_size=group_size,  # noqa: E731
                                                                  scale=scale)
    else:
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        max_seqlen = rng.choice([None, max(b - a for a, b in zip(bounds[:-1], bounds[1:])), rows])
        call = lambda q, k, v: block_causal_attention_varlen(  # noqa: E731
            q, k, v, cu_seqlens, max_seqlen=max_seqlen, group_size=group_size, scale=scale)
        truth = lambda q, k, v: block_causal_attention_varlen_reference(  # noqa: E731
            q, k, v, cu_seqlens, group_size=group_size, scale=scale)
    with forced_tiles(*tiles):
        check_attention(call, truth, (q, k, v), widen, minus_inf_key=values == "minus-inf-key")


def check_attention(call, truth, inputs, widen: float, *, minus_inf_key: bool) -> None:
    """Output and (dq, dk, dv) of ``call`` against ``truth`` in float64 on the same inputs, the tolerances times
    ``widen``."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = call(*leaves)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    expected = float64_outputs_and_grads(truth, inputs, do)
    assert out.dtype == inputs[0].dtype and out.shape == expected[0].shape
    for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        if name == "dq" and minus_inf_key:  # the -inf key's zero probability times its -inf: NaN in feature 0
            actual, wanted = actual[..., 1:], wanted[..., 1:]
        assert_close(name, actual, wanted, (TOLERANCE if name == "out" else GRAD_TOLERANCE) * widen)


# ------------------------------------------------------------------------------------------------------- entmax


@pytest.mark.parametrize("seed", range(len(ATTENTION_CASES)))
def test_entmax_random_cases(triton_backend, seed):
    layout, values, strided = ATTENTION_CASES[seed]
    rng = random.Random(100 + seed)
    torch.manual_seed(100 + seed)
    causal = rng.random() < 0.75
    h, d, dv = rng.randint(1, 2), rng.choice([1, 4, 8, 16]), rng.choice([1, 5, 16])
    if layout == "whole":
        batch, rows = rng.randint(1, 2), rng.randint(1, 20)
        bounds, time_dim = [0, rows], -2
    else:
        bounds = sequence_bounds(rng, 32)
        batch, rows, time_dim = 1, bounds[-1], 0
    q, k, v = attention_inputs(rng, layout, strided, h, d, dv, rows, batch)
    scale = make_extreme(values, q, k, v, bounds, time_dim, 1, rng)
    widen = score_factor(q, k, d ** -0.5 if scale is None else scale, time_dim)
    if layout == "whole":
        call = lambda q, k, v: entmax15_attention(q, k, v, causal=causal, scale=scale)  # noqa: E731
        truth = lambda q, k, v: reference.entmax15_attention_reference(q, k, v, causal=causal,  # noqa: E731
                                                                       scale=scale)
    else:
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        call = lambda q, k, v: entmax15_attention_varlen(q, k, v, cu_seqlens, causal=causal,  # noqa: E731
                                                         scale=scale)
        truth = lambda q, k, v: entmax15_attention_varlen_reference(q, k, v, cu_seqlens, causal=causal,  # noqa: E731
                                                                    scale=scale)
    check_attention(call, truth, (q, k, v), widen, minus_inf_key=values == "minus-inf-key")


# ---------------------------------------------------------------------------------------------------------- moe

MOE_CASES = ("normal", "padded", "strided", "large")
#: 16-wide tiles, so small problems still span several tiles with partial ones at the edges
MOE_TINY_TILES = MoETiles(block_m=16, block_n=16, block_k=16, block_rows=4, num_warps=1, num_stages=1)


def moe_forward_backward(op, inputs, row_mask, upstream):
    """(y, routing weights, aux loss, *gradients of every input) under a loss that uses all three outputs."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    y, routing = op(*leaves, row_mask=row_mask, return_routing=True)
    dy, d_weights = upstream
    loss = (y * dy.to(y.dtype)).sum() + (routing.weights * d_weights.to(routing.weights.dtype)).sum()
    loss = loss + 0.5 * routing.aux_loss
    return (y, routing.weights, routing.aux_loss, routing.experts, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("seed", range(len(MOE_CASES)))
def test_moe_top2_random_cases(triton_backend, monkeypatch, seed):
    monkeypatch.setattr(moe, "TILES", {key: (MOE_TINY_TILES,) for key in moe.TILES})
    kind = MOE_CASES[seed]
    rng = random.Random(200 + seed)
    torch.manual_seed(200 + seed)
    n, num_experts = rng.randint(1, 40), rng.randint(2, 8)
    d, h, d_out = rng.randint(1, 20), rng.randint(1, 24), rng.randint(1, 20)
    x = torch.randn(n, d)
    x[rng.randrange(n)] = 0.0  # equal logits: experts 0 and 1, on both sides
    inputs = [x, torch.randn(num_experts, d), torch.randn(num_experts, d, h) / d ** 0.5,
              torch.randn(num_experts, h) / 2, torch.randn(num_experts, h, d_out) / h ** 0.5,
              torch.randn(num_experts, d_out) / 2]
    row_mask = torch.rand(n) < 0.7 if kind == "padded" else None
    if kind == "large":  # logits far apart (one-hot gate weights) and large expert outputs
        inputs[0] = inputs[0] * 30
        inputs[4] = inputs[4] * 100
    if kind == "strided":  # transposed storage: the kernels read through strides
        inputs = [t.t().contiguous().t() if t.dim() == 2 else t.transpose(1, 2).contiguous().transpose(1, 2)
                  for t in inputs]
    upstream = (torch.randn(n, d_out), torch.randn(n, 2))
    got = moe_forward_backward(moe_top2, inputs, row_mask, upstream)
    expected = moe_forward_backward(moe_top2_reference, [t.double() for t in inputs], row_mask, upstream)
    names = ("y", "weights", "aux_loss", "experts", "dx", "dgate_weight", "dw1", "db1", "dw2", "db2")
    for name, actual, wanted in zip(names, got, expected, strict=True):
        if name == "experts":
            assert torch.equal(actual, wanted), "different experts chosen"
        else:
            assert_close(name, actual, wanted, TOLERANCE if name in ("y", "weights", "aux_loss") else GRAD_TOLERANCE)
    if row_mask is not None:
        assert (got[0][~row_mask] == 0).all() and (got[4][~row_mask] == 0).all(), "padded rows: zero out and grad"


# ------------------------------------------------------------------------------------------ modules, padded batches

MODULES = {
    "block_causal": lambda rng: BlockCausalMultiheadAttention(8, 2, group_size=rng.choice([1, 2, 3])),
    "fused_entmax": lambda rng: FusedEntmaxCausalAttention(8, 2),
    "reference_entmax": lambda rng: reference.EntmaxCausalAttention(8, 2),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(MODULES))
def test_padded_positions_output_zero_in_every_module(backend, name):
    """The rule of every attention module: with ``key_padding_mask``, padded positions output exactly 0 (no
    ``out_proj`` bias) and pass no gradient; valid positions equal their row's valid tokens run alone. Random
    masks (left, right and inner padding, an all-padding row), random nonzero biases."""
    rng = random.Random(name)
    torch.manual_seed(len(name))
    module = MODULES[name](rng)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    b, t = 4, 7
    padding = torch.rand(b, t) < 0.4
    padding[0] = True  # all padding
    padding[1] = False  # no padding
    x = torch.randn(b, t, 8, requires_grad=True)
    with use_backend(backend):
        out, _ = module(x, key_padding_mask=padding)
        out.sin().sum().backward()
        assert (out[padding] == 0).all(), "padded positions must output 0"
        assert (x.grad[padding] == 0).all(), "padded positions must get no gradient"
        with torch.no_grad():
            for row, keep in enumerate(~padding):
                if keep.any():
                    alone, _ = module(x[row:row + 1, keep])
                    torch.testing.assert_close(out[row, keep], alone[0], atol=1e-5, rtol=1e-5)
        if isinstance(module, reference.EntmaxCausalAttention):
            context = module.forward_with_context(x, key_padding_mask=padding).context
            assert (context[padding] == 0).all(), "padded positions must have zero context"
