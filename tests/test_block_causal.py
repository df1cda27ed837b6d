"""Block-causal attention (kernels/block_causal.py): Triton forward and gradients against the dense
reference on fresh random inputs, packed and padded batches, strided inputs, bad input, and the modules.

Tiny tiles (``forced_tiles(16, 16)``) make T <= 40 span several query and key tiles, so fully visible,
partial and hidden tiles all occur, in the forward and in both backward kernels.
"""
import pytest
import torch
from torch import nn

from kernels import (
    BlockCausalMultiheadAttention,
    BlockCausalTransformerLayer,
    block_causal_attention,
    use_backend,
)
from kernels.block_causal import (
    block_causal_attention_reference,
    block_causal_attention_varlen,
    block_causal_attention_varlen_reference,
    block_causal_mask,
    forced_tiles,
)
from kernels._triton_helpers import tma_eligible

TILE = 16


@pytest.fixture(autouse=True)
def seeded(request):
    """Fresh random inputs per test that still reproduce: the seed comes from the test's id, not the run order."""
    torch.manual_seed(sum(request.node.nodeid.encode()))


def tolerance(dtype, device):
    """(atol, rtol) against a float64 reference. fp32 runs TF32 tensor cores on a GPU (exact in the interpreter);
    fp16/bf16 round P to the input dtype before P @ V and round the output."""
    if dtype == torch.float32:
        return (1e-2, 1e-2) if device.type == "cuda" else (2e-5, 2e-5)
    return {torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}[dtype]


def assert_close(actual, expected, dtype, name):
    atol, rtol = tolerance(dtype, actual.device)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def random_qkv(b, h, t, d, dv, dtype, device="cpu"):
    q, k = (torch.randn(b, h, t, d, dtype=dtype, device=device) for _ in range(2))
    v = torch.randn(b, h, t, dv, dtype=dtype, device=device)
    return q, k, v


def reference_with_grads(q, k, v, do, group_size, scale=None):
    """float64 reference output and (dq, dk, dv) for the same inputs."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = block_causal_attention_reference(q64, k64, v64, group_size=group_size, scale=scale)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), do.double()))


def check_against_reference(q, k, v, group_size, scale=None):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = block_causal_attention(q, k, v, group_size=group_size, scale=scale)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    expected = reference_with_grads(q, k, v, do, group_size, scale)
    assert out.dtype == q.dtype and out.shape == v.shape
    for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_close(actual, wanted, q.dtype, name)


@pytest.mark.parametrize(
    "b, h, t, d, dv, group_size",
    [
        pytest.param(2, 2, 40, 16, 16, 1, id="G1-T40-causal"),
        pytest.param(2, 2, 33, 16, 24, 2, id="G2-T33-Dv24"),
        pytest.param(2, 2, 37, 24, 20, 3, id="G3-T37-D24-Dv20"),
        pytest.param(1, 3, 29, 16, 16, 4, id="G4-T29"),
        pytest.param(1, 2, 40, 8, 8, 7, id="G7-T40"),
        pytest.param(2, 1, 1, 16, 16, 3, id="G3-T1"),
        pytest.param(1, 2, 5, 16, 16, 3, id="G3-T5-one-partial-tile"),
        pytest.param(1, 1, 34, 16, 16, 40, id="G40-larger-than-T"),
    ],
)
def test_matches_reference_fp32(triton_backend, b, h, t, d, dv, group_size):
    with forced_tiles(TILE, TILE):
        check_against_reference(*random_qkv(b, h, t, d, dv, torch.float32), group_size)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_matches_reference_half_precision(triton_backend, dtype):
    with forced_tiles(TILE, TILE):
        check_against_reference(*random_qkv(2, 2, 35, 32, 24, dtype), group_size=3)


@pytest.mark.parametrize(
    "d, dv, dtype",
    [
        pytest.param(65, 100, torch.float32, id="D65-Dv100-fp32"),
        pytest.param(129, 255, torch.float16, id="D129-Dv255-fp16"),
        pytest.param(256, 256, torch.bfloat16, id="D256-Dv256-bf16"),
        pytest.param(256, 3, torch.float32, id="D256-Dv3-fp32"),
    ],
)
def test_wide_and_odd_head_dims_with_default_tiles(triton_backend, d, dv, dtype):
    check_against_reference(*random_qkv(1, 2, 11, d, dv, dtype), group_size=3)


def test_default_tiles_at_model_head_dim(triton_backend):
    """The tiles a GPU launch uses (64 x 64) over several tiles, at the model's head dim."""
    check_against_reference(*random_qkv(1, 2, 150, 64, 64, torch.float16), group_size=3)


