"""The first use of the native extension says that it compiles (one line); using fastpeft prints no warnings."""
import subprocess
import sys
import types

import pytest

from fastpeft import _native


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """A build folder of our own and a ``cpp_extension.load`` that only records its calls."""
    calls = []

    def load(name, sources, **kwargs):
        calls.append(name)
        (_native.build_dir("cpu") / f"{name}.so").write_bytes(b"")

    monkeypatch.setenv(_native.ENV_BUILD_DIR, str(tmp_path))
    monkeypatch.delenv(_native.ENV_PREBUILT, raising=False)
    monkeypatch.setattr(_native, "_import_cpp_extension", lambda: types.SimpleNamespace(load=load))
    return calls


def test_a_build_announces_itself_once(fake_build, capsys):
    _native._load("cpu", verbose=False)
    first = capsys.readouterr().err
    assert first.count("\n") == 1 and "fastpeft: compiling the native cpu extension" in first
    _native._load("cpu", verbose=False)  # cached now: silent
    assert capsys.readouterr().err == ""
    assert fake_build == ["fastpeft_native_cpu", "fastpeft_native_cpu"]


def test_a_changed_source_announces_the_rebuild(fake_build, capsys, monkeypatch, tmp_path):
    _native._load("cpu", verbose=False)
    capsys.readouterr()
    newer = tmp_path / "newer.cpp"
    newer.write_text("")
    library = _native.build_dir("cpu") / "fastpeft_native_cpu.so"
    import os

    os.utime(newer, (library.stat().st_mtime + 10,) * 2)
    monkeypatch.setattr(_native, "cpu_sources", lambda: [str(newer)])
    _native._load("cpu", verbose=False)
    assert "compiling the native cpu extension" in capsys.readouterr().err


def test_import_and_first_nf4_use_print_no_warnings():
    _native.load_cpu()  # the real build, cached for the fresh process below
    script = (
        "import torch, fastpeft\n"
        "model = torch.nn.Sequential(torch.nn.Linear(64, 64))\n"
        "fastpeft.apply_qlora(model, ['0'], double_quant=True)\n"
        "model(torch.randn(2, 64)).sum().backward()\n"
    )
    run = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == "" and run.stdout == ""
