"""Any ``nn.Module`` classifier as the frozen target of an inversion: logits, penultimate features,
and the mapping from the generator's [-1, 1] images to the classifier's input."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from . import reference
from .config import Preprocess

Tensor = torch.Tensor


class ClassifierError(ValueError):
    """The classifier does not fit what ``invert`` needs; the message says what was expected."""


def fingerprint(classifier: nn.Module) -> str:
    """A hash of what the classifier computes with: the shape, dtype and values of each of its parameters
    and buffers, in registration order (shared tensors once). Names and the module's class do not enter,
    so a wrapper around the same network has the same fingerprint; other weights or layer shapes do not."""
    h = hashlib.sha256()
    for t in [*classifier.parameters(), *classifier.buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
                print(
                    "tldr_fast: classifier has no tldr_meta and no preprocess was given: feeding it [0, 1] images",
                    file=sys.stderr,
                )
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


def normalisation(spec: Preprocess, classifier: nn.Module, channels: int) -> Optional[Tensor]:
    """The classifier's input normalisation as ``[2, C]`` fp32 (per-channel mean and std of [0, 1]
    images): from ``preprocess=(mean, std)`` or, with no preprocess given, from the classifier's
    ``tldr_meta``; None when it is not known (a callable, "unit" or "identity" preprocess)."""
    if spec is None:
        meta = getattr(classifier, "tldr_meta", None)
        if isinstance(meta, Mapping) and "mean" in meta and "std" in meta:
            spec = (meta["mean"], meta["std"])
    if isinstance(spec, Mapping):
        spec = (spec["mean"], spec["std"])
    if not isinstance(spec, (tuple, list)):
        return None
    mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in spec)
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(f"preprocess (mean, std) have {len(mean)} and {len(std)} values for {channels} channels")
    return torch.stack([mean.expand(channels), std.expand(channels)])


def batchnorm_layers(classifier: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The classifier's BatchNorm layers that keep running statistics (what ``bn_stats`` matches)."""
    return [
        m
        for m in classifier.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _find_head(classifier: nn.Module, num_classes: int, name: Optional[str]) -> Tuple[str, Optional[nn.Linear]]:
    modules = dict(classifier.named_modules())
    if name is not None:
        if name not in modules:
            raise ClassifierError(
                f"head={name!r} is not a submodule of the classifier; linear layers: {_linears(classifier)}"
            )
        if not isinstance(modules[name], nn.Linear):
            raise ClassifierError(f"head={name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
        return name, modules[name]
    found = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return found[-1] if found else ("", None)


def _class_count_mismatch(logits: Tensor, num_classes: int) -> str:
    if logits.dim() != 2:
        return f"the classifier returns logits of shape {tuple(logits.shape)}; expected [B, K] with K = num_classes = {num_classes}"
    return (
        f"the classifier has {logits.shape[1]} classes (its logits are [B, {logits.shape[1]}]), not num_classes={num_classes}: "
        f"give the classifier of these {num_classes} classes"
    )


def _linears(classifier: nn.Module) -> List[str]:
    return [
        f"{n} ({m.in_features}->{m.out_features})" for n, m in classifier.named_modules() if isinstance(m, nn.Linear)
    ]


class FrozenClassifier(nn.Module):
    """``forward(images in [-1, 1]) -> (logits [N, K], features [N, D])`` of a frozen classifier.

    Features are (a) the second output of a classifier returning ``(logits, features)``, or (b) the
    input of its final ``nn.Linear`` head (named by ``head`` or found as the last ``nn.Linear`` with
    ``num_classes`` outputs), captured with a forward hook. While this wrapper uses the classifier
    (``attached``: every forward, and ``invert``'s whole run) it is in eval mode, its parameters are frozen
    (``requires_grad`` on only for the terms that differentiate through them, ``grad_norm="full"`` and
    ``kkt``; never updated) and the wrapper's hooks are registered on it; afterwards, also after an error
    or an interrupt, the hooks are gone and its modes and flags are what they were. It is moved to
    ``device`` (and stays there).

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
        self.classifier = classifier.to(device)
        self.need_param_grads = need_param_grads
        self._attached = 0  # the depth of nested attached() blocks
        self.num_classes = num_classes
        self.preprocess = make_preprocess(preprocess, classifier, quiet)
        self.head_name, self.head = _find_head(classifier, num_classes, head)
        self._captured: List[Tensor] = []
        self._capturing = False  # the hook records only during our own forward
        self._tuple_output = False
        meta = getattr(classifier, "tldr_meta", None)
        if (
            isinstance(meta, Mapping)
            and meta.get("input_shape") is not None
            and list(meta["input_shape"]) != list(image_shape)
        ):
            raise ClassifierError(
                f"the classifier was trained on images of shape {tuple(meta['input_shape'])} (its tldr_meta), not "
                f"{tuple(image_shape)}: invert it at its own input shape"
            )
        self.moments = normalisation(preprocess, classifier, image_shape[0])  # [2, C] or None
        if self.moments is not None:
            self.moments = self.moments.to(device)
        self.batchnorms = batchnorm_layers(self.classifier)
        self._bn_rows = 0  # > 0 while forward_bn_stats runs: the rows whose statistics are matched
        self._bn_terms: List[Tensor] = []
        self._bn_op: Callable = reference.bn_stats  # the bn_stats of forward_bn_stats's backend
        with self.attached():
            self._probe(image_shape)

    @property
    def head_bias(self) -> bool:
        return self.head is not None and self.head.bias is not None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The classifier prepared for this wrapper for the duration of the block: eval mode, parameters'
        ``requires_grad`` set to ``need_param_grads``, the head's feature hook and the BatchNorm pre-hooks
        registered. On leaving the block (an error and ``KeyboardInterrupt`` included) the hooks are removed
        and every module's mode and parameter's flag restored, so the user's classifier is left as it was
        (``torch.save`` of it works). Nested blocks attach once (``invert`` holds one for its whole run, so
        the hooks a compiled classifier traced stay the same)."""
        if self._attached:
            self._attached += 1
            try:
                yield
            finally:
                self._attached -= 1
            return
        modes = [(m, m.training) for m in self.classifier.modules()]
        flags = [(p, p.requires_grad) for p in self.classifier.parameters()]
        handles = []
        self._attached = 1
        try:
            self.classifier.eval()
            for p, _ in flags:
                p.requires_grad_(self.need_param_grads)
            if self.head is not None:
                handles.append(self.head.register_forward_hook(self._capture))
            handles += [m.register_forward_pre_hook(self._bn_capture) for m in self.batchnorms]
            yield
        finally:
            self._attached = 0
            for h in handles:
                h.remove()
            for m, training in modes:
                m.training = training
            for p, flag in flags:
                p.requires_grad_(flag)

    def _probe(self, image_shape: Tuple[int, int, int]) -> None:
        device = next(self.classifier.parameters(), torch.empty(0)).device
        x = torch.rand(2, *image_shape, device=device) * 2 - 1  # in [-1, 1], like the generator's output
        buffers = {name: b.clone() for name, b in self.classifier.named_buffers()}
        try:
            with torch.no_grad():
                out = self.classifier(self.preprocess(x))
        except Exception as e:
            raise ClassifierError(
                f"the classifier failed on a batch of shape {tuple(x.shape)} (image_shape={tuple(image_shape)}): {e}"
            ) from e
        changed = [
            name for name, b in self.classifier.named_buffers() if name in buffers and not torch.equal(b, buffers[name])
        ]
        if changed:
            raise ClassifierError(
                f"the classifier's forward changed its buffer {changed[0]!r} in eval mode: invert needs a forward that "
                "leaves the classifier's state alone (the same images give the same logits); keep such updates out of "
                "eval mode, or freeze the buffer"
            )
        if isinstance(out, Tensor) and (out.dim() != 2 or out.shape[1] != self.num_classes):
            raise ClassifierError(_class_count_mismatch(out, self.num_classes))
        if isinstance(out, Mapping):
            raise ClassifierError(
                f"the classifier returns a {type(out).__name__} (keys {list(out)[:5]}); invert needs logits [B, K], or "
                "(logits, features): wrap it in a module that returns those"
            )
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
            logits, feats = self._run(x, no_grad=True)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ClassifierError(_class_count_mismatch(logits, self.num_classes))
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

    def _bn_capture(self, module: nn.modules.batchnorm._BatchNorm, inputs: Tuple[Tensor, ...]) -> None:
        if self._bn_rows:
            self._bn_terms.append(self._bn_op(inputs[0][: self._bn_rows], module.running_mean, module.running_var))

    def forward_bn_stats(
        self, x: Tensor, rows: int, module: Optional[Callable] = None, op: Callable = reference.bn_stats
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """``forward`` plus the BatchNorm-statistics term of the first ``rows`` images: the sum over
        the classifier's BatchNorm layers of ``op`` (a backend's ``bn_stats``; 0 without BatchNorm layers)."""
        self._bn_terms.clear()
        self._bn_rows = rows
        self._bn_op = op
        try:
            logits, feats = self._run(x, module=module)
        finally:
            self._bn_rows = 0
        bn = torch.stack(self._bn_terms).sum() if self._bn_terms else logits.new_zeros((), dtype=torch.float32)
        self._bn_terms.clear()
        return logits, feats, bn

    def _run(self, x: Tensor, no_grad: bool = False, module: Optional[Callable] = None) -> Tuple[Tensor, Tensor]:
        self._captured.clear()
        self._capturing = True
        try:
            with self.attached(), torch.set_grad_enabled(not no_grad and torch.is_grad_enabled()):
                out = (self.classifier if module is None else module)(self.preprocess(x))
        finally:
            self._capturing = False
        if self._tuple_output:
            return out[0], out[1]
        if len(self._captured) != 1:
            raise ClassifierError(
                f"the head {self.head_name!r} ran {len(self._captured)} times in one forward; expected once"
            )
        return out, self._captured.pop()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        # x: [N, C, H, W] in [-1, 1] -> logits: [N, K], features: [N, D]
        return self._run(x)

    def compiled(self) -> Callable[[Tensor], Tensor]:
        """The classifier under ``torch.compile``, to pass as ``module`` to ``forward_bn_stats`` (the
        head's feature hook and the BatchNorm hooks are traced with it); the user's classifier is left
        as it is."""
        return torch.compile(self.classifier)
