"""setuptools entry point. The CUDA C++ library (csrc/) build hooks in here (see the sandwich-norm issue)."""

from setuptools import setup

setup()
