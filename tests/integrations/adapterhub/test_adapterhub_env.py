"""The side env builder: a build that cannot install fails loudly (no skip), a ready env is not rebuilt."""
from __future__ import annotations

import adapterhub_env
import pytest


def test_failed_install_raises_and_leaves_no_ready_marker(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    monkeypatch.setenv("FASTPEFT_ADAPTERHUB_VENV", str(venv))
    monkeypatch.setattr(adapterhub_env, "PACKAGES", ("adapters==0.0.0.1",))  # no such release
    with pytest.raises(RuntimeError, match="pip install adapters==0.0.0.1"):
        adapterhub_env.side_python()
    assert not (venv / adapterhub_env.MARKER).exists()


def test_ready_env_is_reused_without_building(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / adapterhub_env.MARKER).write_text("{}")
    monkeypatch.setenv("FASTPEFT_ADAPTERHUB_VENV", str(venv))

    def no_build(_):
        raise AssertionError("a ready env was rebuilt")

    monkeypatch.setattr(adapterhub_env, "_build", no_build)
    assert adapterhub_env.side_python() == venv / "bin" / "python"


def test_env_without_marker_is_rebuilt(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # half-built: no marker
    monkeypatch.setenv("FASTPEFT_ADAPTERHUB_VENV", str(venv))
    calls = []
    monkeypatch.setattr(adapterhub_env, "_build", lambda v: calls.append(v))
    monkeypatch.setattr(adapterhub_env, "_check", lambda v: {"adapters": "1.3.0"})
    adapterhub_env.side_python()
    assert calls == [venv] and (venv / adapterhub_env.MARKER).exists()
