"""Every kernel configuration a launcher can choose compiles for sm_80 and sm_90 (no GPU needed).

The quick tests compile the default autotune candidate of every list (aligned variants) and check that the sm_80
defaults fit the shared memory of compute capability 8.6 / 8.9; every candidate of every list is compiled by
``pytest -m full_aot`` (deselected by default: minutes) and measured by ``python -m kernels.tools.report``."""
import re

import pytest

from conftest import compile_ahead_of_time
from kernels._autotune import SMALLEST_SHARED_MEMORY
from kernels.aot import OP_MODULES, config_targets, configurations


def _check_compiled(op, result, configs):
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    compiled = [line for line in result.stdout.splitlines() if line.startswith(op) and ": ok " in line]
    assert len(compiled) == sum(len(config_targets(config, (80, 90))) for config in configs), report


@pytest.fixture(scope="module", params=sorted(OP_MODULES))
def default_compiles(request):
    """(op, its default configurations, ``kernels.aot --defaults-only`` run for sm_80 and sm_90), once per op."""
    op = request.param
    configs = configurations(op, defaults_only=True)
    assert configs, f"{op} lists no kernel configuration to compile"
    return op, configs, compile_ahead_of_time(op, extra=("--defaults-only",))


def test_every_default_configuration_compiles_for_sm80_and_sm90(default_compiles):
    op, configs, result = default_compiles
    _check_compiled(op, result, configs)


def test_sm80_defaults_fit_the_shared_memory_of_sm86_and_sm89(default_compiles):
    """Compute capability 8.6 / 8.9 takes the sm_80 lists but allows 99 KB of shared memory per block (A100: 163):
    every sm_80 default, which launches there untuned (kernels._autotune), must fit."""
    op, configs, result = default_compiles
    shared = {}
    for line in result.stdout.splitlines():
        match = re.match(rf"{op} sm_80 (.+): ok .* (\d+) B shared memory", line)
        if match:
            shared[match.group(1)] = int(match.group(2))
    assert set(shared) == {c.label for c in configs if 80 in config_targets(c, (80,))}, result.stdout
    too_big = {label: size for label, size in shared.items() if size > SMALLEST_SHARED_MEMORY}
    assert not too_big, f"sm_80 defaults over {SMALLEST_SHARED_MEMORY} B of shared memory: {too_big}"


@pytest.mark.full_aot
@pytest.mark.parametrize("op", sorted(OP_MODULES))
def test_every_autotune_candidate_compiles_for_sm80_and_sm90(op):
    _check_compiled(op, compile_ahead_of_time(op), configurations(op))


def test_aligned_16bit_block_causal_candidates_stream_through_async_copies():
    """The 16-divisibility attributes give the variant a launch on aligned tensors makes: 16-byte loads that
    cp.async takes. Every sm_80 candidate of the bf16 forward (D 64) compiled with them has cp.async; the default
    compiled without them (odd head dims) has none."""
    prefix = "fwd-bf16-d64-ieee-"
    listed = [c for c in configurations("block_causal_attention") if c.label.startswith(prefix) and 80 in c.capabilities]
    aligned = [c.label for c in listed if c.divisible]
    assert len(aligned) == 3 and any(not c.default for c in listed if c.divisible), aligned
    result = compile_ahead_of_time("block_causal_attention", capabilities=(80,),
                                   extra=("--match", prefix, "--async-copies"))
    assert result.returncode == 0, result.stdout + result.stderr
    copies = {line.split(": ")[0].split()[-1]: int(re.search(r"(\d+) async copies", line).group(1))
              for line in result.stdout.splitlines() if " async copies" in line}
    assert set(copies) == {c.label for c in listed}, result.stdout
    assert all(copies[label] > 0 for label in aligned), copies
    assert [copies[c.label] for c in listed if not c.divisible] == [0], copies
