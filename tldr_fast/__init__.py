"""tldr_fast: fast network inversion (TLDR, arXiv 2410.16884) with fused Triton and CUDA kernels.

>>> from tldr_fast import invert, InversionConfig
"""

from .config import TERMS, InversionConfig, LossWeights, Ramp
from .generator import ConditionedGenerator
from .invert import Inversion, invert

__version__ = "0.1.0"
__all__ = ["invert", "Inversion", "InversionConfig", "LossWeights", "Ramp", "ConditionedGenerator", "TERMS"]
