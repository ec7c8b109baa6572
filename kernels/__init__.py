"""Triton kernels of tldr_fast (installed as ``tldr_fast.kernels``).

Each op has the signature, return values and semantics of the op of the same name in
``tldr_fast.reference``. The loss ops are ``torch.library`` ops (namespace ``tldr_triton``) with their
gradient computed in the fused forward, so a loss built from them traces under
``torch.compile(fullgraph=True)``; ``pairwise_ssim`` (evaluation only, no autograd) is a plain function.
The ops here are those whose declaration (``tldr_fast/ops/<op>.py``) names ``kernels/<op>.py`` in its
``files``: each is the function ``<op>`` of that module.
"""

import importlib

from tldr_fast.ops import SPECS

__all__ = [name for name, spec in SPECS.items() if f"kernels/{name}.py" in spec.files]
globals().update({name: getattr(importlib.import_module(f"{__name__}.{name}"), name) for name in __all__})
