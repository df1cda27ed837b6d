"""The PyTorch entmax-1.5 of the reference path (``kernels.entmax.entmax15``): against the ``entmax``
package on ordinary rows (forward and gradients), and where that package fails: rows with NaN, +inf or no finite
score (NaN rows), and huge scores (exact). Last, the Triton op against the reference on those rows.
"""
import entmax
import pytest
import torch

from kernels import entmax15_attention, use_backend
from kernels.entmax import entmax15, entmax15_attention_reference, entmax15_attention_varlen_reference

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]


def _rows(kind, generator, shape=(40, 23)):
    """Fresh random score rows of one kind, float64."""
    if kind == "random":
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * 3
    if kind == "ties":  # few distinct values: ties inside and at the edge of the support
        return torch.randint(-3, 3, shape, generator=generator).double()
    if kind == "peaked":  # most rows one-hot
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * 100
    if kind == "flat":  # the support is the whole row
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.01
    raise ValueError(kind)


ORDINARY = ["random", "ties", "peaked", "flat"]


@pytest.mark.parametrize("kind", ORDINARY)
def test_forward_and_gradient_match_the_entmax_package(kind):
    generator = torch.Generator().manual_seed(ORDINARY.index(kind))
    scores = _rows(kind, generator)
    scores[::3, -5:] = float("-inf")  # hidden keys, as the causal mask makes them
    ours = scores.clone().requires_grad_()
    theirs = scores.clone().requires_grad_()
    p, expected = entmax15(ours), entmax.entmax15(theirs, dim=-1)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    dp = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    p.backward(dp)
    expected.backward(dp)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=0)
    # float32 and float16-range inputs in float32, as the attention reference computes them
    torch.testing.assert_close(entmax15(scores.float()), entmax.entmax15(scores.float(), dim=-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["random", "flat"])
def test_gradcheck_in_float64(kind):
    scores = _rows(kind, torch.Generator().manual_seed(7), shape=(4, 9)).requires_grad_()
    assert torch.autograd.gradcheck(entmax15, (scores,))


def test_undefined_rows_are_nan_and_the_others_untouched():
    generator = torch.Generator().manual_seed(11)
    scores = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    scores[0, 4] = float("nan")
    scores[1, 2] = float("inf")
    scores[2] = float("-inf")  # no finite score
    scores[3, :3] = float("-inf")  # hidden keys only: an ordinary row
    scores = scores.requires_grad_()
    p = entmax15(scores)
    assert p[:3].isnan().all()
    ordinary = scores.detach()[3:].clone().requires_grad_()
    expected = entmax.entmax15(ordinary, dim=-1)
    torch.testing.assert_close(p[3:], expected, atol=1e-12, rtol=0)
    assert torch.all(p[3, :3] == 0)
    dp = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    p.backward(dp)
    expected.backward(dp[3:])
    assert scores.grad[:3].isnan().all()
    torch.testing.assert_close(scores.grad[3:], ordinary.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1e7, 1e30])
def test_huge_scores_are_exact(dtype, magnitude):
    generator = torch.Generator().manual_seed(13)
    # scores a multiple of `magnitude`: only the ties with the row maximum are in the support, equally weighted
    levels = torch.randint(-2, 3, (30, 17), generator=generator).to(dtype)
    p = entmax15(levels * magnitude)
    at_max = levels == levels.amax(-1, keepdim=True)
    expected = at_max / at_max.sum(-1, keepdim=True)
    torch.testing.assert_close(p, expected.to(dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 2.0 ** 20), (torch.float64, 2.0 ** 40)])
def test_shift_by_a_huge_offset_changes_nothing(dtype, offset):
    # eighths in [-2, 2] plus the offset are exact in the dtype, so the weights must be those without it
    small = torch.randint(-16, 17, (30, 17), generator=torch.Generator().manual_seed(23)).to(dtype) / 8
    torch.testing.assert_close(entmax15(small + offset), entmax15(small), atol=1e-6, rtol=0)


def test_attention_reference_keeps_huge_fp16_inputs_exact():
    q = torch.full((1, 2, 7, 4), 60000.0, dtype=torch.float16)  # scores 7.2e9: every visible key ties
    out = entmax15_attention_reference(q, q, q)
    assert torch.all(out == 60000.0)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_reference_is_the_reference_per_sequence(causal):
    """The packed reference (one masked (total x total) attention) equals the reference on each sequence alone,
    forward and gradients; an empty sequence owns no row."""
    generator = torch.Generator().manual_seed(3)
    lengths = [4, 1, 0, 6]
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, n, generator=generator, dtype=torch.float64, requires_grad=True)
               for n in (5, 5, 3))
    out = entmax15_attention_varlen_reference(q, k, v, cu_seqlens, causal=causal, scale=0.7)
    do = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if end == start:
            continue
        alone = [x[start:end].detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v)]  # (1, H, L, D)
        expected = entmax15_attention_reference(*alone, causal=causal, scale=0.7)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected)
        for grad, expected_grad in zip(grads, torch.autograd.grad(expected, alone, do[start:end]), strict=True):
            torch.testing.assert_close(grad[start:end], expected_grad[0].transpose(0, 1))


def test_attention_reference_nan_query_row_stays_in_its_row():
    generator = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=generator) for _ in range(3))
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = q.clone()
        poisoned[0, 0, 2, 1] = bad
        out = entmax15_attention_reference(poisoned, k, v)
        assert out[0, 0, 2].isnan().all()
        rows = torch.arange(6) != 2
        torch.testing.assert_close(out[0, 0, rows], entmax15_attention_reference(q, k, v)[0, 0, rows])


def _special_inputs(case):
    generator = torch.Generator().manual_seed(19)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=generator) for _ in range(3))
    scale = None
    if case in ("nan", "+inf"):
        q[0, 1, 4, 0] = float("nan") if case == "nan" else float("inf")
    elif case == "scale-1e7":
        scale = 1e7
    elif case == "fp16-60000":
        q = k = v = torch.full((1, 2, 9, 4), 60000.0, dtype=torch.float16)
    return q, k, v, scale


@pytest.mark.parametrize("case", [
    pytest.param("nan", id="nan-in-q"),
    pytest.param("+inf", id="inf-in-q"),
    pytest.param("scale-1e7", id="scores-1e7"),
    pytest.param("fp16-60000", id="fp16-q-k-v-60000"),
])
def test_triton_op_agrees_with_reference_on_special_rows(case):
    q, k, v, scale = _special_inputs(case)
    with use_backend("triton"):
        out = entmax15_attention(q, k, v, scale=scale)
    expected = entmax15_attention_reference(q, k, v, scale=scale)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3, equal_nan=True)
