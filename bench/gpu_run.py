"""One command on one CUDA GPU: the GPU tests, the entmax accuracy script and the benchmark suite, within a time
budget, writing ``<out>/<gpu>-<date>.{json,md,log}`` after every step (bench/README.md; ``bash bench/gpu.sh`` runs
this file).

    bash bench/gpu.sh                    # about 8 minutes on an H100-class GPU -> bench/results/
    bash bench/gpu.sh --dry-run          # any machine: CPU, tiny shapes, GPU parts skipped -> a temporary folder
    bash bench/gpu.sh --budget 600 --out DIR --only tests,bench

Steps, each a subprocess whose time limit is cut from the global budget so that the run always ends in time and
writes its files (a step cut short keeps what it had measured):

1. ``tests``: tests/test_gpu.py on the device (``TRITON_INTERPRET=0``), over pytest-xdist workers when installed, as
   many as the CPUs and the GPU's free memory allow (``test_workers``);
2. ``accuracy``: bench/accuracy_entmax.py in bf16, fp16 and fp32 (before the benchmarks, which take whatever time
   is left);
3. ``bench``: bench/test_bench_*.py with ``BENCH_QUICK=1`` (each file's budgeted selection) and
   ``BENCH_TARGET_SECONDS=0.2``, the models and the MoE first; every case is streamed into the results as it ends.
   A bench file that fails to import is reported (status ``error``) and the other files still run.

Peers that the Python environment lacks (entmax, which the references need, and adasplash) are installed from the
wheels in ``.whl/`` when that folder exists (a machine without internet), or reported missing.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("entmax", "adasplash")
BENCH_DIR = ROOT / "bench"
BENCH_FILES = ["test_bench_carn.py", "test_bench_camhg.py", "test_bench_moe.py", "test_bench_entmax_attention.py",
               "test_bench_block_causal.py", "test_bench_graphs.py", "test_bench_decode.py", "test_bench_stream.py"]
#: seconds kept at the end of the budget to write the files
FINAL_RESERVE_S = 10.0
#: seconds the bench step keeps after its files' shares for the case running at the end of a share and pytest's exit
BENCH_EXIT_S = 20.0
#: GPU memory that one worker of the tests step may hold: the float64 references of the largest GPU tests (~6 GB),
#: the CUDA context and the caching allocator's slack
TEST_WORKER_GPU_BYTES = 8 * 2**30
#: the most workers the tests step starts, and the share of the GPU's free memory that they may fill
MAX_TEST_WORKERS, GPU_MEMORY_SHARE = 8, 0.9


class Step(NamedTuple):
    name: str
    max_seconds: float  # the most this step may take
    reserve_seconds: float  # what earlier steps must leave to it


STEPS = [Step("tests", 200, 90), Step("accuracy", 90, 30), Step("bench", float("inf"), 60)]

_PROBE = r"""
import importlib, importlib.metadata, json, platform
info = {"python": platform.python_version()}
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                free_memory_bytes=torch.cuda.mem_get_info(0)[0])
versions = {}
for name in ("triton", "pytorch-triton", "numpy", "pytest", "pytest-benchmark", "pytest-xdist"):
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        versions[name] = None
info["versions"] = versions
peers = {}
for name in PEERS:
    try:
        module = importlib.import_module(name)
        peers[name] = {"version": importlib.metadata.version(name), "path": getattr(module, "__file__", None)}
    except Exception as error:
        peers[name] = {"version": None, "error": f"{type(error).__name__}: {error}"}
