"""fastpeft's kernel benchmark suite: fastpeft against the tools a user would otherwise use.

``python -m benchmarks`` runs it on this machine (``--help`` for options);
``pytest benchmarks --benchmark-only`` runs the same cases under pytest-benchmark.
Layout: ``spec`` (what an op declares), ``ops/`` (one file per op),
``harness`` (timing), ``memory``, ``ceilings``, ``precision`` (error against
float64, effective compute dtype), ``runner`` (rows, equal-precision ratios,
flags), ``tables``, ``outputs`` (CSV/JSON/summary), ``plots``, ``readme``
(``--update-readme``), ``kernel_report``, ``machine``, ``cli``.
"""
