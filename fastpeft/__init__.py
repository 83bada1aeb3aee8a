"""fastpeft: fused kernels for parameter-efficient fine-tuning."""
from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
