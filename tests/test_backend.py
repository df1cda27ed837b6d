"""The backend switch (docs/design.md section 1)."""
import pytest
import torch

from kernels import backend, use_backend


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "reference")
    assert backend.requested_backend() == "reference"
    assert not backend.use_triton(torch.zeros(1))
    monkeypatch.setenv("KERNELS_BACKEND", "auto")
    assert not backend.use_triton(torch.zeros(1)), "auto runs the reference on CPU tensors"


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        backend.requested_backend()
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        with use_backend("fast"):
            pass


def test_use_backend_overrides_and_restores(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "reference")
    with use_backend("triton"):
        assert backend.requested_backend() == "triton"
        with use_backend("auto"):
            assert backend.requested_backend() == "auto"
        assert backend.requested_backend() == "triton"
    assert backend.requested_backend() == "reference"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.use_triton(torch.zeros(1))
