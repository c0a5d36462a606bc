"""Figures of the HTML report, drawn with matplotlib (the optional ``report`` extra) into PNG bytes.

Every function takes report data only and draws it; nothing here runs a model.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image

from ..errors import UsageError

CLEAN, EVIDENCE, FLAGGED, GREY = "#3b75af", "#d9822b", "#c0392b", "#9aa5b1"
#: Per-channel charts show at most this many channels (the highest scores), so wide maps stay readable.
MAX_CHANNELS = 64


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: figures only go to PNG bytes
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the HTML report needs matplotlib: pip install 'onnx-linf[report]'") from None
    return plt


def _png(fig) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def channel_figure(tap, score_label: str) -> bytes:
    """One map: per-channel mean ℓ∞ on clean images (± std, max as a tick) against evidence images, and
    the distribution of the per-channel means; flagged channels in red."""
    plt = pyplot()
    clean = tap.stats["linf"] if "linf" in tap.stats else next(iter(tap.stats.values()))
    ev = (tap.evidence_stats or {}).get("linf")
    scores = np.asarray(tap.scores) if tap.scores else np.asarray(clean.mean)
    order = np.argsort(-scores, kind="stable")[:MAX_CHANNELS]
    flagged = set(tap.flagged)
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 1.3]})
    x = np.arange(len(order))
    mean, std, mx = (np.asarray(v)[order] for v in (clean.mean, clean.std, clean.max))
    width = 0.4 if ev is not None else 0.8
    colors = [FLAGGED if c in flagged else CLEAN for c in order]
    ax.bar(x - (width / 2 if ev is not None else 0), mean, width, yerr=std, color=colors, alpha=0.85,
           error_kw={"elinewidth": 0.6, "ecolor": "#555"})
    ax.scatter(x - (width / 2 if ev is not None else 0), mx, marker="_", color="#222", s=30)
    if ev is not None:
        ax.bar(x + width / 2, np.asarray(ev.mean)[order], width, color=EVIDENCE, alpha=0.85)
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in order], fontsize=6, rotation=90)
    ax.set_xlabel(f"channel (sorted by {score_label}; red = flagged)")
    ax.set_ylabel("ℓ∞ of the map")
    # Proxy handles: the bars' first colour may be the flagged red, which would mislabel the legend.
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLEAN), plt.Rectangle((0, 0), 1, 1, color=FLAGGED)]
    names = ["clean mean ± std", "flagged (clean mean)"]
    if ev is not None:
        handles.append(plt.Rectangle((0, 0), 1, 1, color=EVIDENCE))
        names.append("evidence mean")
    handles.append(plt.Line2D([], [], color="#222", marker="_", linestyle="", markersize=8))
    names.append("clean max")
    ax.legend(handles, names, fontsize=7, loc="upper right")
    bins = np.histogram_bin_edges(np.concatenate([clean.mean, ev.mean]) if ev is not None else clean.mean, 20)
    hx.hist(clean.mean, bins=bins, color=CLEAN, alpha=0.6, label="clean")
    if ev is not None:
        hx.hist(ev.mean, bins=bins, color=EVIDENCE, alpha=0.6, label="evidence")
    hx.set_xlabel("per-channel mean ℓ∞")
    hx.set_ylabel("channels")
    hx.legend(fontsize=7)
    shown = f", showing the top {len(order)}" if len(order) < tap.channels else ""
    fig.suptitle(f"{tap.name}  ({tap.channels} channels{shown})", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def synthesis_figure(synthesis: dict) -> bytes:
    """Per class: the synthesized trigger's mask L1 (log scale) and the anomaly index against the threshold."""
    plt = pyplot()
    classes = synthesis["classes"]
    suspected = set(synthesis["suspected"])
    labels = [str(c["target"]) for c in classes]
    colors = [FLAGGED if c["target"] in suspected else CLEAN if c["found"] else GREY for c in classes]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax.bar(labels, [max(c["norm"], 1e-3) for c in classes], color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("target class (red = suspected, grey = not found: the image area is a bound)")
    ax.set_ylabel("mask L1 (pixels)")
    bx.bar(labels, [c["anomaly"] for c in classes], color=colors)
    bx.axhline(synthesis["threshold"], color=FLAGGED, linestyle="--", linewidth=1,
               label=f"threshold {synthesis['threshold']:g}")
    bx.set_xlabel("target class")
    bx.set_ylabel(f"anomaly index ({synthesis['scale']} norms)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def bounds_figure(maps: list, bounds: dict) -> bytes:
    """Clamp headroom: per map, how far the position bounds sit below the channel's largest bound
    (τ(c,h,w) / max over h,w of τ(c)); at 1 a position bound is no tighter than a channel bound."""
    plt = pyplot()
    rows = [m for m in maps if m.tap in bounds]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.2, 2]})
    names = [m.tap for m in rows]
    y = np.arange(len(rows))
    ax.barh(y, [m.hi_max for m in rows], color=GREY, label="max τ")
    ax.barh(y, [m.hi_mean for m in rows], color=CLEAN, label="mean τ")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("upper bound τ")
    ax.legend(fontsize=7)
    data, labels = [], []
    for m in rows:
        hi = np.asarray(bounds[m.tap][0], dtype=np.float64)
        peak = hi.reshape(hi.shape[0], -1).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (hi.reshape(hi.shape[0], -1) / np.where(peak > 0, peak, np.nan)[:, None]).ravel()
        data.append(ratio[np.isfinite(ratio)])
        labels.append(m.tap)
    if data and any(len(d) for d in data):
        # `orientation` replaced `vert` in matplotlib 3.10 (`vert` warns from 3.11 on).
        version = tuple(int(v) for v in sys.modules["matplotlib"].__version__.split(".")[:2])
        side = {"orientation": "horizontal"} if version >= (3, 10) else {"vert": False}
        bx.boxplot([d if len(d) else [np.nan] for d in data], showfliers=False, **side)
        bx.set_yticks(np.arange(1, len(labels) + 1))
        bx.set_yticklabels(labels, fontsize=6)
        bx.invert_yaxis()
    bx.set_xlabel("τ(c,h,w) / max over h,w of τ(c)   (1 = no tighter than a channel bound)")
    fig.tight_layout()
    return _png(fig)


