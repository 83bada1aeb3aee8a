"""The suite's machinery: what an op declares (``spec``), timing (``harness``), ``memory``, ``ceilings``,
``precision`` (error against float64, effective compute dtype), ``runner`` (rows, equal-precision ratios,
flags), ``kernel_report``, ``machine`` and the command line (``cli``)."""
