"""Shared benchmark harness (pytest-benchmark); see bench/README.md.

Bench files use it like this::

    from conftest import bench_call, requires_cuda

    @requires_cuda
    def test_op_forward_ours(benchmark, device):
        benchmark.group = "op fwd B4-T256"
        q = torch.randn(4, 256, 64, device=device)
        bench_call(benchmark, lambda: op(q))

Every candidate (ours, the reference, peers) at one shape shares one ``benchmark.group``, so
pytest-benchmark's table compares them side by side.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import time
from typing import Callable, Optional, TypeVar

import pytest
import torch

T = TypeVar("T")

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: Triton kernels and GPU peers are timed on the GPU only",
)

# A GPU case is timed for about this long in total (BENCH_TARGET_SECONDS; bench/gpu.sh sets less); a round lasts
# at least _GPU_ROUND_SECONDS so that the timer's resolution and the Python overhead of one round stay small next to
# what is measured.
_GPU_TARGET_SECONDS = float(os.environ.get("BENCH_TARGET_SECONDS", "1.0"))
_GPU_ROUND_SECONDS = 0.01
_GPU_MAX_ROUNDS = 200
# On CPU only tiny reference-side cases run, and the whole CPU bench run must stay under a minute.
_CPU_ROUNDS = 3


#: BENCH_QUICK=1 (bench/gpu.sh): the budgeted run, which times the cases each bench file selects for it
QUICK = os.environ.get("BENCH_QUICK", "") == "1"


def skip_in_quick_run(selected: bool, what: str) -> None:
    """Skip a case that the budgeted run (``BENCH_QUICK=1``) leaves out; ``what`` says which cases it leaves out."""
    if QUICK and not selected:
        pytest.skip(f"left out of the budgeted run (BENCH_QUICK=1): {what}")


#: BENCH_DEADLINE (a time.time() value, bench/gpu.sh): each bench file of the run gets an equal share of the time left
#: when it starts (time a file leaves unused goes to the later ones); cases past their file's share are skipped
_FILE_DEADLINES: dict = {}


def pytest_runtest_setup(item) -> None:
    deadline = os.environ.get("BENCH_DEADLINE")
    if not deadline:
        return
    if item.path not in _FILE_DEADLINES:
        paths = list(dict.fromkeys(other.path for other in item.session.items))
        now = time.time()
        _FILE_DEADLINES[item.path] = now + (float(deadline) - now) / (len(paths) - paths.index(item.path))
    if time.time() > _FILE_DEADLINES[item.path]:
        pytest.skip("this file's share of the time budget is spent (BENCH_DEADLINE, bench/gpu.sh)")


@pytest.fixture
def device() -> torch.device:
    """``cuda`` when a GPU is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_call(benchmark, fn: Callable[[], T]) -> T:
    """Time ``fn()`` with ``benchmark`` and return its result.

    ``fn`` runs once untimed first (Triton compilation, autotuning, cuDNN/cuBLAS heuristics). On CUDA each
    timed call ends with ``torch.cuda.synchronize()``, so asynchronous launches are not mistaken for speed,
    and ``benchmark.extra_info["peak_mem_MiB"]`` records ``torch.cuda.max_memory_allocated`` over the timed
    calls (inputs that are alive included); it is None on a machine without CUDA.
    ``benchmark.extra_info["autotune"]`` lists the candidate each autotuned launch of the warm-up ran
    (``kernels._autotune.recording_choices``; empty where nothing was autotuned).
    """
    from kernels._autotune import recording_choices

    on_cuda = torch.cuda.is_available()

    def timed() -> T:
        result = fn()
        if on_cuda:
            torch.cuda.synchronize()
        return result

    with recording_choices() as choices:
        timed()  # warm-up: compile and autotune outside the timing
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        timed()
        one_call = max(time.perf_counter() - start, 1e-6)
        iterations = max(1, round(_GPU_ROUND_SECONDS / one_call))
        rounds = int(min(_GPU_MAX_ROUNDS, max(3, _GPU_TARGET_SECONDS / (one_call * iterations))))
    else:
        iterations, rounds = 1, _CPU_ROUNDS

    result = benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)
    benchmark.extra_info["peak_mem_MiB"] = (
        round(torch.cuda.max_memory_allocated() / 2**20, 2) if on_cuda else None
    )
    benchmark.extra_info["autotune"] = [dict(row) for row in {str(row): row for row in choices}.values()]
    return result


def _installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Store what the timings depend on with every saved result (``--benchmark-json`` / ``--benchmark-save``)."""
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cuda"] = torch.version.cuda
    machine_info["torch"] = torch.__version__
    for distribution in ("triton", "entmax", "adasplash"):
        machine_info[distribution] = _installed_version(distribution)
    machine_info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


#: the parameter that names a case's candidate in each bench file, and the names given to its values
_CANDIDATE_PARAMETERS = ("candidate", "name", "backend", "fused")
_CANDIDATE_NAMES = {"auto": "ours", True: "ours", False: "reference"}


def _candidate(item, params: dict) -> str:
    """The candidate a case times: its candidate parameter, else the test's name (the CPU cases have none)."""
    for key in _CANDIDATE_PARAMETERS:
        if key in params:
            return _CANDIDATE_NAMES.get(params[key], str(params[key]))
    return item.originalname


def _stream_record(item, report) -> Optional[dict]:
    benchmark = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        record = {"status": "skipped", "reason": reason.removeprefix("Skipped: ")}
    elif report.failed:
        record = {"status": "failed", "reason": (report.longreprtext.strip().splitlines() or ["?"])[-1][:500]}
    elif report.when == "call" and getattr(benchmark, "stats", None) is not None:
        stats = benchmark.stats.stats
        record = {"status": "ok", "iterations": benchmark.stats.iterations,
                  "stats": {key: getattr(stats, key) for key in ("min", "max", "mean", "median", "stddev", "rounds")},
                  "extra_info": dict(benchmark.extra_info)}
    else:
        return None
    params = item.callspec.params if hasattr(item, "callspec") else {}
    record.update(nodeid=item.nodeid, group=getattr(benchmark, "group", None), candidate=_candidate(item, params),
                  params={key: str(value) for key, value in params.items()})
    return record


def _stream(record: dict) -> None:
    with open(os.environ["BENCH_STREAM_JSONL"], "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, default=str) + "\n")


def pytest_collectreport(report) -> None:
    """With ``BENCH_STREAM_JSONL``, a bench file that fails to import (a missing module, a syntax error) is streamed
    as one ``error`` record; ``bench/gpu.sh`` passes ``--continue-on-collection-errors``, so the other files run."""
    if os.environ.get("BENCH_STREAM_JSONL") and report.failed:
        reason = (report.longreprtext.strip().splitlines() or ["?"])[-1][:500]
        _stream({"status": "error", "reason": f"collection failed: {reason}", "nodeid": report.nodeid,
                 "group": None, "candidate": report.nodeid, "params": {}})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``BENCH_STREAM_JSONL=path``, append each timed, skipped or failed case to that file as one JSON line
    as soon as it is done, so that a run stopped half way (bench/gpu.sh's time budget) keeps what it measured."""
    outcome = yield
    if not os.environ.get("BENCH_STREAM_JSONL"):
        return
    report = outcome.get_result()
    if report.when == "teardown" and not report.failed:
        return
    record = _stream_record(item, report)
    if record is not None:
        _stream(record)
