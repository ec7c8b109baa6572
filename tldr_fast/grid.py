"""Image grids and image files (Pillow only).

``pair_grid``: one row per class; each generated image beside its best-matching training image, the
pair's SSIM written under it, the class name on the left. Small images are upscaled (nearest) so the
grid is readable. ``save_image_folder``: images as PNG files, one folder per class.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO, Callable, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write, atomic_write_many

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

MIN_TILE = 56  # px: images are upscaled by an integer factor to at least this size
GAP = 2  # px between a generated image and its match
PAD = 8  # px around pairs
TEXT_H = 14  # px: the line of text under each row of pairs, and the title line
LABEL_W = 80  # px: the class-name column
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def to_pil(image: Tensor) -> Image.Image:
    """One image ``[C, H, W]`` in [0, 1] (C = 1 or 3) as a PIL image ("L" or "RGB")."""
    a = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if a.shape[0] == 1:
        return Image.fromarray(a[0])
    if a.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)))
    raise ValueError(f"images must have 1 or 3 channels, got {a.shape[0]}")


def tile_scale(height: int, width: int) -> int:
    """The integer upscaling factor of an image of this size in a grid."""
    return max(1, math.ceil(MIN_TILE / min(height, width)))


def grid_size(rows: int, cols: int, height: int, width: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of a ``pair_grid`` with ``rows`` classes of up to ``cols`` pairs."""
    s = tile_scale(height, width)
    pair_w = 2 * width * s + GAP
    return LABEL_W + cols * (pair_w + PAD) + PAD, TEXT_H + PAD + rows * (height * s + TEXT_H + PAD)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def pair_grid(
    generated: Tensor,
    matches: Tensor,
    labels: Tensor,
    scores: Tensor,
    class_names: Sequence[str],
    per_class: int = 8,
    title: str = "generated | nearest training image (same class); SSIM below",
) -> Image.Image:
    """The comparison grid as an RGB image (size: ``grid_size(rows, cols, H, W)``).

    Args:
        generated: ``[N, C, H, W]`` in [0, 1].
        matches: ``[N, C, H, W]`` in [0, 1], the training image paired with each generated one.
        labels: ``[N]`` class of each generated image.
        scores: ``[N]`` SSIM of each pair (NaN: no match, e.g. a class without training images).
        class_names: name of each class.
        per_class: pairs shown per class, the ``per_class`` highest-scoring ones, best first.

    One row per class that has generated images, in class order.
    """
    n, _, h, w = generated.shape
    if matches.shape != generated.shape or labels.shape != (n,) or scores.shape != (n,):
        raise ValueError("generated, matches, labels and scores must describe the same N images")
    rank = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores.float())
    rows: List[Tuple[int, Tensor]] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).view(-1)
        rows.append((c, members[rank[members].argsort(descending=True, stable=True)[:per_class]]))
    cols = max((len(m) for _, m in rows), default=0)
    s = tile_scale(h, w)
    th, tw = h * s, w * s
    canvas = Image.new("RGB", grid_size(len(rows), cols, h, w), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((PAD, 1), title, fill=INK, font=font)
    for r, (c, members) in enumerate(rows):
        y = TEXT_H + PAD + r * (th + TEXT_H + PAD)
        draw.text((PAD, y + th // 2 - 6), str(class_names[c])[:12], fill=INK, font=font)
        for j, i in enumerate(members.tolist()):
            x = LABEL_W + PAD + j * (2 * tw + GAP + PAD)
            for k, img in enumerate((generated[i], matches[i])):
                canvas.paste(to_pil(img).convert("RGB").resize((tw, th), Image.NEAREST), (x + k * (tw + GAP), y))
            score = scores[i].item()
            draw.text((x, y + th + 1), "no match" if math.isnan(score) else f"SSIM {score:.2f}", fill=INK, font=font)
    return canvas


def save_pair_grid(path: PathLike, *args, **kwargs) -> Tuple[int, int]:
    """``pair_grid(*args, **kwargs)`` written as a PNG, atomically; returns its ``(width, height)``."""
    img = pair_grid(*args, **kwargs)
    atomic_write(path, lambda f: img.save(f, format="PNG"), "grid")
    return img.size


def save_image_folder(folder: PathLike, images: Tensor, labels: Tensor, num_classes: int) -> List[Path]:
    """Each image ``[N, C, H, W]`` in [0, 1] as ``folder/<class>/<n>.png``, class folders zero-padded
    (``00``, ``01``, ...) so that sorted names are the class order (``tldr_fast.data.load_image_folder``
    reads it back). Each file is written atomically. Returns the files written."""
    digits = len(str(num_classes - 1))
    counts = [0] * num_classes
    written = []
    for c in labels.tolist():
        written.append(Path(folder) / f"{c:0{digits}d}" / f"{counts[c]:05d}.png")
        counts[c] += 1
    atomic_write_many([(path, _png(to_pil(img))) for path, img in zip(written, images)], "image")
    return written


def _png(img: Image.Image) -> Callable[[BinaryIO], None]:
    return lambda f: img.save(f, format="PNG")
