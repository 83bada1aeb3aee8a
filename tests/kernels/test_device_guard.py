"""Every public Triton launcher launches on its tensors' device, not on the current CUDA device.

Triton launches on ``torch.cuda.current_device()``; with a model spread over
two GPUs that is the wrong one for half the layers. The launchers enter
``_common.on_device_of(tensor)`` (``@launcher``). There is no GPU here, so a
recorder stands in for ``on_device_of`` and every kernel launch is replaced by
a probe: each launch must happen inside a device context, and the context must
be the one of the launcher's input tensor.

The launchers under test are not listed by hand: they are the functions of
each op's declared dispatch contract (``fastpeft/ops/_contracts.py``), so a
new op or a new contract function fails here until it has a call below.
"""
import contextlib
import importlib
import pkgutil

import pytest
import torch

from fastpeft import kernels
from fastpeft.kernels import adapter, dora, lora, nf4, prefix_attention, qlora
from fastpeft.ops._contracts import contract_functions
from fastpeft.quant.nf4 import NF4Weight
from op_registry import op_names


def dispatched_launchers() -> set[tuple[str, str]]:
    """``(op, function)`` for every function of every op's dispatch contract."""
    return {(op, name) for op in op_names() for name in contract_functions(op)}


# --- inputs ------------------------------------------------------------------------------------------------

M, K, N, R = 3, 64, 16, 2


def _lora_args():
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    return x, w, b, torch.randn(R, K), torch.randn(N, R), torch.randn(M, N)


def _nf4_weight():
    w = NF4Weight.from_float(torch.randn(N, K), blocksize=64)
    return w.packed, w.absmax_float(), w.code, N, K, 64


def _adapter_args():
    b = 8
    x, dy = torch.randn(M, K), torch.randn(M, K)
    return x, dy, torch.randn(b, K), torch.randn(K, b), torch.randn(b), torch.randn(K), torch.randn(M, b)


def _prefix_args():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    pk, pv = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    return q, k, v, pk, pv, torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5)


def _lora_calls():
    x, w, b, a, bb, dy = _lora_args()
    return x, {
        "lora_forward": lambda: lora.lora_forward(x, w, b, a, bb, 1.0, 0.0, 0),
        "lora_backward": lambda: lora.lora_backward(dy, x, w, a, bb, torch.zeros(M, R), 1.0, 0.0, 0, True, True, True),
        "dropout_mask": lambda: lora.dropout_mask((M, K), 0.5, 1, x.device),
    }


def _nf4_calls():
    x, _, _, _, _, dy = _lora_args()
    packed, absmax, code, n, k, bs = _nf4_weight()
    return x, {
        "nf4_dequantize": lambda: nf4.nf4_dequantize(packed, absmax, code, n, k, bs),
        "nf4_matmul": lambda: nf4.nf4_matmul(x, packed, absmax, code, n, k, bs),
        "nf4_matmul_transposed": lambda: nf4.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs),
        "nf4_forward": lambda: nf4.nf4_forward(x, packed, absmax, code, n, k, bs),
        "nf4_input_grad": lambda: nf4.nf4_input_grad(dy, packed, absmax, code, n, k, bs),
    }


def _qlora_calls():
    x, _, _, a, bb, dy = _lora_args()
    packed, absmax, code, n, k, bs = _nf4_weight()
    return x, {
        "qlora_forward": lambda: qlora.qlora_forward(x, packed, absmax, code, n, k, bs, None, a, bb, 1.0, 0.0, 0),
        "qlora_backward": lambda: qlora.qlora_backward(dy, x, packed, absmax, code, n, k, bs, a, bb,
                                                       torch.zeros(M, R), 1.0, 0.0, 0, True, True, True),
    }


