"""Backend selection rule of fastpeft._backend (docs/architecture.md, "Backends and dispatch")."""
import pytest
import torch

from fastpeft._backend import Backend, select_backend

CPU = torch.device("cpu")


def test_cpu_tensors_run_triton_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(CPU) is Backend.TRITON


def test_cpu_tensors_run_the_cpu_path_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(CPU) is Backend.CPU


@pytest.mark.parametrize("value,expected", [("cpu", Backend.CPU), ("CPU", Backend.CPU), ("triton", Backend.TRITON)])
def test_environment_forces_a_backend(monkeypatch, value, expected):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTPEFT_BACKEND", value)
    assert select_backend(CPU) is expected


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend(CPU)


def test_unknown_backend_name_raises(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        select_backend(CPU)


def test_unsupported_device_raises(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    with pytest.raises(TypeError, match="meta"):
        select_backend(torch.device("meta"))
