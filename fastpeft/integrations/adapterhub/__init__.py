"""AdapterHub interop: bottleneck adapters and AdapterFusion layers in AdapterHub ``adapters`` 1.3's directory format.

``load_adapter`` / ``save_adapter`` and ``load_adapter_fusion`` /
``save_adapter_fusion`` (see ``format``); needs only safetensors, not the
``adapters`` package.
"""
from .format import load_adapter, load_adapter_fusion, read_adapter_config, save_adapter, save_adapter_fusion

__all__ = ["load_adapter", "load_adapter_fusion", "read_adapter_config", "save_adapter", "save_adapter_fusion"]
