"""The static GPU gates: development tools beside ``benchmarks/``, not part of the ``fastpeft`` wheel.

``kernel_report`` compiles every Triton kernel variant the launchers run for
sm_80/sm_90 and checks resources (``python -m gates.kernel_report``);
``offset_check`` checks int64 addressing in the TTIR
(``python -m gates.offset_check``); ``sass_loops`` reads main loops out of
SASS; ``aot_spec`` records the launches, which ``aot/<op>.py`` makes for
each kernel module ``fastpeft.kernels.<op>``. See ``docs/architecture.md``,
"The static GPU gate". Run from the repository root (or with it on
``PYTHONPATH``). Nothing in ``fastpeft`` imports this package.
"""
