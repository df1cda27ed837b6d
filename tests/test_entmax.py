"""The fused entmax-1.5 attention op and its modules against the float64 reference (docs/design.md sections 1-2).

Kernel tests run on the ``triton_backend`` fixture (Triton's interpreter on a CPU) with tiny tiles, so that a few
dozen positions cover several, partial and skipped tiles, and both tau solvers (rows in registers and multi-pass).
"""
import collections

import pytest
import torch
import triton

import kernels
from kernels import FusedEntmaxCausalAttention, entmax15_attention, reference
from kernels import entmax
from kernels.tools.counts import InterpreterCounter
from kernels.entmax import (
    EntmaxAttentionOutput,
    Tiles,
    entmax15_attention_varlen,
    entmax15_attention_varlen_reference,
    entmax15_attention_weights,
    tau_solver_passes,
    tau_support_tiles,
)

# the interpreter computes -inf - -inf on padded rows; the kernels mask those results
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

#: rows of up to 8 keys are solved in registers, longer ones in passes over 8-key tiles; 4 candidate thresholds per
#: pass (the interpreter runs them one by one) make the solver take several passes, as 16 do on longer rows
TINY = Tiles(block_m=8, block_n=8, block_d=8, block_dv=8, row_block_m=4, row_block_n=8, candidates=4, wide_block_dv=16)
#: BM != BN: the causal start of the dk/dv loop is rounded down to a query tile; 2 candidates: the bracket's ends
SKEWED = Tiles(block_m=8, block_n=4, block_d=4, block_dv=4, row_block_m=8, row_block_n=8, candidates=2)
#: Dv above 16: the output kernel's own 4-row query tiles inside the 8-row mask tiles, Dv in chunks of up to 32
WIDE_ROWS = TINY._replace(wide_dv_block_m=4, wide_dv_block_dv=32)
#: Dv above 4: 2-row query tiles in 8 x 4 mask tiles, Dv in chunks of up to 8
SKEWED_WIDE_ROWS = SKEWED._replace(wide_block_dv=4, wide_dv_block_m=2, wide_dv_block_dv=8)
#: the threshold passes stream K in 2-key tiles inside the mask's 8-key tiles (each mask tile the OR of four)
SUB_KEY_TILES = TINY._replace(tau_block_n=2)
#: the threshold passes' programs take 16 query rows, two of the mask's 8-row tiles (one mark per 8 rows)
TALL_PASSES = TINY._replace(tau_block_m=16)

#: (forward atol, gradient atol) against float64 on the same inputs; rtol is the same as atol
TOLERANCES = {torch.float32: (2e-5, 5e-5), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 8e-2)}


@pytest.fixture
def tiles(monkeypatch):
    def use(value):
        monkeypatch.setattr(entmax, "_TILE_OVERRIDE", value)

    return use


def _inputs(b, h, t, d, dv, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, n, generator=generator).to(dtype).requires_grad_() for n in (d, d, dv)]


def _float64_reference(q, k, v, do, causal=True, scale=None):
    """Output and (dq, dk, dv) of the reference in float64 on the same (rounded) inputs."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = reference.entmax15_attention_reference(*leaves, causal=causal, scale=scale)
    out.backward(do.double())
    return out, [x.grad for x in leaves]


def _assert_close(actual, expected, atol, what):
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


def _check_against_reference(q, k, v, causal=True, scale=None):
    out = entmax15_attention(q, k, v, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == v.shape
    do = torch.randn_like(out)
    out.backward(do)
    expected, grads = _float64_reference(q, k, v, do, causal=causal, scale=scale)
    atol, grad_atol = TOLERANCES[q.dtype]
    _assert_close(out, expected, atol, "output")
    for name, x, g in zip("qkv", (q, k, v), grads):
        _assert_close(x.grad, g, grad_atol, f"d{name}")


@pytest.mark.parametrize(
    "b, h, t, d, dv, causal, scale, tile_set",
    [
        pytest.param(1, 1, 1, 3, 1, True, None, TINY, id="T1-D3-Dv1"),
        pytest.param(2, 2, 7, 5, 3, True, None, TINY, id="T7-odd-in-registers-B2H2"),
        pytest.param(1, 1, 8, 4, 4, False, None, TINY, id="T8-last-length-in-registers"),
        pytest.param(1, 1, 9, 4, 4, False, None, TINY, id="T9-first-length-in-passes"),
        pytest.param(1, 1, 19, 11, 9, True, None, TINY, id="T19-passes-partial-tiles-causal"),
        pytest.param(1, 1, 19, 6, 20, True, None, TINY, id="T19-Dv20-two-wide-forward-chunks"),
        pytest.param(2, 1, 19, 6, 20, True, None, WIDE_ROWS, id="T19-Dv20-4-row-forward-tiles-one-chunk"),
        pytest.param(1, 2, 21, 7, 40, False, None, WIDE_ROWS, id="T21-Dv40-4-row-forward-tiles-two-chunks-full"),
        pytest.param(1, 1, 7, 7, 20, True, None, WIDE_ROWS, id="T7-Dv20-4-row-forward-tiles-in-registers"),
        pytest.param(1, 1, 13, 6, 11, True, 0.7, SKEWED_WIDE_ROWS, id="T13-Dv11-2-row-forward-tiles-BN4"),
        pytest.param(1, 1, 19, 11, 9, False, None, TINY, id="T19-passes-not-causal"),
        pytest.param(1, 1, 13, 6, 5, True, 0.7, SKEWED, id="T13-BM8-BN4-scale0.7"),
        pytest.param(2, 2, 19, 5, 3, False, None, SKEWED, id="T19-B2H2-BM8-BN4-not-causal"),
        pytest.param(1, 2, 21, 20, 12, True, None, None, id="T21-default-tiles"),
    ],
)
def test_matches_float64_reference(triton_backend, tiles, b, h, t, d, dv, causal, scale, tile_set):
    tiles(tile_set)
    _check_against_reference(*_inputs(b, h, t, d, dv), causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("causal", [pytest.param(True, id="causal"), pytest.param(False, id="full")])
def test_half_precision_inputs(triton_backend, tiles, dtype, causal):
    tiles(TINY)
    _check_against_reference(*_inputs(1, 1, 17, 9, 10, dtype=dtype, seed=1), causal=causal)


@pytest.mark.parametrize("d, dv", [pytest.param(1024, 1024, id="D1024-Dv1024"), pytest.param(1, 1, id="D1-Dv1")])
def test_feature_sizes_from_1_to_1024(triton_backend, d, dv):
    q, k, v = _inputs(1, 1, 3, d, dv, seed=2)
    # unit-norm rows keep the scores O(1) at any D, so the rows are neither one-hot nor uniform
    _check_against_reference(q, k, v, scale=1.0 if d == 1 else 3.0 / d)


@pytest.mark.parametrize("scale", [pytest.param(0.05, id="dense"), pytest.param(6.0, id="sparse")])
def test_probabilities_sum_to_one_and_are_zero_where_the_reference_is(triton_backend, tiles, scale):
    """With v = identity the op returns the attention matrix itself."""
    tiles(TINY)
    t = 24
    # unit rows with q = k: at a large scale each row attends to itself and its few near-duplicates
    q = torch.nn.functional.normalize(torch.randn(1, 1, t, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    k = q.clone()
    identity = torch.eye(t).expand(1, 1, t, t)
    weights = entmax15_attention(q, k, identity, scale=scale)
    expected = entmax15_attention_weights(q.double(), k.double(), scale=scale)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, t), atol=1e-5, rtol=0)
    assert torch.equal(weights == 0, expected == 0), "zeros differ from the reference's"
    _assert_close(weights, expected, 2e-5, "weights")
    if scale > 1:  # the sparse case must exercise tile skipping: some visible 8 x 8 tile is all zero
        tiles_nonzero = (expected[0, 0] != 0).reshape(3, 8, 3, 8).any(3).any(1)
        visible = torch.ones(3, 3, dtype=torch.bool).tril()
        assert (visible & ~tiles_nonzero).any()
        # and the gradients agree where whole tiles are skipped, forward and backward
        v = torch.randn(1, 1, t, 5)
        _check_against_reference(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scale=scale)


def test_non_contiguous_inputs(triton_backend, tiles):
    tiles(TINY)
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 11, 3, 5, generator=generator).transpose(1, 2).requires_grad_()  # (B, T, H, D) viewed
    k = torch.randn(2, 3, 5, 11, generator=generator).transpose(2, 3).requires_grad_()  # (B, H, D, T) viewed
    v = torch.randn(2, 3, 11, 14, generator=generator)[..., ::2].requires_grad_()  # strided features
    assert not any(x.is_contiguous() for x in (q, k, v))
    out = entmax15_attention(q, k, v)
    do = torch.randn(2, 11, 3, 7, generator=generator).transpose(1, 2)  # a non-contiguous output gradient
    out.backward(do)
    expected, grads = _float64_reference(q, k, v, do)
    _assert_close(out, expected, 2e-5, "output")
    for name, x, g in zip("qkv", (q, k, v), grads):
        _assert_close(x.grad, g, 5e-5, f"d{name}")


@pytest.mark.parametrize("t", [pytest.param(6, id="in-registers"), pytest.param(13, id="passes")])
def test_nan_row_gives_nan_row_and_terminates(triton_backend, tiles, t):
    tiles(TINY)
    q, k, v = _inputs(1, 1, t, 4, 3, seed=5)
    q = q.detach().clone()
    q[0, 0, 3] = float("nan")
    out = entmax15_attention(q.requires_grad_(), k, v)
    assert out[0, 0, 3].isnan().all()
    # the entmax package itself fails on a NaN row; causally, row 3 of q reaches only output row 3
    clean = torch.where(q.isnan(), 0.0, q).detach().double()
    expected = reference.entmax15_attention_reference(clean, k.detach().double(), v.detach().double())
    rows = torch.arange(t) != 3
    _assert_close(out[0, 0, rows], expected[0, 0, rows], 2e-5, "rows without NaN")
    out.sum().backward()  # the backward must finish too, and leave the other rows' gradients right
    clean.requires_grad_(True)
    reference.entmax15_attention_reference(clean, k.detach().double(), v.detach().double()).sum().backward()
    _assert_close(q.grad[0, 0, rows], clean.grad[0, 0, rows], 2e-5, "q gradient of rows without NaN")


def test_saved_state_is_linear_in_sequence_length(triton_backend):
    b, h, t, d, dv = 1, 2, 40, 4, 3
    q, k, v = _inputs(b, h, t, d, dv, seed=6)
    out = entmax15_attention(q, k, v)
    saved = out.grad_fn.saved_tensors
    assert saved, "the autograd Function saved nothing"
    for tensor in saved:
        assert tensor.numel() <= b * h * t * max(d, dv) < b * h * t * t, tuple(tensor.shape)


def _good():
    return [torch.randn(1, 2, 5, 4) for _ in range(3)]


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(lambda q, k, v: (q[0], k, v, {}), ValueError, "q must have 4 dimensions", id="rank"),
        pytest.param(lambda q, k, v: (q, k[..., :3], v, {}), ValueError, "k must match q in batch and D", id="k-D"),
        pytest.param(lambda q, k, v: (q, k, v[:, :, :4], {}), ValueError, "v must match k", id="v-T"),
        pytest.param(lambda q, k, v: (q, k, v[:, :1], {}), ValueError, "v must match k", id="v-H"),
        pytest.param(lambda q, k, v: (q.double(), k.double(), v.double(), {}), TypeError, "q must have dtype",
                     id="float64"),
        pytest.param(lambda q, k, v: (q, k, v.half(), {}), TypeError, "v has dtype", id="mixed-dtypes"),
        pytest.param(lambda q, k, v: (q, k.to("meta"), v, {}), ValueError, "k is on meta", id="devices"),
        pytest.param(lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0], {}), ValueError, "q is empty",
                     id="empty"),
        pytest.param(lambda q, k, v: ([1.0], k, v, {}), TypeError, "q must be a torch.Tensor", id="not-tensor"),
        pytest.param(lambda q, k, v: (q, k, v, {"scale": "big"}), TypeError, "scale must be", id="scale-type"),
        pytest.param(lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale must be finite",
                     id="scale-nan"),
        pytest.param(lambda q, k, v: (q, k, v, {"causal": 1}), TypeError, "causal must be a bool", id="causal"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(triton_backend, make, error, match):
    q, k, v, kwargs = make(*_good())
    with pytest.raises(error, match=match):
        entmax15_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "num_heads, out_proj", [pytest.param(1, False, id="H1-CARN"), pytest.param(2, True, id="H2-out_proj")]
)
def test_module_twins_share_state_and_outputs(triton_backend, tiles, num_heads, out_proj):
    tiles(TINY)
    torch.manual_seed(7)
    embed_dim, t = 6, 11
    fused = FusedEntmaxCausalAttention(embed_dim, num_heads, out_proj=out_proj)
    twin = reference.EntmaxCausalAttention(embed_dim, num_heads, out_proj=out_proj)
    assert fused.state_dict().keys() == twin.state_dict().keys()
    x = torch.randn(2, t, embed_dim)
    for source, target in ((fused, twin), (twin, fused)):
        for parameter in source.parameters():  # fresh weights each way, so that each load is tested
            torch.nn.init.normal_(parameter.data)
        target.load_state_dict(source.state_dict())
        got = fused.forward_with_context(x, need_weights=True)
        want = twin.forward_with_context(x, need_weights=True)
        assert isinstance(got, EntmaxAttentionOutput)
        for name in EntmaxAttentionOutput._fields:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5, msg=name)
    output, weights = fused(x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(output, got.output, atol=0, rtol=0)
    torch.testing.assert_close(weights, got.weights, atol=0, rtol=0)
    assert fused(x)[1] is None
    # the context is A @ x averaged over heads, A from the reference formula on the module's projections
    split = lambda y: y.view(2, t, num_heads, embed_dim // num_heads).transpose(1, 2)  # noqa: E731
    weights = entmax15_attention_weights(*(split(y) for y in twin.qkv_proj(x).chunk(3, dim=-1)[:2]))
    torch.testing.assert_close(got.context, (weights @ x.unsqueeze(1)).mean(1), atol=1e-5, rtol=1e-5)
    assert got.weights.shape == (2, num_heads, t, t)


def _separate_projections_formulation(module, projections, x):
    """(output, context) of ``module.forward_with_context(x)`` as it was written with three projections ``(q_proj,
    k_proj, v_proj)``: one GEMM each, x appended to the values by a concatenation, the context's mean over heads."""
    b, t, e = x.shape
    h, h_kv, dh = module.num_heads, module.num_kv_heads, e // module.num_heads
    q_proj, k_proj, v_proj = projections
    q = q_proj(x).view(b, t, h, dh).transpose(1, 2)
    k, v = (proj(x).view(b, t, h_kv, dh).transpose(1, 2) for proj in (k_proj, v_proj))
    v = torch.cat([v, x.unsqueeze(1).expand(b, h_kv, t, e)], dim=-1)
    attended = module._attention(q, k, v, alpha=module.alpha, causal=module.causal)
    output = attended[..., :dh].transpose(1, 2).reshape(b, t, e)
    if module.out_proj is not None:
        output = module.out_proj(output)
    return output, attended[..., dh:].mean(dim=1)


