"""PEFT's ``task_type`` of a transformers model, read off its class name: the one rule fastpeft uses.

PEFT's ``task_type`` picks the ``PeftModel`` class a loaded adapter is wrapped
in (``PeftModelForCausalLM``, ``...ForSequenceClassification``, ...). The
prompt methods record it when they are applied (prompt tuning also decides
how its hook extends labels and token types by it) and ``save_peft`` writes
it. Ground floor: ``injection`` and ``integrations`` both read it.
"""
from __future__ import annotations

from torch import nn

CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION = "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"
# transformers' class-name suffixes and the PEFT task type they mean (first match wins).
_TASK_TYPE_BY_CLASS_SUFFIX = (
    ("ForCausalLM", CAUSAL_LM), ("LMHeadModel", CAUSAL_LM),
    ("ForSequenceClassification", SEQ_CLS), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def infer_task_type(model: nn.Module) -> str:
    """PEFT's ``task_type`` for ``model`` from its class name (``...ForCausalLM`` -> CAUSAL_LM, anything
    else without a head suffix, e.g. a bare ``...Model``, -> FEATURE_EXTRACTION)."""
    name = type(model).__name__
    for suffix, task_type in _TASK_TYPE_BY_CLASS_SUFFIX:
        if name.endswith(suffix):
            return task_type
    return FEATURE_EXTRACTION
