"""Decoding with a KV cache (kernels/kvcache.py): the references against full-sequence computations, the in-place
cache append, and bad input.

Caches hold NaN beyond each batch row's keys (never written), so a key or value the ops should not read shows up.
"""
import entmax
import pytest
import torch

from kernels import block_causal_attention_with_kvcache, entmax_attention_with_kvcache, kvcache, use_backend
from kernels.block_causal import block_causal_attention_reference
from kernels.entmax import entmax15_attention_reference
from kernels.reference import (block_causal_attention_with_kvcache_reference,
                               entmax_attention_with_kvcache_reference)
from kernels.tools import counts


@pytest.fixture(autouse=True)
def seeded(request):
    """Fresh random inputs per test that still reproduce: the seed comes from the test's id, not the run order."""
    torch.manual_seed(sum(request.node.nodeid.encode()))


def decoding_inputs(cache_seqlens, heads, kv_heads, tq, t_max, d=8, dv=6, dtype=torch.float64, append=True):
    """q (B, H, Tq, D); caches (B, Hkv, Tmax, .) with random keys below ``cache_seqlens`` and NaN above;
    new k, v (B, Hkv, Tq, .) when ``append``; ``cache_seqlens`` as an int32 tensor."""
    batch = len(cache_seqlens)
    q = torch.randn(batch, heads, tq, d, dtype=dtype)
    k_cache = torch.full((batch, kv_heads, t_max, d), float("nan"), dtype=dtype)
    v_cache = torch.full((batch, kv_heads, t_max, dv), float("nan"), dtype=dtype)
    for b, length in enumerate(cache_seqlens):
        k_cache[b, :, :length] = torch.randn(kv_heads, length, d, dtype=dtype)
        v_cache[b, :, :length] = torch.randn(kv_heads, length, dv, dtype=dtype)
    k = torch.randn(batch, kv_heads, tq, d, dtype=dtype) if append else None
    v = torch.randn(batch, kv_heads, tq, dv, dtype=dtype) if append else None
    return q, k_cache, v_cache, torch.tensor(cache_seqlens, dtype=torch.int32), k, v


def full_sequence(k_cache, v_cache, cache_seqlens, k, v, b):
    """Batch row b's attended keys and values (Hkv, L, .): its cached ones followed by the new ones."""
    length = int(cache_seqlens[b])
    keys, values = k_cache[b, :, :length], v_cache[b, :, :length]
    if k is not None:
        keys, values = torch.cat([keys, k[b]], dim=1), torch.cat([values, v[b]], dim=1)
    return keys, values


