"""Test configuration.

The tests build their inputs on the CPU, so the Triton kernels run through Triton's interpreter, which must be
switched on before any kernel is decorated, i.e. before ``kernels`` is imported: the README's test command sets
``TRITON_INTERPRET=1``, and this file sets it too when it is missing so that a bare ``pytest`` works (also on a
machine with a GPU, whose kernels the benchmarks exercise).
"""
import os
import subprocess
import sys

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import use_backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests first (stable order otherwise): under ``-n 2`` the long runs start on both workers at once
    and the short tests fill in around them, instead of a long test running alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _poisoned(factory):
    """Wrap an allocation function so floating outputs are NaN and integer ones a huge sentinel."""

    def allocate(*args, **kwargs):
        tensor = factory(*args, **kwargs)
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(float("nan"))
        elif tensor.dtype in (torch.int32, torch.int64, torch.int16):
            tensor.fill_(torch.iinfo(tensor.dtype).min)
        return tensor

    return allocate


@pytest.fixture(autouse=True)
def poison_uninitialized_memory(monkeypatch):
    """``torch.empty`` and friends return NaN, so an output element that a kernel never writes fails a test."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))


@pytest.fixture
def triton_backend():
    """Run the test body on the Triton kernels (the interpreter on CPU)."""
    with use_backend("triton"):
        yield


@pytest.fixture
def reference_backend():
    """Run the test body on the PyTorch references (fast; for model training tests)."""
    with use_backend("reference"):
        yield


def compile_ahead_of_time(op: str, capabilities=(80, 90), extra=()) -> subprocess.CompletedProcess:
    """Compile every configuration of ``op`` for the given GPU targets in a fresh, non-interpreted process
    (``extra``: more ``kernels.aot`` options)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "kernels.aot", "--op", op, "--capability", *map(str, capabilities), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
