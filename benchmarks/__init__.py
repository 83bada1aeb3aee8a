"""fastpeft's kernel benchmark suite: fastpeft against the tools a user would otherwise use.

``python -m benchmarks`` runs it on this machine (``--help`` for options);
``pytest benchmarks --benchmark-only`` runs the same cases under pytest-benchmark.
Layout, by job: ``suite/`` (the machinery: ``spec`` what an op declares, ``harness``
timing, ``memory``, ``ceilings``, ``precision``, ``runner``, ``kernel_report``,
``machine``, ``cli``), ``report/`` (``tables``, ``outputs``, ``plots``,
``readme``, ``train_step``), ``ops/`` (one spec per op), ``models/`` (whole-model training steps:
``--op train_step``) and ``standalone/`` (programs run on their
own: ``python -m benchmarks.standalone.<name>``).
"""
