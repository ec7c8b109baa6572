"""Triton kernels of tldr_fast (installed as ``tldr_fast.kernels``)."""
