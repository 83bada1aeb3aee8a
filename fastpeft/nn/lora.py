"""``LoRALinear``: a frozen linear layer plus a trainable low-rank update.

``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with ``A [r, in]``, ``B [out, r]``
and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).

The module only holds parameters and state; the arithmetic is done by
``fastpeft.ops.lora_linear`` (fused Triton kernels on GPU, the CPU path on CPU).

Parameter names follow the HF PEFT adapter layout, so state dicts map 1:1 onto
PEFT files: ``base_layer.weight`` (+ ``base_layer.bias``), ``lora_A.weight``
and ``lora_B.weight`` (``lora_A``/``lora_B`` are bias-free ``nn.Linear``
holders; they are never called).

Wraps ``nn.Linear`` (weight ``[out, in]``) and transformers' ``Conv1D`` (GPT-2;
weight stored ``[in, out]``, i.e. ``fan_in_fan_out``). For ``Conv1D`` the op
receives ``weight.t()``, a transposed view: no copy is made (the CPU path
multiplies by its transpose again, which is the contiguous original).

Dtypes: the op needs one dtype for all operands, the compute dtype: the
autocast dtype inside ``torch.autocast`` (torch's rule for ``linear``), else
the input's dtype. Parameters of another dtype (fp32 adapters on a bf16 model,
bf16 activations into an fp32 layer) are cast to it for the call; the cast is
differentiable, so gradients still land in the parameters, in their dtype.
The output has the compute dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_probability
from ..ops._autocast import any_autocast_enabled, autocast_dtype
from ..variants import LoraVariant, variant as lora_variant
from .base import PeftLayer, module_parameter

InitLoraWeights = Union[bool, str]


@functools.lru_cache(maxsize=None)
def conv1d_class():
    """transformers' ``Conv1D`` class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight stored ``[in, out]``)."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_lora_target(module: nn.Module) -> bool:
    """True for the layer types ``LoRALinear`` can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    return r


def _check_alpha(lora_alpha) -> float:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise TypeError(f"lora_alpha must be a number, got {type(lora_alpha).__name__}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")
    return lora_alpha


def _check_init(init_lora_weights) -> InitLoraWeights:
    if isinstance(init_lora_weights, bool):
        return init_lora_weights
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
        return "gaussian"
    raise ValueError(
        f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}"
    )


@torch.no_grad()
def init_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, init_lora_weights: InitLoraWeights) -> None:
    """PEFT's init: A kaiming-uniform (a=√5), or N(0, 1/r²) for "gaussian"; B zero. ``False``: untouched."""
    init_lora_weights = _check_init(init_lora_weights)
    if init_lora_weights is False:
        return
    if init_lora_weights is True:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    else:
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])
    nn.init.zeros_(lora_B)


def check_use_rslora(use_rslora) -> bool:
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
    return use_rslora


def validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora=False) -> None:
    """Raise the ValueError/TypeError ``LoRALinear`` would raise for these values."""
    check_use_rslora(use_rslora)
    _check_rank(r)
    _check_alpha(lora_alpha)
    check_probability("lora_dropout", lora_dropout)
    _check_init(init_lora_weights)


def check_lora_dtype(lora_dtype) -> None:
    """TypeError unless ``lora_dtype`` is None or a floating torch dtype."""
    if lora_dtype is not None and not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
        raise TypeError(f"lora_dtype must be a floating torch.dtype or None, got {lora_dtype!r}")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a LoRA layer computes in for input x: autocast's for ``linear`` when active, else x's."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return (any_autocast_enabled() and autocast_dtype(x)) or x.dtype


def cast_to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype`` (a differentiable cast, so gradients reach ``t`` in its own dtype); None stays None."""
    return t if t is None or t.dtype is dtype else t.to(dtype)


class LoraLayer(PeftLayer):
    """What every LoRA-kind layer shares: the ``lora_A``/``lora_B`` pair, its hyperparameters, init and variant.

    Subclasses (``LoRALinear``, ``fastpeft.nn.qlora.QLoRALinear``) set their
    ``base_kind`` ("dense", "nf4"), call ``_init_lora`` from their constructor
    and implement ``forward``, ``merge``, ``unmerge``, ``frozen_weight_parameter``
    and ``frozen_weight_out_in``. ``lora_A``/``lora_B`` are bias-free
    ``nn.Linear`` holders named as in HF PEFT; they are never called.
    ``variant`` (``fastpeft.variants``: plain "lora", "dora", ...) supplies the
    forward on the base, any extra parameters, merging and checkpoint keys.
    """

    peft_kind = "lora"
    mergeable = True
    abstract_peft_layer = True
    base_kind = ""

    def _init_lora(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float,
                   use_rslora: bool, init_lora_weights: InitLoraWeights, device, dtype: torch.dtype,
                   variant: Union[str, LoraVariant] = "lora") -> None:
        self.variant = check_variant_for_base(variant, self.base_kind, type(self.base_layer).__name__)
        self.r = _check_rank(r)
        self.lora_alpha = _check_alpha(lora_alpha)
        self.lora_dropout = check_probability("lora_dropout", lora_dropout)
        self.use_rslora = check_use_rslora(use_rslora)
        self.scaling = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        init_lora_weights = _check_init(init_lora_weights)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        self._merged = False
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: InitLoraWeights = True) -> None:
        """PEFT's init (see ``init_lora_pair``); ``False`` leaves both random (a non-zero update: for tests).
        The variant's parameters are initialised from the pair afterwards (DoRA: ``m = ‖W + s·BA‖``)."""
        init_lora_pair(self.lora_A.weight, self.lora_B.weight, init_lora_weights)
        self.variant.init(self)

    def peft_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight, *self.variant.parameters(self)]

    def frozen_weight_parameter(self) -> torch.Tensor:
        """The tensor holding the frozen base weight (whose storage and version say whether it changed)."""
        raise NotImplementedError

    def frozen_weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen base weight as ``[out, in]`` in ``dtype`` (dequantized for an NF4 base)."""
        raise NotImplementedError

    def lora_weights_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in the compute dtype for x (``compute_dtype``): a differentiable cast when needed."""
        return self._lora_pair_in(compute_dtype(x))

    def _lora_pair_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        modules = self._modules
        return (cast_to(module_parameter(modules["lora_A"], "weight"), dtype),
                cast_to(module_parameter(modules["lora_B"], "weight"), dtype))

    @torch.no_grad()
    def delta_weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        """``scaling · B A`` as ``[out, in]``, computed in at least float32, returned in ``dtype``."""
        compute = torch.promote_types(dtype, torch.float32)
        return ((self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute)) * self.scaling).to(dtype)

    def extra_repr(self) -> str:
        variant = "" if self.variant.name == "lora" else f", variant={self.variant.name}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"merged={self._merged}{variant}")


