"""Any ``nn.Module`` classifier as the frozen target of an inversion: logits, penultimate features,
and the mapping from the generator's [-1, 1] images to the classifier's input."""

from __future__ import annotations

import functools

import sys
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .config import Preprocess

Tensor = torch.Tensor


class ClassifierError(ValueError):
    """The classifier does not fit what ``invert`` needs; the message says what was expected."""


def make_preprocess(spec: Preprocess, classifier: nn.Module, quiet: bool = False) -> Callable[[Tensor], Tensor]:
    """The map from generator output in [-1, 1] to the classifier's input (see ``InversionConfig``)."""
    if callable(spec) and not isinstance(spec, str):
        return spec
    if spec is None:
        meta = getattr(classifier, "tldr_meta", None)
        if isinstance(meta, Mapping) and "mean" in meta and "std" in meta:
            spec = (meta["mean"], meta["std"])
        else:
            if not quiet:
                print("tldr_fast: classifier has no tldr_meta and no preprocess was given: feeding it [0, 1] images", file=sys.stderr)
            spec = "unit"
    if spec == "identity":
        return lambda x: x
    if spec == "unit":
        return lambda x: (x + 1) * 0.5
    if isinstance(spec, Mapping):
        spec = (spec["mean"], spec["std"])
    mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in spec)
    if (std <= 0).any():
        raise ValueError(f"preprocess std must be positive, got {std.flatten().tolist()}")
    # (x01 - mean) / std with x01 = (x + 1) / 2, folded into one multiply-add
    scale, shift = 0.5 / std, (0.5 - mean) / std

    on_device: Dict[Tuple[torch.device, torch.dtype], Tuple[Tensor, Tensor]] = {}

    def normalise(x: Tensor) -> Tensor:
        # scale and shift copied to x's device once: a copy per call would sync the host with the GPU
        key = (x.device, x.dtype)
        if key not in on_device:
            on_device[key] = (scale.to(x.device, x.dtype), shift.to(x.device, x.dtype))
        s, t = on_device[key]
        return x * s + t

    return normalise


def _find_head(classifier: nn.Module, num_classes: int, name: Optional[str]) -> Tuple[str, Optional[nn.Linear]]:
    modules = dict(classifier.named_modules())
    if name is not None:
        if name not in modules:
            raise ClassifierError(f"head={name!r} is not a submodule of the classifier; linear layers: {_linears(classifier)}")
        if not isinstance(modules[name], nn.Linear):
            raise ClassifierError(f"head={name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
        return name, modules[name]
    found = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return found[-1] if found else ("", None)


def _linears(classifier: nn.Module) -> List[str]:
    return [f"{n} ({m.in_features}->{m.out_features})" for n, m in classifier.named_modules() if isinstance(m, nn.Linear)]


class FrozenClassifier(nn.Module):
    """``forward(images in [-1, 1]) -> (logits [N, K], features [N, D])`` of a frozen classifier.

    Features are (a) the second output of a classifier returning ``(logits, features)``, or (b) the
    input of its final ``nn.Linear`` head (named by ``head`` or found as the last ``nn.Linear`` with
    ``num_classes`` outputs), captured with a forward hook. The classifier is put in eval mode and its
    parameters are frozen (``requires_grad`` stays on only for ``grad_norm="full"``, which
    differentiates through them; they are never updated).

    A probe forward on random images of ``image_shape`` checks, with clear errors, the input shape,
    the number of classes, finite logits and that the head's output is the classifier's output.
    """

    def __init__(
        self,
        classifier: nn.Module,
        num_classes: int,
        image_shape: Tuple[int, int, int],
        preprocess: Preprocess = None,
        head: Optional[str] = None,
        need_param_grads: bool = False,
        quiet: bool = False,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise ClassifierError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        self.classifier = classifier.to(device).eval()
        for p in classifier.parameters():
            p.requires_grad_(need_param_grads)
        self.num_classes = num_classes
        self.preprocess = make_preprocess(preprocess, classifier, quiet)
        self.head_name, self.head = _find_head(classifier, num_classes, head)
        self._captured: List[Tensor] = []
        self._capturing = False  # the hook records only during our own forward
        self._tuple_output = False
        self._hook = None
        self._probe(image_shape)

    @property
    def head_bias(self) -> bool:
        return self.head is not None and self.head.bias is not None

    def _probe(self, image_shape: Tuple[int, int, int]) -> None:
        device = next(self.classifier.parameters(), torch.empty(0)).device
        x = torch.rand(2, *image_shape, device=device) * 2 - 1  # in [-1, 1], like the generator's output
        try:
            with torch.no_grad():
                out = self.classifier(self.preprocess(x))
        except Exception as e:
            raise ClassifierError(f"the classifier failed on a batch of shape {tuple(x.shape)} (image_shape={tuple(image_shape)}): {e}") from e
        if isinstance(out, (tuple, list)):
            if len(out) != 2 or not all(isinstance(t, Tensor) for t in out):
                raise ClassifierError("a classifier returning a tuple must return (logits [B, K], features [B, D])")
            self._tuple_output = True
            logits, feats = out
        else:
            if self.head is None:
                raise ClassifierError(
                    f"cannot find the penultimate features: the classifier returns a tensor and has no nn.Linear with "
                    f"out_features={self.num_classes} (its linear layers: {_linears(self.classifier) or 'none'}). "
                    "Name the final linear layer with head='...', or return (logits, features) from forward()"
                )
            self._hook = self.head.register_forward_hook(self._capture)
            logits, feats = self._run(x, no_grad=True)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ClassifierError(f"the classifier returns logits of shape {tuple(logits.shape)}, expected [B, {self.num_classes}] (num_classes={self.num_classes})")
        if feats.dim() != 2 or feats.shape[0] != logits.shape[0]:
            raise ClassifierError(f"penultimate features must be [B, D], got {tuple(feats.shape)}")
        if not torch.isfinite(logits).all():
            raise ClassifierError("the classifier returned NaN or inf logits on a probe batch")
        if not self._tuple_output:
            with torch.no_grad():
                again = self.head(feats)
            if not torch.allclose(again, logits, rtol=1e-4, atol=1e-5):
                raise ClassifierError(
                    f"the output of head {self.head_name!r} is not the classifier's output (is something applied after it, "
                    "e.g. a softmax?). invert needs logits = head(features): name the right layer with head='...'"
                )
        self.feature_dim = feats.shape[1]

    def _capture(self, module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        if self._capturing:
            self._captured.append(inputs[0])

    def _run(self, x: Tensor, no_grad: bool = False, module: Optional[Callable] = None) -> Tuple[Tensor, Tensor]:
        self._captured.clear()
        self._capturing = True
        try:
            with torch.set_grad_enabled(not no_grad and torch.is_grad_enabled()):
                out = (self.classifier if module is None else module)(self.preprocess(x))
        finally:
            self._capturing = False
        if self._tuple_output:
            return out[0], out[1]
        if len(self._captured) != 1:
            raise ClassifierError(f"the head {self.head_name!r} ran {len(self._captured)} times in one forward; expected once")
        return out, self._captured.pop()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        # x: [N, C, H, W] in [-1, 1] -> logits: [N, K], features: [N, D]
        return self._run(x)

    def compiled(self) -> Callable[[Tensor], Tuple[Tensor, Tensor]]:
        """``forward`` with the classifier under ``torch.compile`` (the head's feature hook traced
        with it); this module and the user's classifier are left as they are."""
        return functools.partial(self._run, module=torch.compile(self.classifier))