def _adapter_calls():
    x, dy, down_w, up_w, down_b, up_b, pre = _adapter_args()
    return x, {
        "adapter_forward": lambda: adapter.adapter_forward(x, down_w, up_w, down_b, up_b, x, 1.0, None, "relu",
                                                           0.1, 1, True),
        "adapter_backward": lambda: adapter.adapter_backward(dy, x, down_w, up_w, up_b, pre, 1.0, None, "relu",
                                                             0.1, 1, *[True] * 6),
        "dropout_mask": lambda: adapter.dropout_mask((M, K), 0.5, 1, x.device),
    }


def _prefix_attention_calls():
    q, k, v, pk, pv, out, lse = _prefix_args()
    return q, {
        "prefix_attention_forward": lambda: prefix_attention.prefix_attention_forward(q, k, v, pk, pv, None, True,
                                                                                      None),
        "prefix_attention_backward": lambda: prefix_attention.prefix_attention_backward(
            out, q, k, v, pk, pv, None, out, lse, True, None, True, True, True),
        "row_delta": lambda: prefix_attention.row_delta(out, out),
    }


def _dora_calls():
    x, w, b, a, bb, dy = _lora_args()
    scale, norm = torch.rand(N) + 0.5, torch.rand(N) + 0.5
    return x, {
        "dora_forward": lambda: dora.dora_forward(x, w, b, a, bb, scale, 1.0, 0.1, 1, True),
        "dora_backward": lambda: dora.dora_backward(dy, x, w, a, bb, torch.zeros(M, R), torch.randn(M, N), scale, norm,
                                                    1.0, 0.1, 1, True, True, True, True),
    }


CALLS = {"lora": _lora_calls, "nf4": _nf4_calls, "qlora": _qlora_calls, "adapter": _adapter_calls,
         "prefix_attention": _prefix_attention_calls, "dora": _dora_calls}


def _cases():
    return [(op, name) for op, calls in CALLS.items() for name in calls()[1]]


# --- the recorder ------------------------------------------------------------------------------------------

class _Probe:
    """Stands in for ``on_device_of`` and for every kernel launch (no kernel runs)."""

    def __init__(self):
        self.current = None  # the device context the code is in, as entered
        self.entered = []
        self.launches = []  # (kernel name, context at launch)

    def on_device_of(self, where):
        self.entered.append(where)

        @contextlib.contextmanager
        def context():
            outer, self.current = self.current, where
            try:
                yield
            finally:
                self.current = outer

        return context()

    def run(self, fn, *args, **kwargs):
        self.launches.append((getattr(fn, "__name__", repr(fn)), self.current))


@pytest.fixture
def probe(monkeypatch):
    recorder = _Probe()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        if hasattr(module, "on_device_of"):
            monkeypatch.setattr(module, "on_device_of", recorder.on_device_of)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for cls in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(cls, "run", lambda self, *a, **kw: recorder.run(self, *a, **kw))
    return recorder


def _device(where) -> torch.device:
    return where.device if isinstance(where, torch.Tensor) else torch.device(where)


# --- tests -------------------------------------------------------------------------------------------------

def test_every_dispatched_launcher_has_a_device_guard_case():
    """The cases below cover exactly the functions the ops dispatch to (a new op must add its calls)."""
    dispatched = dispatched_launchers()
    assert {("adapter", "adapter_forward"), ("prefix_attention", "prefix_attention_backward"),
            ("lora", "dropout_mask")} <= dispatched
    missing = dispatched - set(_cases())
    assert not missing, f"no device-guard case in CALLS for {sorted(missing)}"


@pytest.mark.parametrize("op,name", _cases())
def test_launcher_launches_every_kernel_inside_its_inputs_device(probe, op, name):
    first, calls = CALLS[op]()
    calls[name]()
    assert probe.launches, f"kernels.{op}.{name} launched no kernel (the probe would prove nothing)"
    outside = [kernel for kernel, context in probe.launches if context is None]
    assert not outside, f"kernels.{op}.{name} launched {outside} outside any device context"
    for kernel, context in probe.launches:
        assert _device(context) == first.device, (name, kernel, context)

