"""Triton kernels of tldr_fast (installed as ``tldr_fast.kernels``).

Each op has the signature, return values and semantics of the op of the same name in
``tldr_fast.reference``. The loss ops are ``torch.library`` ops (namespace ``tldr_triton``) with their
gradient computed in the fused forward, so a loss built from them traces under
``torch.compile(fullgraph=True)``; ``pairwise_ssim`` (evaluation only, no autograd) is a plain function.
"""

from .bn_stats import bn_stats
from .feature_loss import feature_loss
from .head_loss import head_loss
from .image_prior import image_prior
from .mode_seek import mode_seek
from .pairwise_ssim import pairwise_ssim
from .perturb import perturb

__all__ = ["head_loss", "feature_loss", "image_prior", "perturb", "bn_stats", "mode_seek", "pairwise_ssim"]
