"""Bridges to other libraries. Each submodule imports its library on import, so
none is imported here: ``from fastpeft.integrations.peft import fastpeft_lora_config``.
"""
