"""Counting the fused ops the HF PEFT backend (``fastpeft.integrations.peft.backend``) calls, for its tests."""
import fastpeft.integrations.peft.backend as backend


def count_fused_calls(monkeypatch, *ops: str) -> list:
    """Wrap ``backend.<op>`` for each of ``ops``; the returned list gets each call's ``dropout_p``."""
    calls = []
    for op in ops:
        original = getattr(backend, op)

        def counting(*args, _original=original, **kwargs):
            calls.append(kwargs.get("dropout_p"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend, op, counting)
    return calls
