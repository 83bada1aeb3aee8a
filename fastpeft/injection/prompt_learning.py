"""What prefix tuning and prompt tuning do to a model once their layer is built: one attach step for both.

``apply_prefix_tuning`` and ``apply_prompt_tuning`` each check their input
and build their layer without touching the model (``prefix_tuning_layer``,
``prompt_tuning_layer``); then ``attach_prompt_layer`` changes the model the
way HF PEFT does for prompt learning:

- every parameter is frozen except those of PEFT layers applied before (LoRA,
  adapters), as PEFT freezes the base;
- the layer becomes the submodule ``PROMPT_MODULE_NAME``;
- ``modules_to_save`` are wrapped in ``ModulesToSave`` (a trainable copy,
  saved with the adapter). By default that is PEFT's choice for the task: a
  sequence classifier's new head (``classifier`` / ``score``) trains, as in
  ``PeftModelForSequenceClassification`` (frozen like the layer in
  ``inference_mode``, PEFT's loaded form).

``prompt_parameters`` lists what the optimizer gets.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ..nn.base import peft_layers
from ..nn.prompt_learning import PROMPT_MODULE_NAME, PromptLearningLayer, prompt_learning_layer
from ..nn.modules_to_save import saved_modules
from .modules_to_save import modules_to_save_names, wrap_modules_to_save
from .targets import is_under_modules_to_save

# PEFT's modules_to_save for a sequence classifier's head (``PeftModelForSequenceClassification``).
SEQ_CLS_HEADS = ("classifier", "score")
def modules_to_save_plan(model: nn.Module, task_type: Optional[str],
                         modules_to_save: Optional[Sequence[str]]) -> list[str]:
    """The module names ``attach_prompt_layer`` will wrap; checks only (ValueError/TypeError), no change.

    ``modules_to_save=None`` is PEFT's default: the classification head of a
    ``SEQ_CLS`` model, nothing otherwise; ``[]`` wraps nothing.
    """
    if modules_to_save is None:
        if task_type != "SEQ_CLS":
            return []
        names = [n for n, _ in model.named_modules() if n]
        modules_to_save = [h for h in SEQ_CLS_HEADS if any(is_under_modules_to_save(n, [h]) for n in names)]
        if not modules_to_save:
            return []
    return modules_to_save_names(model, modules_to_save)


def attach_prompt_layer(model: nn.Module, layer: PromptLearningLayer, saved: Sequence[str]) -> None:
    """Freeze the model (other PEFT layers excepted), add ``layer``, wrap ``saved`` (see module docstring)."""
    keep = {id(p) for _, other in peft_layers(model) for p in other.peft_parameters()}
    keep |= {id(p) for _, wrapper in saved_modules(model) for p in wrapper.trainable_copy.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    model.add_module(PROMPT_MODULE_NAME, layer)
    wrap_modules_to_save(model, saved)
    if layer.inference_mode:  # PEFT's loaded form: nothing trains
        for name in saved:
            model.get_submodule(name).trainable_copy.requires_grad_(False)


def prompt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters prompt learning added: the layer's and the ``modules_to_save`` copies'."""
    layer = prompt_learning_layer(model)
    if layer is None:
        raise ValueError("model has no prompt-learning method applied (fastpeft.apply_prefix_tuning or "
                         "fastpeft.apply_prompt_tuning)")
    copies = [p for _, wrapper in saved_modules(model) for p in wrapper.trainable_copy.parameters()
              if p.requires_grad]
    return layer.peft_parameters() + copies