@pytest.mark.parametrize("fused, num_heads, num_kv_heads, out_proj", [
    pytest.param(False, 1, 1, False, id="reference-H1-CARN"),
    pytest.param(False, 4, 2, True, id="reference-H4-2-key-heads-out_proj"),
    pytest.param(True, 1, 1, False, id="fused-H1-CARN"),
])
def test_fused_projection_computes_the_separate_projections(triton_backend, tiles, fused, num_heads, num_kv_heads,
                                                            out_proj):
    """A state_dict of separate q_proj, k_proj, v_proj (earlier versions) loads strictly into ``qkv_proj``, and the
    module then computes what the three projections did: the outputs bit for bit (inputs and weights in eighths, so
    that every projection is exact whatever the GEMM's order of sums), the gradients to fp32 rounding (their GEMMs
    sum in another order)."""
    tiles(TINY)
    torch.manual_seed(5)
    embed_dim, kv_dim = 8, 8 // num_heads * num_kv_heads
    module = (FusedEntmaxCausalAttention if fused else reference.EntmaxCausalAttention)(
        embed_dim, num_heads, out_proj=out_proj, num_kv_heads=num_kv_heads)
    projections = [torch.nn.Linear(embed_dim, n) for n in (embed_dim, kv_dim, kv_dim)]
    with torch.no_grad():
        for parameter in [p for proj in projections for p in proj.parameters()]:
            parameter.copy_(torch.randint(-8, 9, parameter.shape) / 8)
    old_state = {f"{name}.{key}": value for name, proj in zip(("q_proj", "k_proj", "v_proj"), projections)
                 for key, value in proj.state_dict().items()}
    if out_proj:
        old_state.update({f"out_proj.{key}": value for key, value in module.out_proj.state_dict().items()})
    module.load_state_dict(old_state)
    assert list(module.state_dict()) == ["qkv_proj.weight", "qkv_proj.bias"] + (
        ["out_proj.weight", "out_proj.bias"] if out_proj else [])
    torch.testing.assert_close(module.qkv_proj.weight, torch.cat([p.weight for p in projections]), atol=0, rtol=0)
    x = (torch.randint(-8, 9, (1, 7, embed_dim)) / 8).requires_grad_()
    got = module.forward_with_context(x)
    want = _separate_projections_formulation(module, projections, x)
    cotangents = [torch.randn_like(y) for y in want]
    grads = torch.autograd.grad(got[:2], [x, module.qkv_proj.weight, module.qkv_proj.bias], cotangents)
    want_grads = torch.autograd.grad(want, [x, *[p for proj in projections for p in proj.parameters()]], cotangents)
    want_grads = [want_grads[0], torch.cat(want_grads[1::2]), torch.cat(want_grads[2::2])]
    for name, a, b in zip(("output", "context"), got[:2], want):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    for name, a, b in zip(("dx", "dW", "db"), grads, want_grads):
        torch.testing.assert_close(a, b, msg=name)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="embed_dim"):
        FusedEntmaxCausalAttention(6, num_heads=4)
    module = FusedEntmaxCausalAttention(6, num_heads=2)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        module(torch.randn(11, 6))
    with pytest.raises(ValueError, match="x must have embed_dim = 6"):
        module(torch.randn(2, 11, 5))


def _float64_tau(q, k, causal=True, scale=None):
    """Exact tau (B, H, T) of the halved scores in float64, by sorting each row."""
    t, d = q.shape[-2:]
    scale = d ** -0.5 if scale is None else scale
    z = (q.double() @ k.double().transpose(-1, -2)) * (0.5 * scale)
    if causal:
        z = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    z, _ = z.sort(-1, descending=True)
    size = torch.arange(1, t + 1, dtype=torch.float64)
    s1, s2 = z.cumsum(-1), (z * z).cumsum(-1)
    roots = (s1 - (s1 * s1 - size * (s2 - 1)).clamp(min=0).sqrt()) / size  # tau if the support were the top `size`
    support = (roots < z).sum(-1, keepdim=True)  # the valid sizes are a prefix
    return roots.gather(-1, support - 1)[..., 0]


@pytest.mark.parametrize("t", [pytest.param(8, id="in-registers"), pytest.param(21, id="passes")])
@pytest.mark.parametrize(
    "q_scale", [pytest.param(0.01, id="flat-std0.01"), pytest.param(1.0, id="random"), pytest.param(30.0, id="peaked")]
)
def test_tau_is_exact_on_flat_random_and_peaked_rows(triton_backend, tiles, t, q_scale):
    tiles(TINY)
    q, k, _ = (x.detach() for x in _inputs(1, 2, t, 8, 1, seed=8))
    q = q * q_scale
    whole = entmax._whole_sequences(t, q.device)
    rowmax, tau, _ = entmax._entmax_tau(q, k, True, 8 ** -0.5, whole)
    expected = _float64_tau(q, k)
    torch.testing.assert_close((rowmax + tau).double(), expected, atol=1e-6, rtol=1e-6)
    # the flat case is what the tolerance is for: rows of near-equal scores, tau near max - n^-1/2
    out = entmax15_attention(q, k, torch.eye(t).expand(1, 2, t, t))
    _assert_close(out, entmax15_attention_weights(q.double(), k.double()), 2e-5, "weights")


