"""Entry point of ``python -m benchmarks``."""
from .suite.cli import main

raise SystemExit(main())
