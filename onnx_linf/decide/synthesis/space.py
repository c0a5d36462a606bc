"""The low-dimensional search space: mask logits on a grid, pattern logits at full resolution, patch windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .results import SynthConfig

# Mask logits of a patch start: inside the window nearly opaque, outside nearly transparent.
_INSIDE_LOGIT, _OUTSIDE_LOGIT = 3.0, -4.0


def cells(size: int, grid: int) -> np.ndarray:
    """Index of the grid cell each of `size` pixels falls in (nearest upsampling of `grid` cells)."""
    g = min(size, grid)
    return (np.arange(size) * g) // size


class Space:
    """Maps a flat parameter vector to a mask ``[H, W]`` and a pattern ``[H, W, C]`` (pixel values)."""

    def __init__(self, height: int, width: int, channels: int, mask_grid: int, pattern_grid: int) -> None:
        self.h, self.w, self.c = height, width, channels
        self.mr, self.mc = cells(height, mask_grid), cells(width, mask_grid)
        self.pr, self.pc = cells(height, pattern_grid), cells(width, pattern_grid)
        self.mh, self.mw = int(self.mr[-1]) + 1, int(self.mc[-1]) + 1
        self.ph, self.pw = int(self.pr[-1]) + 1, int(self.pc[-1]) + 1
        self.n_mask = self.mh * self.mw
        self.n_luma = self.ph * self.pw
        # Colour lives on the mask grid: the fine structure a trigger needs is in its luminance.
        self.n_chroma = self.n_mask * channels if channels > 1 else 0
        self.dim = self.n_mask + self.n_luma + self.n_chroma

    def initial(self, mask_init: float) -> np.ndarray:
        theta = np.zeros(self.dim)
        theta[:self.n_mask] = math.log(mask_init / (1.0 - mask_init))
        return theta

    def from_patch(self, window: Window, patch: np.ndarray) -> np.ndarray:
        """Parameters of an (almost) opaque `patch` in `window` and an (almost) empty mask elsewhere."""
        theta = np.zeros(self.dim)
        rows, cols = slice(window.row, window.row + window.size), slice(window.col, window.col + window.size)
        a = np.full((self.mh, self.mw), _OUTSIDE_LOGIT)
        a[np.ix_(np.unique(self.mr[rows]), np.unique(self.mc[cols]))] = _INSIDE_LOGIT
        theta[:self.n_mask] = a.ravel()
        z = np.log(np.clip(patch, 1.0, 254.0) / (255.0 - np.clip(patch, 1.0, 254.0)))
        luma = np.zeros((self.ph, self.pw))
        # Luminance takes the channel mean; colour (if any) the per-channel rest, on the mask grid.
        luma[self.pr[rows][:, None], self.pc[cols][None, :]] = z.mean(axis=2)
        theta[self.n_mask:self.n_mask + self.n_luma] = luma.ravel()
        if self.n_chroma:
            chroma = np.zeros((self.mh, self.mw, self.c))
            chroma[self.mr[rows][:, None], self.mc[cols][None, :]] = z - z.mean(axis=2, keepdims=True)
            theta[self.n_mask + self.n_luma:] = chroma.ravel()
        return theta

    def decode(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[K, D]`` parameters -> masks ``[K, H, W]`` in [0, 1], patterns ``[K, H, W, C]`` in 0..255."""
        k = theta.shape[0]
        a = theta[:, :self.n_mask].reshape(k, self.mh, self.mw)
        mask = sigmoid(a)[:, self.mr][:, :, self.mc]
        luma = theta[:, self.n_mask:self.n_mask + self.n_luma].reshape(k, self.ph, self.pw)
        logits = luma[:, self.pr][:, :, self.pc][..., None]
        if self.n_chroma:
            chroma = theta[:, self.n_mask + self.n_luma:].reshape(k, self.mh, self.mw, self.c)
            logits = logits + chroma[:, self.mr][:, :, self.mc]
        else:
            logits = np.broadcast_to(logits, (k, self.h, self.w, self.c))
        return mask, 255.0 * sigmoid(logits)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def stamp(images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Every trigger on every image: ``[K, H, W]``, ``[K, H, W, C]``, ``[B, H, W, C]`` -> ``[K*B, H, W, C]``."""
    m = mask[:, None, :, :, None]
    out = (1.0 - m) * images[None] + (m * pattern[:, None])
    return out.reshape((-1,) + images.shape[1:]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Window:
    row: int
    col: int
    size: int


def patch_sizes(height: int, width: int, config: SynthConfig) -> tuple[int, ...]:
    side = min(height, width)
    if config.patch_sizes is not None:
        sizes = config.patch_sizes
    else:
        base = max(4, round(side / 8))
        sizes = (base, round(1.5 * base))
    return tuple(sorted({min(int(v), side) for v in sizes}))


def patch_windows(height: int, width: int, sizes: Sequence[int]) -> list[Window]:
    """Square windows of each size at a stride of half the size, the last one flush with the border."""
    out = []
    for size in sizes:
        stride = max(1, size // 2)
        rows = sorted(set(range(0, height - size + 1, stride)) | {height - size})
        cols = sorted(set(range(0, width - size + 1, stride)) | {width - size})
        out.extend(Window(r, c, size) for r in rows for c in cols)
    return out


def stamp_windows(images: np.ndarray, windows: Sequence[Window], patches: Sequence[np.ndarray]) -> np.ndarray:
    """Each opaque patch in its window on every image -> ``[len(windows) * B, H, W, C]`` float32."""
    out = np.repeat(images[None].astype(np.float32), len(windows), axis=0)
    for k, (w, patch) in enumerate(zip(windows, patches)):
        out[k, :, w.row:w.row + w.size, w.col:w.col + w.size, :] = patch
    return out.reshape((-1,) + images.shape[1:])


def patch_decode(theta: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Patch parameters ``[K, size*size (+ channels)]`` -> patches ``[K, size, size, C]`` in 0..255."""
    k = theta.shape[0]
    luma = theta[:, :size * size].reshape(k, size, size, 1)
    if channels > 1:
        luma = luma + theta[:, size * size:][:, None, None, :]
    else:
        luma = np.broadcast_to(luma, (k, size, size, channels))
    return 255.0 * sigmoid(luma)


def patch_dim(size: int, channels: int) -> int:
    return size * size + (channels if channels > 1 else 0)
