"""Per-architecture autotune candidates (``kernels._autotune``): the lists of block-causal attention, entmax
attention and the MoE, the default under the interpreter, ``KERNELS_AUTOTUNE``, and what the ahead-of-time compile
lists."""
import importlib

import pytest
import torch
import triton
import triton.language as tl

from kernels import _autotune
from kernels._autotune import ARCHS, FALLBACK, autotune_enabled, launch, launch_arch, pick, recording_choices
from kernels.aot import configurations

bc = importlib.import_module("kernels.block_causal")
moe = importlib.import_module("kernels.moe")
em = importlib.import_module("kernels.entmax")


@triton.jit
def _write_block(out, BLOCK: tl.constexpr):
    tl.store(out + tl.arange(0, 16), tl.full([16], BLOCK, tl.int32))


CANDIDATES = [triton.Config({"BLOCK": 32}, num_warps=2, num_stages=1), triton.Config({"BLOCK": 64}, num_warps=4)]


def test_interpreter_launches_the_default_candidate_without_tuning():
    out = torch.zeros(16, dtype=torch.int32)
    before = dict(_autotune._tuners)
    with recording_choices() as picks:
        for _ in range(2):
            launch(_write_block, lambda meta: (1,), (out,), {}, CANDIDATES, device=out.device, bucket=(16,))
    assert out.eq(32).all()  # BLOCK of the first candidate
    assert picks == [] and _autotune._tuners == before  # nothing timed, no tuner made