def expected_entmax_rows(q, keys, values, alpha_heads, causal, scale=None):
    """One batch row (H, Tq, Dv) by ``entmax.entmax_bisect`` in float64 on the gathered visible scores."""
    heads, tq, d = q.shape
    groups = heads // keys.shape[0]
    length = keys.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(heads, tq, values.shape[-1], dtype=torch.float64)
    for h in range(heads):
        for i in range(tq):
            seen = length - tq + i + 1 if causal else length
            if seen <= 0:
                continue
            scores = (keys[h // groups, :seen].double() @ q[h, i].double()) * scale
            p = entmax.entmax_bisect(scores[None], alpha=float(alpha_heads[h]), n_iter=100)[0]
            out[h, i] = p @ values[h // groups, :seen].double()
    return out


ALPHAS = [pytest.param(1.25, id="alpha1.25"), pytest.param(1.5, id="alpha1.5"), pytest.param(2.0, id="alpha2"),
          pytest.param("per-head", id="alpha-per-head")]


def alpha_of(alpha, heads):
    if alpha == "per-head":
        return torch.linspace(1.1, 2.0, heads, dtype=torch.float64)
    return alpha


def alpha_heads_of(alpha, heads):
    return alpha if isinstance(alpha, torch.Tensor) else torch.full((heads,), alpha)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("tq, causal, append", [(1, True, True), (3, True, True), (3, False, True), (2, True, False)],
                         ids=["Tq1", "Tq3-causal", "Tq3-noncausal", "Tq2-causal-no-append"])
def test_entmax_reference_matches_entmax_bisect_on_the_gathered_scores(alpha, tq, causal, append):
    cache_seqlens = [0, 5, 9]  # with Tq = 2, causal, no append: row 0 sees no key, row 1's first query neither
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs(cache_seqlens, 4, 2, tq, 12, append=append)
    alpha = alpha_of(alpha, 4)
    expected = [expected_entmax_rows(q[b], *full_sequence(k_cache, v_cache, seqlens, k, v, b),
                                     alpha_heads_of(alpha, 4), causal) for b in range(len(cache_seqlens))]
    out = entmax_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens, k=k, v=v, alpha=alpha, causal=causal)
    assert out.shape == (3, 4, tq, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("tq", [1, 4])
def test_entmax15_reference_is_the_last_rows_of_full_causal_attention(tq):
    """Bottom-right causal alignment: the new queries are the last Tq positions of the whole sequence."""
    cache_seqlens = [3, 7]
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs(cache_seqlens, 4, 2, tq, 11, dtype=torch.float32)
    caches = k_cache.clone(), v_cache.clone()
    out = entmax_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens, k=k, v=v)
    for b, length in enumerate(cache_seqlens):
        keys, values = full_sequence(*caches, seqlens, k, v, b)
        earlier = torch.randn(4, length, q.shape[-1])  # queries of the earlier positions: their rows are dropped
        queries = torch.cat([earlier, q[b]], dim=1)[None]
        full = entmax15_attention_reference(queries, keys.repeat_interleave(2, 0)[None],
                                            values.repeat_interleave(2, 0)[None], causal=True)
        torch.testing.assert_close(out[b], full[0, :, length:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tq, append", [(1, True), (3, True), (3, False)])
def test_block_causal_reference_is_the_last_group_of_full_block_causal_attention(tq, append):
    cache_seqlens = [0, tq, 3 * tq] if append else [tq, 2 * tq, 3 * tq]  # whole groups before the new one
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs(cache_seqlens, 4, 2, tq, 12, append=append)
    caches = k_cache.clone(), v_cache.clone()
    out = block_causal_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens, k=k, v=v)
    for b, length in enumerate(cache_seqlens):
        keys, values = full_sequence(*caches, seqlens, k, v, b)
        attended = keys.shape[1]
        earlier = torch.randn(4, attended - tq, q.shape[-1], dtype=q.dtype)
        queries = torch.cat([earlier, q[b]], dim=1)[None]
        full = block_causal_attention_reference(queries, keys.repeat_interleave(2, 0)[None],
                                                values.repeat_interleave(2, 0)[None], group_size=tq)
        torch.testing.assert_close(out[b], full[0, :, attended - tq:], atol=1e-12, rtol=1e-12)


def test_append_writes_the_new_keys_at_each_rows_length_and_nothing_else():
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs([2, 0, 6], 2, 1, 3, 9)
    before_k, before_v, before_lengths = k_cache.clone(), v_cache.clone(), seqlens.clone()
    block_causal_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens, k=k, v=v)
    assert torch.equal(seqlens, before_lengths)  # the caller advances cache_seqlens
    for b, length in enumerate([2, 0, 6]):
        torch.testing.assert_close(k_cache[b, :, length:length + 3], k[b], rtol=0, atol=0)
        torch.testing.assert_close(v_cache[b, :, length:length + 3], v[b], rtol=0, atol=0)
        for cache, before in ((k_cache, before_k), (v_cache, before_v)):
            untouched = torch.ones(9, dtype=torch.bool)
            untouched[length:length + 3] = False
            torch.testing.assert_close(cache[b, :, untouched], before[b, :, untouched], rtol=0, atol=0,
                                       equal_nan=True)


def test_rows_that_see_no_key_are_zeros():
    q, k_cache, v_cache, seqlens, _, _ = decoding_inputs([0, 1], 2, 2, 3, 4, append=False)
    out = entmax_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # empty cache
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))  # causal: only the last query sees key 0
    torch.testing.assert_close(out[1, :, 2], v_cache[1, :, 0])
    softmax_out = block_causal_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens)
    assert torch.equal(softmax_out[0], torch.zeros_like(softmax_out[0]))
    torch.testing.assert_close(softmax_out[1], v_cache[1, :, :1].expand(-1, 3, -1))


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("reference", torch.bfloat16),
                                            ("triton", torch.float32)])
