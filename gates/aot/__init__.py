"""One AOT module per kernel module: ``gates.aot.<op>`` covers ``fastpeft.kernels.<op>``.

Each defines ``aot_launches()`` (the launchers called on realistic CPU
tensors, each group labelled with ``gates.aot_spec.launch_label``),
``aot_specs()`` and, where the op has them, ``EPILOGUE_KERNELS``.
"""
