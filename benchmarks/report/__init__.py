"""What a run leaves for a reader: ``tables`` (text and markdown), ``outputs`` (CSV/JSON/summary.md),
``plots`` (``python -m benchmarks.report.plots RESULTS_JSON`` redraws them) and ``readme``
(``--update-readme``)."""
