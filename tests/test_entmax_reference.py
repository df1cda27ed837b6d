"""The PyTorch entmax-1.5 of the reference path (``kernels.entmax.entmax15``): against the ``entmax``
package on ordinary rows (forward and gradients), and where that package fails: rows with NaN, +inf or no finite
score (NaN rows), and huge scores (exact). Then the Triton op against the reference on those rows. Last, alpha-entmax
(``kernels.alpha_entmax``) and the attention references of any alpha, grouped-query heads and Tq != Tk against
``entmax.entmax_bisect`` in float64, forward and gradients (alpha's included), and the argument checks.
"""
import entmax
import pytest
import torch

from kernels import alpha_entmax, entmax15_attention, entmax_attention, entmax_attention_varlen, use_backend
from kernels.entmax import (EntmaxCausalAttention, entmax15, entmax15_attention_reference,
                            entmax15_attention_varlen_reference, entmax_attention_reference,
                            entmax_attention_varlen_reference)

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


# ----------------------------------------------------------------------------------------------------------------
# alpha-entmax: any alpha (per row or head, differentiable), grouped-query heads, Tq != Tk, separate q/k offsets
# ----------------------------------------------------------------------------------------------------------------

ALPHAS = [1.25, 1.5, 1.75, 2.0]


def _bisect(scores, alpha):
    """The ``entmax`` package's alpha-entmax (float64 bisection to its last bits)."""
    return entmax.entmax_bisect(scores, alpha, dim=-1, n_iter=120)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ORDINARY)
def test_alpha_entmax_matches_entmax_bisect_with_the_gradient_of_alpha(alpha, kind):
    generator = torch.Generator().manual_seed(ALPHAS.index(alpha) * 10 + ORDINARY.index(kind))
    scores = _rows(kind, generator)
    scores[::3, -5:] = float("-inf")
    alphas = torch.full((scores.shape[0], 1), alpha, dtype=torch.float64)
    alphas[1::2] += 0.5 * (torch.rand(alphas[1::2].shape, generator=generator, dtype=torch.float64) - 1) * 0.2
    ours = [scores.clone().requires_grad_(), alphas.clone().requires_grad_()]
    theirs = [scores.clone().requires_grad_(), alphas.clone().requires_grad_()]
    p, expected = alpha_entmax(*ours), _bisect(*theirs)
    torch.testing.assert_close(p, expected, atol=1e-12, rtol=0)
    dp = torch.randn(p.shape, generator=generator, dtype=torch.float64)
    p.backward(dp)
    expected.backward(dp)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=0)
    # a float alpha: the same probabilities
    torch.testing.assert_close(alpha_entmax(scores, alpha), _bisect(scores, alpha), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [1.3, 1.5, 1.9])