def test_hidden_key_tiles_are_never_loaded(triton_backend):
    """With 16-row tiles and G = 3, query tile [0, 16) sees keys < 18: key tile [32, 40) is hidden from it. NaN
    there would reach its rows through any load (even a masked score times a NaN value is NaN in P @ V)."""
    q, k, v = random_qkv(1, 2, 40, 16, 16, torch.float32)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, 32:], v_poisoned[:, :, 32:] = float("nan"), float("nan")
    q = q.requires_grad_()
    with forced_tiles(TILE, TILE):
        out = block_causal_attention(q, k_poisoned, v_poisoned, group_size=3)
        do = torch.randn_like(out)
        (dq,) = torch.autograd.grad(out, q, do)
    expected, expected_dq, _, _ = reference_with_grads(q, k, v, do, group_size=3)
    assert_close(out[:, :, :TILE], expected[:, :, :TILE], torch.float32, "out rows of the first tile")
    assert_close(dq[:, :, :TILE], expected_dq[:, :, :TILE], torch.float32, "dq rows of the first tile")


def peaked_qkv(b, h, t, d, dtype):
    """Sharply peaked scores: each key is its query plus a little noise, scaled so that the diagonal dominates
    (most rows put > 0.99 on one key); dP - delta nearly cancels on those rows."""
    q = torch.randn(b, h, t, d) * 4 / d ** 0.25
    k = q + 0.1 * torch.randn(b, h, t, d) / d ** 0.25
    return q.to(dtype), k.to(dtype), torch.randn(b, h, t, d).to(dtype)


