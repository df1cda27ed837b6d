"""The interpreter counter of ``kernels.tools.counts`` on purpose-written kernels whose counts follow from the launch, the
K-traffic ratio against an independently computed flash-attention pass, and ``tau_solver_passes`` (the PyTorch mirror
of the entmax threshold solver) against the kernel's own count of its passes over K.
"""
import json

import pytest
import torch
import triton
import triton.language as tl

from kernels import entmax
from kernels.tools import counts
from kernels.tools.counts import InterpreterCounter
from kernels.entmax import Tiles, tau_solver_passes

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]


@triton.jit
def _copy_kernel(x, y, out, n, BLOCK: tl.constexpr):
    """out[i] = x[i] (masked) + y[i % BLOCK] (unmasked, y holds BLOCK elements)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b_x = tl.load(x + o, mask=o < n, other=0.0)
    b_y = tl.load(y + tl.arange(0, BLOCK))
    tl.store(out + o, b_x + b_y, mask=o < n)


@triton.jit
def _matmul_kernel(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c (M, N) = a (M, K) @ b (K, N), all contiguous, one BM x BN tile per program, K in chunks of BK."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_a = tl.load(a + o_m[:, None] * K + o_k[None, :], mask=(o_m[:, None] < M) & (o_k[None, :] < K), other=0.0)
        b_b = tl.load(b + o_k[:, None] * N + o_n[None, :], mask=(o_k[:, None] < K) & (o_n[None, :] < N), other=0.0)
        acc += tl.dot(b_a, b_b, input_precision="ieee")
    tl.store(c + o_m[:, None] * N + o_n[None, :], acc, mask=(o_m[:, None] < M) & (o_n[None, :] < N))


@triton.jit
def _causal_key_reader(k, out, T, D, PASSES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Reads, PASSES times, every key row that query tile ``program_id(0)`` (BM rows) sees causally; stores a sum."""
    i_m = tl.program_id(0)
    hi = tl.minimum((i_m + 1) * BM, T)
    total = tl.zeros([BN, BD], dtype=tl.float32)
    for _ in range(PASSES):
        for n0 in range(0, hi, BN):
            o_n = n0 + tl.arange(0, BN)
            o_d = tl.arange(0, BD)
            total += tl.load(k + o_n[:, None] * D + o_d[None, :], mask=(o_n[:, None] < hi) & (o_d[None, :] < D),
                             other=0.0)
    tl.store(out + i_m, tl.sum(tl.sum(total, 1), 0))


def test_counts_masked_and_unmasked_loads_per_program():
    n, block = 45, 16
    x, y, other = torch.randn(n), torch.randn(block), torch.randn(n)
    out = torch.empty(n)
    with InterpreterCounter({"x": x, "y": y, "other": other}, track_distinct=True) as counter:
        _copy_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    torch.testing.assert_close(out, x + y.repeat(triton.cdiv(n, block))[:n])
    (launch,) = counter.launches
    programs = triton.cdiv(n, block)
    assert launch.kernel == "_copy_kernel" and launch.grid == (programs, 1, 1)
    for i in range(programs):
        assert launch.loads[(i, 0, 0)]["x"] == min(block, n - i * block)  # masked-off lanes do not count
        assert launch.loads[(i, 0, 0)]["y"] == block
        assert launch.distinct_loaded((i, 0, 0), "y") == block
    assert counter.loaded("x") == n and counter.loaded("y") == programs * block
    assert counter.loaded("other") == 0 and counter.dot_flops() == 0


def test_counts_only_the_span_of_a_view():
    n, block = 40, 16
    base, y = torch.randn(n + 10), torch.randn(block)
    x = base[10:]  # the kernel reads x; watching base[:10] must see nothing, base[10:20] exactly 10 elements
    out = torch.empty(n)
    with InterpreterCounter({"head": base[:10], "window": base[10:20]}) as counter:
        _copy_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    assert counter.loaded("head") == 0 and counter.loaded("window") == 10


