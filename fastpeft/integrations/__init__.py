"""Bridges to other libraries, one sub-package each (``peft``). A bridge imports
its library only when a name that needs it is used:
``from fastpeft.integrations.peft import fastpeft_lora_config``.
"""