def dense_low_precision_grads(q, k, v, do, group_size):
    """What a dense computation in the inputs' dtype gives (every op in bf16, torch's autograd): the yardstick."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~block_causal_mask(q.shape[-2], group_size), float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return (out, *torch.autograd.grad(out, (q, k, v), do))


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_gradients_on_peaked_scores_as_accurate_as_dense_low_precision(triton_backend, dtype):
    """Against float64, the kernels' output and gradients are within 2x of a dense computation in the same dtype
    (out and dv in bf16: 4x, see below)."""
    # delta = rowsum(P * dP) from the backward's own P and dP makes dS cancel exactly where P is one-hot; the former
    # rowsum(dO * O), O rounded to bf16, was 4.3x worse than dense here on dq and dk in bf16 (0.062 vs 0.015)
    q, k, v = (x.requires_grad_() for x in peaked_qkv(1, 2, 48, 16, dtype))
    do = torch.randn(1, 2, 48, 16).to(dtype)
    with forced_tiles(TILE, TILE):
        out = block_causal_attention(q, k, v, group_size=3)
        ours = (out, *torch.autograd.grad(out, (q, k, v), do))
    dense = dense_low_precision_grads(q, k, v, do, group_size=3)
    exact = reference_with_grads(q, k, v, do, group_size=3)
    for name, mine, yardstick, wanted in zip(("out", "dq", "dk", "dv"), ours, dense, exact):
        relative = lambda x: ((x.double() - wanted).norm() / wanted.norm()).item()  # noqa: E731
        # Triton 3.9's interpreter rounds fp32 -> bf16 toward zero (1 + 2^-8 + 2^-10 -> 1.0; a GPU rounds to
        # nearest), doubling the error of the roundings of P and O behind out and dv: 4x there, in bf16 only
        bound = 4 if dtype == torch.bfloat16 and name in ("out", "dv") else 2
        error, yardstick_error = relative(mine), relative(yardstick)
        assert error <= bound * yardstick_error, f"{name}: {error:.3g} vs dense {yardstick_error:.3g}"


@pytest.mark.parametrize("needed", [pytest.param("q", id="dq-only"), pytest.param("kv", id="dk-dv-only"),
                                    pytest.param("v", id="dv-only"), pytest.param("qk", id="dq-dk")])
def test_only_needed_gradients_are_computed(triton_backend, monkeypatch, needed):
    """Inputs without requires_grad get None, the others the reference's gradients; without k's and v's gradients
    the dK/dV kernel never runs."""
    module = __import__("kernels.block_causal", fromlist=["_"])
    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel.fn.__name__)
            return self.kernel[grid]

    for name in ("block_causal_attn_bwd_dq_kernel", "block_causal_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(module, name, Counted(getattr(module, name)))
    q, k, v = random_qkv(1, 2, 37, 16, 24, torch.float32)
    inputs = {"q": q, "k": k, "v": v}
    for name in needed:
        inputs[name].requires_grad_()
    with forced_tiles(TILE, TILE):
        out = block_causal_attention(q, k, v, group_size=3)
        do = torch.randn_like(out)
        out.backward(do)
    expected = dict(zip("qkv", reference_with_grads(q, k, v, do, group_size=3)[1:]))
    for name, tensor in inputs.items():
        if name in needed:
            assert_close(tensor.grad, expected[name], torch.float32, f"d{name}")
        else:
            assert tensor.grad is None, f"d{name} was not asked for"
    assert launches.count("block_causal_attn_bwd_dq_kernel") == 1  # delta, and dq when asked for
    assert launches.count("block_causal_attn_bwd_dkdv_kernel") == int("k" in needed or "v" in needed)


def test_cross_attention_and_custom_scale(triton_backend):
    """Queries from one sequence (hyperedges), keys and values from another of the same length (nodes)."""
    edges, nodes = torch.randn(2, 30, 32), torch.randn(2, 30, 32)
    w_q, w_k, w_v = torch.randn(3, 32, 32) / 32 ** 0.5
    split = lambda x: x.view(2, 30, 2, 16).transpose(1, 2)
    q, k, v = split(edges @ w_q), split(nodes @ w_k), split(nodes @ w_v)
    with forced_tiles(TILE, TILE):
        check_against_reference(q, k, v, group_size=3, scale=0.7)


def test_strided_inputs(triton_backend):
    """Transposed (B, T, H, D) views, a slice along D and a V whose last dim is not contiguous: no copies needed."""
    b, t, h = 2, 27, 2
    q = torch.randn(b, t, h, 16).transpose(1, 2)
    k = torch.randn(b, h, t, 40)[..., 8:24]
    v = torch.randn(b, h, 12, t).transpose(-1, -2)
    assert not any(x.is_contiguous() for x in (q, k, v))
    with forced_tiles(TILE, TILE):
        check_against_reference(q, k, v, group_size=3)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_packed_varlen_matches_each_sequence(triton_backend, dtype):
    """Forward and gradients of the packed form equal the reference run on each sequence alone."""
    lengths, h, d, dv, group_size = [5, 1, 17, 35], 2, 16, 24, 3
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k = (torch.randn(total, h, d, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(total, h, dv, dtype=dtype, requires_grad=True)
    with forced_tiles(TILE, TILE):
        out = block_causal_attention_varlen(q, k, v, cu_seqlens, group_size=group_size)
        out_total_bound = block_causal_attention_varlen(q, k, v, cu_seqlens, max_seqlen=total, group_size=group_size)
    torch.testing.assert_close(out_total_bound, out, atol=0, rtol=0)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        per_sequence = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
        expected = reference_with_grads(*per_sequence, do[start:end].transpose(0, 1)[None], group_size)
        for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
            assert_close(actual[start:end], wanted[0].transpose(0, 1), dtype, f"{name}[{start}:{end}]")


def test_right_padded_batch_needs_no_mask(triton_backend):
    """Valid rows of a right-padded batch equal the per-sequence result; padded rows stay finite. Lengths are
    multiples of the group (CaM-HG: 3 nodes per utterance); otherwise a last partial group would see padding."""
    lengths, t, h, d = [39, 18, 3], 40, 2, 16
    q, k, v = random_qkv(len(lengths), h, t, d, d, torch.float32)
    with forced_tiles(TILE, TILE):
        out = block_causal_attention(q, k, v, group_size=3)
    assert torch.isfinite(out).all()
    for i, length in enumerate(lengths):
        alone = block_causal_attention_reference(*(x[i:i + 1, :, :length].double() for x in (q, k, v)), group_size=3)
        assert_close(out[i:i + 1, :, :length], alone, torch.float32, f"sequence {i}")


# ----------------------------------------------------------------------------------------------------------------
# TMA (sm_90): the interpreter runs tensor descriptors as a GPU reads them (bounds, zero fill, alignment asserts)
# ----------------------------------------------------------------------------------------------------------------


def launched_as_on(monkeypatch, arch, run_kernels=True):
    """Launches choose their variant as on ``arch`` (``launch_arch``); returns the list of (kernel, USE_TMA) that
    they append to. Without ``run_kernels`` nothing runs (outputs stay uninitialized)."""
    import kernels.block_causal as module

    chosen, launch = [], module.launch

    def recording(kernel, grid, args, kwargs, *rest, **options):
        chosen.append((kernel.fn.__name__, kwargs["USE_TMA"]))
        if run_kernels:
            launch(kernel, grid, args, kwargs, *rest, **options)

    monkeypatch.setattr(module, "launch_arch", lambda device: arch)
    monkeypatch.setattr(module, "launch", recording)
    return chosen


KERNEL_NAMES = ("block_causal_attn_fwd_kernel", "block_causal_attn_bwd_dq_kernel", "block_causal_attn_bwd_dkdv_kernel")


def test_tma_loads_stop_at_the_sequence_and_the_head_dim(triton_backend, monkeypatch):
    """sm_90's descriptor path on views into NaN-filled buffers: rows past T and columns past D must read as zeros
    (the descriptor's shape), as the masked pointer loads do; forward and gradients against float64."""
    chosen = launched_as_on(monkeypatch, "sm_90")
    b, h, t, d = 1, 1, 29, 24
    buffers = [torch.full((b, h, t + 5, 32), float("nan")) for _ in range(3)]
    for buffer in buffers:
        buffer[:, :, :t, :d] = torch.randn(b, h, t, d)
    q, k, v = (buffer[:, :, :t, :d] for buffer in buffers)
    with forced_tiles(TILE, TILE):
        check_against_reference(q, k, v, group_size=3)
    assert chosen == [(name, True) for name in KERNEL_NAMES], chosen


def test_tma_loads_of_packed_sequences(triton_backend, monkeypatch):
    """sm_90's descriptor path on packed fp16 sequences (each descriptor starts at its sequence's first row)."""
    chosen = launched_as_on(monkeypatch, "sm_90")
    lengths, h, d, dv, group_size = [5, 20, 12], 2, 16, 24, 3
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q, k = (torch.randn(total, h, d, dtype=torch.float16, requires_grad=True) for _ in range(2))
    v = torch.randn(total, h, dv, dtype=torch.float16, requires_grad=True)
    with forced_tiles(TILE, TILE):
        out = block_causal_attention_varlen(q, k, v, cu_seqlens, group_size=group_size)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    assert chosen == [(name, True) for name in KERNEL_NAMES], chosen
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        per_sequence = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
        expected = reference_with_grads(*per_sequence, do[start:end].transpose(0, 1)[None], group_size)
        for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
            assert_close(actual[start:end], wanted[0].transpose(0, 1), torch.float16, f"{name}[{start}:{end}]")


def _fp16(*shape):
    return torch.randn(*shape, dtype=torch.float16)


def _off_by_2_bytes(*shape):
    """An fp16 tensor whose address is 2 bytes past a 16-byte boundary."""
    return _fp16(torch.Size(shape).numel() + 1)[1:].view(shape)


@pytest.mark.parametrize("arch, make_qkv, uses_tma", [
    pytest.param("sm_90", lambda: [_fp16(1, 2, 8, 16) for _ in range(3)], (True, True, True), id="sm90-aligned"),
    pytest.param("sm_80", lambda: [_fp16(1, 2, 8, 16) for _ in range(3)], (False, False, False), id="sm80"),
    pytest.param("fallback", lambda: [_fp16(1, 2, 8, 16) for _ in range(3)], (False, False, False),
                 id="fallback-arch"),
    pytest.param("sm_90", lambda: [_fp16(1, 8, 2, 16).transpose(1, 2) for _ in range(3)], (True, True, True),
                 id="sm90-transposed-views"),
    pytest.param("sm_90", lambda: [_fp16(1, 2, 8, 16), _off_by_2_bytes(1, 2, 8, 16), _fp16(1, 2, 8, 16)],
                 (False, False, True), id="sm90-k-unaligned"),  # dK/dV streams q and dO, not k
    pytest.param("sm_90", lambda: [_off_by_2_bytes(1, 2, 8, 16), _fp16(1, 2, 8, 16), _fp16(1, 2, 8, 16)],
                 (True, True, False), id="sm90-q-unaligned"),
    pytest.param("sm_90", lambda: [_fp16(1, 2, 8, 20) for _ in range(3)], (False, False, False),
                 id="sm90-40-byte-rows"),
])
def test_tma_is_chosen_on_sm90_for_aligned_streams(triton_backend, monkeypatch, arch, make_qkv, uses_tma):
    """Which variant each launch picks (nothing runs): TMA on sm_90 when the tiles a kernel streams (forward and
    dQ: K, V; dK/dV: Q, dO) have 16-byte aligned addresses and strides, pointer loads otherwise."""
    chosen = launched_as_on(monkeypatch, arch, run_kernels=False)
    q, k, v = (x.requires_grad_() for x in make_qkv())
    out = block_causal_attention(q, k, v, group_size=3)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert chosen == list(zip(KERNEL_NAMES, uses_tma))


def test_aot_lists_the_tma_variants_that_aligned_sm90_launches_take():
    """Aligned configurations compile with ``USE_TMA`` on sm_90 and without it on sm_80 (the variants aligned launches
    take there); the unaligned defaults without it on both."""
    from kernels.aot import configurations

    configs = configurations("block_causal_attention")
    for config in configs:
        tma = config.constexprs["USE_TMA"]
        assert config.capabilities == ((90,) if tma else config.capabilities) and (not tma or config.divisible)
        assert not config.divisible or (90 in config.capabilities) == tma, config.label
    kinds = {(c.constexprs["USE_TMA"], bool(c.divisible)) for c in configs}
    assert kinds == {(True, True), (False, True), (False, False)}, kinds


def test_tma_eligibility_of_strides_and_addresses():
    """16-byte aligned address, positive 16-byte multiples as strides (of size-1 dims too), unit-stride last dim."""
    x = torch.randn(2, 3, 8, 16)
    assert tma_eligible(x, x.transpose(1, 2), x[:, :, :5, :8], x[:1, :, :1])
    assert not tma_eligible(x[..., 1:])  # address 4 bytes past the boundary
    assert not tma_eligible(x[..., ::2])  # strided last dim
    assert not tma_eligible(torch.randn(2, 3, 8, 18)[..., :16])  # rows of 72 bytes
    assert not tma_eligible(torch.randn(1, 1, 1, 16).as_strided((1, 1, 1, 16), (16, 16, 5, 1)))  # one row of 20 B
    assert not tma_eligible(torch.randn(1, 1, 16).expand(2, 8, 16))  # broadcast rows (stride 0)
    assert not tma_eligible(x, x[..., 1:])  # every tensor must qualify


@pytest.mark.parametrize(
    "change, error, match",
    [
        pytest.param(lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dimensions", id="q-rank"),
        pytest.param(lambda q, k, v: (q, k.half(), v), TypeError, "k has dtype", id="k-dtype-mismatch"),
        pytest.param(lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "q must have dtype",
                     id="float64"),
        pytest.param(lambda q, k, v: (q, k[:, :, :-1], v), ValueError, "k must have q's shape", id="k-shape"),
        pytest.param(lambda q, k, v: (q, k, v[:, :1]), ValueError, "v must have shape", id="v-shape"),
        pytest.param(lambda q, k, v: (q, k, v[:, :, :0]), ValueError, "v is empty", id="empty"),
        pytest.param(lambda q, k, v: (q, k, "v"), TypeError, "v must be a torch.Tensor", id="not-a-tensor"),
        pytest.param(lambda q, k, v: (torch.randn(1, 1, 4, 257),) * 2 + (v[:, :1, :4],), ValueError,
                     "q head dimension must be <= 256", id="D257"),
    ],
)
def test_bad_tensors_raise(triton_backend, change, error, match):
    q, k, v = random_qkv(1, 2, 6, 8, 8, torch.float32)
    with pytest.raises(error, match=match):
        block_causal_attention(*change(q, k, v))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"group_size": 0}, ValueError, "group_size must be >= 1", id="group-0"),
        pytest.param({"group_size": 1.5}, TypeError, "group_size must be an int", id="group-float"),
        pytest.param({"scale": float("nan")}, ValueError, "scale must be finite", id="scale-nan"),
        pytest.param({"scale": "big"}, TypeError, "scale must be a float", id="scale-str"),
    ],
)
def test_bad_options_raise(triton_backend, kwargs, error, match):
    q, k, v = random_qkv(1, 1, 6, 8, 8, torch.float32)
    with pytest.raises(error, match=match):
        block_causal_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "offsets, dtype, error, match",
    [
        pytest.param([1, 4, 9], torch.int32, ValueError, "cu_seqlens must start at 0", id="not-from-0"),
        pytest.param([0, 6, 4, 9], torch.int32, ValueError, "cu_seqlens must be strictly increasing", id="decreasing"),
        pytest.param([0, 4, 4, 9], torch.int32, ValueError, "cu_seqlens must be strictly increasing", id="empty-seq"),
        pytest.param([0, 4, 12], torch.int32, ValueError, "cu_seqlens must end at the packed length 9", id="too-long"),
        pytest.param([0, 4, 8], torch.int32, ValueError, "cu_seqlens must end at the packed length 9", id="too-short"),
        pytest.param([0], torch.int32, ValueError, "cu_seqlens must hold", id="one-offset"),
        pytest.param([0, 4, 9], torch.int64, TypeError, "cu_seqlens must have dtype", id="int64"),
    ],
)
def test_bad_offsets_raise(triton_backend, offsets, dtype, error, match):
    q, k, v = (torch.randn(9, 2, 8) for _ in range(3))
    with pytest.raises(error, match=match):
        block_causal_attention_varlen(q, k, v, torch.tensor(offsets, dtype=dtype))


