"""HF PEFT interop, in one place.

- ``checkpoints``: ``load_peft`` / ``save_peft``, every supported ``peft_type``;
  ``lora_format`` (``fastpeft.save_lora`` / ``fastpeft.load_lora``) and
  ``prompt_learning_format`` do the methods' I/O, ``peft_directory`` holds
  what the directory format shares; they need only safetensors.
- ``backend``: fastpeft as a backend of HF PEFT (``fastpeft_lora_config``,
  ``load_fastpeft_adapter``, ...); importing it imports ``peft``, so its names
  are loaded on first access.
"""
import importlib

from .lora_format import load_lora, read_lora_config, save_lora

_BACKEND_NAMES = ("FastLoraLinear", "FusedLoraTarget", "fastpeft_lora_config", "load_fastpeft_adapter",
                  "register_fastpeft")


def __getattr__(name):
    if name in _BACKEND_NAMES or name == "backend":
        backend = importlib.import_module(f"{__name__}.backend")  # imports peft
        return backend if name == "backend" else getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_lora", "read_lora_config", "save_lora", *_BACKEND_NAMES]
