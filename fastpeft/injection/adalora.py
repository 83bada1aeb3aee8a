"""AdaLoRA on a model: ``apply_adalora``, PEFT's rank allocator (``update_and_allocate``) and its
orthogonality regulariser, with HF PEFT's semantics (``tuners/adalora``; the layer maths:
``fastpeft.variants.adalora``).

- Budget: ``init_bgt = Σ init_r`` over the layers, ``target_bgt = target_r ·
  layers``. Step ``t ≤ tinit``: the full budget, no masking; ``t >
  total_step − tfinal``: the target; between them the cubic schedule
  ``⌊(init − target)·(1 − (t − tinit)/(total_step − tfinal − tinit))³ + target⌋``,
  masking every ``deltaT`` steps.
- Sensitivity of each entry of A, E, B: ``|p · ∇p|``, smoothed by an EMA
  (``beta1``), its uncertainty ``|ipt − ema|`` by another (``beta2``); a
  score ``ema · unc`` per entry, per rank ``i`` the score of ``E_i`` plus the
  means of A's row i and B's column i. The ``init_bgt − budget`` lowest ranks
  (ties included, ``kthvalue``) get ``E_i = 0``; ``rank_pattern`` records the
  kept ranks per layer. At ``total_step − tfinal`` the mask is final and
  re-applied every later step.
- Loss: the model's forward adds ``orth_reg_weight · mean over A and B
  matrices of ‖P Pᵀ − I‖_F`` (``‖Bᵀ B − I‖_F`` for B) to ``outputs.loss``
  when the output has one, as PEFT's ``AdaLoraModel.forward`` does.

Call ``update_and_allocate(model, step)`` after ``loss.backward()`` /
``optimizer.step()`` and before ``zero_grad()``, as PEFT's
``model.base_model.update_and_allocate(step)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .._validation import check_positive_int
from ..nn.lora import LoRALinear
from ..variants.adalora import VARIANT as ADALORA
from .lora import check_lora_targets, lora_modules, mark_only_lora_trainable
from .targets import TargetModules, find_target_modules, swap_modules

STATE_ATTR = "adalora_state"


@dataclass
class AdaLoraSchedule:
    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    deltaT: int
    total_step: int
    beta1: float
    beta2: float
    orth_reg_weight: float


@dataclass
class AdaLoraState:
    """The allocator's state on a model: the schedule, the sensitivity EMAs and the latest ``rank_pattern``."""

    schedule: AdaLoraSchedule
    init_bgt: int
    target_bgt: int
    exp_avg_ipt: dict = field(default_factory=dict)
    exp_avg_unc: dict = field(default_factory=dict)
    rank_pattern: Optional[dict] = None