info["peers"] = peers
print(json.dumps(info))
"""


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def install_wheels(wheel_dir: Path, site_dir: Path) -> dict:
    """pip-install (no index, no dependencies) each wheel of ``wheel_dir`` whose distribution is not importable here
    into ``site_dir``. Returns {distribution: what happened}."""
    done = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        distribution = wheel.name.split("-")[0].replace("_", "-").lower()
        try:
            done[distribution] = f"already installed ({importlib.metadata.version(distribution)}); {wheel.name} unused"
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--target", str(site_dir), str(wheel)]
        result = subprocess.run(command, capture_output=True, text=True)
        done[distribution] = (f"installed from {wheel.name}" if result.returncode == 0
                              else f"install of {wheel.name} failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return done


def machine_info(env: dict) -> dict:
    """GPU, driver, CUDA, torch, Triton and peer versions, read in a child process (which owns the CUDA context)."""
    info = {"date_utc": _utc_now().isoformat(timespec="seconds")}
    probe = _PROBE.replace("PEERS", repr(PEERS))
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    if result.returncode == 0:
        info.update(json.loads(result.stdout.strip().splitlines()[-1]))
    else:
        info["probe_error"] = (result.stderr or result.stdout).strip()[-500:]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    else:
        info["driver"] = None
    return info


def _stop(process: subprocess.Popen) -> None:
    """End a step that ran past its limit: SIGTERM to its process group (pytest-xdist workers included), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(name: str, command: list, env: dict, limit: float, log) -> dict:
    """Run ``command`` with its output appended to ``log``, stopped after ``limit`` seconds."""
    log.write(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s, {_utc_now():%H:%M:%S} UTC)\n")
    log.flush()
    start, cpu_start = time.monotonic(), _children_cpu_seconds()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        process.wait(timeout=limit)
        status = "passed" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop(process)
        status = "cut"
    seconds = round(time.monotonic() - start, 1)
    cpu_seconds = round(_children_cpu_seconds() - cpu_start, 1)
    log.write(f"===== {name}: {status} after {seconds} s, {cpu_seconds} s CPU (exit code {process.returncode})\n")
    log.flush()
    return {"name": name, "status": status, "seconds": seconds, "cpu_seconds": cpu_seconds, "limit_s": round(limit),
            "returncode": process.returncode, "command": " ".join(command)}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_junit(path: Path) -> Optional[dict]:
    """Counts and failures from pytest's JUnit XML, or None when the run wrote none (cut short)."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, seconds = [], 0.0
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = "passed"
            for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                element = case.find(tag)
                if element is not None:
                    outcome = key
                    if tag != "skipped":
                        failures.append({"test": test, "kind": tag, "message": (element.get("message") or "")[:2000]})
                    break
            counts[outcome] += 1
    return {**counts, "seconds": round(seconds, 1), "failures": failures}


_VERBOSE_OUTCOME = re.compile(r"(?:\b(PASSED|FAILED|SKIPPED|ERROR) (tests/\S+::\S+))|(?:(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)\b)")


def outcomes_from_log(text: str) -> dict:
    """Counts and failed tests from pytest's verbose lines (``-v``, with or without xdist): what a tests step that was
    stopped before pytest wrote its JUnit report had finished."""
    outcomes = {}
    for match in _VERBOSE_OUTCOME.finditer(text):
        outcome, test = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        outcomes[test] = outcome
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    for outcome in outcomes.values():
        counts[key[outcome]] += 1
    failures = [{"test": test, "kind": outcome.lower(), "message": "(cut short: see the log)"}
                for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    return {**counts, "seconds": None, "failures": failures, "cut_short": True}


def read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a stopped process
            pass
    return records


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _ms(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


def _baseline(rows: list) -> Optional[dict]:
    """Ours in a group: the row named ``ours``, else the first whose name starts with ``ours``."""
    named = [row for row in rows if row["candidate"] == "ours"]
    named = named or [row for row in rows if str(row["candidate"]).startswith("ours")]
    return named[0] if named else None


def _autotune_summary(row: dict) -> list:
    """``tuned fwd 2/3`` per autotuned kernel of a case (candidate rank / list length; details in the JSON)."""
    picks = row.get("extra_info", {}).get("autotune") or []
    return [f"tuned {pick['kernel']} {pick['rank']}/{pick['candidates']}" for pick in picks]


def benchmark_tables(records: list) -> list:
    lines = []
    timed = [record for record in records if record["status"] == "ok"]
    groups = {}
    for record in timed:
        groups.setdefault(record["group"] or record["nodeid"], []).append(record)
    for group, rows in groups.items():
        rows.sort(key=lambda row: row["stats"]["mean"])
        baseline = _baseline(rows)
        lines += ["", f"### {group}", "",
                  f"| candidate | mean ms | min ms | rounds x calls | x {baseline['candidate'] if baseline else 'ours'} "
                  "| peak MiB | more |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            stats = row["stats"]
            ratio = f"{stats['mean'] / baseline['stats']['mean']:.2f}" if baseline else ""
            extra = {key: value for key, value in row.get("extra_info", {}).items()
                     if key not in ("peak_mem_MiB", "autotune")}
            more = ", ".join([f"{key} {value}" for key, value in extra.items()] + _autotune_summary(row))
            peak = row.get("extra_info", {}).get("peak_mem_MiB")
            lines.append(f"| {row['candidate']} | {_ms(stats['mean'])} | {_ms(stats['min'])} | "
                         f"{stats['rounds']} x {row.get('iterations', 1)} | {ratio} | {'' if peak is None else peak} | "
                         f"{more} |")
    not_timed = {}
    for record in records:
        if record["status"] != "ok":
            key = (record["status"], record.get("reason") or "")
            not_timed[key] = not_timed.get(key, 0) + 1
    if not_timed:
        lines += ["", "### Cases not timed", "", "| status | reason | cases |", "| --- | --- | --- |"]
        for (status, reason), count in sorted(not_timed.items(), key=lambda item: -item[1]):
            lines.append(f"| {status} | {reason.replace('|', '/')[:300]} | {count} |")
    return lines


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    versions = machine.get("versions", {})
    gpu = machine.get("gpu") or "no CUDA GPU"
    lines = [f"# Kernel tests and benchmarks on {gpu}, {machine['date_utc'][:10]}", ""]
    if results["dry_run"]:
        lines += ["**Dry run** on the CPU: tiny shapes, GPU parts skipped, our side on the reference backend. "
                  "It checks that the script works; its numbers measure nothing.", ""]
    lines += [f"`{results['command']}`; budget {results['budget_s']:.0f} s; files `{results['stem']}.json` (everything "
              f"below), `.md`, `.log` (every step's output).", "", "| | |", "| --- | --- |"]
    hardware = gpu
    if machine.get("capability"):
        hardware += (f" (sm {machine['capability']}, {machine.get('multiprocessors')} SMs, "
                     f"{machine.get('memory_gib')} GiB)")
    triton_version = versions.get("triton") or versions.get("pytorch-triton")
    lines += [f"| GPU | {hardware} |", f"| driver / CUDA | {machine.get('driver')} / {machine.get('cuda')} |",
              f"| torch / triton / python | {machine.get('torch')} / {triton_version} / {machine.get('python')} |"]
    for name, peer in machine.get("peers", {}).items():
        lines.append(f"| {name} | {peer.get('version') or 'not available: ' + peer.get('error', '?')} |")
    for name, what in results["wheels"].items():
        lines.append(f"| wheel {name} | {what} |")
    lines.append(f"| date (UTC) | {machine['date_utc']} |")
    if machine.get("probe_error"):
        lines.append(f"| probe error | {machine['probe_error'][-300:]} |")

    lines += ["", "## Steps", "", "| step | status | seconds | CPU seconds | limit s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {step['name']} | {step['status']} | {step.get('seconds', '')} | {step.get('cpu_seconds', '')} | "
              f"{step.get('limit_s', '')} |" for step in results["steps"]]

    tests = results.get("gpu_tests")
    lines += ["", "## GPU tests (tests/test_gpu.py)", ""]
    if tests is None:
        lines.append("No result (not run, or cut short before pytest wrote its report: see the log).")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped" + (", when the step was stopped (from the log)." if
                                                      tests.get("cut_short") else f", in {tests['seconds']} s."))
        for failure in tests["failures"]:
            message = failure["message"].replace("\n", " ")[:400]
            lines.append(f"- **{failure['kind']}** `{failure['test']}`: {message}")
        if tests["failed"] or tests["errors"]:
            lines += ["", "**Some GPU tests failed: the timings below are of kernels that are not all correct.**"]

    accuracy = results.get("accuracy")
    lines += ["", "## Entmax accuracy (bench/accuracy_entmax.py): max |error| against float64", ""]
    if not accuracy:
        lines.append("No result (not run, or cut short before its first shape: see the log).")
    else:
        lines += [f"Notes: {'; '.join(accuracy['notes'])}." if accuracy.get("notes") else "",
                  "", "| dtype | shape | candidate | output | gradients |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {row['dtype']} | {row['shape']} | {row['candidate']} | {row['max_abs_error_output']:.3e} | "
                  f"{row['max_abs_error_gradients']:.3e} |" for row in accuracy["rows"]]

    lines += ["", "## Benchmarks (bench/test_bench_*.py, budgeted selection)", "",
              "Mean time per call, each call ending with a device synchronization; `x ours` = that candidate's "
              "mean / ours' mean in the same group (above 1: ours is faster). `peak MiB`: torch's peak allocation "
              "over the timed calls, inputs included."]
    lines += benchmark_tables(results["benchmarks"])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def write_results(results: dict, out_dir: Path) -> None:
    """Rewrite ``<stem>.json`` and ``<stem>.md`` (atomically: a reader never sees half a file)."""
    for suffix, text in ((".json", json.dumps(results, indent=1, default=str)), (".md", render_markdown(results))):
        target = out_dir / f"{results['stem']}{suffix}"
        partial = target.parent / f"{target.name}.partial"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)


def _unused_stem(out_dir: Path, stem: str) -> str:
    candidate, number = stem, 1
    while any((out_dir / f"{candidate}{suffix}").exists() for suffix in (".json", ".md", ".log")):
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


def test_workers(cpu_count: int, gpu_free_bytes: Optional[int]) -> int:
    """pytest-xdist workers for the tests step: half the CPUs, at most ``MAX_TEST_WORKERS``, and no more than
    ``GPU_MEMORY_SHARE`` of the GPU's free memory holds at ``TEST_WORKER_GPU_BYTES`` each (all of them on one GPU);
    at least 1. ``gpu_free_bytes`` None (not measured): by CPUs alone."""
    workers = min(MAX_TEST_WORKERS, cpu_count // 2)
    if gpu_free_bytes is not None:
        workers = min(workers, int(GPU_MEMORY_SHARE * gpu_free_bytes // TEST_WORKER_GPU_BYTES))
    return max(1, workers)


def _xdist_workers(gpu_free_bytes: Optional[int]) -> int:
    try:
        importlib.metadata.version("pytest-xdist")
    except importlib.metadata.PackageNotFoundError:
        return 0
    return test_workers(os.cpu_count() or 2, gpu_free_bytes)


def step_command(name: str, dry_run: bool, scratch: Path, gpu_free_bytes: Optional[int] = None) -> tuple:
    """(command, extra environment) of a step; ``gpu_free_bytes`` (the probe's) sizes the tests step's workers."""
    python = sys.executable
    if name == "tests":
        command = [python, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                   "--durations=15", f"--junitxml={scratch / 'gpu_tests.xml'}"]
        workers = 0 if dry_run else _xdist_workers(gpu_free_bytes)
        if workers > 1:
            command += ["-n", str(workers)]
        return command, ({"KERNELS_GPU_TESTS_ON_CPU": "1"} if dry_run else {})
    if name == "accuracy":
        command = [python, "bench/accuracy_entmax.py", "--dtype", "bfloat16", "float16", "float32",
                   "--json", str(scratch / "accuracy.json")]
        return command + (["--dry-run"] if dry_run else []), {}
    if name == "bench":
        # a file that fails to import is streamed as an error (bench/conftest.py); the others still run
        command = [python, "-m", "pytest", *[str(BENCH_DIR / file) for file in BENCH_FILES], "--benchmark-only", "-q",
                   "-p", "no:cacheprovider", "--benchmark-columns=min,median,mean,rounds",
                   "--continue-on-collection-errors"]
        return command, {"BENCH_QUICK": "1", "BENCH_TARGET_SECONDS": "0.2",
                         "BENCH_STREAM_JSONL": str(scratch / "bench.jsonl")}  # + BENCH_DEADLINE, set at launch
    raise ValueError(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480: 8 min)")
    parser.add_argument("--out", type=Path, help="folder for the files (default bench/results, or a temporary "
                                                 "folder with --dry-run)")
    parser.add_argument("--only", default=",".join(step.name for step in STEPS),
                        help="comma-separated steps to run, of: " + ", ".join(step.name for step in STEPS))
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels of missing peers (default .whl/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: tiny shapes, GPU parts skipped, files in a temporary folder unless --out")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(selected) - {step.name for step in STEPS}
    if unknown:
        parser.error(f"--only: unknown steps {sorted(unknown)}")
    deadline = time.monotonic() + args.budget

    scratch = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "KERNELS_BACKEND": "auto"}
    env.pop("KERNELS_GPU_TESTS_ON_CPU", None)
    for name in [key for key in env if key.startswith("PYTEST_XDIST") or key == "PYTEST_CURRENT_TEST"]:
        env.pop(name)  # a calling pytest-xdist worker's: pytest-benchmark would switch timing off in the steps
    if not args.dry_run:
        env["TRITON_INTERPRET"] = "0"  # tests/conftest.py would otherwise switch the interpreter on
    wheels = {}
    if args.wheels.is_dir():
        site = scratch / "site"
        wheels = install_wheels(args.wheels, site)
        if site.is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    machine = machine_info(env)
    if not args.dry_run and not machine.get("cuda_available"):
        print("no CUDA GPU here: run with --dry-run to check the script on a CPU", file=sys.stderr)
        return 2

    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu-dry-run-")) if args.dry_run else ROOT / "bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(machine.get('gpu') or 'cpu')}-{machine['date_utc'][:10]}"
    stem = _unused_stem(out_dir, ("dry-run-" if args.dry_run else "") + stem)
    results = {"schema": 1, "stem": stem, "dry_run": args.dry_run, "budget_s": args.budget,
               "command": "bash bench/gpu.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine, "wheels": wheels, "steps": [], "gpu_tests": None, "accuracy": None,
               "benchmarks": []}
    write_results(results, out_dir)
    print(f"writing {out_dir / stem}.{{json,md,log}}")

    plan = [step for step in STEPS if step.name in selected]
    with open(out_dir / f"{stem}.log", "a", encoding="utf-8") as log:
        for index, step in enumerate(plan):
            later = sum(s.reserve_seconds for s in plan[index + 1:])
            limit = min(step.max_seconds, deadline - time.monotonic() - FINAL_RESERVE_S - later)
            if limit < 5:
                results["steps"].append({"name": step.name, "status": "skipped: no time left"})
                write_results(results, out_dir)
                continue
            command, extra_env = step_command(step.name, args.dry_run, scratch, machine.get("free_memory_bytes"))
            print(f"[{_utc_now():%H:%M:%S}] {step.name} (limit {limit:.0f} s) ...", flush=True)
            if step.name == "bench":  # each bench file gets a fair share of the step's time (bench/conftest.py)
                extra_env["BENCH_DEADLINE"] = str(time.time() + limit - BENCH_EXIT_S)
            log_start = log.tell()
            outcome = run_step(step.name, command, {**env, **extra_env}, limit, log)
            results["steps"].append(outcome)
            if step.name == "tests":
                results["gpu_tests"] = read_junit(scratch / "gpu_tests.xml")
                if results["gpu_tests"] is None:
                    with open(log.name, encoding="utf-8") as text:
                        text.seek(log_start)
                        results["gpu_tests"] = outcomes_from_log(text.read())
            elif step.name == "accuracy" and (scratch / "accuracy.json").exists():
                results["accuracy"] = json.loads((scratch / "accuracy.json").read_text(encoding="utf-8"))
            elif step.name == "bench":
                results["benchmarks"] = read_jsonl(scratch / "bench.jsonl")
            write_results(results, out_dir)
            print(f"[{_utc_now():%H:%M:%S}] {step.name}: {outcome['status']} in {outcome['seconds']} s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    tests = results["gpu_tests"]
    if tests:
        print(f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
              f"{tests['skipped']} skipped")
    print(f"{sum(r['status'] == 'ok' for r in results['benchmarks'])} benchmark cases timed; "
          f"results in {out_dir / stem}.{{json,md,log}}")
    failed = [step["name"] for step in results["steps"] if step["status"] != "passed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