def image_png(array: np.ndarray, scale: int = 6) -> bytes:
    """A small image (``[H, W]`` in [0, 1] or ``[H, W, C]`` pixels 0..255) upscaled with nearest neighbours."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a * 255.0
    elif a.shape[2] == 1:
        a = a[..., 0]
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()



def _upsample(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized bilinearly to (H, W)."""
    if a.shape == size:
        return a
    return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode="F").resize(size[::-1], Image.BILINEAR))


def heatmap_figure(maps, clean_pixels: np.ndarray | None, evidence_pixels: np.ndarray | None = None,
                   evidence_label: str | None = None) -> bytes:
    """One map's chosen channels (rows) on the sample images (columns: clean, then evidence): each
    channel's activation upsampled bilinearly to the image size over the image, half transparent.
    A channel's colour scale is shared by its clean and evidence images."""
    plt = pyplot()
    clean, ev = np.asarray(maps.clean, np.float32), None if maps.evidence is None else np.asarray(maps.evidence)
    groups = [("clean", clean, clean_pixels)] + ([(evidence_label or "evidence", ev, evidence_pixels)]
                                                 if ev is not None else [])
    cols = sum(len(g[1]) for g in groups)
    rows = len(maps.channels)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols + 0.9, 1.5 * rows + 0.5), squeeze=False)
    for r, channel in enumerate(maps.channels):
        values = np.concatenate([g[1][:, r] for g in groups]).astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        col, shown = 0, None
        for name, data, pixels in groups:
            for i in range(len(data)):
                ax = axes[r, col]
                size = tuple(pixels.shape[1:3]) if pixels is not None else data.shape[2:]
                if pixels is not None:
                    px = pixels[i]
                    ax.imshow(px[..., 0] if px.shape[-1] == 1 else px, cmap="gray", vmin=0, vmax=255,
                              interpolation="nearest")
                shown = ax.imshow(_upsample(data[i, r], size), cmap="jet", vmin=lo, vmax=hi if hi > lo else lo + 1,
                                  alpha=0.5 if pixels is not None else 1.0, interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{name} {i + 1}", fontsize=7, color=EVIDENCE if name != "clean" else CLEAN)
                if col == 0:
                    ax.set_ylabel(f"channel {channel}", fontsize=8)
                col += 1
        bar = fig.colorbar(shown, ax=list(axes[r]), fraction=0.015, pad=0.01)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{maps.tap}  ({maps.why})", fontsize=9)
    return _png(fig)