def check_schedule(init_r, target_r, tinit, tfinal, deltaT, total_step, beta1, beta2,
                   orth_reg_weight) -> AdaLoraSchedule:
    """PEFT's ``AdaLoraConfig`` checks, as ValueError/TypeError naming the argument."""
    if total_step is None:
        raise ValueError("total_step: AdaLoRA needs the number of training steps (> 0)")
    total_step = check_positive_int("total_step", total_step)
    init_r, target_r, deltaT = (check_positive_int(n, v) for n, v in
                                (("init_r", init_r), ("target_r", target_r), ("deltaT", deltaT)))
    for name, value in (("tinit", tinit), ("tfinal", tfinal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if target_r > init_r:
        raise ValueError(f"target_r ({target_r}) must be at most init_r ({init_r})")
    if tinit >= total_step - tfinal:
        raise ValueError(f"tinit ({tinit}) must be below total_step - tfinal ({total_step - tfinal}): "
                         "the schedule leaves no budgeting phase")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if isinstance(orth_reg_weight, bool) or not isinstance(orth_reg_weight, (int, float)) or orth_reg_weight < 0:
        raise ValueError(f"orth_reg_weight must be a number >= 0, got {orth_reg_weight!r}")
    return AdaLoraSchedule(init_r, target_r, tinit, tfinal, deltaT, total_step, float(beta1), float(beta2),
                           float(orth_reg_weight))


def apply_adalora(model: nn.Module, target_modules: TargetModules, *, total_step: Optional[int] = None,
                  init_r: int = 12, target_r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                  tinit: int = 0, tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                  orth_reg_weight: float = 0.5) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` / ``Conv1D`` layers in AdaLoRA layers (rank ``init_r``), in place.

    Arguments as PEFT's ``AdaLoraConfig``; ``total_step`` is required. Every
    other parameter is frozen; the model's forward adds the orthogonality
    regulariser to ``outputs.loss``. Errors (bad schedule, no target) before
    anything changes.
    """
    schedule = check_schedule(init_r, target_r, tinit, tfinal, deltaT, total_step, beta1, beta2, orth_reg_weight)
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("model: AdaLoRA is already applied")
    names = find_target_modules(model, target_modules)
    check_lora_targets(model, names, ADALORA)

    def make(name: str, module: nn.Module) -> nn.Module:
        return LoRALinear.from_linear(module, r=init_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                      variant=ADALORA)

    swap_modules(model, names, make)
    mark_only_lora_trainable(model)
    layers = adalora_layers(model)
    state = AdaLoraState(schedule, init_bgt=sum(layer.r for _, layer in layers),
                         target_bgt=target_r * len(layers))
    object.__setattr__(model, STATE_ATTR, state)
    model.register_forward_hook(_add_orthogonal_regularisation)
    return model


def adalora_layers(model: nn.Module) -> list:
    return [(name, layer) for name, layer in lora_modules(model) if layer.variant is ADALORA]


def orthogonal_regularisation(model: nn.Module) -> torch.Tensor:
    """PEFT's regulariser: the mean over every A and B of ``‖A Aᵀ − I‖_F`` / ``‖Bᵀ B − I‖_F``."""
    terms = []
    for _, layer in adalora_layers(model):
        a, b = layer.lora_A.weight, layer.lora_B.weight
        for cov in (a @ a.T, b.T @ b):
            terms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
    return torch.stack(terms).mean()


def _add_orthogonal_regularisation(model, _args, outputs):
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor):
        outputs.loss = loss + getattr(model, STATE_ATTR).schedule.orth_reg_weight * orthogonal_regularisation(model)
    return outputs


def budget_schedule(state: AdaLoraState, step: int) -> tuple[int, bool]:
    """``(budget, mask now)`` at ``step`` (module docstring)."""
    s = state.schedule
    if step <= s.tinit:
        return state.init_bgt, False
    if step > s.total_step - s.tfinal:
        return state.target_bgt, True
    mul_coeff = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
    return int((state.init_bgt - state.target_bgt) * (mul_coeff ** 3) + state.target_bgt), step % s.deltaT == 0


@torch.no_grad()
def _update_sensitivity(state: AdaLoraState, model: nn.Module) -> None:
    b1, b2 = state.schedule.beta1, state.schedule.beta2
    for name, layer in adalora_layers(model):
        for key, p in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight), ("E", layer.lora_E)):
            ipt = (p * p.grad).abs()
            k = (name, key)
            avg = state.exp_avg_ipt.get(k, torch.zeros_like(p))
            unc = state.exp_avg_unc.get(k, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            state.exp_avg_ipt[k] = avg
            state.exp_avg_unc[k] = b2 * unc + (1 - b2) * (ipt - avg).abs()


@torch.no_grad()
def _mask_to_budget(state: AdaLoraState, model: nn.Module, budget: int) -> dict:
    scores = {}
    for name, layer in adalora_layers(model):
        def score(key):
            return state.exp_avg_ipt[(name, key)] * state.exp_avg_unc[(name, key)]
        ab = torch.cat([score("A").mean(dim=1, keepdim=True), score("B").mean(dim=0).view(-1, 1)], dim=1)
        scores[name] = score("E").view(-1) + ab.sum(dim=1)
    k = state.init_bgt - budget
    threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else -float("inf")
    pattern = {}
    for name, layer in adalora_layers(model):
        masked = scores[name] <= threshold
        layer.lora_E.masked_fill_(masked.view(-1, 1), 0.0)
        pattern[name] = (~masked).tolist()
    return pattern


@torch.no_grad()
def _mask_using_rank_pattern(model: nn.Module, pattern: dict) -> None:
    for name, layer in adalora_layers(model):
        keep = torch.tensor(pattern[name], device=layer.lora_E.device)
        layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def update_and_allocate(model: nn.Module, global_step: int) -> Optional[dict]:
    """PEFT's ``update_and_allocate``: update the sensitivities, mask E to the step's budget; returns the
    ``rank_pattern`` ({layer name: [kept per rank]}) in force, or None before the first masking."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("model: update_and_allocate needs a model from fastpeft.apply_adalora")
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
    s = state.schedule
    final = s.total_step - s.tfinal
    if global_step < final:
        _update_sensitivity(state, model)
        budget, mask_now = budget_schedule(state, global_step)
        if mask_now:
            state.rank_pattern = _mask_to_budget(state, model, budget)
    elif global_step == final:  # PEFT: no sensitivity update at this step, the target budget, then a reset
        state.rank_pattern = _mask_to_budget(state, model, budget_schedule(state, global_step)[0])
        state.exp_avg_ipt.clear()
        state.exp_avg_unc.clear()
    elif state.rank_pattern is not None:
        _mask_using_rank_pattern(model, state.rank_pattern)
    return state.rank_pattern
