"""The audit's report: ``report.html`` (one self-contained file: images embedded as base64 PNG, no script,
nothing fetched), ``report.json`` (every number) and ``grids/`` (the same pictures as PNG files).
``tldr_fast.audit`` computes; this module draws and writes."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write, atomic_write_text
from .data import ImageDataset
from .grid import to_pil
from .progress import progress_bar

Tensor = torch.Tensor
BEST = 12  # training images shown in "reconstructed best"
SAMPLES_PER_CLASS = 16  # generated images shown per class
TILE = 84  # pixels per image in the page


def png_bytes(image: Tensor, scale: int = 1) -> bytes:
    """One image ``[C, H, W]`` in [0, 1] as PNG bytes, upscaled ``scale`` times (nearest neighbour)."""
    img = to_pil(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tile_png(images: Tensor, columns: int = 8) -> bytes:
    """Images ``[N, C, H, W]`` in [0, 1] tiled in rows of ``columns`` (2-pixel white gaps), as PNG bytes."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // columns))
    sheet = torch.ones(c, rows * (h + 2), min(n, columns) * (w + 2))
    for i in range(n):
        r, k = divmod(i, columns)
        sheet[:, r * (h + 2) : r * (h + 2) + h, k * (w + 2) : k * (w + 2) + w] = images[i]
    return png_bytes(sheet, scale=max(1, 56 // h))


def similarity_figure(report: Dict[str, Any]) -> bytes:
    """PNG of the similarity to training against the similarity to held-out images, for the generated and
    the real unseen images: a scatter (above the diagonal: closer to training) and a histogram of the
    difference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    scatter, hist = fig.subplots(1, 2)
    diffs = []
    for key, name, colour in (("real", "real unseen images (null)", "#7f7f7f"), ("generated", "generated", "#d62728")):
        t = np.array([np.nan if v is None else v for v in report[key]["to_train"]], dtype=float)
        h = np.array([np.nan if v is None else v for v in report[key]["to_held"]], dtype=float)
        ok = ~(np.isnan(t) | np.isnan(h))
        scatter.scatter(h[ok], t[ok], s=9, alpha=0.6, color=colour, label=name)
        diffs.append((t[ok] - h[ok], name, colour))
    lo = min([0.0] + [float(np.min(d)) for d, _, _ in diffs if len(d)])
    scatter.plot([lo, 1], [lo, 1], color="black", linewidth=0.8)
    scatter.set_xlabel("SSIM to the nearest held-out image")
    scatter.set_ylabel("SSIM to the nearest training image")
    scatter.set_title("above the line: closer to training")
    scatter.legend(loc="lower right", fontsize=8)
    bins = np.linspace(
        min([-0.05] + [float(d.min()) for d, _, _ in diffs if len(d)]),
        max([0.05] + [float(d.max()) for d, _, _ in diffs if len(d)]),
        31,
    )
    for d, name, colour in diffs:
        hist.hist(d, bins=bins, alpha=0.55, color=colour, label=name, density=True)
    hist.axvline(0, color="black", linewidth=0.8)
    hist.set_xlabel("SSIM to training minus SSIM to held-out")
    hist.set_ylabel("density")
    hist.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(data: bytes, alt: str, width: Optional[int] = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def best_reconstructed(report: Dict[str, Any], limit: int = BEST) -> List[int]:
    """The generated images nearest a training image, most similar first, one per training image."""
    gen = report["generated"]
    order = sorted(
        (i for i, v in enumerate(gen["to_train"]) if v is not None and gen["train_nn"][i] >= 0),
        key=lambda i: -gen["to_train"][i],
    )
    chosen, seen = [], set()
    for i in order:
        if gen["train_nn"][i] not in seen:
            seen.add(gen["train_nn"][i])
            chosen.append(i)
        if len(chosen) == limit:
            break
    return chosen


def render_html(
    report: Dict[str, Any], figure: bytes, best: Sequence[Dict[str, Any]], classes: Sequence[Dict[str, Any]]
) -> str:
    """The page: verdict, settings, the training images reconstructed best (``best``: dicts of ``train``,
    ``generated``, ``held`` PNG bytes and their SSIMs), the similarity ``figure``, and per class (``classes``:
    dicts of ``name``, ``metrics`` and ``samples`` PNG bytes) the metrics and the generated images."""
    s = report["settings"]
    e, x = report["closer_to_train"], report["excess_matches"]
    kind = report["verdict_kind"]
    colour = {"leakage": "#b00020", "no measurable leakage": "#1b5e20"}.get(kind, "#0d47a1")
    settings = [
        ("classifier", f"{s['classifier']['arch']} (weights {s['classifier']['fingerprint']})"
         + (f", {s['classifier_file']}" if s.get("classifier_file") else "")),
        ("training images", f"{s['train']['n']} ({s['train']['source']})"),
        ("held-out images", f"{s['held_out']['n']} ({s['held_out']['source']}): {s['real_unseen']} real unseen "
         f"(the null), {s['control']} control"),
        ("generated images", f"{s['generated']} ({s['n_per_class']} per class)"),
        ("budget", f"{s['inversion']['steps']} steps of {s['inversion']['batch_size']} images, best of "
         f"{s['inversion']['select']} candidates per image"),
        ("options", ", ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "the library's defaults"),
        ("seed, SSIM threshold", f"{s['seed']}, {s['tau']}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items())),
        ("date, device", f"{s['date']}, {s['device']}"),
        ("wall time, peak memory", f"{s['wall_seconds']:g} s, "
         + (f"{s['peak_rss_mb']:g} MB resident" if s.get("peak_rss_mb") is not None else "peak memory not measured")),
    ]  # fmt: skip
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings)
    numbers = [
        ("generated images closer to training", _fmt(e["generated"])),
        ("real unseen images closer to training (null)", _fmt(e["null"])),
        (f"difference, {round(100 * e['confidence'])}% interval", f"{e['effect']:+.3f} [{e['interval'][0]:+.3f}, {e['interval'][1]:+.3f}]"),
        ("one-sided permutation p-value", f"{e['p_value']:.3g}"),
        (f"training images matched at SSIM &ge; {s['tau']}", str(x["train_matched"])),
        ("control images matched by the same images", str(x["held_out_matched"])),
        ("excess matches, interval", f"{x['excess']:+.0f} [{x['interval'][0]:+.0f}, {x['interval'][1]:+.0f}]"),
        ("excess matches of real unseen images", f"{report['real_excess_matches']['excess']:+.0f}"),
    ]  # fmt: skip
    if report.get("features"):
        f = report["features"]
        numbers.append(
            ("closer to training in the evaluation classifier's features: generated / real",
             f"{_fmt(f['generated_closer_to_train'])} / {_fmt(f['real_closer_to_train'])}")
        )  # fmt: skip
    stats = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in numbers)
    best_rows = "".join(
        "<tr>"
        f"<td>{_img(b['train'], 'training image', TILE)}</td><td>{_img(b['generated'], 'reconstruction', TILE)}</td>"
        f"<td>{_img(b['held'], 'nearest held-out image', TILE)}</td>"
        f"<td>{html.escape(b['name'])}</td><td>{_fmt(b['to_train'])}</td><td>{_fmt(b['to_held'])}</td></tr>"
        for b in best
    )
    columns = [
        ("generated", "n_generated", 0), ("NN-SSIM to training", "nn_ssim_mean", 3),
        ("to control training", "train_control_ssim_mean", 3), ("to held-out", "held_out_ssim_mean", 3),
        ("closer to training", "closer_to_train", 2), ("# matched", "n_train_matched", 0),
        ("attack acc.", "attack_accuracy", 2), ("target acc.", "target_accuracy", 2),
        ("diversity (same-class SSIM)", "same_class_ssim_mean", 3),
    ]  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h, _, _ in columns)
    class_blocks = "".join(
        f"<tr><th>{html.escape(c['name'])}</th>"
        + "".join(f"<td>{_fmt(c['metrics'].get(k), d) if d else _fmt(c['metrics'].get(k))}</td>" for _, k, d in columns)
        + f'</tr><tr><td></td><td colspan="{len(columns)}">{_img(c["samples"], "generated images of " + c["name"])}</td></tr>'
        for c in classes
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tldr-fast audit</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
.verdict {{ border-left: 6px solid {colour}; padding: 0.6em 1em; background: #f6f6f6; font-size: 1.1em; }}
table {{ border-collapse: collapse; margin: 0.6em 0 1.4em; }}
th, td {{ padding: 3px 8px; text-align: left; vertical-align: middle; border-bottom: 1px solid #ddd; }}
img {{ image-rendering: pixelated; }}
</style></head>
<body>
<h1>Does the classifier give its training images away?</h1>
<p class="verdict">{html.escape(report["verdict"])}</p>
<h2>The numbers</h2><table>{stats}</table>
<p>A generated image is <em>closer to training</em> when its most similar training image (SSIM, same class) is more
similar than its most similar held-out image, both sets of equal size per class; each image counts with its exact
probability over every such draw of training and held-out images. Real images the classifier never saw are closer to
training about half of the time: that is the null. It holds when the held-out images are drawn like the training
images; held-out images from another source (other writers, another camera) let images that resemble the training
distribution, not its individual images, score above it. The interval is a percentile bootstrap; the p-value
counts how often permuting the labels generated/real gives a difference this large.</p>
<h2>Settings</h2><table>{rows}</table>
<h2>The training images reconstructed best</h2>
<table><tr><th>training image</th><th>reconstruction</th><th>nearest held-out image</th><th>class</th>
<th>SSIM to training</th><th>SSIM to held-out</th></tr>{best_rows}</table>
<h2>Similarity to training against similarity to held-out images</h2>
{_img(figure, "similarity to training against similarity to held-out images")}
<h2>Per class</h2><table><tr><th>class</th>{head}</tr>{class_blocks}</table>
</body></html>
"""


def write_report(
    out: Path,
    report: Dict[str, Any],
    evaluation: Any,
    x01: Tensor,
    labels: Tensor,
    train: ImageDataset,
    control: ImageDataset,
    progress: bool = False,
) -> None:
    """Write ``grids/`` (pairs.png: each class's generated images beside their nearest training images;
    class-NAME.png: each class's generated images; best.png; similarity.png), ``report.json`` and
    ``report.html`` into ``out``, each atomically. ``evaluation``: the ``EvaluationReport`` of the images."""
    bar = progress_bar(total=4, desc="report", disable=not progress)
    grids = out / "grids"
    evaluation.save_grid(grids / "pairs.png", per_class=8)
    bar.update()
    figure = similarity_figure(report)
    atomic_write(grids / "similarity.png", lambda f: f.write(figure))
    gen, names = report["generated"], list(train.class_names)
    scale = max(1, TILE // x01.shape[-1])
    chosen = best_reconstructed(report)
    triples = [(train.images[gen["train_nn"][i]], x01[i], control.images[gen["held_nn"][i]]) for i in chosen]
    best = [
        {
            "train": png_bytes(t, scale),
            "generated": png_bytes(g, scale),
            "held": png_bytes(h, scale),
            "name": names[int(labels[i])],
            "to_train": gen["to_train"][i],
            "to_held": gen["to_held"][i],
        }
        for i, (t, g, h) in zip(chosen, triples)
    ]
    if triples:
        sheet = tile_png(torch.stack([image for triple in triples for image in triple]), columns=3)
        atomic_write(grids / "best.png", lambda f: f.write(sheet))
    bar.update()
    per_class = {c["class"]: c for c in report["evaluation"]["per_class"]}
    classes = []
    for c in sorted(per_class):
        sheet = tile_png(x01[labels == c][:SAMPLES_PER_CLASS])
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in names[c])
        atomic_write(grids / f"class-{c}-{safe}.png", lambda f, sheet=sheet: f.write(sheet))
        classes.append({"name": names[c], "metrics": per_class[c], "samples": sheet})
    bar.update()
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "report.html", render_html(report, figure, best, classes))
    bar.update()
    bar.close()
