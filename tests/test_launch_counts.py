"""Host-side work per call (``python -m kernels.tools.launches``): every op and module's device operations per forward
+ backward at the models' shapes stay within the committed ceilings (``CEILINGS``), and the counting rules hold."""
import json
import os
import subprocess
import sys
from pathlib import Path

from kernels.tools.launches import CASES, CEILINGS, DTYPES, SLOW_ON_CPU, count_events

ROOT = Path(__file__).resolve().parent.parent


def test_every_case_and_dtype_has_a_ceiling():
    assert set(CEILINGS) == {(case.name, dtype) for case in CASES for dtype in DTYPES}
    assert CEILINGS[("Top2MoE", "fp32")] <= 15 and CEILINGS[("Top2MoE", "bf16")] <= 15  # the target


def test_device_operations_per_call_stay_within_their_ceilings(tmp_path):
    """One subprocess (the capture needs Triton's compiled mode, this process interprets): every case in fp32 and
    bf16 (``--quick``: but the layer's bf16, whose CPU GEMMs take a minute), each count at most its ceiling."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "launches.json"
    command = [sys.executable, "-m", "kernels.tools.launches", "--quick", "--check", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert {(row["case"], row["dtype"]) for row in rows} == set(CEILINGS) - SLOW_ON_CPU
    for row in rows:
        assert row["triton"] > 0 and row["other"] <= row["ceiling"], row
        assert sum(row["operators"].values()) == row["other"] and row["gemm"] <= row["other"], row
    assert "| Top2MoE |" in result.stdout


class _Event:
    def __init__(self, name, *children):
        self.name, self.cpu_children, self.cpu_parent = name, list(children), None
        for child in children:
            child.cpu_parent = self


def test_counting_rules():
    """Outermost aten operators count once; views and plain allocations not at all; ``aten::to`` and other wrappers,
    autograd nodes and custom ops are looked through; the instrument's own fills are left out."""
    from kernels.tools.launches import _FILL

    fill = _Event(_FILL, _Event("aten::zero_", _Event("aten::fill_")))
    zeros = _Event("aten::zeros", _Event("aten::empty"), _Event("aten::zero_", _Event("aten::fill_")))
    cast = _Event("aten::to", _Event("aten::_to_copy", _Event("aten::empty_strided"), _Event("aten::copy_")))
    no_op_cast = _Event("aten::to")
    linear = _Event("aten::linear", _Event("aten::t"), _Event("aten::addmm"))
    backward = _Event("autograd::engine::evaluate_function: MulBackward0", _Event("MulBackward0", _Event("aten::mul")))
    custom = _Event("kernels::moe_top2_fwd", _Event("aten::empty"), _Event("aten::sort"), fill)
    views = [_Event("aten::view"), _Event("aten::transpose", _Event("aten::as_strided")), _Event("aten::empty")]
    counts = count_events([zeros, cast, no_op_cast, linear, backward, custom, *views])
    assert counts == {"aten::zeros": 1, "aten::_to_copy": 1, "aten::addmm": 1, "aten::mul": 1, "aten::sort": 1}