def test_public_ops_equal_their_references(backend, dtype):
    """The public ops on either backend (the kernels with their default tiles) against the references."""
    inputs = decoding_inputs([1, 4], 4, 2, 2, 8, dtype=dtype)
    for op, reference, extra in ((entmax_attention_with_kvcache, entmax_attention_with_kvcache_reference,
                                  {"alpha": 1.25}),
                                 (block_causal_attention_with_kvcache, block_causal_attention_with_kvcache_reference,
                                  {})):
        q, k_cache, v_cache, seqlens, k, v = (x.clone() if x is not None else None for x in inputs)
        expected = reference(q, k_cache.clone(), v_cache.clone(), seqlens, k=k, v=v, **extra)
        with use_backend(backend):
            out = op(q, k_cache, v_cache, seqlens, k=k, v=v, **extra)
        assert out.dtype == dtype and not out.requires_grad
        torch.testing.assert_close(out, expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def _bad(**changes):
    def make():
        q, k_cache, v_cache, seqlens, k, v = decoding_inputs([1, 2], 4, 2, 2, 5, dtype=torch.float32)
        arguments = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": seqlens, "k": k, "v": v}
        for name, change in changes.items():
            arguments[name] = change(arguments[name])
        return arguments
    return make


BAD_INPUTS = [
    pytest.param(_bad(q=lambda q: q[0]), ValueError, "q must have 4 dimensions", id="q-3d"),
    pytest.param(_bad(q=lambda q: q[:, :3]), ValueError, "Hkv = 2 must divide q's heads H = 3", id="gqa-heads"),
    pytest.param(_bad(k_cache=lambda c: c[..., :4]), ValueError, "k_cache must have shape", id="k_cache-D"),
    pytest.param(_bad(v_cache=lambda c: c[:, :, :4]), ValueError, "v_cache must match k_cache", id="v_cache-T"),
    pytest.param(_bad(v_cache=lambda c: c.half()), TypeError, "v_cache has dtype", id="v_cache-dtype"),
    pytest.param(_bad(cache_seqlens=lambda s: s.long()), TypeError, "cache_seqlens must have dtype int32",
                 id="seqlens-int64"),
    pytest.param(_bad(cache_seqlens=lambda s: s[:1]), ValueError, r"cache_seqlens must have shape \(B,\)",
                 id="seqlens-shape"),
    pytest.param(_bad(cache_seqlens=lambda s: s + 2), ValueError, "must fit the cache", id="cache-too-small"),
    pytest.param(_bad(cache_seqlens=lambda s: s - 2), ValueError, "cache_seqlens must be >= 0", id="seqlens-negative"),
    pytest.param(_bad(v=lambda v: None), ValueError, "k and v must be given together", id="k-without-v"),
    pytest.param(_bad(k=lambda k: k[:, :, :1]), ValueError, r"k must have shape \(B, Hkv, Tq, D\)", id="k-shape"),
    pytest.param(_bad(v=lambda v: v[..., :2]), ValueError, r"v must have shape \(B, Hkv, Tq, Dv\)", id="v-shape"),
]


@pytest.mark.parametrize("make, error, match", BAD_INPUTS)
@pytest.mark.parametrize("op", [entmax_attention_with_kvcache, block_causal_attention_with_kvcache],
                         ids=["entmax", "block-causal"])
def test_bad_inputs_raise_naming_the_argument(op, make, error, match):
    with pytest.raises(error, match=match):
        op(**make())


@pytest.mark.parametrize("alpha, error, match", [
    (1.0, ValueError, r"alpha must lie in \(1, 2\]"), (2.5, ValueError, r"alpha must lie in \(1, 2\]"),
    (True, TypeError, "alpha must be a float"), (torch.full((3,), 1.5), ValueError, r"alpha must be a float or a tensor of shape \(H,\)"),
    (torch.tensor([1.5, 1.5, 0.5, 1.5]), ValueError, r"alpha must lie in \(1, 2\]"),
    (torch.ones(4, dtype=torch.int32), TypeError, "floating-point tensor"),
])
def test_bad_alpha_raises(alpha, error, match):
    arguments = _bad()()
    with pytest.raises(error, match=match):
        entmax_attention_with_kvcache(**arguments, alpha=alpha)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_each_argument_check_runs_once_per_call(monkeypatch, tiny_tiles, backend):
    """The public ops check their arguments once, not again in the reference or the launchers they call."""
    calls = []
    for name in ("_check_kvcache_inputs", "check_alpha", "_check_kernel_arguments"):
        check = getattr(kvcache, name)
        monkeypatch.setattr(kvcache, name, lambda *a, _check=check, _name=name: (calls.append(_name), _check(*a))[1])
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs([1, 2], 2, 1, 1, 4, dtype=torch.float32)
    kernel_checks = ["_check_kernel_arguments"] if backend == "triton" else []
    with use_backend(backend):
        entmax_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, alpha=torch.tensor([1.5, 1.25]))
        assert calls == ["_check_kvcache_inputs", "check_alpha", *kernel_checks]
        calls.clear()
        block_causal_attention_with_kvcache(q, k_cache, v_cache, seqlens + 1, k=k, v=v)
        assert calls == ["_check_kvcache_inputs", *kernel_checks]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("new_dtype", [torch.float32, torch.bfloat16], ids=["fp32-inputs", "bf16-inputs"])
