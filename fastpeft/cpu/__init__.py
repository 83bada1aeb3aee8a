"""The CPU implementation floor: ``<op>.py`` exports the same functions as ``fastpeft.kernels.<op>``.

``fastpeft.ops._dispatch.implementation`` picks this module or the Triton one
by the backend rule (``docs/architecture.md``, "Backends and dispatch").
``nf4_native.py`` is the Python side of the native (C++) NF4 CPU kernels.
Nothing here imports ``fastpeft.kernels``.
"""
