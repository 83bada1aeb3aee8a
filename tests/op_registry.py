"""The ops fastpeft has, found from the package (shared by the registry and device-guard tests)."""
import importlib
import inspect
import pkgutil

import torch

from fastpeft import ops


def op_names() -> list[str]:
    """The ops: modules of ``fastpeft.ops`` that define an autograd Function."""
    names = []
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"fastpeft.ops.{info.name}")
        if any(inspect.isclass(v) and issubclass(v, torch.autograd.Function) and v.__module__ == module.__name__
               for v in vars(module).values()):
            names.append(info.name)
    return sorted(names)