def test_autocast_runs_in_the_caches_dtype(tiny_tiles, backend, new_dtype):
    """Under autocast (bf16 on the CPU) with fp32 caches, q, k, v (fp32, or bf16 as projections under autocast give
    them) are cast to fp32 and the ops compute as without autocast: fp32 outputs equal to the fp32 call's, the
    caches appended alike. Outside autocast, bf16 inputs next to fp32 caches are refused."""
    inputs = decoding_inputs([2, 6], 4, 2, 1, 8, dtype=torch.float32)
    q, k, v = (inputs[i].to(new_dtype) for i in (0, 4, 5))
    for op, extra in ((entmax_attention_with_kvcache, {"alpha": 1.25}), (block_causal_attention_with_kvcache, {})):
        expected_caches = inputs[1].clone(), inputs[2].clone()
        caches = inputs[1].clone(), inputs[2].clone()
        with use_backend(backend):
            expected = op(q.float(), *expected_caches, inputs[3], k=k.float(), v=v.float(), **extra)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = op(q, *caches, inputs[3], k=k, v=v, **extra)
            if new_dtype != torch.float32:
                with pytest.raises(TypeError, match="k_cache has dtype torch.float32 but q has torch.bfloat16"):
                    op(q, *caches, inputs[3], k=k, v=v, **extra)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for cache, wanted in zip(caches, expected_caches):
            torch.testing.assert_close(cache, wanted, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (the interpreter), with tiles small enough for several splits, skipped tiles and the reduction
# ----------------------------------------------------------------------------------------------------------------

TINY_TILES = kvcache.DecodeTiles(block_n=16, block_t=64, num_warps=4, threshold_num_warps=4, tiles_per_split=2)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """16-key tiles, 2 per split, threshold chunks of 64: an 80-key cache spans 3 splits of 5 tiles."""
    monkeypatch.setattr(kvcache, "_TILE_OVERRIDE", TINY_TILES)


def run_both(op, reference, inputs, **options):
    """(op's output on the Triton backend, its caches after the call, the float64 reference, its caches)."""
    q, k_cache, v_cache, seqlens, k, v = inputs
    caches = k_cache.double(), v_cache.double()  # copies
    with use_backend("reference"):
        expected = reference(q.double(), *caches, seqlens, k=None if k is None else k.double(),
                             v=None if v is None else v.double(), **options)
    with use_backend("triton"):
        out = op(q, k_cache, v_cache, seqlens, k=k, v=v, **options)
    return out, (k_cache, v_cache), expected, caches


@pytest.mark.parametrize("alpha, heads, kv_heads, tq, causal", [
    *(pytest.param(alpha, 4, 2, 1, True, id=f"G2-Tq1-{alpha}") for alpha in (1.25, 1.5, 2.0, "per-head")),
    pytest.param(1.5, 2, 1, 3, True, id="G2-Tq3-causal-1.5"),
    pytest.param("per-head", 2, 1, 3, True, id="G2-Tq3-causal-per-head"),
    pytest.param(1.25, 3, 1, 2, False, id="G3-Tq2-noncausal-1.25"),
])
def test_entmax_kernels_match_the_reference(tiny_tiles, alpha, heads, kv_heads, tq, causal):
    inputs = decoding_inputs([0, 37, 80 - tq], heads, kv_heads, tq, 80, dtype=torch.float32)
    inputs[0].mul_(3.0)  # peaked rows: sparse supports, tiles without a nonzero probability
    out, caches, expected, expected_caches = run_both(entmax_attention_with_kvcache,
                                                      entmax_attention_with_kvcache_reference, inputs,
                                                      alpha=alpha_of(alpha, heads), causal=causal)
    assert out.shape == (3, heads, tq, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    for cache, wanted in zip(caches, expected_caches):
        torch.testing.assert_close(cache.double(), wanted, rtol=0, atol=0, equal_nan=True)


def test_kernels_give_zeros_to_rows_that_see_no_key(tiny_tiles):
    """No append: an empty cache sees nothing; with one cached key, causal, only the last of 3 queries sees it."""
    q, k_cache, v_cache, seqlens, _, _ = decoding_inputs([0, 1, 20], 2, 1, 3, 24, dtype=torch.float32, append=False)
    with use_backend("triton"):
        out = entmax_attention_with_kvcache(q, k_cache, v_cache, seqlens, alpha=1.25)
        softmax_out = block_causal_attention_with_kvcache(q, k_cache, v_cache, seqlens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))
    torch.testing.assert_close(out[1, :, 2], v_cache[1, :, 0].expand(2, -1))
    expected = entmax_attention_with_kvcache_reference(q, k_cache, v_cache, seqlens, alpha=1.25)
    torch.testing.assert_close(out[2], expected[2], atol=2e-5, rtol=2e-5)
    assert torch.equal(softmax_out[0], torch.zeros_like(softmax_out[0]))
    torch.testing.assert_close(softmax_out[1], v_cache[1, :, :1].expand(2, 3, -1))


@pytest.mark.parametrize("alpha", [1.1, 1.5, 2.0])
def test_entmax_output_kernel_skips_tiles_without_probability(tiny_tiles, alpha):
    """Keys 16..47 (two whole tiles) score far below the others, so every row of the group gives them probability
    0; their values are NaN, which a loaded V tile would spread (0 * NaN) to the output."""
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs([60, 70], 2, 1, 1, 72, dtype=torch.float32)
    direction = torch.randn(8)
    direction /= direction.norm()
    q.copy_(10 * direction + 0.1 * q)  # scores of the far keys: 35 below the others
    k_cache[:, :, 16:48] = -10 * direction
    v_cache[:, :, 16:48] = float("nan")
    with use_backend("triton"):
        out = entmax_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, alpha=alpha)
    v_cache[:, :, 16:48] = 0.0
    expected = entmax_attention_with_kvcache_reference(q.double(), k_cache.double(), v_cache.double(), seqlens + 1,
                                                       alpha=alpha)  # the call appended k, v
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads, kv_heads, tq, append", [(4, 2, 1, True), (4, 1, 3, True), (2, 2, 2, False)],
                         ids=["G2-Tq1", "G4-Tq3", "G1-Tq2-no-append"])
