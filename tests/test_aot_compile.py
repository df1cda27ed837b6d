"""Every kernel configuration a launcher can choose compiles for sm_80 and sm_90 (no GPU needed)."""
import pytest

from conftest import compile_ahead_of_time
from kernels.aot import OP_MODULES, configurations


@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_every_configuration_compiles_for_sm80_and_sm90(op):
    assert configurations(op), f"{op} lists no kernel configuration to compile"
    result = compile_ahead_of_time(op)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    compiled = [line for line in result.stdout.splitlines() if line.startswith(op) and ": ok " in line]
    assert len(compiled) == 2 * len(configurations(op)), report
