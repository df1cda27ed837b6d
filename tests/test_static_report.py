"""The static report (``python -m kernels.tools.report``): launch capture and Triton's specializations, the occupancy
formula, the ptxas / SASS readers, and the CI spill guard (``kernels/tools/spill_budget.json``)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels.aot import AotConfig, config_key
from kernels.tools.report import (
    BUDGET_PATH,
    SM90_HGMMA_FLOOR,
    SM90_TMA_FLOOR,
    SM_LIMITS,
    _round_up,
    capturing,
    cases,
    check_budget,
    mma_kind,
    mma_summary,
    occupancy,
    parse_ptxas_log,
    parse_sass,
    rewritten_budget,
    uses_tma,
)


def _probe(x_ptr, stride_row, stride_col, n_rows, n_cols, flag, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    values = tl.load(x_ptr + i * stride_row + offsets * stride_col, mask=(offsets < n_cols) & (i < n_rows))
    tl.store(x_ptr + i * stride_row + offsets * stride_col, values * flag, mask=offsets < n_cols)


# a compiled-mode JITFunction even though this test process runs the ops through the interpreter
probe_kernel = JITFunction(_probe, do_not_specialize=["n_rows", "flag"])


@pytest.fixture
def compiled_mode(monkeypatch):
    """Capture refuses to run under TRITON_INTERPRET=1 (the ops' kernels are interpreted in this process)."""
    # Triton's launcher imports gluon on first use, which accepts this process's interpreted helpers only while
    # the interpreter is on: import it first
    import triton.experimental.gluon  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _arg(launch, name):
    """(type in the signature, specialized attributes) of argument ``name``."""
    index = list(launch.signature).index(name)
    attrs = [list(a) for a in launch.attrs.get((index,), [])]
    return launch.signature[name], attrs


@pytest.mark.parametrize("capability", sorted(SM_LIMITS))
def test_capture_records_the_specializations_of_tritons_launcher(compiled_mode, capability):
    x = torch.randn(48, 32)
    with capturing(capability) as launches:
        probe_kernel[(48,)](x, x.stride(0), x.stride(1), 48, 32, 1, BLOCK=32, num_warps=2)
        probe_kernel[(48,)](x[:, 1:], x.stride(0), x.stride(1), 48, 31, 1, BLOCK=32)  # pointer + 4 B: unaligned
    assert len(launches) == 2
    aligned, unaligned = launches
    divisibility = ["tt.divisibility", 16]
    assert aligned.options["num_warps"] == 2 and aligned.options["arch"] == f"sm{capability}"
    assert _arg(aligned, "x_ptr") == ("*fp32", [divisibility])  # a fresh CPU allocation is 16-byte aligned
    assert _arg(aligned, "stride_row") == ("i32", [divisibility])  # 32
    assert _arg(aligned, "stride_col")[0] == "constexpr"  # the unit stride becomes the constant 1
    assert aligned.constants[(list(aligned.signature).index("stride_col"),)] == 1
    assert _arg(aligned, "n_cols") == ("i32", [divisibility])
    assert _arg(aligned, "n_rows") == ("i32", [])  # do_not_specialize: 48 is 16-divisible but not specialized
    assert _arg(aligned, "flag") == ("i32", [])  # do_not_specialize: 1 stays a runtime integer
    assert aligned.constexprs() == {"BLOCK": 32}
    divisible, ones = aligned.specialized_args()
    assert set(divisible) == {"x_ptr", "stride_row", "n_cols"} and ones == ["stride_col"]
    assert _arg(unaligned, "x_ptr") == ("*fp32", [])
    assert _arg(unaligned, "n_cols") == ("i32", [])  # 31
    assert aligned.key != unaligned.key


def test_a_launch_matches_the_configuration_of_its_own_specialization_only(compiled_mode):
    """``variant_key``: a captured launch equals the ahead-of-time configuration with the same types, constexprs
    (the unit stride as the constant 1), 16-divisible arguments and options, and no configuration that differs in
    one of them."""
    x = torch.randn(48, 32)
    with capturing(90) as launches:
        probe_kernel[(48,)](x, x.stride(0), x.stride(1), 48, 32, 1, BLOCK=32, num_warps=2, num_stages=3)
    (launch,) = launches
    signature = {"x_ptr": "*fp32", "stride_row": "i32", "stride_col": "constexpr", "n_rows": "i32", "n_cols": "i32",
                 "flag": "i32", "BLOCK": "constexpr"}
    same = AotConfig("probe", probe_kernel, signature, {"stride_col": 1, "BLOCK": 32}, num_warps=2, num_stages=3,
                     divisible=("x_ptr", "stride_row", "n_cols"))
    assert config_key(same) == launch.variant_key()
    others = [same._replace(signature={**signature, "stride_col": "i32"}, constexprs={"BLOCK": 32}),  # strided
              same._replace(constexprs={"stride_col": 1, "BLOCK": 64}),
              same._replace(divisible=("x_ptr", "stride_row")),
              same._replace(signature={**signature, "x_ptr": "*fp16"}),
              same._replace(num_warps=4), same._replace(num_stages=2), same._replace(maxnreg=128)]
    assert all(config_key(other) != launch.variant_key() for other in others)


def test_capture_reports_every_autotune_candidate_without_running(compiled_mode):
    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in ((32, 2, 1), (64, 4, 3))]
    tuned = triton.autotune(configs=configs, key=["n_cols"])(JITFunction(_probe, do_not_specialize=["n_rows"]))
    x = torch.randn(4, 32)
    before = x.clone()
    with capturing(90) as launches:
        tuned[(4,)](x, x.stride(0), x.stride(1), 4, 32, 1)
    assert [(l.constexprs()["BLOCK"], l.options["num_warps"], l.options["num_stages"]) for l in launches] == [
        (32, 2, 1), (64, 4, 3)]
    assert [l.config.split(" ")[:2] for l in launches] == [["autotune", "1/2"], ["autotune", "2/2"]]
    assert torch.equal(x, before)  # nothing ran