def test_kernels_autotune_variable(monkeypatch):
    monkeypatch.delenv("KERNELS_AUTOTUNE", raising=False)
    assert autotune_enabled()
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")
    assert not autotune_enabled()
    monkeypatch.setenv("KERNELS_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="KERNELS_AUTOTUNE must be 0 or 1"):
        autotune_enabled()


def test_cpu_launches_take_the_sm80_list_and_fallback_too():
    assert launch_arch(torch.device("cpu")) == "sm_80"
    per_arch = {"sm_80": CANDIDATES, "sm_90": CANDIDATES[::-1]}
    assert pick(per_arch, "sm_90") == CANDIDATES[::-1]
    assert pick(per_arch, FALLBACK) == CANDIDATES  # checked to fit at the first launch (fitting_config)


def _pipeline_bytes(config: triton.Config) -> int:
    """A 16-bit GEMM tile's shared memory: num_stages buffers of its [BM, BK] and [BK, BN] operand tiles."""
    kwargs = config.kwargs
    return max(config.num_stages, 1) * 2 * kwargs["BK"] * (kwargs["BM"] + kwargs["BN"])


@pytest.mark.parametrize("capability", sorted(set(_autotune.SHARED_MEMORY_PER_BLOCK) - {80, 90}))
def test_fallback_gpus_launch_the_first_candidate_that_fits_their_shared_memory(capability):
    """sm_75 (64 KB per block), 8.6 / 8.9 and 12.x (99 KB), 10.x (227 KB): the MoE's sm_80 candidates sized as their
    operand pipelines; the chosen one fits, and it is the first in ``fallback_order`` that does."""
    limit = _autotune.SHARED_MEMORY_PER_BLOCK[capability]
    candidates = moe._kernel_candidates("grouped_matmul", moe.TILES[("sm_80", torch.float16)])
    chosen = _autotune.fitting_config(candidates, _pipeline_bytes, limit)
    order = _autotune.fallback_order(candidates)
    assert _pipeline_bytes(chosen) <= limit
    assert all(_pipeline_bytes(config) > limit for config in order[:order.index(chosen)])


def test_fallback_tries_one_stage_last_and_says_when_nothing_fits():
    big = triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4)
    small = triton.Config({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=3)
    assert [c.num_stages for c in _autotune.fallback_order([big, small])] == [4, 3, 1, 1]
    # 4 stages of the big tile: 256 KB, one stage: 64 KB; the small tile: 24 KB in 3 stages
    assert _autotune.fitting_config([big, small], _pipeline_bytes, 100 * 1024) == small
    one_stage = _autotune.fitting_config([big], _pipeline_bytes, 64 * 1024)
    assert (one_stage.kwargs, one_stage.num_warps, one_stage.num_stages) == (big.kwargs, 8, 1)
    with pytest.raises(ValueError, match="no launch configuration fits this GPU's 1024 B"):
        _autotune.fitting_config([big, small], _pipeline_bytes, 1024)


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dq", "bwd_dkdv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_d", [64, 128, 256])
def test_block_causal_candidates_per_architecture(kernel, dtype, block_d):
    for arch in ARCHS:
        listed = bc._candidates(kernel, dtype, block_d, arch)
        assert listed and len(set(map(str, listed))) == len(listed), listed  # no duplicates
        table = bc._CANDIDATE_TILES[(kernel, dtype == torch.float32, block_d)]
        assert listed[0] == table[arch][0].config()  # the default is the table's first entry
    assert bc._candidates(kernel, dtype, block_d, FALLBACK) == bc._candidates(kernel, dtype, block_d, "sm_80")
    q = torch.zeros(1, 1, 4, 8, dtype=dtype)
    assert bc._launch_candidates(kernel, q, block_d) == bc._candidates(kernel, dtype, block_d, "sm_80")


def test_ieee_fp32_launches_only_the_default(monkeypatch):
    monkeypatch.setenv("KERNELS_FP32_PRECISION", "ieee")
    q = torch.zeros(1, 1, 4, 8)
    assert bc._launch_candidates("fwd", q, 64) == bc._candidates("fwd", torch.float32, 64, "sm_80")[:1]
    assert moe._launch_tiles(q) == moe.TILES[("sm_80", torch.float32)][:1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moe_candidates_per_architecture(dtype):
    for arch in ARCHS:
        tiles = moe.TILES[(arch, dtype)]
        assert len(tiles) > 1
        for kind in ("route", "grouped_matmul", "grouped_wgrad", "combine", "router_grad", "aux_loss"):
            configs = moe._kernel_candidates(kind, tiles)
            assert configs[0].num_warps == tiles[0].num_warps and configs[0].kwargs["BM"] in (
                tiles[0].block_m, tiles[0].block_rows)
            assert len(set(map(str, configs))) == len(configs)
    assert moe._launch_tiles(torch.zeros(2, 2, dtype=dtype)) == moe.TILES[("sm_80", dtype)]


@pytest.mark.parametrize("kernel", ["tau registers", "tau passes", "fwd", "fwd wide", "bwd", "bwd chunked",
                                    "tau registers general", "tau passes general", "fwd general", "fwd wide general"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_entmax_candidates_per_architecture(kernel, dtype):
    tiles = em._DEFAULT_TILES[dtype]
    constexprs = {"BM": 16, "BN": 16, "BDV": 512}
    for arch in ARCHS:
        listed = em._candidates(kernel, dtype, constexprs, arch)
        # any alpha's fp32 threshold passes on sm_80 keep their default alone (the others spill)
        assert len(listed) > 1 or (kernel, dtype, arch) == ("tau passes general", torch.float32, "sm_80"), listed
        assert len(set(map(str, listed))) == len(listed), listed
        warps, stages, *cap = em._default_options(kernel, tiles)
        assert (listed[0].num_warps, listed[0].num_stages) == (warps, stages)
        # a register cap on the default only where the tiles set one, for rows in registers: entmax-1.5's in 16-bit
        # (unforced, ptxas stops at 80 registers on sm_80 and spills), any alpha's in fp32 (at 128 on sm_90)
        assert listed[0].maxnreg == (cap[0]["maxnreg"] if cap else None)
        assert (listed[0].maxnreg is not None) == ((kernel, dtype == torch.float32) in (
            ("tau registers", False), ("tau registers general", True)))
        assert listed[0].kwargs == constexprs
        if kernel.startswith("tau passes"):
            # the threshold passes tune their key tile, a divisor of the support mask's (the mask tile is their OR),
            # and their query rows, a multiple of the mask's (a program writes one mark per mask tile of its rows)
            for config in listed:
                assert tiles.block_n % config.kwargs["BN"] == 0 or config.kwargs["BN"] == constexprs["BN"]
                assert config.kwargs["BM"] % tiles.block_m == 0 or config.kwargs["BM"] == constexprs["BM"]
                assert {k: v for k, v in config.kwargs.items() if k not in ("BM", "BN")} == {"BDV": 512}
            continue
        if kernel == "tau registers":
            # rows in registers tune their query rows (the launcher fills their mask), sm_90's for warpgroup MMA
            assert all({k: v for k, v in config.kwargs.items() if k != "BM"} == {"BN": 16, "BDV": 512}
                       for config in listed)
            assert arch != "sm_90" or any(config.kwargs["BM"] == 64 for config in listed)
            continue
        if kernel not in ("fwd wide", "fwd general", "fwd wide general"):
            # one tile shape per call: the support mask's tiles and the backward's query-tile lists are fixed before
            assert all(config.kwargs == constexprs for config in listed)
            continue
        # the wide and any-alpha output kernels tune their own query rows (dividing the mask's) and Dv chunk (at
        # most the default's; any alpha's at Dv <= 128 only where an alternative does not spill)
        assert len({(c.kwargs["BM"], c.kwargs["BDV"]) for c in listed}) > 1 or kernel == "fwd general"
        for config in listed:
            assert tiles.block_m % config.kwargs["BM"] == 0 and config.kwargs["BDV"] <= constexprs["BDV"]
            assert {k: v for k, v in config.kwargs.items() if k not in ("BM", "BDV")} == {"BN": 16}
    assert em._candidates(kernel, dtype, constexprs, FALLBACK) == em._candidates(kernel, dtype, constexprs,
                                                                               "sm_80")[:1]
    # a Dv chunk narrower than an alternative's caps it, and alternatives that become the default are dropped
    narrow = em._candidates(kernel, dtype, dict(constexprs, BDV=128), "sm_90")
    assert len(set(map(str, narrow))) == len(narrow) and all(c.kwargs["BDV"] <= 128 for c in narrow)


def test_entmax_rows_in_registers_candidates_solve_the_same_thresholds(monkeypatch):
    """The sm_90 candidates of the rows-in-registers threshold kernel with other query rows than the default's (64:
    the grid follows the candidate's BM; T = 40, a partial tile) give the default's rowmax and tau (the interpreter
    ignores warps and stages)."""
    generator = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 1, 40, 16, generator=generator) for _ in range(2))
    configs = em._candidates("tau registers", torch.float32, dict(BM=16, BN=128, BD=32), "sm_90")
    configs = [configs[0]] + [config for config in configs if config.kwargs["BM"] != 16]
    assert len(configs) > 1
    solved = []
    for config in configs:
        monkeypatch.setattr(em, "_candidates", lambda *args, config=config: [config])
        rowmax, tau, _ = em._entmax_tau(q, k, True, 0.25, em._whole_sequences(40, "cpu"))
        solved.append((rowmax, tau))
    for rowmax, tau in solved[1:]:
        torch.testing.assert_close(rowmax, solved[0][0])
        torch.testing.assert_close(tau, solved[0][1])


def test_entmax_launches_reset_what_the_timing_runs_write(monkeypatch):
    """The backward zeros dq (atomic adds) before each timed run, the threshold kernel restores the support mask
    (written only at the tiles it visits); the tests' tiny tiles launch their default alone (the backward's list
    and row-sum kernels have one configuration: nothing to time)."""
    monkeypatch.setattr(em, "_TILE_OVERRIDE", em.Tiles(block_m=8, block_n=8, block_d=8, block_dv=8, row_block_m=4,
                                                       row_block_n=8, candidates=4, wide_block_dv=16))
    launches = {}

    def recording(kernel, grid, args, kwargs, candidates, **options):
        launches[kernel.fn.__name__] = (len(candidates), options.get("reset_to_zero", ()),
                                        options.get("restore_value", ()))
        launch(kernel, grid, args, kwargs, candidates, **options)

    monkeypatch.setattr(em, "launch", recording)
    q, k, v = (torch.randn(1, 1, 12, 4, requires_grad=True) for _ in range(3))
    em.entmax15_attention(q, k, v).sum().backward()
    assert launches == {"_entmax_tau_kernel": (1, (), ("support",)), "_entmax_fwd_kernel": (1, (), ()),
                        "_tile_lists_kernel": (1, (), ()), "_entmax_bwd_row_sums_kernel": (1, (), ()),
                        "_entmax_bwd_kernel": (1, ("dq",), ())}
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("op", ["block_causal_attention", "moe_top2", "entmax15_attention"])
def test_aot_lists_every_candidate_of_both_architectures_with_alignment(op):
    configs = configurations(op)
    compiled = {(config.kernel, tuple(sorted(config.constexprs.items())), config.num_warps, config.num_stages, c,
                 config.maxnreg) for config in configs if config.divisible for c in config.capabilities}
    kernels = {config.kernel for config in configs}
    for arch in ARCHS:
        capability = _autotune.ARCH_CAPABILITY[arch]
        for kernel in kernels:
            listed = [c for c in compiled if c[0] is kernel and c[4] == capability]
            launched = _launched_candidates(op, kernel, arch)
            assert launched and all(any(_same(candidate, c) for c in listed) for candidate in launched), (
                kernel.fn.__name__, arch)
    assert configurations(op, defaults_only=True) == [c for c in configs if c.default]
    assert len(configurations(op, defaults_only=True)) < len(configs)
    if op == "entmax15_attention":  # every dtype compiled: one dtype's variant does not stand for another's
        for kernel in kernels:
            dtypes = {c.signature.get("q", c.signature.get("do")) for c in configs if c.kernel is kernel}
            assert kernel is em._tile_lists_kernel or dtypes == set(_ENTMAX_DTYPES), kernel.fn.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_entmax_odd_wide_heads_take_backward_chunks_compiled_ahead_of_time(dtype):
    """CARN's D = 256, Dv = 512 take one chunked-backward program per key tile (dk and dv whole: QK^T and dP once);
    D or Dv not a multiple of 16 (no vector loads) take at most 64-feature chunks and steps, and the AOT list
    compiles that variant without the 16-divisibility."""
    tiles = em._DEFAULT_TILES[dtype]
    aligned, odd = em._backward_tiles(tiles, 256, 512), em._backward_tiles(tiles, 250, 500)
    assert not aligned["WHOLE"] and not odd["WHOLE"]
    assert (aligned["BD"], aligned["BDV"]) == (256, 512) and aligned["BK"] < 256
    assert odd["BD"] == odd["BDV"] == em._UNALIGNED_BWD_BLOCK_D
    assert odd["BK"] == min(aligned["BK"], em._UNALIGNED_BWD_BLOCK_D)
    q_type = next(name for name, torch_dtype in _ENTMAX_DTYPES.items() if torch_dtype is dtype)
    assert any(c.kernel is em._entmax_bwd_kernel and not c.divisible and c.signature["q"] == q_type
               and {k: c.constexprs[k] for k in odd} == odd for c in configurations("entmax15_attention"))


def _launched_candidates(op, kernel, arch):
    """Every candidate config of ``kernel`` on ``arch`` over dtypes and head-dim tiles."""
    if op == "moe_top2":
        kind = {moe._moe_route_kernel: "route", moe._moe_grouped_matmul_kernel: "grouped_matmul",
                moe._moe_grouped_wgrad_kernel: "grouped_wgrad", moe._moe_combine_kernel: "combine",
                moe._moe_router_grad_kernel: "router_grad", moe._moe_aux_loss_kernel: "aux_loss"}[kernel]
        return [c for dtype in (torch.float32, torch.float16, torch.bfloat16)
                for c in moe._kernel_candidates(kind, moe.TILES[(arch, dtype)])]
    if kernel is em._tile_lists_kernel:  # the backward's list kernel: one configuration per dtype's tiles
        return [c for dtype in _ENTMAX_DTYPES.values() for has_support in (True, False)
                for c in em._tile_list_candidates(dtype, arch, has_support)]
    if kernel is em._entmax_bwd_row_sums_kernel:  # the backward's row sums: one configuration
        return [triton.Config(em._ROW_SUMS_TILES, **em._ROW_SUMS_OPTIONS)]
    if op == "entmax15_attention":  # every default tile shape of aot_configurations(), with each candidate list
        # each default compiled for this architecture (the backward's tiles may differ per architecture)
        return [c for config in configurations(op, defaults_only=True) if config.kernel is kernel
                and _autotune.ARCH_CAPABILITY[arch] in config.capabilities
                for c in em._candidates(_entmax_list(config), _ENTMAX_DTYPES[config.signature["q"]],
                                        {k: config.constexprs[k] for k in ("BM", "BN", "BD")
                                         + (("BDV",) if "BDV" in config.constexprs else ())
                                         + (("WHOLE",) if "WHOLE" in config.constexprs else ())}, arch)]
    name = {bc.block_causal_attn_fwd_kernel: "fwd", bc.block_causal_attn_bwd_dq_kernel: "bwd_dq",
            bc.block_causal_attn_bwd_dkdv_kernel: "bwd_dkdv"}[kernel]
    return [c for dtype in (torch.float32, torch.float16, torch.bfloat16) for block_d in bc._HEAD_DIM_BLOCKS
            for c in bc._candidates(name, dtype, block_d, arch)]


def _same(candidate, listed):
    constexprs = dict(listed[1])
    return (all(constexprs.get(k) == v for k, v in candidate.kwargs.items())
            and (candidate.num_warps, candidate.num_stages) == listed[2:4] and candidate.maxnreg == listed[5])


_ENTMAX_DTYPES = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}


def _entmax_list(config):
    """The candidate list (``kernels.entmax._ALTERNATIVES``) of an AOT configuration: any alpha's threshold and wide
    output kernels (GENERAL) and its output kernel with alpha's gradient (STORE_S) have lists of their own."""
    name = next(name for name in ("tau registers", "tau passes", "fwd wide", "fwd", "bwd chunked", "bwd")
                if config.label.startswith(name))
    own = name != "fwd" and not name.startswith("bwd") or config.constexprs.get("STORE_S", False)
    return name + " general" if config.constexprs["GENERAL"] and own else name
