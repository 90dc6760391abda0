"""Packaging entry point; the C++ CPU kernels in csrc/ are added here as a pybind11 extension."""
from setuptools import setup

setup()
