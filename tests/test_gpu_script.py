"""``bash bench/gpu.sh`` cannot rot: its CPU dry run runs end to end here (every step, every file it writes), a step
past its time limit is stopped and reported, and the GPU tests are collected and skipped without CUDA."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _environment() -> dict:
    """This environment without the variables that the script sets per step, the repository on the path."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("KERNELS_GPU_TESTS_ON_CPU", "KERNELS_BACKEND", "BENCH_QUICK", "BENCH_STREAM_JSONL",
                          "BENCH_TARGET_SECONDS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHON"] = sys.executable
    return env


def _gpu_run_module():
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "bench" / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out), "--wheels", str(tmp_path / "none")],
                            cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    (json_file,) = out.glob("*.json")
    assert json_file.name.startswith("dry-run-") and sorted(p.suffix for p in out.iterdir()) == [".json", ".log", ".md"]
    results = json.loads(json_file.read_text(encoding="utf-8"))
    assert results["dry_run"] and results["machine"]["torch"] == torch.__version__
    assert [(step["name"], step["status"]) for step in results["steps"]] == [
        ("tests", "passed"), ("accuracy", "passed"), ("bench", "passed")]

    tests = results["gpu_tests"]
    collected = tests["passed"] + tests["failed"] + tests["errors"] + tests["skipped"]
    # on a CPU eight tests skip: the sync trap, the autotune choice, the two CUDA-graph replays and the four TMA-variant
    # comparisons, block-causal's and entmax's (a Hopper GPU, or the interpreter mode the dry run does not use)
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] >= collected - 8, tests
    assert {row["dtype"] for row in results["accuracy"]["rows"]} == {"bfloat16", "float16", "float32"}

    timed = [record for record in results["benchmarks"] if record["status"] == "ok"]
    untimed = [record for record in results["benchmarks"] if record["status"] != "ok"]
    assert timed and all(record["stats"]["mean"] > 0 and record["group"] for record in timed)
    assert untimed and all(record["status"] == "skipped" and "CUDA" in record["reason"] for record in untimed)

    markdown = json_file.with_suffix(".md").read_text(encoding="utf-8")
    for section in ("**Dry run**", "## Steps", "## GPU tests", "## Entmax accuracy", "## Benchmarks",
                    "### Cases not timed"):
        assert section in markdown, section
    assert all(f"### {record['group']}" in markdown for record in timed)
    log = json_file.with_suffix(".log").read_text(encoding="utf-8")
    assert all(f"===== {step}: passed" in log for step in ("tests", "accuracy", "bench"))


def test_a_step_past_its_limit_is_stopped_and_reported(tmp_path):
    gpu_run = _gpu_run_module()
    with open(tmp_path / "log", "w", encoding="utf-8") as log:
        outcome = gpu_run.run_step("sleep", [sys.executable, "-c", "import time; print('started', flush=True); "
                                             "time.sleep(60)"], dict(os.environ), 3, log)
    assert outcome["status"] == "cut" and outcome["seconds"] < 30
    assert "started" in (tmp_path / "log").read_text(encoding="utf-8")


def test_gpu_tests_are_collected_and_skipped_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the GPU tests run instead")
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\d+ skipped in ", result.stdout.strip().splitlines()[-1]), result.stdout
    assert "needs a CUDA GPU: `bash bench/gpu.sh` runs these tests on one" in result.stdout


def test_outcomes_of_a_stopped_tests_step_are_read_from_its_log():
    """pytest writes its JUnit report at the end only: a tests step stopped at its limit is counted from ``-v`` lines
    (pytest-xdist's and plain pytest's forms)."""
    log = ("[gw1] [ 10%] PASSED tests/test_gpu.py::test_a[B1-fp32] \n"
           "tests/test_gpu.py::test_b[fp16] FAILED                 [ 20%]\n"
           "[gw0] [ 12%] SKIPPED tests/test_gpu.py::test_c \n"
           "tests/test_gpu.py::test_d[fp32] PASSED                 [ 30%]\n"
           "FAILED tests/test_gpu.py::test_b[fp16] - AssertionError: grad q: max |ours - fp64| = 1\n")
    outcomes = _gpu_run_module().outcomes_from_log(log)
    assert (outcomes["passed"], outcomes["failed"], outcomes["errors"], outcomes["skipped"]) == (2, 1, 0, 1)
    assert [failure["test"] for failure in outcomes["failures"]] == ["tests/test_gpu.py::test_b[fp16]"]