def test_capture_zero_fills_allocations_and_restores_torch(compiled_mode):
    empty = torch.empty
    with capturing(80):
        assert torch.empty(64, dtype=torch.int64).eq(0).all() and torch.empty_like(torch.ones(8)).eq(0).all()
    assert torch.empty is empty


def test_capture_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with capturing(90):
            pass


@pytest.mark.parametrize("capability", sorted(SM_LIMITS))
def test_occupancy_formula_from_the_limits(capability):
    limits = SM_LIMITS[capability]
    # few registers, no shared memory: only the warp slots limit
    assert occupancy(32, 0, 4, limits) == (limits.max_warps, "registers+warps")
    # 255 registers: a warp takes 255 * 32 rounded up to the allocation unit, in one sub-partition
    per_warp = _round_up(255 * 32, limits.register_unit)
    warps = (limits.registers // limits.sub_partitions // per_warp) * limits.sub_partitions
    assert occupancy(255, 0, 4, limits) == (warps // 4 * 4, "registers")
    assert occupancy(255, 0, 8, limits)[0] == warps // 8 * 8
    # shared memory for exactly 3 blocks once the reserved 1 KB per block is added
    shared = (limits.shared_memory // 3) // limits.shared_unit * limits.shared_unit - limits.reserved_shared_per_block
    assert occupancy(32, shared, 4, limits) == (3 * 4, "shared memory")
    assert occupancy(32, shared + limits.shared_unit, 4, limits)[0] == 2 * 4
    # more than a block may have, or more registers than a thread may have: the kernel cannot launch
    assert occupancy(32, limits.shared_memory_per_block + 1, 4, limits)[0] == 0
    assert occupancy(limits.max_registers_per_thread + 1, 0, 4, limits)[0] == 0
    # 1 warp per block: the block limit binds before the warp slots
    assert occupancy(16, 0, 1, limits) == (min(limits.max_blocks, limits.max_warps), "blocks")


def test_ptxas_log_and_sass_readers():
    registers, stores, loads, stack = 32, 18348, 22592, 5392
    log = (f"ptxas info    : Compiling entry function 'k' for 'sm_80'\nptxas info    : Function properties for k\n"
           f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads\n"
           f"ptxas info    : Used {registers} registers, used 1 barriers, {stack} bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == {"registers": registers, "spill_store_bytes": stores, "spill_load_bytes": loads,
                                    "stack_bytes": stack}
    with pytest.raises(ValueError, match="register"):
        parse_ptxas_log("ptxas fatal")
    instructions = ["HMMA.1688.F32.TF32 R4, R8, R12, R4 ;"] * 3 + ["@!P0 LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;"]
    instructions += ["HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], R24 ;", "UTMALDG.2D [UR8], [UR4] ;", "EXIT ;"]
    # a TMA load under a uniform predicate counts; descriptor cache control and flushes copy nothing
    instructions += ["@UP4 UTMALDG.2D [UR8], [UR6] ;", "UTMACCTL.IV [UR6] ;", "UTMACMDFLUSH ;"]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {text}  /* 0x000fe20000000f00 */"
                     for i, text in enumerate(instructions))
    parsed = parse_sass(sass)
    assert parsed["instructions"] == len(instructions)
    assert parsed["tensor_core"] == {"HMMA.1688.F32.TF32": 3, "HGMMA.64x64x8.F32.TF32": 1}
    assert parsed["async_copies"] == {"LDGSTS.E.BYPASS.128": 1, "UTMALDG.2D": 2}


def _row(kernel, target, stores, loads, case="shape A"):
    return {"op": "moe_top2", "kernel": kernel, "target": target, "cases": [case], "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def test_budget_check_names_kernel_shape_and_bytes():
    budget = {"moe_top2 | shape A | k1 | sm_80": {"spill_store_bytes": 100, "spill_load_bytes": 100},
              "moe_top2 | shape A | k2 | sm_80": {"spill_store_bytes": 0, "spill_load_bytes": 0},
              "moe_top2 | shape B | k1 | sm_80": {"spill_store_bytes": 0, "spill_load_bytes": 0}}
    ran = [("moe_top2", "shape A")]
    within = [_row("k1", "sm_80", 100, 64), _row("k2", "sm_80", 0, 0)]
    assert check_budget(within, budget, ran, ["sm_80"]) == []  # shape B did not run: not missing
    over = check_budget([_row("k1", "sm_80", 101, 64), _row("k2", "sm_80", 0, 0)], budget, ran, ["sm_80"])
    assert len(over) == 1 and "k1" in over[0] and "shape A" in over[0] and "101" in over[0]
    missing = check_budget([_row("k1", "sm_80", 0, 0)], budget, ran, ["sm_80"])
    assert len(missing) == 1 and "k2" in missing[0] and "missing" in missing[0]
    unbudgeted = check_budget(within + [_row("k3", "sm_80", 0, 8)], budget, ran, ["sm_80"])
    assert len(unbudgeted) == 1 and "k3" in unbudgeted[0] and "8 > budget 0" in unbudgeted[0]


#: two ops with a case of the same name, on two targets
_SHARED_NAME_BUDGET = {f"{op} | shape A | {kernel} | {target}": {"spill_store_bytes": 0, "spill_load_bytes": 0}
                       for op, kernel in (("moe_top2", "k_moe"), ("entmax15_attention", "k_entmax"))
                       for target in ("sm_80", "sm_90")}


def test_budget_check_of_some_ops_leaves_the_other_ops_entries_alone():
    """``--ops``: a case name that another op also has does not make that op's kernels missing."""
    moe_only = [_row("k_moe", "sm_80", 0, 0)]
    assert check_budget(moe_only, _SHARED_NAME_BUDGET, [("moe_top2", "shape A")], ["sm_80"]) == []
    both = check_budget(moe_only, _SHARED_NAME_BUDGET, [("moe_top2", "shape A"), ("entmax15_attention", "shape A")],
                        ["sm_80"])
    assert len(both) == 1 and "missing" in both[0]
    assert both[0].startswith("entmax15_attention | shape A | k_entmax | sm_80")


def test_budget_rewrite_of_some_ops_and_targets_keeps_the_other_entries():
    rows = [_row("k_moe", "sm_80", 8, 16), _row("k_new", "sm_80", 0, 0)]
    rewritten = rewritten_budget(rows, _SHARED_NAME_BUDGET, [("moe_top2", "shape A")], ["sm_80"])
    expected = dict(_SHARED_NAME_BUDGET)
    expected["moe_top2 | shape A | k_moe | sm_80"] = {"spill_store_bytes": 8, "spill_load_bytes": 16}
    expected["moe_top2 | shape A | k_new | sm_80"] = {"spill_store_bytes": 0, "spill_load_bytes": 0}
    assert rewritten == expected
    # a kernel of the run that no longer launches leaves the budget
    assert "moe_top2 | shape A | k_moe | sm_80" not in rewritten_budget(
        [_row("k_new", "sm_80", 0, 0)], _SHARED_NAME_BUDGET, [("moe_top2", "shape A")], ["sm_80"])


def test_check_budget_of_one_op_reports_only_that_ops_entries(monkeypatch, tmp_path, capsys):
    """``--ops block_causal_attention --check-budget`` on a run that launched nothing: every budgeted kernel of
    block-causal attention at the run's shapes and targets is missing, and nothing of the other ops (entmax has
    cases of the same names). No capture or compile: both are replaced."""
    import kernels.tools.report as report

    monkeypatch.setattr(report, "capture_variants", lambda selected, capabilities: ([], []))
    monkeypatch.setattr(report, "compile_variants", lambda variants, jobs: None)
    op = "block_causal_attention"
    assert report.main(["--ops", op, "--targets", "80", "--check-budget", "--out", str(tmp_path)]) == 1
    missing = {line.removeprefix("SPILL BUDGET: ").split(": ")[0] for line in capsys.readouterr().out.splitlines()
               if line.startswith("SPILL BUDGET: ")}
    budget = json.loads(BUDGET_PATH.read_text())
    names = {case.name for case in cases(quick=False) if case.op == op}
    assert names & {case.name for case in cases(quick=False) if case.op != op}, "no case name shared with another op"
    assert missing == {key for key in budget if key.startswith(f"{op} |") and key.endswith("| sm_80")
                       and key.split(" | ")[1] in names}


def test_budget_covers_every_quick_case_and_both_targets():
    budget = json.loads(BUDGET_PATH.read_text())
    for case in cases(quick=True):
        for target in ("sm_80", "sm_90"):
            prefix, suffix = f"{case.op} | {case.name} |", f"| {target}"
            assert any(key.startswith(prefix) and key.endswith(suffix) for key in budget), (
                f"{BUDGET_PATH.name} has no kernel of {case.op} at {case.name} on {target}")


@pytest.mark.slow
def test_quick_report_keeps_the_spill_budget(tmp_path):
    """Every kernel of every op at the models' shapes, compiled for sm_90 and sm_80: none spills more than the
    budget allows (in a fresh process without the interpreter: interpreted kernels cannot be compiled)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "kernels.tools.report", "--quick", "--no-peers", "--check-budget",
               "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert "spill budget kept" in result.stdout, output
    (report_path,) = tmp_path.glob("*.json")
    rows = json.loads(report_path.read_text())["rows"]
    assert not [row for row in rows if "error" in row], output
    # every variant the ops launch is one that kernels.aot compiles ahead of time (the same code)
    assert all(row["ahead_of_time"] for row in rows), [(r["kernel"], r["target"]) for r in rows
                                                       if not r["ahead_of_time"]]
    # Hopper's warpgroup MMA: the number of sm_90 variants that issue it may not fall (SM90_HGMMA_FLOOR)
    summary = mma_summary(rows, "sm_90")
    assert summary["HGMMA"] >= SM90_HGMMA_FLOOR, (summary, [(r["kernel"], r["dtype"], r["config"]) for r in rows
                                                           if r["target"] == "sm_90" and mma_kind(r) == "HMMA"])
    # TMA tensor descriptors (sm_90: block-causal attention, the entmax threshold and output kernels): the number of
    # sm_90 variants may not fall either
    streaming = ("block_causal_attention", "_entmax_tau_kernel", "_entmax_fwd_kernel")
    assert summary["TMA"] >= SM90_TMA_FLOOR, (summary, [(r["kernel"], r["dtype"], r["config"]) for r in rows
                                                       if r["target"] == "sm_90" and not uses_tma(r)
                                                       and (r["op"] in streaming or r["kernel"] in streaming)])
    assert not [r for r in rows if r["target"] == "sm_80" and uses_tma(r)], "TMA on sm_80"
    assert "HGMMA / HMMA / no MMA variants" in next(tmp_path.glob("*.md")).read_text(encoding="utf-8")
    for op in {case.op for case in cases(quick=True)}:
        kernels = {row["kernel"] for row in rows if row["op"] == op}
        assert kernels, f"no kernel of {op} captured"
        for kernel in kernels:
            assert {row["target"] for row in rows if row["kernel"] == kernel} == {"sm_80", "sm_90"}, kernel
    # every autotune candidate of the capture target's own list is captured and compiled (kernels._autotune)
    block_causal = importlib.import_module("kernels.block_causal")
    for arch in ("sm_80", "sm_90"):
        captured = {(row["constexprs"]["BM"], row["constexprs"]["BN"], row["num_warps"], row["num_stages"])
                    for row in rows if row["kernel"] == "block_causal_attn_fwd_kernel" and row["target"] == arch}
        listed = {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages)
                  for c in block_causal._candidates("fwd", torch.float32, 64, arch)}
        assert captured == listed, (arch, captured, listed)


def test_mma_and_tma_columns_classify_each_variant():
    rows = [{"op": "moe_top2", "target": "sm_90", "tensor_core": {"HGMMA.64x64x8.F32.TF32": 4, "HMMA.1688.F32.TF32": 2},
             "async_copies": {"UTMALDG.2D": 2}},
            {"op": "moe_top2", "target": "sm_90", "tensor_core": {"HMMA.1688.F32.TF32": 16}, "async_copies": {}},
            {"op": "moe_top2", "target": "sm_90", "tensor_core": {}, "async_copies": {"LDGSTS.E.BYPASS.128": 4}},
            {"op": "moe_top2", "target": "sm_80", "tensor_core": {"HMMA.1688.F32.TF32": 16}, "async_copies": {}},
            {"op": "adasplash2", "target": "sm_90", "tensor_core": {"HGMMA.64x64x16.F32.BF16": 1}, "async_copies": {}}]
    assert [mma_kind(row) for row in rows[:3]] == ["HGMMA", "HMMA", "none"]
    assert mma_summary(rows) == {"HGMMA": 1, "HMMA": 1, "none": 1, "TMA": 1}  # ours only, sm_90 only
    assert mma_summary(rows, "sm_80") == {"HGMMA": 0, "HMMA": 1, "none": 0, "TMA": 0}
