"""tldr_fast: fast network inversion (TLDR, arXiv 2410.16884) with fused Triton and CUDA kernels."""

__version__ = "0.1.0"