def test_threshold_passes_take_d_in_their_own_chunks(triton_backend, tiles, monkeypatch):
    """``Tiles.tau_block_d`` chunks D in the long-row passes only (D = 10: chunks of 4, the last one partial)."""
    tiles(TINY._replace(tau_block_d=4))
    chunks, launch = [], entmax.launch

    def recording(kernel, grid, args, kwargs, candidates, **options):
        chunks.append((kwargs["ROW_IN_REGISTERS"], candidates[0].kwargs["BD"]))
        launch(kernel, grid, args, kwargs, candidates, **options)

    q, k, _ = (x.detach() for x in _inputs(1, 2, 21, 10, 1, seed=8))
    with monkeypatch.context() as patch:
        patch.setattr(entmax, "launch", recording)
        for t in (21, 8):  # passes, then rows in registers (block_d chunks)
            whole = entmax._whole_sequences(t, q.device)
            rowmax, tau, _ = entmax._entmax_tau(q[:, :, :t], k[:, :, :t], True, 10 ** -0.5, whole)
            torch.testing.assert_close((rowmax + tau).double(), _float64_tau(q[:, :, :t], k[:, :, :t]), atol=1e-6,
                                       rtol=1e-6)
    assert chunks == [(False, 4), (True, 8)]


@pytest.mark.parametrize("t", [pytest.param(6, id="in-registers"), pytest.param(21, id="passes")])
def test_scores_of_any_magnitude(triton_backend, tiles, t):
    tiles(TINY)
    # fp16 q = k = v = 60000: every score ties, so each row is uniform over its visible keys and returns v
    big = torch.full((1, 1, t, 4), 60000.0, dtype=torch.float16)
    out = entmax15_attention(big, big, big)
    torch.testing.assert_close(out, big, atol=0, rtol=1e-3)  # fp16 steps are 32 near 60000
    # scores near 1e9 (scale 1e9 on O(1) dot products): rows are one-hot on their largest score, as in float64
    # (forward only: a gradient of 1e9 * (rounding of dP - c) is not meaningful in float32)
    q, k, v = (x.detach() for x in _inputs(1, 2, t, 4, 3, seed=9))
    expected = reference.entmax15_attention_reference(q.double(), k.double(), v.double(), scale=1e9)
    _assert_close(entmax15_attention(q, k, v, scale=1e9), expected, 2e-5, "scale 1e9")
    # and with each key three times, the support of a row at that scale is its tied maxima, with equal weights
    k3 = k[:, :, torch.arange(t) // 3 * 3]
    expected = reference.entmax15_attention_reference(q.double(), k3.double(), v.double(), scale=1e9)
    _assert_close(entmax15_attention(q, k3, v, scale=1e9), expected, 2e-5, "scale 1e9, tied keys")


@pytest.mark.parametrize("t", [pytest.param(7, id="in-registers"), pytest.param(21, id="passes")])
def test_infinite_scores(triton_backend, tiles, t):
    """+inf in a visible score gives a NaN row; -inf is a key of probability zero."""
    tiles(TINY)
    q, k, v = (x.detach() for x in _inputs(1, 1, t, 4, 3, seed=11))
    q[..., 0] = q[..., 0].abs() + 0.5  # positive first feature: k[j, 0] = +-inf makes q_i . k_j = +-inf
    k[0, 0, 2, 0] = float("-inf")
    k[0, 0, t - 3, 0] = float("inf")
    out = entmax15_attention(q, k, v)
    assert out[0, 0, t - 3:].isnan().all(), "rows that see the +inf score must be NaN"
    clean = k.clone()
    clean[0, 0, t - 3, 0] = 0.0  # the entmax package fails on +inf; the rows compared never see that key
    expected = reference.entmax15_attention_reference(q.double(), clean.double(), v.double())
    _assert_close(out[0, 0, :t - 3], expected[0, 0, :t - 3], 2e-5, "rows before the +inf key")
    weights = entmax15_attention(q, k, torch.eye(t).expand(1, 1, t, t))
    assert (weights[0, 0, 2:t - 3, 2] == 0).all() and (weights[0, 0, :t - 3].sum(-1) - 1).abs().max() < 1e-5


def _interpreter_loads_per_program(monkeypatch, tensor):
    """Elements of ``tensor``'s storage that interpreted kernels load, per program (grid index)."""
    from triton.runtime.interpreter import InterpreterBuilder

    counts = collections.Counter()
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    load = InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, other, *args):
        hits = (ptrs.data >= start) & (ptrs.data < end) & mask.data
        counts[self.grid_idx] += int(hits.sum())
        return load(self, ptrs, mask, other, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    return counts


@pytest.mark.parametrize(
    "q_scale, least_most_passes, tile_set",
    [pytest.param(1.0, 3, TINY, id="random"), pytest.param(4.0, 2, TINY, id="q-x4"),
     pytest.param(4.0, 2, TALL_PASSES, id="q-x4-16-row-programs")]
)
def test_tau_solver_passes_match_the_kernels_k_loads(triton_backend, tiles, monkeypatch, q_scale, least_most_passes,
                                                     tile_set):
    tiles(tile_set)
    b, h, t, d = 1, 2, 45, 8
    rows = entmax._tau_pass_tiles(tile_set)["BM"]
    q, k, _ = (x.detach() for x in _inputs(b, h, t, d, 1, seed=12))
    q = q * q_scale
    counts = _interpreter_loads_per_program(monkeypatch, k)
    entmax._entmax_tau(q, k, True, d ** -0.5, entmax._whole_sequences(t, q.device))
    passes = tau_solver_passes(q, k, block_m=rows, block_n=8)
    assert passes.shape == (b, h, -(-t // rows))
    for i_bh in range(b * h):
        for i_m in range(passes.shape[-1]):
            visible_keys = min((i_m + 1) * rows, t)
            assert counts[(i_m, i_bh, 0)] == passes[0, i_bh, i_m] * visible_keys * d, (i_m, i_bh)
    assert passes.max() >= least_most_passes  # random rows: some tile needs a second candidate pass


def _tiles_with_support(p, block_m, block_n):
    """(B*H, cdiv(T, block_m), cdiv(T, block_n)) bool: tile pairs of the float64 reference probabilities p
    (B, H, T, T) with any p > 1e-20: the reference's clamp at max - 1 leaves (2^-52)^2 ~ 5e-32 on the keys at or
    below it in one-hot rows (tau = max - 1 to rounding), where the exact p is 0."""
    b, h, t, _ = p.shape
    padded = torch.nn.functional.pad(p > 1e-20, (0, -t % block_n, 0, -t % block_m))
    return padded.view(b * h, -(-t // block_m), block_m, -(-t // block_n), block_n).any(-1).any(2)


def _visible_tiles(t, block_m, block_n):
    i_m = torch.arange(-(-t // block_m))[:, None]
    i_n = torch.arange(-(-t // block_n))[None, :]
    return i_n * block_n < torch.clamp((i_m + 1) * block_m, max=t)


@pytest.mark.parametrize(
    "q_scale, scale, tile_set",
    [pytest.param(0.01, None, TINY, id="flat-std0.01"), pytest.param(1.0, None, TINY, id="random"),
     pytest.param(30.0, None, TINY, id="peaked"), pytest.param(1.0, 1e9, TINY, id="scale-1e9"),
     pytest.param(1.0, None, SUB_KEY_TILES, id="random-2-key-threshold-tiles"),
     pytest.param(30.0, None, SUB_KEY_TILES, id="peaked-2-key-threshold-tiles"),
     pytest.param(4.0, None, TALL_PASSES, id="q-x4-16-row-threshold-programs")],
)
def test_support_mask_is_sound_tight_and_skips_tiles(triton_backend, tiles, q_scale, scale, tile_set):
    """The threshold pass's per-tile mask covers every p > 0, is 0 above the diagonal, equals its PyTorch mirror
    (also when the passes stream K in key tiles narrower than the mask's), and the output kernel reads K only for
    the tiles it marks; the output stays exact."""
    from kernels.tools.counts import InterpreterCounter

    tiles(tile_set)
    b, h, t, d = 1, 1 if tile_set is SUB_KEY_TILES else 2, 45, 8  # 2-key passes: slow in the interpreter
    q, k, v = (x.detach() for x in _inputs(b, h, t, d, 3, seed=15))
    q = q * q_scale
    scale = d ** -0.5 if scale is None else scale
    _, _, support = entmax._entmax_tau(q, k, True, scale, entmax._whole_sequences(t, q.device))
    assert support.dtype == torch.uint8 and support.shape == (b * h, 6, 6) and support.is_contiguous()
    with_support = _tiles_with_support(entmax15_attention_weights(q.double(), k.double(), scale=scale), 8, 8)
    mask = support.bool()
    assert not (with_support & ~mask).any(), "a tile with p > 0 is not marked"
    assert not (mask & ~_visible_tiles(t, 8, 8)).any(), "a hidden tile is marked"
    assert torch.equal(mask.view(b, h, 6, 6), tau_support_tiles(q, k, scale=scale, block_m=8, block_n=8,
                                                                pass_block_m=entmax._tau_pass_tiles(tile_set)["BM"]))
    assert (mask & ~with_support).sum() <= 0.05 * mask.sum(), "the last pass's bracket should be nearly tight"
    if q_scale == 30.0:  # peaked rows: visible tiles without support are skipped
        assert mask.sum() < _visible_tiles(t, 8, 8).sum() * b * h
    with InterpreterCounter({"k": k}) as counter:
        out = entmax15_attention(q, k, v, scale=scale)
    key_tile_sizes = torch.tensor([min(8, t - 8 * j) for j in range(6)])
    expected_loads = int((mask.long() * key_tile_sizes).sum()) * d
    assert counter.loaded("k", "_entmax_fwd_kernel") == expected_loads
    expected = reference.entmax15_attention_reference(q.double(), k.double(), v.double(), scale=scale)
    _assert_close(out, expected, 2e-5, "output")


@pytest.mark.parametrize("d, dv, chunks", [pytest.param(16, 24, 1, id="Dv24-one-chunk"),
                                            pytest.param(8, 40, 2, id="Dv40-two-chunks")])
def test_wide_dv_output_kernel_computes_qk_once_per_chunk_on_its_own_rows(triton_backend, tiles, d, dv, chunks):
    """With Dv above ``wide_block_dv`` the output kernel runs 4-row query tiles inside the mask's 8-row tiles: each
    visits the key tiles that its mask tile marks and it can see, computing QK^T there once per Dv chunk (and PV
    where its own rows have support)."""
    tiles(WIDE_ROWS)
    t, scale = 30, 6.0
    # unit rows with q = k at a large scale: each row attends to itself alone, except rows 8-11, which attend to
    # keys 0-3: the 8-row mask tile of rows 8-15 marks key tile 0, where rows 12-15 have no support
    k = torch.nn.functional.normalize(torch.randn(1, 1, t, d, generator=torch.Generator().manual_seed(24)), dim=-1)
    q, v = k.clone(), torch.randn(1, 1, t, dv, generator=torch.Generator().manual_seed(25))
    q[:, :, 8:12] = k[:, :, 0:4]
    sequences = entmax._whole_sequences(t, q.device)
    _, _, _, support, *_ = entmax._entmax_attention_fwd(q, k, v, True, scale, False, sequences)
    # the mask (8 x 8 tiles) per 4-row tile, and the key tiles each 4-row tile can see
    visited = support[0].bool().repeat_interleave(2, 0)[:-(-t // 4)] & _visible_tiles(t, 4, 8)
    assert visited.sum() < _visible_tiles(t, 4, 8).sum(), "peaked rows must leave visible tiles unmarked"
    with InterpreterCounter({"k": k, "v": v}) as counter:
        out = entmax15_attention(q, k, v, scale=scale)
    (launch,) = counter.of("_entmax_fwd_kernel")
    assert launch.grid == (-(-t // 4), chunks, 1)
    key_tile_sizes = torch.tensor([min(8, t - 8 * j) for j in range(-(-t // 8))])
    assert counter.loaded("k", "_entmax_fwd_kernel") == chunks * int((visited.long() * key_tile_sizes).sum()) * d
    # QK^T on 4 x 8 tiles over D, once per chunk and visited tile; PV on 4 x 8 x 32 (the chunk) where G > 0
    qk_flops = chunks * int(visited.sum()) * 2 * 4 * 8 * d
    pv_tiles, rest = divmod(counter.dot_flops("_entmax_fwd_kernel") - qk_flops, chunks * 2 * 4 * 8 * 32)
    with_support = _tiles_with_support(entmax15_attention_weights(q.double(), k.double(), scale=scale), 4, 8)
    assert rest == 0 and with_support.sum() <= pv_tiles <= visited.sum()
    assert with_support.sum() < visited.sum(), "some visited 4-row tile must skip PV"
    _assert_close(out, reference.entmax15_attention_reference(q.double(), k.double(), v.double(), scale=scale),
                  2e-5, "output")


@pytest.mark.parametrize("override, dv, message", [
    pytest.param(dict(wide_dv_block_m=3), 17, "output kernel tile 3 must divide the support mask's 8",
                 id="output-rows"),
    pytest.param(dict(tau_block_n=3), 4, "threshold key tile 3 must divide the support mask's 8", id="threshold-keys"),
    pytest.param(dict(tau_block_m=12), 4, "threshold query rows 12 must be a multiple of the support mask's 8",
                 id="threshold-rows")])
def test_kernel_tiles_must_fit_the_mask_tiles(triton_backend, tiles, override, dv, message):
    tiles(TINY._replace(**override))
    q, k, v = _inputs(1, 1, 9, 4, dv)
    with pytest.raises(ValueError, match=message):
        entmax15_attention(q, k, v)


def test_taller_threshold_programs_solve_the_same_tau_and_mark_no_more_tiles(triton_backend, tiles):
    """Threshold programs of 16 query rows (two 8-row mask tiles, one mark each) give every row the rowmax and tau of
    8-row programs (a row's solve is its own; the interpreter's dots of 16 rows may round the scores' last bit
    otherwise), and a mask within theirs (a row solved before its program's last pass bounds its marks by tau, not
    by its lower bracket) that equals the mirror's."""
    b, h, t, d, causal = 1, 2, 45, 8, True
    q, k, _ = (x.detach() for x in _inputs(b, h, t, d, 1, seed=18))
    q = q * 4.0
    solved = {}
    for tile_set in (TINY, TALL_PASSES):
        tiles(tile_set)
        solved[tile_set] = entmax._entmax_tau(q, k, causal, d ** -0.5, entmax._whole_sequences(t, q.device))
    (rowmax, tau, mask), (tall_rowmax, tall_tau, tall_mask) = solved[TINY], solved[TALL_PASSES]
    rounding = 4e-6 * rowmax.abs().max().item()  # a few fp32 floats of the largest score
    torch.testing.assert_close(tall_rowmax, rowmax, rtol=0, atol=rounding)
    torch.testing.assert_close(tall_tau, tau, rtol=0, atol=rounding)
    assert tall_mask.shape == mask.shape and not (tall_mask.bool() & ~mask.bool()).any()
    assert torch.equal(tall_mask.bool().view(b, h, 6, 6), tau_support_tiles(
        q, k, causal=causal, block_m=8, block_n=8, pass_block_m=16))


def test_support_mask_of_rows_in_registers_marks_the_reachable_tiles(triton_backend, tiles):
    tiles(TINY)
    q, k, _ = (x.detach() for x in _inputs(1, 2, 7, 4, 1, seed=16))
    whole = entmax._whole_sequences(7, q.device)
    _, _, support = entmax._entmax_tau(q, k, True, 0.5, whole)  # T <= row_block_n = 8
    assert torch.equal(support.bool(), _visible_tiles(7, 8, 8).expand(2, 1, 1))
    _, _, support = entmax._entmax_tau(q, k, False, 0.5, whole)
    assert support.bool().all()


@pytest.mark.parametrize("causal, tile_set", [pytest.param(True, TINY, id="causal"),
                                               pytest.param(False, TINY, id="not-causal"),
                                               pytest.param(True, SUB_KEY_TILES, id="causal-2-key-threshold-tiles"),
                                               pytest.param(False, TALL_PASSES, id="not-causal-16-row-programs")])
def test_support_mask_is_sound_on_packed_sequences(triton_backend, tiles, causal, tile_set):
    """Tiles mixing sequences: a tile pair is marked wherever a row has p > 0 for a key of its own sequence (with
    2-key threshold tiles, a sequence's first visited key tile may lie inside a mask tile)."""
    tiles(tile_set)
    lengths = [5, 1, 12, 9, 3]
    total = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, _ = (x.detach()[0] for x in _inputs(1, 2, total, 4, 1, seed=17))  # (H, total, D)
    scores = (q @ k.transpose(-1, -2)).double() * 4.0  # peaked enough to leave tiles empty
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    hidden = sequence[:, None] != sequence[None, :]
    if causal:
        hidden |= torch.ones(total, total, dtype=torch.bool).triu(1)
    p = entmax.entmax15(scores.masked_fill(hidden, float("-inf")))
    sequences = entmax._packed_sequences(cu_seqlens, total, q.device)
    _, _, support = entmax._entmax_tau(q[None], k[None], causal, 4.0, sequences)
    with_support = _tiles_with_support(p[None], 8, 8)
    assert not (with_support & ~support.bool()).any()
    assert support.sum() < with_support.numel()  # tiles of other sequences are never marked


@pytest.mark.parametrize(
    "lengths, causal, tile_set, dv",
    [
        pytest.param([3, 1, 4], True, TINY, 3, id="in-registers-causal"),
        pytest.param([5, 1, 12, 9], True, TINY, 3, id="passes-causal"),
        pytest.param([5, 1, 12, 9], False, TINY, 3, id="passes-not-causal"),
        pytest.param([5, 1, 12, 9], True, SUB_KEY_TILES, 3, id="passes-2-key-threshold-tiles-causal"),
        pytest.param([5, 1, 12, 9], True, TALL_PASSES, 3, id="passes-16-row-threshold-programs-causal"),
        pytest.param([9, 2, 6], False, SKEWED, 3, id="BM8-BN4-not-causal"),
        pytest.param([5, 1, 12, 9], True, WIDE_ROWS, 19, id="4-row-forward-tiles-causal"),
        pytest.param([9, 2, 6], False, SKEWED_WIDE_ROWS, 9, id="2-row-forward-tiles-BN4-not-causal"),
    ],
)
def test_varlen_matches_per_sequence_reference(triton_backend, tiles, lengths, causal, tile_set, dv):
    """Sequences straddle tiles, so tiles mix sequences; forward and gradients against float64 per sequence."""
    tiles(tile_set)
    total, h = sum(lengths), 2
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    generator = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(total, h, n, generator=generator).requires_grad_() for n in (5, 5, dv))
    out = entmax15_attention_varlen(q, k, v, cu_seqlens, causal=causal)
    assert out.shape == v.shape
    do = torch.randn_like(out)
    out.backward(do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = entmax15_attention_varlen_reference(*leaves, cu_seqlens, causal=causal)
    expected.backward(do.double())
    _assert_close(out, expected, 2e-5, "output")
    for name, x, ref in zip("qkv", (q, k, v), leaves):
        _assert_close(x.grad, ref.grad, 5e-5, f"d{name}")


@pytest.mark.parametrize(
    "cu_seqlens, kwargs, error, match",
    [
        pytest.param(torch.tensor([0, 3, 7]), {}, TypeError, "cu_seqlens must have dtype", id="int64"),
        pytest.param(torch.tensor([0, 3, 6], dtype=torch.int32), {}, ValueError, "end at the packed length",
                     id="short"),
        pytest.param(torch.tensor([0, 3, 3, 7], dtype=torch.int32), {}, ValueError, "strictly increasing",
                     id="empty-sequence"),
        pytest.param(torch.tensor([0, 7], dtype=torch.int32), {"max_seqlen": 0}, ValueError, "max_seqlen",
                     id="max_seqlen"),
    ],
)
def test_varlen_rejects_bad_offsets(triton_backend, cu_seqlens, kwargs, error, match):
    q = torch.randn(7, 2, 4)
    with pytest.raises(error, match=match):
        entmax15_attention_varlen(q, q, q, cu_seqlens, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_varlen_max_seqlen_below_the_longest_sequence_raises(backend):
    """Both varlen ops refuse a max_seqlen below the longest sequence of checked offsets, naming the argument;
    the exact bound passes."""
    q = torch.randn(7, 2, 4)
    cu_seqlens = torch.tensor([0, 5, 7], dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, 2, 7], dtype=torch.int32)
    with kernels.use_backend(backend):
        with pytest.raises(ValueError, match=r"^max_seqlen \(4\) is below the longest sequence \(5\)"):
            entmax15_attention_varlen(q, q, q, cu_seqlens, max_seqlen=4)
        for kwargs, name in (({"max_seqlen_q": 4}, "max_seqlen_q"), ({"max_seqlen_k": 4}, "max_seqlen_k"),
                             ({"cu_seqlens_k": cu_seqlens_k, "max_seqlen_k": 4}, "max_seqlen_k")):
            with pytest.raises(ValueError, match=rf"^{name} \(4\) is below the longest sequence \(5\)"):
                kernels.entmax_attention_varlen(q, q, q, cu_seqlens, **kwargs)
        with pytest.raises(ValueError, match=r"^max_seqlen_q must be a positive int"):
            kernels.entmax_attention_varlen(q, q, q, cu_seqlens, max_seqlen_q=0, validate=False)
        exact = entmax15_attention_varlen(q, q, q, cu_seqlens, max_seqlen=5)
        torch.testing.assert_close(exact, entmax15_attention_varlen(q, q, q, cu_seqlens))


@pytest.mark.parametrize("fused", [pytest.param(True, id="fused"), pytest.param(False, id="reference")])
def test_module_key_padding_mask_runs_each_row_alone(triton_backend, tiles, fused):
    """Packed rows give what each row's unpadded positions give alone; padded positions attend nothing."""
    tiles(TINY)
    torch.manual_seed(14)
    cls = FusedEntmaxCausalAttention if fused else reference.EntmaxCausalAttention
    module = cls(6, 2, out_proj=False)
    x = torch.randn(3, 11, 6, requires_grad=True)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[0, 7:] = True  # right padding
    padding[1, :4] = True  # left padding
    padding[2, :] = True  # an empty row
    got = module.forward_with_context(x, key_padding_mask=padding)
    got.output.sum().backward()
    for row, keep in enumerate(~padding):
        if keep.any():
            alone = module.forward_with_context(x[row:row + 1, keep].detach())
            torch.testing.assert_close(got.output[row, keep], alone.output[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.context[row, keep], alone.context[0], atol=1e-5, rtol=1e-5)
        assert (got.output[row, ~keep] == 0).all() and (got.context[row, ~keep] == 0).all()
    assert x.grad[2].abs().max() == 0 and x.grad[0, :7].abs().max() > 0
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        module(x, key_padding_mask=padding[:, :5])
    with pytest.raises(TypeError, match="key_padding_mask must have dtype"):
        module(x, key_padding_mask=padding.float())


# ----------------------------------------------------------------------------------------------------------------
# Backward: the per-tile support mask
# ----------------------------------------------------------------------------------------------------------------

#: mask tiles 8 x 8, backward tiles 4 x 4 inside them (one mask entry per tile pair)
SUB_TILES = TINY._replace(bwd_block_m=4, bwd_block_n=4)
#: mask tiles 4 x 4, backward tiles 8 x 8 over 2 x 2 of them (their OR)
SUPER_TILES = TINY._replace(block_m=4, block_n=4, row_block_m=4, row_block_n=4, bwd_block_m=8, bwd_block_n=8)
#: D and Dv wider than ``bwd_whole_d``: the chunked backward (dk and dv whole, z and dP reduced in 8-feature steps)
CHUNKED = TINY._replace(bwd_whole_d=8, bwd_block_d=8)
#: D and Dv wider than ``bwd_wide_d`` / ``bwd_wide_dv`` too: dk/dq and dv in chunks of 8 over several programs, each
#: recomputing z (and dP with a dk chunk)
SPLIT = CHUNKED._replace(bwd_wide_d=8, bwd_wide_dv=8)


def _reference_probabilities(q, k, causal, scale, lengths=None):
    """The float64 attention matrix (B, H, T, T) of the reference, differentiable in q and k; with ``lengths`` the
    packed sequences' blocks on the diagonal (zero elsewhere)."""
    lengths = lengths or [q.shape[2]]
    p = q.new_zeros(*q.shape[:2], q.shape[2], q.shape[2], dtype=torch.float64)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        p[:, :, rows, rows] = entmax15_attention_weights(q[:, :, rows].double(), k[:, :, rows].double(),
                                                         causal=causal, scale=scale)
        start += n
    return p


def _exact_support(p, block_m, block_n):
    """The per-tile mask of the contract: (B*H, cdiv(T, block_m), cdiv(T, block_n)) uint8, 1 iff some p > 0 in the
    tile pair."""
    b, h, t, _ = p.shape
    rows, cols = -(-t // block_m), -(-t // block_n)
    padded = torch.nn.functional.pad(p.detach() > 0, (0, cols * block_n - t, 0, rows * block_m - t))
    return padded.reshape(b * h, rows, block_m, cols, block_n).any(4).any(2).to(torch.uint8)


def _backward_with(q, k, v, do, causal, scale, sequences, supports):
    """The backward launcher's (dq, dk, dv) with each mask of ``supports`` ("forward": the mask the forward's
    threshold pass wrote), after one forward."""
    _, rowmax, tau, forward_support, w, *_ = entmax._entmax_attention_fwd(q, k, v, causal, scale, True,
                                                                          sequences)
    return [entmax._entmax_attention_bwd(do, q, k, v, rowmax, tau, w, causal, scale, sequences,
                                                   forward_support if isinstance(support, str) else support)
            for support in supports]


_PACKED = [7, 1, 11]


@pytest.mark.parametrize("tile_set, q_scale, lengths, causal", [
    pytest.param(TINY, 1.0, None, True, id="mask-tiles-causal-random"),
    pytest.param(TINY, 12.0, None, False, id="mask-tiles-full-peaked"),
    pytest.param(TINY, 0.01, _PACKED, True, id="mask-tiles-packed-causal-flat"),
    pytest.param(SUB_TILES, 12.0, None, True, id="sub-tiles-causal-peaked"),
    pytest.param(SUB_TILES, 1.0, _PACKED, False, id="sub-tiles-packed-full-random"),
    pytest.param(SUPER_TILES, 0.01, None, False, id="super-tiles-full-flat"),
    pytest.param(SUPER_TILES, 12.0, _PACKED, True, id="super-tiles-packed-causal-peaked"),
    pytest.param(CHUNKED, 1.0, None, True, id="chunked-causal-random"),
    pytest.param(SPLIT, 12.0, _PACKED, False, id="split-packed-full-peaked"),
    pytest.param(WIDE_ROWS, 12.0, None, True, id="4-row-forward-tiles-causal-peaked"),
    pytest.param(WIDE_ROWS, 1.0, _PACKED, False, id="4-row-forward-tiles-packed-full-random"),
])
def test_backward_skips_tiles_of_the_support_mask_exactly(triton_backend, tiles, q_scale, lengths, causal,
                                                          tile_set):
    """Gradients with the exact per-tile mask, the forward's own mask, an all-ones mask and none are identical, and
    match float64; peaked
    rows (q = k) leave visible tiles without support. Odd sizes (T = 19, D = 11, Dv = 20), two heads."""
    tiles(tile_set)
    t, d, dv = 19, 11, 20
    q, k, v = (x.detach() for x in _inputs(1, 2, t, d, dv, seed=21))
    # scores q . k / sqrt(D) of std ~q_scale (0.01: nearly flat rows); peaked: q = k, each row peaks on its own key
    q = k * q_scale if q_scale > 1 else q * q_scale
    do = torch.randn(1, 2, t, dv, generator=torch.Generator().manual_seed(22))
    scale = d ** -0.5
    sequences = (entmax._whole_sequences(t, q.device) if lengths is None else
                 entmax._packed_sequences(torch.tensor([0, 7, 8, 19], dtype=torch.int32), t, q.device))
    assert lengths in (None, _PACKED)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    p = _reference_probabilities(leaves[0], leaves[1], causal, scale, lengths)
    (p @ leaves[2]).backward(do.double())
    support = _exact_support(p, tile_set.block_m, tile_set.block_n)
    if q_scale > 1:
        visible = _exact_support(_reference_probabilities(q, q, causal, 0.0, lengths), tile_set.block_m,
                                 tile_set.block_n)  # scale 0: uniform rows, p > 0 wherever visible
        assert support.sum() < visible.sum(), "peaked rows must leave visible tiles without support"
    exact, ones, default, forward = _backward_with(q, k, v, do, causal, scale, sequences,
                                                   [support, torch.ones_like(support), None, "forward"])
    for name, a, b, c, f, x in zip("qkv", exact, ones, default, forward, leaves):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, f), f"d{name} depends on the mask"
        _assert_close(a, x.grad, 5e-5, f"d{name}")


@pytest.mark.parametrize("tile_set, loads", [(TINY, 1), (CHUNKED, 2)], ids=["whole", "chunked"])
def test_backward_work_follows_the_support_mask(triton_backend, tiles, tile_set, loads):
    """One key tile program per key tile; each query tile with support costs FA2's five dots (2 (3 D + 2 Dv) FLOPs
    per score), D and Dv whole or, chunked, z and dP reduced in steps (q and dO then load twice: in steps and
    whole); tiles without support cost nothing."""
    tiles(tile_set)
    t, d, bm = 32, 16, 8
    # unit rows with q = k at a large scale: each row attends to itself and its few near-duplicates
    q = torch.nn.functional.normalize(torch.randn(1, 1, t, d, generator=torch.Generator().manual_seed(23)), dim=-1)
    k, v, do = q.clone(), torch.randn(1, 1, t, d), torch.randn(1, 1, t, d)
    scale = 6.0
    support = _exact_support(_reference_probabilities(q, k, True, scale), bm, bm)
    sequences = entmax._whole_sequences(t, q.device)
    pairs = {"exact": int(support.sum()), "ones": (t // bm) * (t // bm + 1) // 2}
    assert pairs["exact"] < pairs["ones"]
    _, rowmax, tau, _support, w, *_ = entmax._entmax_attention_fwd(q, k, v, True, scale, True, sequences)
    for name, mask in (("exact", support), ("ones", torch.ones_like(support))):
        with InterpreterCounter({"q": q, "do": do}) as counter:
            entmax._entmax_attention_bwd(do, q, k, v, rowmax, tau, w, True, scale, sequences, mask)
        assert counter.dot_flops("_entmax_bwd_kernel") == pairs[name] * bm * bm * 2 * (3 * d + 2 * d), name
        assert counter.loaded("q", "_entmax_bwd_kernel") == loads * pairs[name] * bm * d, name
        assert counter.loaded("do", "_entmax_bwd_kernel") == loads * pairs[name] * bm * d, name


def test_backward_rejects_tiles_that_do_not_nest_in_the_mask_and_misshapen_masks(triton_backend, tiles):
    q, k, v = (x.detach() for x in _inputs(1, 1, 9, 4, 4))
    do, sequences = torch.randn(1, 1, 9, 4), entmax._whole_sequences(9, "cpu")
    tiles(TINY)
    with pytest.raises(ValueError, match=r"support must have shape \(B\*H, query tiles, key tiles\) = \(1, 2, 2\)"):
        _backward_with(q, k, v, do, True, 0.5, sequences, [torch.ones(1, 2, 1, dtype=torch.uint8)])
    tiles(TINY._replace(block_n=16, bwd_block_n=8 * 3))
    with pytest.raises(ValueError, match="must divide or be a multiple of the support mask"):
        _backward_with(q, k, v, do, True, 0.5, sequences, [None])


def _sorted_tile_lists(support, sequences, causal, t_q, t_k, block_m, block_n, mask_m, mask_n, batch_heads):
    """The query-tile lists as the backward built them with torch.sort (int64 indices): per batch-head and key tile,
    the visible query tiles with support first, ascending (a stable sort of their complement), and their counts."""
    tiles_m, tiles_n = -(-t_q // block_m), -(-t_k // block_n)

    def covering(mask, dim, size, mask_size, tiles):  # the mask regridded to the backward's tiles (OR over tiles)
        if size <= mask_size:
            return mask.repeat_interleave(mask_size // size, dim=dim).narrow(dim, 0, tiles)
        factor = size // mask_size
        padded = torch.nn.functional.pad(mask, (0, 0, 0, tiles * factor - mask.shape[1]) if dim == 1 else
                                         (0, tiles * factor - mask.shape[2]))
        return padded.unflatten(dim, (tiles, factor)).amax(dim + 1)

    pad = tiles_m * block_m - t_q
    start = torch.nn.functional.pad(sequences.start, (0, pad), value=t_k).view(tiles_m, block_m).amin(1)
    if causal:
        hi = torch.clamp((torch.arange(tiles_m) + 1) * block_m, max=t_k)
    else:
        hi = torch.nn.functional.pad(sequences.end, (0, pad), value=0).view(tiles_m, block_m).amax(1)
    key_tile = torch.arange(tiles_n) * block_n
    visit = ((key_tile[None, :] < hi[:, None]) & (key_tile[None, :] + block_n > start[:, None])).expand(
        batch_heads, tiles_m, tiles_n)
    if support is not None:
        visit = visit & (covering(covering(support, 1, block_m, mask_m, tiles_m), 2, block_n, mask_n, tiles_n) != 0)
    visit = visit.transpose(1, 2)
    return torch.sort((~visit).to(torch.uint8), dim=2, stable=True).indices, visit.sum(2)


@pytest.mark.parametrize("t_q, t_k, causal, lengths, tiles_mn, mask_mn", [
    pytest.param(19, 19, True, None, (8, 8), (8, 8), id="T19-causal-mask-tiles"),
    pytest.param(37, 37, False, None, (4, 8), (8, 4), id="T37-full-sub-and-super-tiles"),
    pytest.param(37, 37, True, [5, 1, 13, 18], (16, 16), (8, 4), id="T37-packed-causal-super-tiles"),
    pytest.param(45, 45, False, [7, 1, 11, 26], (4, 4), (8, 8), id="T45-packed-full-sub-tiles"),
    pytest.param(130, 130, True, None, (16, 16), (64, 16), id="T130-causal-fp32-tiles"),
    pytest.param(13, 21, False, "bottom-right", (4, 8), (8, 8), id="Tq13-Tk21-key-ranges"),
])
def test_tile_lists_equal_the_sorted_construction(triton_backend, monkeypatch, t_q, t_k, causal, lengths, tiles_mn,
                                                  mask_mn):
    """The list kernel's lists (int32) equal torch.sort's construction where the backward reads them (each key tile's
    first ``count`` entries) and its counts everywhere, on random support masks (about half ones) and without one;
    whole, packed and key-range sequences, odd sizes; with the default chunks and with chunks of 4 query tiles x 4 key
    tiles (the ranks carried over several chunks, several programs per batch-head). Allocations are poisoned (-1)."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(-1))
    generator = torch.Generator().manual_seed(t_q + t_k)
    batch_heads = 2
    if lengths is None:
        sequences = entmax._whole_sequences(t_q, "cpu")
    elif lengths == "bottom-right":
        sequences = entmax._whole_key_ranges(t_q, t_k, True, "cpu")
    else:
        offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        sequences = entmax._packed_sequences(offsets, t_q, "cpu")
    mask_shape = (batch_heads, -(-t_q // mask_mn[0]), -(-t_k // mask_mn[1]))
    random_mask = torch.rand(mask_shape, generator=generator).lt(0.5).to(torch.uint8)
    small_chunks = dict(CHUNK_M=4, CHUNK_N=4)
    for chunks, support in [(entmax._TILE_LISTS_CHUNKS, random_mask), (entmax._TILE_LISTS_CHUNKS, None),
                            (small_chunks, random_mask)]:
        monkeypatch.setattr(entmax, "_TILE_LISTS_CHUNKS", chunks)
        rows, counts = entmax._query_tile_lists(support, sequences, causal, t_q, t_k, *tiles_mn, *mask_mn,
                                                batch_heads)
        want_rows, want_counts = _sorted_tile_lists(support, sequences, causal, t_q, t_k, *tiles_mn, *mask_mn,
                                                    batch_heads)
        assert rows.dtype == counts.dtype == torch.int32
        assert rows.shape == want_rows.shape and torch.equal(counts, want_counts.to(torch.int32))
        assert int(counts.sum()) > 0
        for listed, want, count in zip(rows.flatten(0, 1), want_rows.flatten(0, 1), counts.flatten().tolist()):
            assert torch.equal(listed[:count], want[:count].to(torch.int32))


# ----------------------------------------------------------------------------------------------------------------
# Grouped-query heads and queries of another length than the keys (the kernels with each query head group packed
# as rows of its key head, and causality folded into each row's key range)
# ----------------------------------------------------------------------------------------------------------------


def _check_general_against_reference(q, k, v, causal, atol=2e-5, grad_atol=5e-5, **varlen):
    """entmax_attention (or, with ``varlen`` offsets, entmax_attention_varlen) on the Triton backend against the
    float64 reference, forward and gradients."""
    if varlen:
        out = kernels.entmax_attention_varlen(q, k, v, varlen["cu_q"], varlen["cu_k"], causal=causal)
        call = lambda *x: reference.entmax_attention_varlen_reference(*x, varlen["cu_q"], varlen["cu_k"],  # noqa
                                                                      causal=causal)
    else:
        out = kernels.entmax_attention(q, k, v, causal=causal)
        call = lambda *x: reference.entmax_attention_reference(*x, causal=causal)  # noqa: E731
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = call(*leaves)
    _assert_close(out, expected, atol, "output")
    for name, grad, want in zip("qkv", grads, torch.autograd.grad(expected, leaves, do.double()), strict=True):
        _assert_close(grad, want, grad_atol, f"d{name}")
    return out, grads


@pytest.mark.parametrize("h, h_kv, t_q, t_k, causal, tile_set", [
    pytest.param(4, 2, 5, 11, True, TINY, id="gqa-short-queries-in-registers-to-passes"),
    pytest.param(2, 1, 13, 6, True, TINY, id="mqa-queries-that-see-no-key"),
    pytest.param(2, 2, 3, 19, True, SKEWED, id="chunk-of-queries-against-a-longer-history"),
    pytest.param(3, 1, 7, 7, False, TINY, id="mqa-not-causal"),
    pytest.param(4, 2, 9, 20, True, TINY, id="gqa-passes"),
])
def test_grouped_heads_and_other_key_lengths_match_the_reference(triton_backend, tiles, h, h_kv, t_q, t_k, causal,
                                                                 tile_set):
    tiles(tile_set)
    generator = torch.Generator().manual_seed(h * 100 + t_q * 10 + t_k)
    q, k, v = (torch.randn(1, heads, t, n, generator=generator).requires_grad_()
               for heads, t, n in ((h, t_q, 5), (h_kv, t_k, 5), (h_kv, t_k, 3)))
    out, grads = _check_general_against_reference(q, k, v, causal)
    if causal and t_q > t_k:  # rows that see no key: zeros, zero gradient
        assert torch.all(out[:, :, :t_q - t_k] == 0) and torch.all(grads[0][:, :, :t_q - t_k] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_with_separate_key_offsets_and_grouped_heads(triton_backend, tiles, causal):
    tiles(TINY)
    generator = torch.Generator().manual_seed(5)
    cu_q = torch.tensor([0, 2, 7, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9, 19], dtype=torch.int32)
    q, k, v = (torch.randn(rows, heads, n, generator=generator).requires_grad_()
               for rows, heads, n in ((10, 4, 5), (19, 2, 5), (19, 2, 3)))
    _check_general_against_reference(q, k, v, causal, cu_q=cu_q, cu_k=cu_k)


def test_grouped_heads_read_each_key_tile_once_per_group(triton_backend, tiles):
    """Decoding with H query heads over one key head: the threshold kernel streams K once per pass for the whole group
    (its passes: those of the group's slowest head), not once per head; the output kernel visits the union of the
    heads' support tiles, once."""
    tiles(TINY)
    generator = torch.Generator().manual_seed(9)
    h, t_k, d = 4, 20, 8
    q = torch.randn(1, h, 1, d, generator=generator) * 3
    k, v = (torch.randn(1, 1, t_k, d, generator=generator) for _ in range(2))
    counters = {}
    for name, (k_heads, v_heads) in (("grouped", (k, v)), ("per_head", (k.expand(1, h, t_k, d),
                                                                         v.expand(1, h, t_k, d)))):
        with torch.no_grad(), InterpreterCounter({"k": k}) as counter:
            kernels.entmax_attention(q, k_heads, v_heads)
        counters[name] = counter
    for kernel in ("_entmax_tau_kernel", "_entmax_fwd_kernel"):
        (grouped,), (per_head,) = (counters[name].of(kernel) for name in ("grouped", "per_head"))
        assert len(grouped.loads) == 1 and len(per_head.loads) == h  # one program for the group, one per head
        slowest_head = max(loads["k"] for loads in per_head.loads.values())
        if kernel == "_entmax_tau_kernel":
            assert grouped.loaded("k") == slowest_head
        else:
            assert slowest_head <= grouped.loaded("k") <= per_head.loaded("k")
    assert counters["grouped"].loaded("k") < counters["per_head"].loaded("k")


def test_fused_module_with_grouped_heads_matches_its_reference_twin(triton_backend, tiles):
    tiles(TINY)
    torch.manual_seed(21)
    fused = FusedEntmaxCausalAttention(8, 4, num_kv_heads=2)
    twin = reference.EntmaxCausalAttention(8, 4, num_kv_heads=2)
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(2, 11, 8)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 7:] = False
    for kwargs in ({}, {"key_padding_mask": ~keep}):
        got, want = fused.forward_with_context(x, **kwargs), twin.forward_with_context(x, **kwargs)
        for name in ("output", "context"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Any alpha in (1, 2]: the threshold found by bracketing passes (Newton and secant bounds), p = G^(1 / (alpha - 1)),
# alpha per head with its gradient
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, h_kv, t_q, t_k, causal, alpha, tile_set", [
    pytest.param(2, 2, 7, 7, True, 1.25, TINY, id="alpha1.25-in-registers"),
    pytest.param(1, 1, 19, 19, True, 2.0, TINY, id="sparsemax-passes"),
    pytest.param(2, 2, 7, 7, False, 2.0, TINY, id="sparsemax-in-registers-not-causal"),
    pytest.param(4, 2, 5, 11, True, "per-head-with-sparsemax", TINY, id="sparsemax-and-other-alpha-per-head-gqa"),
    pytest.param(2, 2, 19, 19, False, "per-head", SKEWED, id="alpha-per-head-passes-not-causal"),
    pytest.param(4, 2, 5, 11, True, "per-head", TINY, id="alpha-per-head-gqa-short-queries"),
    pytest.param(2, 1, 13, 6, True, 1.75, TINY, id="alpha1.75-mqa-queries-that-see-no-key"),
    pytest.param(1, 1, 19, 19, True, 1.5, TINY, id="alpha-tensor-of-1.5"),
])
def test_any_alpha_matches_the_reference_with_alpha_gradient(triton_backend, tiles, h, h_kv, t_q, t_k, causal,
                                                            alpha, tile_set):
    tiles(tile_set)
    generator = torch.Generator().manual_seed(h * 100 + t_q * 10 + t_k)
    q, k, v = (torch.randn(1, heads, t, n, generator=generator).requires_grad_()
               for heads, t, n in ((h, t_q, 5), (h_kv, t_k, 5), (h_kv, t_k, 3)))
    if alpha == "per-head":
        alpha = (1.1 + 0.9 * torch.rand(h, generator=generator)).requires_grad_()
    elif alpha == "per-head-with-sparsemax":  # sparsemax heads share the kernels' tiles with the others
        alpha = torch.tensor([2.0, 1.3, 1.7, 2.0], requires_grad=True)
    elif alpha == 1.5:
        alpha = torch.full((h,), 1.5, requires_grad=True)  # a tensor takes the any-alpha kernels, even at 1.5
    inputs = (q, k, v) + ((alpha,) if isinstance(alpha, torch.Tensor) else ())
    out = kernels.entmax_attention(q, k, v, alpha=alpha, causal=causal)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, do)
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    expected = reference.entmax_attention_reference(*leaves[:3], alpha=leaves[3] if len(leaves) > 3 else alpha,
                                                    causal=causal)
    _assert_close(out, expected, 2e-5, "output")
    for name, grad, want in zip(["q", "k", "v", "alpha"], grads, torch.autograd.grad(expected, leaves, do.double())):
        _assert_close(grad, want, 5e-5, f"d{name}")


def test_any_alpha_varlen_with_separate_key_offsets(triton_backend, tiles):
    tiles(TINY)
    generator = torch.Generator().manual_seed(6)
    cu_q = torch.tensor([0, 2, 7, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9, 19], dtype=torch.int32)
    q, k, v = (torch.randn(rows, heads, n, generator=generator).requires_grad_()
               for rows, heads, n in ((10, 4, 5), (19, 2, 5), (19, 2, 3)))
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.0], requires_grad=True)
    out = kernels.entmax_attention_varlen(q, k, v, cu_q, cu_k, alpha=alpha)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, alpha), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, alpha)]
    expected = reference.entmax_attention_varlen_reference(*leaves[:3], cu_q, cu_k, alpha=leaves[3])
    _assert_close(out, expected, 2e-5, "output")
    for name, grad, want in zip(["q", "k", "v", "alpha"], grads, torch.autograd.grad(expected, leaves, do.double())):
        _assert_close(grad, want, 5e-5, f"d{name}")


#: q scales (powers of two) of the threshold test: flat rows (every key in the support), random, peaked (a few
#: keys), and scores of magnitude ~1e6-1e8 (one-hot)
THRESHOLD_ROWS = [pytest.param(2.0 ** -6, id="flat"), pytest.param(1.0, id="random"), pytest.param(16.0, id="peaked"),
                  pytest.param(2.0 ** 20, id="magnitude-1e6")]


@pytest.mark.parametrize("q_scale", THRESHOLD_ROWS)
@pytest.mark.parametrize("alpha", [1.25, 2.0])
def test_any_alpha_threshold_is_within_fp32_rounding_of_the_float64_root(triton_backend, tiles, q_scale, alpha):
    """tau (relative to the row maximum of (alpha - 1) * scores) against the float64 root of the same scores (small
    integers times powers of two: exact in fp32 and float64 alike, as are (alpha - 1) * scores for these alpha):
    within 4 fp32 floats of tau's magnitude."""
    tiles(TINY)
    t, d = 21, 4
    generator = torch.Generator().manual_seed(int(alpha * 100))
    q = torch.randint(-8, 9, (1, 1, t, d), generator=generator).float() * q_scale
    k = torch.randint(-8, 9, (1, 1, t, d), generator=generator).float()
    alpha_rows = torch.full((1, t), alpha)
    rowmax, tau, _ = entmax._entmax_tau(q, k, True, 0.25, entmax._whole_sequences(t, q.device), alpha_rows)
    assert torch.isfinite(tau).all()
    x = (alpha - 1) * 0.25 * (q[0, 0].double() @ k[0, 0].double().T)
    x = x.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")) - rowmax[0, 0].double()[:, None]
    lo, hi = torch.full((t, 1), -1.0, dtype=torch.float64), torch.zeros(t, 1, dtype=torch.float64)
    for _ in range(200):  # float64 bisection of sum max(x - tau, 0)^(1 / (alpha - 1)) = 1
        mid = (lo + hi) / 2
        above = (x - mid).clamp(min=0).pow(1 / (alpha - 1)).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    error = (tau[0, 0].double() - lo[:, 0]).abs() / lo[:, 0].abs()
    assert error.max() <= 4 * torch.finfo(torch.float32).eps, error.max()


@pytest.mark.parametrize("q_scale", THRESHOLD_ROWS)
@pytest.mark.parametrize("t", [pytest.param(8, id="in-registers"), pytest.param(21, id="passes")])
def test_sparsemax_threshold_is_the_closed_form_rounded_once(triton_backend, tiles, t, q_scale):
    """alpha = 2 rows (every other row; the others alpha = 1.25, in the same tiles) get sparsemax's closed form on
    their support, ``tau = (sum_S x - 1) / |S|``, relative to the row maximum: on scores that are small integers times
    powers of two (the sum exact in fp32) it is the float64 root rounded once to fp32, bit for bit; the alpha = 1.25
    rows stay within 4 fp32 floats of their float64 root."""
    tiles(TINY)
    d = 4
    generator = torch.Generator().manual_seed(t)
    q = torch.randint(-8, 9, (1, 1, t, d), generator=generator).float() * q_scale
    k = torch.randint(-8, 9, (1, 1, t, d), generator=generator).float()
    alpha_rows = torch.where(torch.arange(t) % 2 == 0, 2.0, 1.25)[None, :]
    rowmax, tau, _ = entmax._entmax_tau(q, k, True, 0.25, entmax._whole_sequences(t, q.device), alpha_rows)
    scores = 0.25 * (q[0, 0].double() @ k[0, 0].double().T)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    x = (alpha_rows[0, :, None].double() - 1) * scores - rowmax[0, 0].double()[:, None]
    sparse = alpha_rows[0] == 2.0
    # float64 sparsemax root by sorting (Martins and Astudillo, 2016)
    x_sorted = x[sparse].sort(-1, descending=True).values.clamp(min=-2.0)
    size = torch.arange(1, t + 1, dtype=torch.float64)
    support = (1 + size * x_sorted > x_sorted.cumsum(-1)).sum(-1, keepdim=True)
    root = ((x_sorted.cumsum(-1).gather(-1, support - 1) - 1) / support)[:, 0]
    assert torch.equal(tau[0, 0, sparse], root.float()), (tau[0, 0, sparse] - root).abs().max()
    lo, hi = torch.full((t, 1), -1.0, dtype=torch.float64), torch.zeros(t, 1, dtype=torch.float64)
    for _ in range(200):  # float64 bisection of the alpha = 1.25 rows
        mid = (lo + hi) / 2
        above = (x - mid).clamp(min=0).pow(4).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    error = (tau[0, 0, ~sparse].double() - lo[~sparse, 0]).abs() / lo[~sparse, 0].abs()
    assert error.max() <= 4 * torch.finfo(torch.float32).eps, error.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_any_alpha_output_tiles_hold_at_most_the_general_budget(dtype):
    """The default tiles: any alpha's output kernel with alpha's gradient (three accumulators) cuts its rows (one Dv
    chunk; at most ``general_block_m``) or, above ``wide_block_dv``, its Dv chunks to ``general_block_mdv`` elements;
    without it, entmax-1.5's tiles to ``fixed_alpha_block_mdv``; its rows divide the mask's."""
    t = entmax._DEFAULT_TILES[dtype]
    for dv in (1, 16, 33, 64, 100, 128, 129, 256, 512, 1024):
        name, block_m, block_dv = entmax._forward_tiles(t, dv, general=True, store_s=True)
        one_name, one_m, one_dv = entmax._forward_tiles(t, dv)
        assert name == one_name + " general" and block_m * block_dv <= t.general_block_mdv
        assert t.block_m % block_m == 0 and block_m >= 16 and block_dv >= 16
        if dv <= t.wide_block_dv:
            assert block_dv == one_dv
            assert block_m == min(one_m, t.general_block_m or one_m, t.general_block_mdv // one_dv)
        else:
            assert block_m == one_m and block_dv == min(one_dv, t.general_block_mdv // one_m)
        # without alpha's gradient: entmax-1.5's tiles (wide: any alpha's list) cut to fixed_alpha_block_mdv
        name, block_m, block_dv = entmax._forward_tiles(t, dv, general=True)
        budget = t.fixed_alpha_block_mdv or one_m * one_dv
        assert name == (one_name + " general" if dv > t.wide_block_dv else one_name)
        assert t.block_m % block_m == 0 and block_m * block_dv <= budget and block_m >= 16 and block_dv >= 16
        assert (block_m, block_dv) == ((min(one_m, budget // one_dv), one_dv) if dv <= t.wide_block_dv else
                                       (one_m, min(one_dv, budget // one_m)))


@pytest.mark.parametrize("dv, tiles_of_rows", [pytest.param(6, (4, 8), id="fewer-rows-one-chunk"),
                                               pytest.param(20, (4, 8), id="narrower-chunks")])
def test_any_alpha_output_kernel_takes_tiles_of_its_own(triton_backend, tiles, monkeypatch, dv, tiles_of_rows):
    """With a budget of 32 elements in 8 x 8 mask tiles, the any-alpha output kernel runs 4-row tiles (Dv = 6: one
    8-feature chunk; Dv = 20: chunks of 8 of its 4-row wide tiles) and matches the float64 reference, alpha's
    gradient included (the third accumulator)."""
    tiles(TINY._replace(general_block_mdv=32, wide_dv_block_m=4, wide_dv_block_dv=32))
    launched, launch = [], entmax.launch

    def recording(kernel, grid, args, kwargs, candidates, **options):
        if kernel is entmax._entmax_fwd_kernel:
            launched.append((candidates[0].kwargs["BM"], candidates[0].kwargs["BDV"]))
        launch(kernel, grid, args, kwargs, candidates, **options)

    monkeypatch.setattr(entmax, "launch", recording)
    generator = torch.Generator().manual_seed(dv)
    q, k, v = (torch.randn(1, 2, 13, n, generator=generator).requires_grad_() for n in (5, 5, dv))
    alpha = torch.tensor([1.3, 2.0], requires_grad=True)
    out = kernels.entmax_attention(q, k, v, alpha=alpha)
    assert launched == [tiles_of_rows]
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, alpha), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, alpha)]
    expected = reference.entmax_attention_reference(*leaves[:3], alpha=leaves[3])
    _assert_close(out, expected, 2e-5, "output")
    for name, grad, want in zip(["q", "k", "v", "alpha"], grads, torch.autograd.grad(expected, leaves, do.double())):
        _assert_close(grad, want, 5e-5, f"d{name}")


def test_any_alpha_output_kernel_holds_alphas_gradient_only_when_it_is_needed(triton_backend, tiles, monkeypatch):
    """Without alpha's gradient (no grad, or a float alpha) the any-alpha output kernel launches STORE_S=False at
    entmax-1.5's tiles (8 rows: two accumulators); with alpha requiring grad STORE_S=True at its own (4 rows under a
    budget of 32 elements). Both give the same output."""
    tiles(TINY._replace(general_block_mdv=32))
    launched, launch = [], entmax.launch

    def recording(kernel, grid, args, kwargs, candidates, **options):
        if kernel is entmax._entmax_fwd_kernel:
            launched.append((kwargs["GENERAL"], kwargs["STORE_S"], candidates[0].kwargs["BM"],
                             candidates[0].kwargs["BDV"]))
        launch(kernel, grid, args, kwargs, candidates, **options)

    monkeypatch.setattr(entmax, "launch", recording)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 13, n, generator=generator).requires_grad_() for n in (5, 5, 6))
    alpha = torch.tensor([1.3, 2.0])
    with torch.no_grad():
        plain = kernels.entmax_attention(q, k, v, alpha=alpha)
    kernels.entmax_attention(q, k, v, alpha=1.25)
    learned = kernels.entmax_attention(q, k, v, alpha=alpha.clone().requires_grad_())
    assert launched == [(True, False, 8, 8), (True, False, 8, 8), (True, True, 4, 8)]
    torch.testing.assert_close(learned.detach(), plain)


def test_fused_module_learns_alpha_per_head_like_its_reference_twin(triton_backend, tiles):
    tiles(TINY)
    torch.manual_seed(23)
    fused = FusedEntmaxCausalAttention(8, 4, alpha=1.3, learn_alpha=True, num_kv_heads=2)
    twin = reference.EntmaxCausalAttention(8, 4, alpha=1.3, learn_alpha=True, num_kv_heads=2)
    with torch.no_grad():
        fused.alpha_logit.copy_(torch.randn(4))
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(2, 11, 8)
    outputs = [module(x)[0] for module in (fused, twin)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for output in outputs:
        output.square().sum().backward()
    torch.testing.assert_close(fused.alpha_logit.grad, twin.alpha_logit.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# TMA (sm_90): the threshold and output kernels stream K (and V chunks up to TMA_MAX_BOX features) through tensor
# descriptors; the interpreter runs them as a GPU reads them (bounds, zero fill, alignment asserts)
# ----------------------------------------------------------------------------------------------------------------


def _launched_as_on_sm90(monkeypatch):
    """Launches choose their variant as on sm_90; returns the list of (kernel, USE_TMA) they append to (kernels
    without the flag: None)."""
    chosen, launch = [], entmax.launch

    def recording(kernel, grid, args, kwargs, *rest, **options):
        chosen.append((kernel.fn.__name__, kwargs.get("USE_TMA")))
        launch(kernel, grid, args, kwargs, *rest, **options)

    monkeypatch.setattr(entmax, "launch_arch", lambda device: "sm_90")
    monkeypatch.setattr(entmax, "launch", recording)
    return chosen


def _views_into_nan(generator, *shapes, width=32):
    """Leaf views (..., :n) of NaN-filled buffers with 5 more rows and ``width`` features: a load past the rows or
    features it may read returns NaN."""
    views = []
    for *batch, t, n in shapes:
        buffer = torch.full((*batch, t + 5, width), float("nan"))
        buffer[..., :t, :n] = torch.randn(*batch, t, n, generator=generator)
        views.append(buffer[..., :t, :n].requires_grad_())
    return views


@pytest.mark.parametrize("t, d, dv, alpha, tile_set, v_box", [
    pytest.param(7, 7, 5, 1.5, TINY, 256, id="in-registers-entmax15"),
    pytest.param(19, 11, 9, 1.5, TINY, 256, id="passes-partial-tiles"),
    pytest.param(19, 6, 20, 1.3, WIDE_ROWS, 256, id="any-alpha-wide-dv-chunks"),
    pytest.param(19, 6, 20, 1.5, WIDE_ROWS, 4, id="v-chunks-wider-than-a-box-through-pointers"),
])
def test_tma_loads_stop_at_the_keys_and_the_features(triton_backend, tiles, monkeypatch, t, d, dv, alpha, tile_set,
                                                     v_box):
    """sm_90's descriptor path on views into NaN-filled buffers: keys past T and features past D and Dv must read as
    zeros (the descriptor's shape), as the masked pointer loads do; forward and gradients against float64. V chunks
    wider than a box (``TMA_MAX_BOX``, here lowered) take pointer loads in the same launch. The backward (whole
    heads) streams Q and dO through descriptors when dO's rows are 16-byte multiples too (a fresh fp32 cotangent:
    Dv a multiple of 4)."""
    tiles(tile_set)
    monkeypatch.setattr(entmax, "TMA_MAX_BOX", triton.language.constexpr(v_box))
    chosen = _launched_as_on_sm90(monkeypatch)
    q, k, v = _views_into_nan(torch.Generator().manual_seed(t * 10 + dv), (1, 2, t, d), (1, 2, t, d), (1, 2, t, dv))
    _check_general_against_reference(q, k, v, causal=True) if alpha != 1.5 else _check_against_reference(q, k, v)
    assert ("_entmax_tau_kernel", True) in chosen and ("_entmax_fwd_kernel", True) in chosen, chosen
    assert ("_entmax_bwd_kernel", dv % 4 == 0) in chosen, chosen


def test_tma_loads_of_packed_sequences_with_grouped_heads(triton_backend, tiles, monkeypatch):
    """Packed query and key sequences of their own lengths, 2 query heads per key head, through descriptors."""
    tiles(TINY)
    chosen = _launched_as_on_sm90(monkeypatch)
    cu_q = torch.tensor([0, 2, 7, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9, 19], dtype=torch.int32)
    q, k, v = _views_into_nan(torch.Generator().manual_seed(6), (4, 10, 8), (2, 19, 8), (2, 19, 4))
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # (rows, heads, n) views
    _check_general_against_reference(q, k, v, True, cu_q=cu_q, cu_k=cu_k)
    assert {("_entmax_tau_kernel", True), ("_entmax_fwd_kernel", True), ("_entmax_bwd_kernel", True)} <= set(chosen), \
        chosen


def test_unaligned_keys_take_pointer_loads_on_sm90(triton_backend, tiles, monkeypatch):
    """K and V 4 bytes past a 16-byte boundary: no descriptor can address them; the threshold and output kernels
    take pointer loads (the backward streams the aligned Q and dO through descriptors)."""
    tiles(TINY)
    chosen = _launched_as_on_sm90(monkeypatch)
    q, k, v = _inputs(1, 1, 11, 8, 8)
    k, v = (torch.randn(1, 1, 11, 9)[..., 1:].requires_grad_() for _ in range(2))
    _check_against_reference(q, k, v)
    assert ("_entmax_tau_kernel", False) in chosen and ("_entmax_fwd_kernel", False) in chosen, chosen
    assert ("_entmax_bwd_kernel", True) in chosen, chosen
