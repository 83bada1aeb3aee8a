"""Bridges to other libraries, one sub-package each: ``peft`` (HF PEFT's LoRA format
and fastpeft as a PEFT backend) and ``adapterhub`` (AdapterHub's adapter and
fusion checkpoints). A bridge imports its library only when a name that needs
it is used: ``from fastpeft.integrations.peft import fastpeft_lora_config``.
"""