def test_block_causal_kernels_match_the_reference(tiny_tiles, heads, kv_heads, tq, append):
    inputs = decoding_inputs([0, 33, 77 - tq], heads, kv_heads, tq, 80, dtype=torch.float32, append=append)
    out, caches, expected, expected_caches = run_both(block_causal_attention_with_kvcache,
                                                      block_causal_attention_with_kvcache_reference, inputs)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)
    if not append:
        assert torch.equal(out[0], torch.zeros_like(out[0]))  # an empty cache: no key
    for cache, wanted in zip(caches, expected_caches):
        torch.testing.assert_close(cache.double(), wanted, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_on_16bit_caches_laid_out_time_major(tiny_tiles, dtype):
    """Caches stored (B, Tmax, Hkv, D) as FlashAttention keeps them, passed as (B, Hkv, Tmax, D) views: the
    append writes through the view and the kernels take its strides."""
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs([5, 50], 4, 2, 2, 64, dtype=dtype)
    k_time_major, v_time_major = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    for op, reference in ((entmax_attention_with_kvcache, entmax_attention_with_kvcache_reference),
                          (block_causal_attention_with_kvcache, block_causal_attention_with_kvcache_reference)):
        k_store, v_store = k_time_major.clone(), v_time_major.clone()
        with use_backend("triton"):
            out = op(q, k_store.transpose(1, 2), v_store.transpose(1, 2), seqlens, k=k, v=v)
        expected = reference(q.double(), k_cache.double(), v_cache.double(), seqlens, k=k.double(), v=v.double())
        atol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)
        torch.testing.assert_close(k_store.transpose(1, 2)[1, :, 50:52], k[1], rtol=0, atol=0)