def test_benchmark_tables_show_the_autotuned_candidates():
    gpu_run = _gpu_run_module()
    pick = {"kernel": "block_causal_attn_fwd_kernel", "bucket": [4096, 4], "config": "BM=128 BN=64 num_warps=8 "
            "num_stages=2", "rank": 2, "candidates": 3}
    record = {"status": "ok", "group": "fwd T=4096", "nodeid": "x", "candidate": "ours", "iterations": 1,
              "stats": {"mean": 1e-3, "min": 1e-3, "rounds": 3}, "extra_info": {"peak_mem_MiB": 5.0, "autotune": [pick]}}
    (row,) = [line for line in gpu_run.benchmark_tables([record]) if line.startswith("| ours")]
    assert "tuned block_causal_attn_fwd_kernel 2/3" in row and "num_warps" not in row, row


def test_tests_step_workers_fit_the_gpu_memory():
    """Each worker of the tests step may hold ~8 GiB on the GPU (float64 references): a 48 GiB card takes 5 however
    many CPUs the machine has, an 80 GiB one 8 (the cap), and a machine whose GPU memory was not measured is sized by
    its CPUs alone."""
    workers = _gpu_run_module().test_workers
    gib = 2**30
    assert workers(64, 48 * gib) == 5 and workers(64, 80 * gib) == 8 and workers(16, 141 * gib) == 8
    assert workers(6, 80 * gib) == 3 and workers(64, 4 * gib) == 1 and workers(1, None) == 1
    assert workers(32, None) == 8


def test_a_bench_file_that_fails_to_import_does_not_stop_the_others(tmp_path, monkeypatch):
    """The bench step's pytest run goes on past a file that fails to import, which is streamed as an error."""
    gpu_run = _gpu_run_module()
    (tmp_path / "conftest.py").write_text((ROOT / "bench" / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "test_bench_broken.py").write_text("import a_module_that_is_not_installed\n")
    (tmp_path / "test_bench_fine.py").write_text(
        "from conftest import bench_call\n\n\ndef test_fine(benchmark):\n    benchmark.group = 'fine'\n"
        "    bench_call(benchmark, lambda: sum(range(100)))\n")
    monkeypatch.setattr(gpu_run, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(gpu_run, "BENCH_FILES", ["test_bench_broken.py", "test_bench_fine.py"])
    command, extra_env = gpu_run.step_command("bench", True, tmp_path)
    with open(tmp_path / "log", "w", encoding="utf-8") as log:
        environment = {key: value for key, value in _environment().items() if not key.startswith("PYTEST_")}
        outcome = gpu_run.run_step("bench", command, {**environment, **extra_env}, 600, log)  # not as an xdist worker
    assert outcome["status"] == "failed", outcome  # a file that does not import is a failure of the step
    # node ids are relative to the inner run's root directory, which depends on where tmp_path lies
    records = {record["nodeid"].rsplit("/", 1)[-1]: record for record in gpu_run.read_jsonl(tmp_path / "bench.jsonl")}
    step_log = (tmp_path / "log").read_text(encoding="utf-8")
    assert records.get("test_bench_fine.py::test_fine", {}).get("status") == "ok", (records, step_log)
    broken = records["test_bench_broken.py"]
    assert broken["status"] == "error" and "a_module_that_is_not_installed" in broken["reason"], broken
    assert any("| error | collection failed" in line for line in gpu_run.benchmark_tables(list(records.values())))


def test_a_peer_package_that_is_not_installed_skips_its_cases():
    """A bench case of ``entmax`` (or ``adasplash``) on a Python without it is skipped with the reason, not failed."""
    script = ("import sys; sys.modules['entmax'] = None; import pytest; sys.exit(pytest.main(["
              "'bench/test_bench_entmax_attention.py', '-k', 'tiny_cpu', '-rs', '-p', 'no:cacheprovider']))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout, result.stdout
    assert "the entmax package (PyPI entmax) is not installed" in result.stdout, result.stdout
