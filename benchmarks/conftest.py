"""pytest-benchmark entry: ``pytest benchmarks --benchmark-only [--bench-level default] [--bench-device cuda]``.

Not collected by the plain test command (``testpaths = tests``). Makes the
``benchmarks`` package importable however pytest is started, and adds the
options that pick the shapes and the device.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    group = parser.getgroup("fastpeft benchmarks")
    group.addoption("--bench-level", default="quick", choices=("quick", "default", "full"),
                    help="shape set of the suite (default: quick)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-op", action="append", default=None, help="op to run (repeatable; default: all)")
