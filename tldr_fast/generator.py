"""The label-conditioned generator and the sampling of its conditions."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
LEGACY_EMBED_BIAS = "embed.bias"  # an embedding bias, held by older generator weights; folded away when they load
# Olah et al. 2017 (Feature Visualization, "decorrelated space"): the square root of ImageNet's RGB colour
# correlation from its SVD, as Lucid ships it; columns scaled so that the largest has norm 1 in `colour_basis`
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


def colour_basis() -> Tensor:
    """``M [3, 3]``: a decorrelated output ``d`` becomes RGB ``M d`` (per pixel); ``M`` is
    ``COLOUR_CORRELATION_SQRT`` divided by its largest column norm."""
    m = torch.tensor(COLOUR_CORRELATION_SQRT, dtype=torch.float64)
    return (m / m.norm(dim=0).max()).float()


def spectrum_scale(h: int, w: int) -> Tensor:
    """``S [h, w//2 + 1]``: the gain of each ``rfft2`` frequency in the 1/f-scaled output (Olah et al. 2017):
    ``1 / max(f, 1/max(h, w))`` with ``f`` the frequency's magnitude in cycles per pixel, normalised so that
    ``mean(S**2) = 1`` over the full spectrum (white noise keeps its power, moved to low frequencies)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, w // 2 + 1)
    s = 1.0 / torch.sqrt(fx**2 + fy**2).clamp(min=1.0 / max(h, w))
    # rfft2 keeps columns 0 and (for even w) w/2 once and the others for their mirror too: weight 1 or 2
    weight = torch.full((1, w // 2 + 1), 2.0, dtype=torch.float64)
    weight[0, 0] = 1.0
    if w % 2 == 0:
        weight[0, -1] = 1.0
    return (s / torch.sqrt((weight * s**2).sum() / (h * w))).float()


def sample_conditions(
    batch: int, num_classes: int, nz: int, conditioning: str, generator: torch.Generator, device, paired: bool = False
) -> Tuple[Tensor, Tensor, Tensor]:
    """Draw ``(z [B, nz], c [B, K], y [B])``: ``y ~ U{0..K-1}``, ``z ~ N(0, I)``, and ``c`` one-hot(y)
    ("hot") or softmax of Gaussian logits with ``y = argmax c`` ("soft"). ``paired``: rows
    ``B/2 .. 2(B/2)-1`` repeat the conditions of rows ``0 .. B/2-1`` (same ``c`` and ``y``, their own ``z``)."""
    z = torch.randn(batch, nz, generator=generator, device=device)
    if conditioning == "hot":
        y = torch.randint(0, num_classes, (batch,), generator=generator, device=device)
        c = F.one_hot(y, num_classes).float()
    else:
        c = torch.softmax(torch.randn(batch, num_classes, generator=generator, device=device), dim=1)
        y = c.argmax(1)
    if paired:
        h = batch // 2
        c, y = c.clone(), y.clone()
        c[h : 2 * h], y[h : 2 * h] = c[:h], y[:h]
    return z, c, y


def hot_matrix(labels: Tensor, num_classes: int, size: Tuple[int, int]) -> Tensor:
    """The one-channel K x K "hot matrix" of each label, resized (nearest) to ``size``: ``[B, 1, h, w]``.

    ``M[r, s] = 1`` where ``r == y`` or ``s == y``. Built without a loop and without the ``[B, K, K]``
    tensor: nearest resizing maps output row ``a`` to source row ``src_r[a]``, so the resized matrix is
    ``(src_r == y) | (src_c == y)``; the index maps come from ``F.interpolate`` itself, so this equals
    interpolating the full matrix exactly.
    """
    h, w = size
    k = torch.arange(num_classes, device=labels.device, dtype=torch.float32)
    src_r = F.interpolate(k.view(1, 1, -1, 1), size=(h, 1), mode="nearest").view(h)  # [h]
    src_c = F.interpolate(k.view(1, 1, 1, -1), size=(1, w), mode="nearest").view(w)  # [w]
    y = labels.to(torch.float32).view(-1, 1, 1)
    rows = src_r.view(1, h, 1) == y  # [B, h, 1]
    cols = src_c.view(1, 1, w) == y  # [B, 1, w]
    return (rows | cols).unsqueeze(1).float()


class ConditionedGenerator(nn.Module):
    """DCGAN-style generator with vector AND intermediate-matrix conditioning (DESIGN.md §2).

    The condition ``c`` is embedded (Linear K -> nz, no bias) and concatenated with ``z``; a projection and two
    nearest-upsample + 3x3 conv stages reach ``(H, W)`` exactly, with the label's hot matrix
    concatenated as an extra channel at the intermediate (half-resolution) stage; ``dropout`` (channel
    dropout, active in training mode) after each up-sampling stage. Output: tanh, in [-1, 1]; with
    ``output_norm``, DAFL's and DFAD's output standardisation: a per-channel BatchNorm (affine) after the
    tanh, then tanh again into (-1, 1), so that in training mode each channel's pre-squash mean and std over
    the batch are exactly the BatchNorm's learned shift and scale (a fixed ink budget per batch). Any
    ``(C, H, W)`` with H, W >= 8 and any K >= 2. Olah et al.'s (2017) parameterisation of the output, before the
    tanh: ``scaled_spectrum`` passes the last convolution's output ``x`` through the fixed filter
    ``irfft2(S * rfft2(x))`` (``S = spectrum_scale(H, W)``, 1/f gains: low frequencies amplified, the power of
    white noise kept), and ``decorrelated_colour`` (C = 3 only) maps each pixel's channels ``d`` to ``M d``
    (``M = colour_basis()``, the square root of natural images' colour correlation).

    >>> g = ConditionedGenerator(10, (1, 28, 28))
    >>> z, c, y = sample_conditions(4, 10, g.nz, "hot", torch.Generator().manual_seed(0), "cpu")
    >>> g(z, c, y).shape
    torch.Size([4, 1, 28, 28])
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Tuple[int, int, int],
        nz: int = 100,
        ngf: int = 64,
        dropout: float = 0.0,
        output_norm: bool = False,
        scaled_spectrum: bool = False,
        decorrelated_colour: bool = False,
    ):
        super().__init__()
        c, h, w = image_shape
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if h < 8 or w < 8 or c < 1:
            raise ValueError(f"image_shape must be (C, H, W) with C >= 1 and H, W >= 8, got {tuple(image_shape)}")
        if decorrelated_colour and c != 3:
            raise ValueError(f"decorrelated_colour needs 3 channels (RGB), the images have {c}")
        self.num_classes, self.image_shape, self.nz, self.ngf = num_classes, tuple(image_shape), nz, ngf
        self.mid = (math.ceil(h / 2), math.ceil(w / 2))
        self.start = (math.ceil(h / 4), math.ceil(w / 4))
        c0 = 2 * ngf
        # no bias: it would only shift the input of the BatchNorm below (through the bias-free Linear), which
        # normalises the shift away; its exact gradient is 0, and Adam turned the rounding noise into steps of lr
        self.embed = nn.Linear(num_classes, nz, bias=False)
        self.project = nn.Sequential(
            nn.Linear(2 * nz, c0 * self.start[0] * self.start[1], bias=False),
            nn.BatchNorm1d(c0 * self.start[0] * self.start[1]),
            nn.ReLU(inplace=True),
        )
        self.up1 = nn.Sequential(
            nn.Upsample(size=self.mid, mode="nearest"),
            nn.Conv2d(c0, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.up2 = nn.Sequential(  # + 1 channel: the hot matrix
            nn.Upsample(size=(h, w), mode="nearest"),
            nn.Conv2d(ngf + 1, ngf // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf // 2),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.out = nn.Conv2d(ngf // 2, c, 3, padding=1)
        self.output_norm = output_norm
        if output_norm:  # absent otherwise: weights saved without it load unchanged
            self.out_norm = nn.BatchNorm2d(c)
        # fixed, not learned: buffers outside the state dict, so the saved layout does not change
        self.register_buffer("spectrum", spectrum_scale(h, w) if scaled_spectrum else None, persistent=False)
        self.register_buffer("colour", colour_basis() if decorrelated_colour else None, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """Weights with an embedding bias ``b`` (``LEGACY_EMBED_BIAS``) load as the same function: ``b`` added
        ``P_e b`` (``P_e = project[0].weight[:, nz:]``) to the BatchNorm's input, which the batch statistics
        cancel and the running mean absorbed; so ``b`` is dropped and ``P_e b`` taken off the running mean."""
        bias = state_dict.get(prefix + LEGACY_EMBED_BIAS)
        if bias is not None:
            w = state_dict.get(prefix + "project.0.weight", self.project[0].weight).detach()  # [M, 2 nz]
            mean_key = prefix + "project.1.running_mean"
            mean = state_dict.get(mean_key)  # [M]
            if bias.shape == (self.nz,) and w.shape[1] == 2 * self.nz:  # else another layout: the usual errors
                del state_dict[prefix + LEGACY_EMBED_BIAS]  # Module.load_state_dict passes its own copy
                if mean is not None and mean.shape == w.shape[:1]:
                    shift = w[:, self.nz :].to(mean.device, torch.float64) @ bias.to(mean.device, torch.float64)
                    state_dict[mean_key] = (mean.double() - shift).to(mean.dtype)  # a new tensor: the caller's is kept
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, z: Tensor, c: Tensor, labels: Tensor) -> Tensor:
        # z: [B, nz], c: [B, K], labels: [B] -> images: [B, C, H, W] in [-1, 1]
        v = torch.cat([z, self.embed(c)], dim=1)  # [B, 2 nz]
        x = self.project(v).view(z.shape[0], 2 * self.ngf, *self.start)
        x = self.up1(x)  # [B, ngf, H/2, W/2]
        x = torch.cat([x, hot_matrix(labels, self.num_classes, self.mid).to(x.dtype)], dim=1)
        x = self.out(self.up2(x))  # [B, C, H, W]
        if self.spectrum is not None:
            # in fp32 at least: cuFFT takes half precision only for power-of-two sizes
            y = x.to(torch.promote_types(x.dtype, torch.float32))
            x = torch.fft.irfft2(torch.fft.rfft2(y) * self.spectrum.to(y.dtype), s=x.shape[-2:]).to(x.dtype)
        if self.colour is not None:
            x = torch.einsum("cd,bdhw->bchw", self.colour.to(x.dtype), x)
        x = torch.tanh(x)
        return torch.tanh(self.out_norm(x)) if self.output_norm else x


def legacy_optimizer_state(
    generator: ConditionedGenerator, weights: Mapping[str, Tensor], state: Dict[str, Any]
) -> Dict[str, Any]:
    """The optimizer ``state`` saved with the generator ``weights``, for ``generator``'s parameters: where the
    weights still hold ``embed.bias`` (which ``load_state_dict`` folds away), its entry is dropped and the
    parameters after it renumbered. Anything else is returned as it is."""
    names = [name for name, _ in generator.named_parameters()]
    saved = sorted(i for group in state["param_groups"] for i in group["params"])
    if LEGACY_EMBED_BIAS not in weights or LEGACY_EMBED_BIAS in names or saved != list(range(len(names) + 1)):
        return state
    gone = names.index("embed.weight") + 1  # the saved order: embed.weight, embed.bias, project...

    def new(i: int) -> int:
        return i - (i > gone)

    return {
        **state,
        "state": {new(i): s for i, s in state["state"].items() if i != gone},
        "param_groups": [{**g, "params": [new(i) for i in g["params"] if i != gone]} for g in state["param_groups"]],
    }
