"""Build script for fastpeft.

The Python package is pure Python; the native extension (csrc/) is compiled
lazily with ninja on first use (see ``fastpeft/_native``), so installing never
needs a compiler and never pulls a second torch into an isolated build.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastpeft", "fastpeft.*"]),
)