@pytest.mark.parametrize("offsets, error, match", [
    pytest.param([0, 4, 9], TypeError, "cu_seqlens must be a torch.Tensor, got list", id="list"),
    pytest.param((0, 4, 9), TypeError, "cu_seqlens must be a torch.Tensor, got tuple", id="tuple"),
    pytest.param(torch.tensor([[0, 4, 9]], dtype=torch.int32), ValueError, "cu_seqlens must have 1 dimensions",
                 id="rank-2"),
    pytest.param(torch.tensor([0.0, 4.0, 9.0]), TypeError, "cu_seqlens must have dtype", id="float"),
])
def test_offsets_of_a_wrong_type_raise(triton_backend, offsets, error, match):
    q, k, v = (torch.randn(9, 2, 8) for _ in range(3))
    with pytest.raises(error, match=match):
        block_causal_attention_varlen(q, k, v, offsets)


@pytest.mark.parametrize("validate", [None, False])
def test_non_contiguous_offsets_read_their_own_values(triton_backend, validate):
    torch.manual_seed(7)
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    strided = torch.tensor([0, 99, 4, 99, 10], dtype=torch.int32)[::2]  # offsets [0, 4, 10], stride 2
    assert not strided.is_contiguous()
    out = block_causal_attention_varlen(q, k, v, strided, validate=validate)
    expected = block_causal_attention_varlen_reference(q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_varlen_bad_max_seqlen_and_shapes_raise(triton_backend):
    q, k, v = (torch.randn(9, 2, 8) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        block_causal_attention_varlen(q, k, v, cu_seqlens, max_seqlen=0)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        block_causal_attention_varlen(q[None], k, v, cu_seqlens)



# a sequence of 60 rows under a max_seqlen of 16: the grid, sized by max_seqlen, reaches 16-row tiles only
SHORT_BOUND_OFFSETS = [0, 60, 63]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_max_seqlen_below_the_longest_sequence_raises_on_checked_offsets(backend):
    q, k, v = (torch.randn(63, 1, 8) for _ in range(3))
    cu_seqlens = torch.tensor(SHORT_BOUND_OFFSETS, dtype=torch.int32)
    module = BlockCausalMultiheadAttention(8, 1, group_size=1)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"max_seqlen \(16\) is below the longest sequence \(60\)"):
            block_causal_attention_varlen(q, k, v, cu_seqlens, group_size=1, max_seqlen=16)
        with pytest.raises(ValueError, match=r"max_seqlen \(16\) is below the longest sequence \(60\)"):
            module(q[:, 0], cu_seqlens=cu_seqlens, max_seqlen=16)
        block_causal_attention_varlen(q, k, v, cu_seqlens, group_size=1, max_seqlen=60)  # the exact bound passes


def _zero_filled(allocate):
    def zeros(*args, **kwargs):
        return allocate(*args, **kwargs).zero_()
    return zeros


def test_max_seqlen_below_the_longest_sequence_poisons_unreached_rows(triton_backend, monkeypatch):
    """Unchecked offsets (GPU offsets, or ``validate=False``): the rows and keys the grid cannot reach come back
    NaN in the output and every gradient, never stale memory; the reached rows and the other sequences are right."""
    # unwritten memory reads as zeros here (not the NaN poison): only the kernels' own NaN can pass
    monkeypatch.setattr(torch, "empty_like", _zero_filled(torch.empty_like))
    monkeypatch.setattr(torch, "empty", _zero_filled(torch.empty))
    q, k, v = (torch.randn(63, 1, 8, requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor(SHORT_BOUND_OFFSETS, dtype=torch.int32)
    reached = 16  # one tile of the grid's 16-row tiles
    with forced_tiles(TILE, TILE):
        out = block_causal_attention_varlen(q, k, v, cu_seqlens, group_size=1, max_seqlen=16, validate=False)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected_out = block_causal_attention_varlen_reference(q64, k64, v64, cu_seqlens, group_size=1)
    expected = (expected_out, *torch.autograd.grad(expected_out, (q64, k64, v64), do.double()))
    for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert actual[reached:60].isnan().all(), f"{name}: rows past the grid must be NaN"
        assert_close(actual[60:], wanted[60:], torch.float32, f"{name} of the second sequence")
    for name, actual, wanted in zip(("out", "dq"), (out, grads[0]), expected[:2]):
        assert_close(actual[:reached], wanted[:reached], torch.float32, f"{name} of the reached rows")


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the dq NaN below
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_key_with_minus_infinite_scores_gets_zero_gradients(backend, layout):
    """A key that every query scores -inf has probability 0: dk and dv of it are 0 on every path, not NaN (rows
    past a tile's end once multiplied its -inf by their zero-filled q)."""
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    q[..., 0] = 1.0
    k[0, 0, 3, 0] = float("-inf")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with use_backend(backend), forced_tiles(4, 4):  # 6 rows: a full and a partial tile
        if layout == "padded":
            out = block_causal_attention(q, k, v, group_size=1)
        else:
            cu_seqlens = torch.tensor([0, 6], dtype=torch.int32)
            out = block_causal_attention_varlen(*(x[0].transpose(0, 1) for x in (q, k, v)), cu_seqlens,
                                                group_size=1).transpose(0, 1)[None]
        do = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    expected_out, expected_dq, expected_dk, expected_dv = reference_with_grads(q, k, v, do, 1)
    assert_close(out, expected_out, torch.float32, "out")
    assert (dk[0, 0, 3] == 0).all() and (dv[0, 0, 3] == 0).all()
    for name, actual, wanted in (("dk", dk, expected_dk), ("dv", dv, expected_dv)):
        assert_close(actual, wanted, torch.float32, name)
    # dq's feature 0 multiplies the -inf by a zero probability in the reference too (NaN); the rest agrees
    torch.testing.assert_close(dq.double(), expected_dq, atol=2e-5, rtol=2e-5, equal_nan=True)


# ------------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("arguments, match", [
    pytest.param(dict(embed_dim=8, num_heads=0), "positive multiple of num_heads", id="zero-heads"),
    pytest.param(dict(embed_dim=8, num_heads=3), "positive multiple of num_heads", id="heads-not-dividing"),
    pytest.param(dict(embed_dim=8, num_heads=2, dropout=1.0), "dropout must be in", id="dropout"),
    pytest.param(dict(embed_dim=8, num_heads=2, group_size=0), "group_size", id="group-size"),
])
def test_module_bad_arguments_raise(arguments, match):
    with pytest.raises(ValueError, match=match):
        BlockCausalMultiheadAttention(**arguments)


@pytest.mark.parametrize("bias", [pytest.param(True, id="bias"), pytest.param(False, id="no-bias")])
def test_module_loads_both_ways_with_nn_multihead_attention(triton_backend, bias):
    e, h, t, group_size = 32, 2, 13, 3
    ours = BlockCausalMultiheadAttention(e, h, group_size=group_size, bias=bias)
    torch_mha = nn.MultiheadAttention(e, h, batch_first=True, bias=bias)
    assert ours.state_dict().keys() == torch_mha.state_dict().keys()
    hidden = ~block_causal_mask(t, group_size)
    x, context = torch.randn(2, t, e), torch.randn(2, t, e)
    for source, target in ((torch_mha, ours), (ours, torch_mha)):
        for p in source.parameters():
            nn.init.normal_(p, std=0.2)
        target.load_state_dict(source.state_dict())
        for key_value in (x, context):
            expected = torch_mha(x, key_value, key_value, attn_mask=hidden, need_weights=False)[0]
            assert_close(ours(x, key_value)[0], expected, torch.float32, "module output")


def test_module_packed_equals_padded(triton_backend):
    e, h, lengths = 32, 2, [9, 12]  # multiples of the group, as padding needs
    module = BlockCausalMultiheadAttention(e, h, group_size=3)
    padded = torch.randn(len(lengths), max(lengths), e)
    packed = torch.cat([padded[i, :length] for i, length in enumerate(lengths)])
    cu_seqlens = torch.tensor([0, 9, 21], dtype=torch.int32)
    out_packed, _ = module(packed, cu_seqlens=cu_seqlens)
    out_padded, _ = module(padded)
    # max_seqlen (what a GPU batch passes to size the grid without a host sync) changes nothing but the grid
    torch.testing.assert_close(module(packed, cu_seqlens=cu_seqlens, max_seqlen=12)[0], out_packed, atol=0, rtol=0)
    for i, (start, length) in enumerate(zip([0, 9], lengths)):
        assert_close(out_packed[start:start + length], out_padded[i, :length], torch.float32, f"sequence {i}")


@pytest.mark.parametrize("norm_first", [pytest.param(False, id="post-norm"), pytest.param(True, id="pre-norm")])
def test_transformer_layer_matches_reference_backend(triton_backend, norm_first):
    """Self-attention, cross-attention (eq. 10) and the packed form give the reference backend's outputs and
    input gradients."""
    layer = BlockCausalTransformerLayer(32, 2, dim_feedforward=48, dropout=0.0, group_size=3, norm_first=norm_first)
    x, context = torch.randn(2, 10, 32, requires_grad=True), torch.randn(2, 10, 32)
    cu_seqlens = torch.tensor([0, 10, 20], dtype=torch.int32)
    calls = {
        "self": lambda: layer(x),
        "cross": lambda: layer(x, context),
        "packed": lambda: layer(x.flatten(0, 1), context.flatten(0, 1), cu_seqlens=cu_seqlens,
                                max_seqlen=10).view(2, 10, 32),
    }
    for name, call in calls.items():
        out = call()
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        with use_backend("reference"):
            expected = call()
            (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        assert_close(out, expected, torch.float32, f"{name} output")
        assert_close(grad, expected_grad, torch.float32, f"{name} grad")


def test_module_attention_dropout_trains_and_is_off_in_eval(triton_backend):
    module = BlockCausalMultiheadAttention(16, 2, group_size=3, dropout=0.5)
    x = torch.randn(1, 9, 16)
    torch.manual_seed(0)
    first, _ = module(x)
    torch.manual_seed(1)
    assert not torch.allclose(first, module(x)[0]), "dropout > 0 in training must change the output"
    module.eval()
    expected = BlockCausalMultiheadAttention(16, 2, group_size=3)
    expected.load_state_dict(module.state_dict())
    assert_close(module(x)[0], expected(x)[0], torch.float32, "eval output")