def test_alpha_entmax_gradcheck_in_scores_and_alpha(alpha):
    generator = torch.Generator().manual_seed(29)
    scores = torch.randn(3, 7, generator=generator, dtype=torch.float64).requires_grad_()
    alphas = torch.full((3, 1), alpha, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(alpha_entmax, (scores, alphas))


@pytest.mark.parametrize("alpha", [1.25, 2.0])
def test_alpha_entmax_huge_scores_and_closed_forms(alpha):
    generator = torch.Generator().manual_seed(31)
    levels = torch.randint(-2, 3, (30, 17), generator=generator).double()
    at_max = levels == levels.amax(-1, keepdim=True)
    torch.testing.assert_close(alpha_entmax(levels * 1e30, alpha), at_max / at_max.sum(-1, keepdim=True).double())
    # sparsemax (alpha = 2) and entmax-1.5 inside a tensor of several alpha take their closed forms
    scores = torch.randn(3, 11, generator=generator, dtype=torch.float64)
    mixed = alpha_entmax(scores, torch.tensor([[1.5], [2.0], [alpha]], dtype=torch.float64))
    torch.testing.assert_close(mixed[0], entmax15(scores[0]), atol=0, rtol=0)
    sparsemax = entmax.sparsemax(scores[1], dim=-1)
    torch.testing.assert_close(mixed[1], sparsemax, atol=1e-15, rtol=0)


def _expected_attention(q, k, v, alpha, causal, scale):
    """The attention of one (b, h) at a time with ``entmax_bisect``: query head h reads key head h // (H / Hkv), key
    j visible iff j <= i + Tk - Tq; rows that see no key are zero."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            scores = q[b, h] @ k[b, h // (H // Hkv)].T * scale
            if causal:
                hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
                scores = scores.masked_fill(hidden, float("-inf"))
            sees = torch.isfinite(scores).any(-1, keepdim=True)
            a = alpha[h] if isinstance(alpha, torch.Tensor) else alpha
            p = _bisect(torch.where(sees, scores, 0.0), a) * sees
            heads.append(p @ v[b, h // (H // Hkv)])
        rows.append(torch.stack(heads))
    return torch.stack(rows)


@pytest.mark.parametrize("H, Hkv, Tq, Tk", [
    pytest.param(4, 2, 5, 5, id="gqa"),
    pytest.param(3, 1, 3, 7, id="mqa-short-queries"),
    pytest.param(2, 2, 7, 4, id="queries-that-see-no-key"),
])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_reference_any_alpha_per_head_gqa_and_bottom_right_causal(H, Hkv, Tq, Tk, causal):
    generator = torch.Generator().manual_seed(37 + H + Tq)
    q = torch.randn(2, H, Tq, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, Tk, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, Tk, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    alpha = (1 + torch.rand(H, generator=generator, dtype=torch.float64)).requires_grad_()
    inputs = (q, k, v, alpha)
    out = entmax_attention_reference(q, k, v, alpha=alpha, causal=causal, scale=0.8)
    expected = _expected_attention(q, k, v, alpha, causal, 0.8)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    do = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, do)
    for got, want in zip(grads, torch.autograd.grad(expected, inputs, do), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    if causal and Tq > Tk:
        blind = Tq - Tk  # the first Tq - Tk queries see no key: zero output, zero gradient
        assert torch.all(out[:, :, :blind] == 0)
        assert torch.all(grads[0][:, :, :blind] == 0)
    # a float alpha, and the public op (float32) on the reference backend
    torch.testing.assert_close(entmax_attention_reference(q, k, v, alpha=1.25, causal=causal, scale=0.8),
                               _expected_attention(q, k, v, 1.25, causal, 0.8), atol=1e-12, rtol=0)
    with use_backend("reference"):
        got = entmax_attention(q.float(), k.float(), v.float(), alpha=alpha.float(), causal=causal, scale=0.8)
    torch.testing.assert_close(got, out.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_reference_with_separate_key_offsets_is_the_reference_per_sequence(causal):
    generator = torch.Generator().manual_seed(41)
    lengths_q, lengths_k = [2, 5, 3], [4, 5, 1]
    cu_q, cu_k = (torch.tensor([0, *n], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.0], dtype=torch.float64, requires_grad=True)
    inputs = (q, k, v, alpha)
    out = entmax_attention_varlen_reference(q, k, v, cu_q, cu_k, alpha=alpha, causal=causal)
    do = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, do)
    expected_grads = [torch.zeros_like(x) for x in inputs]
    for s in range(len(lengths_q)):
        rows_q, rows_k = slice(*cu_q[s:s + 2].tolist()), slice(*cu_k[s:s + 2].tolist())
        alone = [x[rows].detach().transpose(0, 1)[None].requires_grad_() for x, rows in ((q, rows_q), (k, rows_k),
                                                                                           (v, rows_k))]
        alone_alpha = alpha.detach().clone().requires_grad_()
        expected = entmax_attention_reference(*alone, alpha=alone_alpha, causal=causal)[0].transpose(0, 1)
        torch.testing.assert_close(out[rows_q], expected, atol=1e-12, rtol=0)
        got = torch.autograd.grad(expected, (*alone, alone_alpha), do[rows_q])
        for grad, rows, x in zip(got[:3], (rows_q, rows_k, rows_k), expected_grads[:3], strict=True):
            x[rows] += grad[0].transpose(0, 1)
        expected_grads[3] += got[3]
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_keeps_alpha_in_its_own_precision(backend):
    """Under autocast q, k, v run in bf16 and alpha stays fp32: the same output as bf16 inputs with that alpha."""
    generator = torch.Generator().manual_seed(43)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=generator) for _ in range(3))
    alpha = torch.tensor([1.3, 1.7], requires_grad=True)
    with use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = entmax_attention(q, k, v, alpha=alpha)
        expected = entmax_attention(*(x.bfloat16() for x in (q, k, v)), alpha=alpha.detach())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.float().sum().backward()
    assert alpha.grad is not None and alpha.grad.dtype == torch.float32 and torch.isfinite(alpha.grad).all()


def _qkv(H=2, Hkv=2, Tq=5, Tk=5):
    return torch.randn(1, H, Tq, 4), torch.randn(1, Hkv, Tk, 4), torch.randn(1, Hkv, Tk, 4)


@pytest.mark.parametrize("kwargs, shapes, error, match", [
    pytest.param({"alpha": 1.0}, {}, ValueError, r"alpha must lie in \(1, 2\]", id="alpha-1"),
    pytest.param({"alpha": 2.5}, {}, ValueError, r"alpha must lie in \(1, 2\]", id="alpha-2.5"),
    pytest.param({"alpha": float("nan")}, {}, ValueError, "alpha must lie", id="alpha-nan"),
    pytest.param({"alpha": float("inf")}, {}, ValueError, "alpha must lie", id="alpha-inf"),
    pytest.param({"alpha": True}, {}, TypeError, "alpha must be a float", id="alpha-bool"),
    pytest.param({"alpha": torch.tensor([1.5, 3.0])}, {}, ValueError, "alpha must lie", id="alpha-tensor-value"),
    pytest.param({"alpha": torch.tensor([1.5, float("nan")])}, {}, ValueError, "alpha must lie",
                 id="alpha-tensor-nan"),
    pytest.param({"alpha": torch.tensor([1.5])}, {}, ValueError, r"alpha must be .* shape \(H,\)", id="alpha-shape"),
    pytest.param({"alpha": torch.tensor([1, 2])}, {}, TypeError, "floating-point tensor", id="alpha-int-tensor"),
    pytest.param({}, {"H": 3, "Hkv": 2}, ValueError, "Hkv = 2 must divide", id="heads"),
    pytest.param({}, {"H": 2, "Hkv": 4}, ValueError, "Hkv = 4 must divide", id="more-kv-heads"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_alpha_and_heads_raise_naming_the_argument(kwargs, shapes, error, match, backend):
    q, k, v = _qkv(**shapes)
    with use_backend(backend), pytest.raises(error, match=match):
        entmax_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda cu: (cu, torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_seqlens_k must end",
                 id="k-end"),
    pytest.param(lambda cu: (cu, torch.tensor([0, 6], dtype=torch.int32)), "as many offsets", id="k-count"),
    pytest.param(lambda cu: (torch.tensor([1, 3, 5], dtype=torch.int32), cu), "cu_seqlens_q must start",
                 id="q-start"),
    pytest.param(lambda cu: (cu, None), "cu_seqlens_k is needed", id="k-missing"),
])
def test_varlen_rejects_bad_key_offsets(make, match):
    q, k = torch.randn(5, 2, 4), torch.randn(6, 2, 4)
    cu_q, cu_k = make(torch.tensor([0, 3, 5], dtype=torch.int32))
    with use_backend("reference"), pytest.raises(ValueError, match=match):
        entmax_attention_varlen(q, k, k, cu_q, cu_k)


def test_module_learns_alpha_per_head_with_grouped_heads():
    """The reference module with one learned alpha per head and 2 key heads for 4 query heads equals the attention
    of its projections computed head by head with ``entmax_bisect``; the gradient reaches alpha_logit."""
    torch.manual_seed(47)
    module = EntmaxCausalAttention(8, 4, alpha=1.3, learn_alpha=True, num_kv_heads=2, out_proj=False)
    with torch.no_grad():
        module.alpha_logit.copy_(torch.randn(4))
    x = torch.randn(2, 6, 8)
    out, _ = module(x)
    b, t, e = x.shape
    with torch.no_grad():
        q, k, v = module.qkv_proj(x).double().split([8, 4, 4], dim=-1)  # [W_q; W_k; W_v]: 4 heads, 2 key heads
        q = q.view(b, t, 4, 2).transpose(1, 2)
        k, v = (y.view(b, t, 2, 2).transpose(1, 2) for y in (k, v))
        alpha = 1.01 + 0.99 * torch.sigmoid(module.alpha_logit.double())
        expected = _expected_attention(q, k, v, alpha, True, 2 ** -0.5).transpose(1, 2).reshape(b, t, e)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert module.alpha_logit.grad is not None and bool(module.alpha_logit.grad.abs().gt(0).all())
    assert "alpha_logit" in module.state_dict() and "num_kv_heads=2" in repr(module) and "alpha=" in repr(module)
    torch.testing.assert_close(module.alpha.double(), alpha)


def test_module_draws_the_initial_weights_of_three_projections():
    """``qkv_proj`` starts from the weights that separate q_proj, k_proj and v_proj (earlier versions) drew from the
    same seed, so seeded runs start where they did."""
    torch.manual_seed(3)
    module = EntmaxCausalAttention(8, 4, num_kv_heads=2)
    torch.manual_seed(3)
    parts = [torch.nn.Linear(8, n) for n in (8, 4, 4)]
    torch.testing.assert_close(module.qkv_proj.weight, torch.cat([p.weight for p in parts]), atol=0, rtol=0)
    torch.testing.assert_close(module.qkv_proj.bias, torch.cat([p.bias for p in parts]), atol=0, rtol=0)
    assert EntmaxCausalAttention(8, 2, bias=False).qkv_proj.bias is None


def test_module_checkpoint_without_alpha_loads_and_alpha_is_kept_in_range():
    torch.manual_seed(53)
    old = EntmaxCausalAttention(6, 2)
    learned = EntmaxCausalAttention(6, 2, alpha=1.75, learn_alpha=True)
    assert "alpha_logit" not in old.state_dict()
    learned.load_state_dict(old.state_dict())  # no alpha_logit: the initial alpha stays
    torch.testing.assert_close(learned.alpha, torch.full((2,), 1.75))
    for name in ("qkv_proj.weight", "qkv_proj.bias"):
        torch.testing.assert_close(learned.state_dict()[name], old.state_dict()[name])
    with torch.no_grad():
        learned.alpha_logit.copy_(torch.tensor([-30.0, 30.0]))
    assert bool(((learned.alpha > 1) & (learned.alpha <= 2)).all())
    fixed = EntmaxCausalAttention(6, 2, alpha=2.0)
    assert fixed.alpha == 2.0 and "alpha=2.0" in repr(fixed)


@pytest.mark.parametrize("kwargs, error, match", [
    pytest.param({"alpha": 0.5}, ValueError, "alpha must lie", id="alpha"),
    pytest.param({"alpha": 2.0, "learn_alpha": True}, ValueError, r"alpha must lie in \(1.01, 2\)",
                 id="learn-alpha-2"),
    pytest.param({"learn_alpha": 1}, TypeError, "learn_alpha must be a bool", id="learn_alpha"),
    pytest.param({"num_kv_heads": 3}, ValueError, "num_kv_heads", id="kv-heads"),
    pytest.param({"alpha": torch.tensor([1.5, 1.5])}, TypeError, "alpha must be a float", id="alpha-tensor"),
])
def test_module_rejects_bad_alpha_and_kv_heads(kwargs, error, match):
    with pytest.raises(error, match=match):
        EntmaxCausalAttention(8, 4, **kwargs)