@pytest.mark.parametrize("m, n, k, bm, bn, bk", [(37, 20, 24, 16, 8, 16), (8, 8, 8, 8, 8, 8)])
def test_counts_dot_flops_and_tile_loads(m, n, k, bm, bn, bk):
    a, b = torch.randn(m, k), torch.randn(k, n)
    c = torch.empty(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    with InterpreterCounter({"a": a, "b": b}) as counter:
        _matmul_kernel[grid](a, b, c, m, n, k, BM=bm, BN=bn, BK=bk)
    torch.testing.assert_close(c, a @ b)
    chunks = triton.cdiv(k, bk)
    assert counter.dot_flops("_matmul_kernel") == grid[0] * grid[1] * chunks * 2 * bm * bn * bk
    # every program reads its row block of a and column block of b once
    assert counter.loaded("a") == grid[1] * m * k and counter.loaded("b") == grid[0] * k * n


def test_nested_counters_both_count_and_hooks_are_removed_on_exit():
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__
    n, block = 20, 16
    x, y, out = torch.randn(n), torch.randn(block), torch.empty(n)
    with InterpreterCounter({"x": x}) as outer:
        with InterpreterCounter({"x": x}) as inner:
            _copy_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
        assert "create_masked_load" in vars(interpreter.interpreter_builder)  # the outer hook is back
        _copy_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    assert inner.loaded("x") == n and outer.loaded("x") == 2 * n
    assert "create_masked_load" not in vars(interpreter.interpreter_builder)
    assert "create_dot" not in vars(interpreter.interpreter_builder)
    assert interpreter.GridExecutor.__call__ is call


def test_rejects_bad_tensors():
    with pytest.raises(TypeError, match="tensors\\['k'\\]"):
        InterpreterCounter({"k": [1.0]})


@pytest.mark.parametrize("t, block_m", [(1, 64), (63, 64), (64, 64), (150, 64), (37, 8)])
def test_flash_attention_denominator(t, block_m):
    d = 3
    sees = torch.ones(t, t, dtype=torch.bool).tril()  # query i sees key j <= i
    tiles = triton.cdiv(t, block_m)
    expected = sum(int(sees[i * block_m:(i + 1) * block_m].any(dim=0).sum()) for i in range(tiles)) * d
    assert counts.flash_attention_k_elements(t, d, block_m=block_m) == expected
    assert counts.flash_attention_k_elements(t, d, block_m=block_m, causal=False) == tiles * t * d


@pytest.mark.parametrize("group_size", [None, 1, 3])
def test_visible_scores(group_size):
    t = 17
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    sees = (j <= i) if group_size is None else (j // group_size <= i // group_size)
    assert counts.visible_scores(t, group_size=group_size) == int(sees.sum())


@pytest.mark.parametrize("passes", [1, 3])
def test_k_traffic_ratio_counts_passes_of_a_flash_reader(passes):
    """A kernel that reads each visible key of each 64-row query tile ``passes`` times has ratio ``passes``."""
    t, d = 150, 5

    def reader(q, k, v):
        out = torch.empty(triton.cdiv(t, counts.FA_BLOCK_M))
        _causal_key_reader[(out.numel(),)](k, out, t, d, PASSES=passes, BM=counts.FA_BLOCK_M, BN=16, BD=8)

    q, k, v = counts.sample_qkv(t, d, d, 1.0, seed=0)
    result = counts.count_forward_k_traffic(reader, q, k, v)
    sees = torch.ones(t, t, dtype=torch.bool).tril()
    fa = sum(int(sees[i:i + 64].any(dim=0).sum()) * d for i in range(0, t, 64))
    assert result["fa_k_elements"] == fa
    assert result["k_elements"] == passes * fa and result["ratio"] == passes
    assert result["per_kernel"] == {"_causal_key_reader": passes * fa}


#: rows of up to 8 keys in registers (4-row tiles), longer rows in passes over 8 x 8 tiles
TINY = Tiles(block_m=8, block_n=8, block_d=8, block_dv=8, row_block_m=4, row_block_n=8)
#: 8-row query tiles over 4-key tiles
SKEWED = Tiles(block_m=8, block_n=4, block_d=4, block_dv=4, row_block_m=8, row_block_n=8)


_SOLVER_CASES = [
    pytest.param(2, 7, True, TINY, id="B2-T7-in-registers"),
    pytest.param(2, 27, True, TINY, id="B2-T27-passes"),
    pytest.param(1, 19, False, SKEWED, id="T19-passes-not-causal-BM8-BN4"),
    pytest.param(2, 27, True, TINY._replace(tau_block_m=16), id="B2-T27-passes-16-row-programs"),
]


@pytest.mark.parametrize("q_scale, seed, b, t, causal, tile_set", [
    pytest.param(q_scale, seed, *case.values, id=f"{case.id}-q{q_scale:g}")
    for case in _SOLVER_CASES[:2] for q_scale, seed in counts.DISTRIBUTIONS
] + [pytest.param(4.0, 3, *case.values, id=f"{case.id}-q4") for case in _SOLVER_CASES[2:]])
def test_tau_solver_passes_equal_the_kernels_count(monkeypatch, triton_backend, q_scale, seed, b, t, causal,
                                                   tile_set):
    """The mirror equals the threshold kernel's own count: per query-tile program, the K elements it loaded divided
    by the distinct K elements it loaded (how many times it read its keys)."""
    monkeypatch.setattr(entmax, "_TILE_OVERRIDE", tile_set)
    h, d = 1, 6
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=generator) * q_scale
    k, v = torch.randn(b, h, t, d, generator=generator), torch.randn(b, h, t, d, generator=generator)
    with torch.no_grad(), InterpreterCounter({"k": k}, track_distinct=True) as counter:
        entmax.entmax15_attention(q, k, v, causal=causal)
    counted = counts.counted_solver_passes(counter, "_entmax_tau_kernel")
    block_m, block_n = counts.solver_tiles(t)
    mirror = tau_solver_passes(q, k, causal=causal, block_m=block_m, block_n=block_n)
    assert mirror.shape == (b, h, triton.cdiv(t, block_m)) and mirror.dtype == torch.int64
    # the threshold kernel's grid is (query tiles, B * H)
    kernel = torch.tensor([[counted[(i_m, i_bh, 0)] for i_m in range(mirror.shape[-1])] for i_bh in range(b * h)])
    torch.testing.assert_close(mirror.view(b * h, -1).double(), kernel.double(), atol=0, rtol=0)


def test_tau_solver_passes_rejects_bad_input():
    q = torch.randn(1, 1, 9, 4)
    with pytest.raises(ValueError, match="k must have"):
        tau_solver_passes(q, torch.randn(1, 1, 8, 4))
    with pytest.raises(TypeError, match="block_m"):
        tau_solver_passes(q, q, block_m=8.0)
    with pytest.raises(ValueError, match="block_n"):
        tau_solver_passes(q, q, block_n=0)


def test_flops_per_score_of_the_real_kernels_cover_the_minimum(monkeypatch):
    """Counted dot FLOPs of both ops, forward and backward, are at least the minimum for their visible scores."""
    monkeypatch.setattr(entmax, "_TILE_OVERRIDE", TINY)
    t = 11
    rows = counts.flops_per_score_rows(t, [("tiny", 6, 5)], [("tiny", 6, 5)])
    assert [row["op"] for row in rows] == ["entmax15_attention", "block_causal_attention (group 3)"]
    for row in rows:
        assert row["visible_scores"] == counts.visible_scores(t, group_size=3 if "block" in row["op"] else None)
        assert row["inference_per_score"] >= row["minimum_forward_per_score"] == 2 * (6 + 5)
        assert row["backward_per_score"] >= row["minimum_backward_per_score"] == 2 * (3 * 6 + 2 * 5)
        by_kernel = row["flops"]["inference_by_kernel"]
        assert sum(by_kernel.values()) == row["flops"]["inference"] and all(by_kernel.values())
    assert set(rows[0]["flops"]["inference_by_kernel"]) == {"_entmax_tau_kernel", "_entmax_fwd_kernel"}


def test_command_writes_its_report(monkeypatch, tmp_path, capsys):
    """``python -m kernels.tools.counts --quick --out DIR`` at tiny sizes: tables printed, markdown and JSON written, and
    the K traffic equal to a direct count."""
    tiny = counts.Settings(traffic_lengths=(64,), solver_lengths=(70,), support_lengths=(200,), flops_length=9,
                           head_dim=16, entmax_head_dims=(("tiny", 4, 3),), block_causal_head_dims=(("tiny", 4, 3),))
    monkeypatch.setattr(counts, "QUICK", tiny)
    monkeypatch.setattr(counts, "DISTRIBUTIONS", counts.DISTRIBUTIONS[:1])
    report = counts.main(["--quick", "--out", str(tmp_path)])
    (markdown,) = tmp_path.glob("*.md")
    (saved,) = tmp_path.glob("*.json")
    assert markdown.read_text().strip() in capsys.readouterr().out
    assert json.loads(saved.read_text())["k_traffic"] == json.loads(json.dumps(report["k_traffic"]))
    (row,) = report["k_traffic"]
    direct = counts.count_forward_k_traffic(counts._ours, *counts.sample_qkv(64, 16, 16, 1.0, 0))
    assert row["ours"]["ratio"] == direct["ratio"] and row["ours"]["mirror_equals_kernel"]
    (support,) = report["support_tiles"]
    assert 0 < support["with_support"] <= support["visited"] <= 1
    if counts.adasplash_status()[0] is not None:  # the peer ran (T = 64 is AdaSplash-2's shortest length)
        assert row["adasplash2"]["ratio"] >= 1


#: 32-row query tiles over 32-key mask tiles (16-feature chunks): T = 64 streams keys in several passes
ALPHA_TILES = Tiles(block_m=32, block_n=32, block_d=16, block_dv=16, row_block_m=8, row_block_n=16)


@pytest.mark.parametrize("alpha", [1.25, 2.0])
def test_any_alpha_forward_k_traffic_is_at_most_five_flash_passes(monkeypatch, alpha):
    """The GENERAL kernels' forward (row max, bracketing solver passes, output) loads K at most 5 times what one
    flash pass with the same query tiles loads, on every q distribution."""
    monkeypatch.setattr(entmax, "_TILE_OVERRIDE", ALPHA_TILES)
    for q_scale, seed in counts.DISTRIBUTIONS:
        q, k, v = counts.sample_qkv(64, 16, 16, q_scale, seed)
        result = counts.count_forward_k_traffic(counts.ours_at(alpha), q, k, v, block_m=ALPHA_TILES.block_m)
        assert set(result["per_kernel"]) == {"_entmax_tau_kernel", "_entmax_fwd_kernel"}
        assert 1 <= result["ratio"] <= 5, (q_scale, result)