def check_variant_for_base(name_or_variant, base_kind: str, base_name: str) -> LoraVariant:
    """The variant, or ValueError when it has no forward for this base kind (e.g. DoRA on an unsupported base)."""
    chosen = lora_variant(name_or_variant)
    if not chosen.supports(base_kind):
        raise ValueError(f"variant: LoRA variant {chosen.name!r} does not support a {base_name} base "
                         f"({base_kind} weight)")
    return chosen


class LoRALinear(LoraLayer):
    """A frozen ``nn.Linear`` / ``Conv1D`` with a trainable LoRA update.

    Build it with ``LoRALinear.from_linear(base, ...)``; the base layer is kept
    (as ``base_layer``), not copied.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                 fan_in_fan_out: Optional[bool] = None, lora_dtype: Optional[torch.dtype] = None,
                 variant: Union[str, LoraVariant] = "lora"):
        super().__init__()
        if not is_lora_target(base_layer):
            raise TypeError(
                "base_layer must be a torch.nn.Linear or a transformers Conv1D, "
                f"got {type(base_layer).__name__}"
            )
        conv1d = is_conv1d(base_layer)
        if fan_in_fan_out is None:
            fan_in_fan_out = conv1d
        elif bool(fan_in_fan_out) != conv1d:
            raise ValueError(
                f"fan_in_fan_out={fan_in_fan_out} does not match base_layer {type(base_layer).__name__} "
                "(True exactly for Conv1D, whose weight is stored [in, out]); leave it None to auto-detect"
            )
        check_lora_dtype(lora_dtype)
        validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        weight = base_layer.weight
        out_features, in_features = (weight.shape[1], weight.shape[0]) if conv1d else weight.shape
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self._init_lora(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                        weight.device, lora_dtype or weight.dtype, variant)

    @classmethod
    def from_linear(cls, base: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                    fan_in_fan_out: Optional[bool] = None,
                    lora_dtype: Optional[torch.dtype] = None,
                    variant: Union[str, LoraVariant] = "lora") -> "LoRALinear":
        """Wrap ``base`` (``nn.Linear`` or ``Conv1D``). ``fan_in_fan_out=None`` auto-detects
        ``Conv1D``; ``lora_dtype=None`` gives the LoRA parameters the base weight's dtype;
        ``variant`` names the LoRA variant (``fastpeft.variants``: "lora", "dora")."""
        return cls(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   init_lora_weights=init_lora_weights, fan_in_fan_out=fan_in_fan_out, lora_dtype=lora_dtype,
                   variant=variant)

    base_kind = "dense"

    def frozen_weight_parameter(self) -> torch.Tensor:
        return module_parameter(self._modules["base_layer"], "weight")

    def frozen_weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        return self._base_weight_out_in().detach().to(dtype)

    def _base_weight_out_in(self) -> torch.Tensor:
        w = module_parameter(self._modules["base_layer"], "weight")
        return w.t() if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        weight = cast_to(self._base_weight_out_in(), dtype)
        bias = cast_to(module_parameter(self._modules["base_layer"], "bias"), dtype)
        if self._merged:
            return F.linear(cast_to(x, dtype), weight, bias)
        lora_A, lora_B = self._lora_pair_in(dtype)
        return self.variant.forward_dense(self, x, weight, bias, lora_A, lora_B)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` laid out like the base weight (``[in, out]`` for Conv1D),
        computed in at least float32 and returned in the base weight's dtype."""
        delta = self.delta_weight_out_in(self.base_layer.weight.dtype)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; forward then runs the base layer alone."""
        if self._merged:
            return
        weight = self._base_weight_out_in()
        weight.copy_(self.variant.merged(self, weight))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to the rounding of the base weight's dtype)."""
        if not self._merged:
            return
        weight = self._base_weight_out_in()
        weight.copy_(self.variant.unmerged(self, weight))
        self._merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fan_in_fan_out={self.fan_in_fan_out}"
