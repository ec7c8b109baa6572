"""tldr_fast: fast network inversion (TLDR, arXiv 2410.16884) with fused Triton and CUDA kernels.

>>> from tldr_fast import invert, evaluate, InversionConfig
"""

from ._version import __version__ as __version__
from .audit import AuditResult, audit
from .config import TERMS, InversionConfig, LossWeights, Ramp
from .data import ImageDataset, load_dataset, subset
from .evaluate import EvaluationReport, evaluate
from .generator import ConditionedGenerator
from .invert import Inversion, invert
from .models import load_classifier, save_classifier, train_classifier

__all__ = [
    "audit",
    "AuditResult",
    "invert",
    "Inversion",
    "InversionConfig",
    "LossWeights",
    "Ramp",
    "ConditionedGenerator",
    "TERMS",
    "evaluate",
    "EvaluationReport",
    "ImageDataset",
    "load_dataset",
    "subset",
    "train_classifier",
    "save_classifier",
    "load_classifier",
]
