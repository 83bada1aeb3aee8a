"""The dispatch contract, declared once: what both implementation floors export for each op.

Op ``<op>`` has two implementation modules, ``fastpeft.kernels.<op>``
(Triton) and ``fastpeft.cpu.<op>`` (CPU); ``_dispatch.implementation`` returns
one of them and ``fastpeft.ops.<op>`` calls the functions declared here on it.
Each op's contract is a ``typing.Protocol`` that both modules satisfy as
modules (PEP 544: the functions of a module implement the protocol's methods,
``self`` left out). ``CONTRACTS`` maps each op to its protocol;
``tests/test_registries.py`` checks that both modules define every function
with the declared parameters (the Triton side may add trailing launch-config
overrides with defaults) and that each op calls nothing else on its
implementation. Neither floor imports this module: it describes them.
"""
from __future__ import annotations

import inspect
from typing import Optional, Protocol

from torch import Tensor


class DropoutMask(Protocol):
    def dropout_mask(self, shape, dropout_p: float, seed: int, device) -> Tensor:
        """Bool keep-mask (True = kept) exactly as this implementation applies it for ``seed``."""


class LoRAImplementation(DropoutMask, Protocol):
    def lora_forward(self, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
        """``(y [M, N] in x's dtype, h [M, r])``, ``h = drop(x) Aᵀ / (1-p)`` saved for the backward."""

    def lora_backward(self, dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                      scaling: float, dropout_p: float, seed: int, need_dx: bool, need_dA: bool,
                      need_dB: bool) -> tuple:
        """``(dx | None, dA | None, dB | None)``: only the asked-for gradients."""


class NF4Implementation(Protocol):
    def nf4_forward(self, x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, n: int, k: int, blocksize: int,
                    bias: Optional[Tensor] = None) -> Tensor:
        """``x2d · dequant(W)ᵀ (+ bias)``."""

    def nf4_input_grad(self, dy2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, n: int, k: int,
                       blocksize: int) -> Tensor:
        """``dy2d · dequant(W)``."""


class QLoRAImplementation(Protocol):
    def qlora_forward(self, x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, n: int, k: int,
                      blocksize: int, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                      dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
        """``(y [M, n], h [M, r])`` in x's dtype."""

    def qlora_backward(self, dy: Tensor, x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, n: int, k: int,
                       blocksize: int, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float,
                       seed: int, need_dx: bool, need_dA: bool, need_dB: bool) -> tuple:
        """``(dx | None, dA | None, dB | None)``; the NF4 weight is frozen."""


class DoRAImplementation(Protocol):
    def dora_forward(self, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     scale: Tensor, scaling: float, dropout_p: float, seed: int, keep_z: bool) -> tuple:
        """``(y [M, N], h [M, r], z [M, N] or None)``; ``scale`` is ``c = m / ‖W + s·BA‖`` (fp32)."""

    def dora_backward(self, dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                      z: Optional[Tensor], scale: Tensor, norm: Tensor, scaling: float, dropout_p: float, seed: int,
                      need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool) -> tuple:
        """``(dx, dA, dB, dm)``; an entry not asked for is ``None``."""


class AdapterImplementation(DropoutMask, Protocol):
    def adapter_forward(self, x2d: Tensor, down_weight: Tensor, up_weight: Tensor, down_bias: Optional[Tensor],
                        up_bias: Optional[Tensor], residual2d: Optional[Tensor], scaling: float,
                        scale: Optional[Tensor], act: str, dropout_p: float, seed: int, store_pre: bool) -> tuple:
        """``(y [M, H] in x's dtype, pre [M, b] or None unless store_pre)``."""

    def adapter_backward(self, dy: Tensor, x2d: Tensor, down_weight: Tensor, up_weight: Tensor,
                         up_bias: Optional[Tensor], pre: Tensor, scaling: float, scale: Optional[Tensor], act: str,
                         dropout_p: float, seed: int, need_dx: bool, need_down_weight: bool, need_up_weight: bool,
                         need_down_bias: bool, need_up_bias: bool, need_scale: bool) -> tuple:
        """``(dx, d_down_weight, d_up_weight, d_down_bias, d_up_bias, d_scale)``; None where not asked for."""


class PrefixAttentionImplementation(Protocol):
    def prefix_attention_forward(self, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                                 prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
                                 scale: Optional[float]) -> tuple[Tensor, Tensor]:
        """``(out [B, Hq, Sq, D], lse [B, Hq, Sq] fp32)``."""

    def prefix_attention_backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                                  prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor,
                                  lse: Tensor, causal: bool, scale: Optional[float], need_q: bool, need_kv: bool,
                                  need_prefix: bool) -> tuple:
        """``(dq, dk, dv, d_prefix_k, d_prefix_v)``; None where not asked for."""


CONTRACTS: dict[str, type] = {
    "adapter": AdapterImplementation,
    "dora": DoRAImplementation,
    "lora": LoRAImplementation,
    "nf4": NF4Implementation,
    "prefix_attention": PrefixAttentionImplementation,
    "qlora": QLoRAImplementation,
}


def contract_functions(op: str) -> dict[str, inspect.Signature]:
    """The functions op ``op``'s implementations export, by name, with their signatures less ``self``."""
    protocol = CONTRACTS[op]
    out = {}
    for cls in reversed(protocol.__mro__):
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and not name.startswith("_"):
                signature = inspect.signature(value)
                out[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return out