def test_decoding_reads_k_once_and_v_only_at_tiles_with_a_nonzero_probability():
    """Counted in the interpreter (kernels.tools.counts): one decoding step's K loads equal Hkv T D, its V loads Dv
    times the keys of the tiles where some query of the GQA group has p > 0, fewer than all of V; softmax decoding
    reads K and V once."""
    row = counts.count_decode_traffic(160, 4.0, 1, shape=(1, 4, 2, 16))
    assert row["k_loaded"] == row["k_formula"] == 2 * 160 * 16
    assert row["v_loaded"] == row["v_formula"] < row["v_dense"]
    assert row["softmax_k_loaded"] == row["softmax_v_loaded"] == row["v_dense"]


@pytest.mark.parametrize("d, dv", [(20, 36), (16, 8), (5, 17)], ids=["D-Dv-chunked", "D-chunked", "Dv-chunked"])
def test_heads_wider_than_one_tile_go_in_chunks(monkeypatch, d, dv):
    """Heads wider than ``whole_d`` (12 here) in chunks of ``block_d`` (8): D inside the score loops, Dv over the
    grid's third axis, for both decoding ops; partial last chunks included."""
    monkeypatch.setattr(kvcache, "_TILE_OVERRIDE", TINY_TILES._replace(whole_d=12, block_d=8))
    inputs = decoding_inputs([3, 40], 4, 2, 2, 48, d=d, dv=dv, dtype=torch.float32)
    for op, reference, options, atol in (
            (entmax_attention_with_kvcache, entmax_attention_with_kvcache_reference, dict(alpha=1.25), 2e-5),
            (block_causal_attention_with_kvcache, block_causal_attention_with_kvcache_reference, {}, 2e-6)):
        cloned = [None if x is None else x.clone() for x in inputs]
        out, _, expected, _ = run_both(op, reference, cloned, **options)
        assert out.shape == (2, 4, 2, dv)
        torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops and torch.compile: the append mutates the caches (kernels::kvcache_append), the Triton attention
# ops are functional; a decoding step that appends and attends compiles without a graph break
# ----------------------------------------------------------------------------------------------------------------


def decoding_step(q, k_cache, v_cache, seqlens, k, v, alpha):
    """Two appends and attentions, as one step of each op: entmax over the first append, softmax over both."""
    entmax_out = entmax_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, alpha=alpha)
    return entmax_out, block_causal_attention_with_kvcache(q, k_cache, v_cache, seqlens + k.shape[2], k=2 * k,
                                                           v=2 * v)


