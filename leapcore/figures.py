"""The report's figures, drawn with matplotlib (Agg canvas, no pyplot state) and encoded small.

- :func:`entanglement_figure`: a diverging heatmap (blue below zero, white at zero, red above) with a
  colour bar centred on zero, a row per prototype and a column per class shown.
- :func:`trajectory_figure`: each prototype's target probability over the optimisation steps.
- :func:`isolation_figure`: an isolation mask as a heatmap over its source image
  (:func:`colour_bar_css`: its colour bar).
- :func:`photo`: an image (prototype, sample) as a compressed WebP for display.

Line plots and heatmaps are SVG (text stays text, so it is sharp and small); images are lossy WebP,
the full-resolution PNGs stay in the bundle's ``images/`` folder. Isolation overlays are blended
with numpy (a matplotlib figure each would cost ~0.3 s); their colour bar is a CSS gradient of the same
colour map. matplotlib is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from leapcore.images import to_uint8

WEBP_QUALITY = 80
OVERLAY_QUALITY = 68  # a heatmap over a grey image: colour fields, no fine detail to keep
MASK_CMAP = "inferno"
EDGE_RGB = (0.0, 0.9, 1.0)  # the outline of the kept region over an inferno heatmap: cyan
EDGE_WIDTH = 2  # pixels: a 1-pixel line loses its colour to WebP's chroma subsampling
OUTLINE_MIN_SIDE = 128  # overlays of smaller inputs are scaled up (nearest) to at least this
ANNOTATE_FROM = 0.1  # smaller entanglement scores are left to the colour alone


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` for an ``<img src>``."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def photo(
    image: torch.Tensor | np.ndarray,
    alpha: torch.Tensor | np.ndarray | None = None,
    quality: int = WEBP_QUALITY,
) -> bytes:
    """``[C, H, W]`` in [0, 1] (optionally with ``[1, H, W]`` alpha) as WebP bytes."""
    out = io.BytesIO()
    Image.fromarray(to_uint8(image, alpha)).save(out, format="WEBP", quality=quality, method=6)
    return out.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _encode(figure: Any, fmt: str, dpi: int = 100) -> bytes:
    """``svg`` (text as text), ``png`` or ``webp`` (lossy) bytes of a figure."""
    import matplotlib

    out = io.BytesIO()
    if fmt == "svg":
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "leapcore"}):
            figure.savefig(out, format="svg", bbox_inches="tight", metadata={"Date": None})
        return out.getvalue()
    figure.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    if fmt == "png":
        return out.getvalue()
    image = Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    webp = io.BytesIO()
    image.save(webp, format="WEBP", quality=WEBP_QUALITY, method=6)
    return webp.getvalue()


def entanglement_norm(scores: np.ndarray) -> Any:
    """The heatmap's colour scale: zero in the middle (white), symmetric, at least -1..1."""
    from matplotlib.colors import TwoSlopeNorm

    finite = np.abs(scores[np.isfinite(scores)])
    bound = max(1.0, float(finite.max()) if finite.size else 1.0)
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def entanglement_figure(
    scores: np.ndarray,
    rows: Sequence[str],
    columns: Sequence[str],
    annotate: bool | None = None,
    fmt: str = "svg",
    label: str = "entanglement (1 = rose as much as the target)",
) -> bytes:
    """A diverging heatmap of ``scores`` ``[len(rows), len(columns)]`` as SVG (or PNG) bytes.

    The colour scale is symmetric around zero (``-m .. m`` with ``m`` the largest magnitude, at
    least 1, so 1 "as much as the target" always reads as full red). Cells of magnitude at least
    ``ANNOTATE_FROM`` hold their value when the grid is small enough to read (``annotate``; default
    up to 30x16 cells).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_rows, n_cols = scores.shape
    width = 2.2 + 0.34 * n_cols
    height = 1.6 + 0.3 * n_rows + 0.06 * max((len(c) for c in columns), default=0)
    figure = _figure(min(width, 12.5), min(height, 16))
    ax = figure.add_subplot()
    norm = entanglement_norm(scores)
    bound = norm.vmax
    mesh = ax.imshow(scores, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_cols), [c[:24] for c in columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [r[:32] for r in rows], fontsize=8)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if annotate is None:
        annotate = n_cols <= 30 and n_rows <= 16
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                value = scores[i, j]
                if not np.isfinite(value) or abs(value) < ANNOTATE_FROM:
                    continue
                dark = abs(value) / bound > 0.55
                ax.text(
                    j,
                    i,
                    f"{value:.2f}".replace("-0.00", "0.00"),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if dark else "#1b1f24",
                )
    bar = figure.colorbar(mesh, ax=ax, fraction=0.035, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _encode(figure, fmt, dpi=110)


def trajectory_figure(steps: Sequence[int], curves: dict[str, Sequence[float]]) -> bytes:
    """Target probability (y) over optimisation steps (x), one line per prototype, as SVG bytes."""
    figure = _figure(7.2, 3.0)
    ax = figure.add_subplot()
    colours = _palette(len(curves))
    for colour, (label, values) in zip(colours, curves.items()):
        ax.plot(list(steps), list(values), color=colour, linewidth=1.4, label=label[:32])
    ax.set_xlabel("optimisation step", fontsize=8)
    ax.set_ylabel("target probability", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(min(steps, default=0), max(max(steps, default=1), 1))
    ax.grid(True, color="#d0d7de", linewidth=0.5)
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if curves:
        ax.legend(
            fontsize=7,
            frameon=False,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncol=1 if len(curves) <= 14 else 2,
        )
    return _encode(figure, "svg")


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def isolation_figure(
    image: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    opacity: float = 0.6,
    saliency: torch.Tensor | np.ndarray | None = None,
) -> bytes:
    """An isolation over ``image`` (``[C, H, W]``, shown in grey), as WebP bytes.

    Without ``saliency``: ``mask`` (``[1, H, W]`` in [0, 1]) as an ``inferno`` heatmap. With it: the
    saliency (``[1, H, W]`` in [0, 1], 1 = the strongest evidence) as the heatmap and the edge of the
    (binary) reported ``mask`` drawn in cyan, so that the page shows both where the evidence is and
    what the isolation kept. :func:`colour_bar_css` draws the colour bar.
    """
    from matplotlib import colormaps

    pixels = to_uint8(image).astype(np.float32) / 255.0
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    shown = mask if saliency is None else saliency
    weights = np.clip(np.asarray(shown, dtype=np.float32).reshape(grey.shape), 0.0, 1.0)
    region = np.asarray(mask, dtype=np.float32).reshape(grey.shape) > 0.5
    # small inputs are drawn larger (nearest neighbour) so that the outline stays a crisp line
    scale = max(1, -(-OUTLINE_MIN_SIDE // max(grey.shape)))
    grey, weights, region = (
        np.kron(a, np.ones((scale, scale), a.dtype)) for a in (grey, weights, region)
    )
    heat = colormaps[MASK_CMAP](weights)[..., :3]
    blended = (1 - opacity) * grey[..., None] + opacity * heat
    if saliency is not None:
        blended[_edge(region, EDGE_WIDTH)] = EDGE_RGB
    out = io.BytesIO()
    Image.fromarray((blended * 255 + 0.5).astype(np.uint8)).save(
        out, format="WEBP", quality=OVERLAY_QUALITY, method=4
    )
    return out.getvalue()


def _edge(region: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``region`` (``[H, W]`` bool) within ``width`` 4-neighbour steps of its outside
    (the image's border does not count as outside)."""
    inner = region
    for _ in range(width):
        padded = np.pad(inner, 1, mode="edge")
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & inner
    return region & ~inner


def colour_bar_css(cmap: str = MASK_CMAP, stops: int = 11) -> str:
    """A CSS ``linear-gradient`` (bottom = 0, top = 1) of ``cmap``: a colour bar drawn by the browser."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.linspace(0.0, 1.0, stops))
    parts = [
        f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {100 * i / (stops - 1):.0f}%"
        for i, (r, g, b, _) in enumerate(colours)
    ]
    return "linear-gradient(to top," + ",".join(parts) + ")"
