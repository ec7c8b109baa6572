"""Build script: the Python package, plus the optional C++/CUDA extension ``tldr_fast._C`` from csrc/."""

from setuptools import setup

setup()