@pytest.mark.parametrize("backend, compiler, alpha, autocast", [
    ("reference", "eager", 1.5, False), ("reference", "aot_eager", 1.5, False),
    ("reference", "aot_eager", 1.5, True), ("triton", "aot_eager", 1.5, False),
])
def test_decoding_step_compiles_fullgraph(tiny_tiles, backend, compiler, alpha, autocast):
    """Compiled (fullgraph) == eager: the outputs and the caches after the step (written in place in both); with
    ``autocast``, bf16 q, k, v under autocast next to fp32 caches."""
    inputs = decoding_inputs([0, 5, 14], 4, 2, 2, 20, dtype=torch.float32)
    alpha = alpha_of(alpha, 4)
    torch._dynamo.reset()
    compiled = torch.compile(decoding_step, fullgraph=True, backend=compiler)
    results = []
    for fn in (decoding_step, compiled):
        q, k_cache, v_cache, seqlens, k, v = (x.clone() for x in inputs)
        if autocast:
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = fn(q, k_cache, v_cache, seqlens, k, v, alpha)
        results.append((*outs, k_cache, v_cache))
        assert torch.equal(seqlens, inputs[3])
    for eager, compiled_result in zip(*results, strict=True):
        torch.testing.assert_close(compiled_result, eager, rtol=0, atol=0, equal_nan=True)
    assert not torch.isnan(results[0][0]).any() and not torch.isnan(results[0][1]).any()


def test_opcheck_kvcache_ops(tiny_tiles):
    """The schemas (the append's mutated caches), fake implementations and dispatch of the three ops (the
    attention ops' traced dispatch: test_decoding_step_compiles_fullgraph)."""
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs([1, 3], 2, 1, 1, 5, dtype=torch.float32)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()  # opcheck compares outputs with NaN != NaN
    ops = torch.ops.kernels
    torch.library.opcheck(ops.kvcache_append, (k_cache, v_cache, seqlens, k, v))
    lengths = seqlens + 1
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.entmax_attention_with_kvcache_fwd, (q, k_cache, v_cache, lengths, None, 1.5, True, 0.3),
                          test_utils=checks)
    torch.library.opcheck(ops.entmax_attention_with_kvcache_fwd,
                          (q, k_cache, v_cache, lengths, torch.tensor([1.25, 2.0]), 0.0, False, 0.3), test_utils=checks)
    torch.library.opcheck(ops.block_causal_attention_with_kvcache_fwd, (q, k_cache, v_cache, lengths, 0.3),
                          test_utils=checks)


@pytest.mark.parametrize("tq, causal", [(1, True), (3, False)])
def test_references_on_caches_that_the_rows_fill(tq, causal):
    """A stream's call: rows of one length and caches of exactly the attended positions (cache_seqlens + Tq = Tmax,
    the references' paths without masks: a slice append, no mask, SDPA for softmax) gives the float64 expectation,
    as the masked paths over the same keys in a larger NaN-padded cache do; the caches receive k and v."""
    q, k_cache, v_cache, seqlens, k, v = decoding_inputs([5, 5], 4, 2, tq, 5 + tq)
    rows = [full_sequence(k_cache, v_cache, seqlens, k, v, b) for b in range(2)]
    expected_entmax = torch.stack([expected_entmax_rows(q[b], *rows[b], [1.5] * 4, causal) for b in range(2)])
    expected_softmax = torch.stack([(q[b] @ keys.repeat_interleave(2, 0).transpose(-1, -2) * 8 ** -0.5).softmax(-1)
                                    @ values.repeat_interleave(2, 0) for b, (keys, values) in enumerate(rows)])
    for padding in (0, 4):
        caches = [torch.cat([c, torch.full_like(c[:, :, :padding], float("nan"))], dim=2) for c in (k_cache, v_cache)]
        got = entmax_attention_with_kvcache_reference(q, *caches, seqlens, k=k, v=v, alpha=1.5, causal=causal)
        torch.testing.assert_close(got, expected_entmax)
        torch.testing.assert_close(torch.cat([caches[0][:, :, 5:5 + tq], caches[1][:, :, 5:5 + tq]], -1),
                                   torch.cat([k, v], -1))
        got = block_causal_attention_with_kvcache_reference(q, *caches, seqlens, k=k, v=v)
        torch.testing.assert_close(got, expected_softmax)
