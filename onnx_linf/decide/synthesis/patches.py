"""Patch scan and patch search: localise patch triggers before the class-specific NES search.

Random black-and-white patterns in square windows at half-window strides, shared by all classes; a
backdoored model answers a partial trigger in the right place with its target already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...measure.calibrate import Progress
from .oracle import EVAL_CHUNK, Oracle, OutOfBudget
from .results import SynthConfig
from .search import EMA, Adam, nes_gradient
from .space import Window, patch_decode, patch_dim, patch_sizes, patch_windows, stamp_windows


@dataclass
class PatchScan:
    """Shared result of the random patch scan: per window and class, the best random pattern."""

    windows: list[Window]
    score: np.ndarray
    """``[windows, classes]`` best mean target log-probability over the random patterns."""
    logits: list[np.ndarray]
    """Per window: ``[samples, size * size + chroma]`` pattern parameters of the random patterns."""
    best: np.ndarray
    """``[windows, classes]`` index of the best pattern."""


def patch_scan(oracle: Oracle, pool: np.ndarray, sizes: Sequence[int], config: SynthConfig) -> PatchScan:
    """Stamp random near-binary patterns in every window; one pass serves every class.

    A backdoored model usually answers a *partial* trigger with its target already, so a random
    binary pattern in the right window scores well for the target class: this localises the trigger
    before any class-specific query is spent.
    """
    rng = np.random.default_rng([config.seed, 1 << 20])
    h, w, c = pool.shape[1:]
    windows = patch_windows(h, w, sizes)
    images = pool[rng.choice(len(pool), size=min(config.batch, len(pool)), replace=False)]
    params = []
    for win in windows:
        p = rng.choice([-4.0, 4.0], size=(config.patch_samples, patch_dim(win.size, c)))
        if c > 1:
            # Half the samples black and white (no colour: checkerboards and similar), half coloured.
            p[:, win.size * win.size:] = rng.normal(0.0, 2.0, (config.patch_samples, c))
            p[::2, win.size * win.size:] = 0.0
        params.append(p)
    # Chunks of windows per ORT call keep memory bounded on large inputs.
    per_call = max(1, EVAL_CHUNK * 4 // (config.patch_samples * len(images)))
    scores, bests = [], []
    for start in range(0, len(windows), per_call):
        chunk = range(start, min(start + per_call, len(windows)))
        wins = [windows[i] for i in chunk for _ in range(config.patch_samples)]
        patches = [p for i in chunk for p in patch_decode(params[i], windows[i].size, c)]
        logp = oracle.log_probs(stamp_windows(images, wins, patches))
        logp = logp.reshape(len(chunk), config.patch_samples, len(images), -1).mean(axis=2)
        scores.append(logp.max(axis=1))
        bests.append(logp.argmax(axis=1))
    score, best = np.concatenate(scores), np.concatenate(bests)
    return PatchScan(windows, score, params, best)


def patch_scan_cost(pool_len: int, height: int, width: int, channels: int, config: SynthConfig) -> int:
    n = len(patch_windows(height, width, patch_sizes(height, width, config)))
    return n * config.patch_samples * min(config.batch, pool_len)


def patch_cost(config: SynthConfig) -> int:
    pairs = max(1, config.pairs // 2)
    return config.patch_windows * config.patch_steps * (2 * pairs + 1) * config.batch


def patch_search(oracle: Oracle, scan: PatchScan, target: int, train: np.ndarray, config: SynthConfig,
                  progress: Progress) -> tuple[Window, np.ndarray, float] | None:
    """NES on the full-resolution pattern inside the class's best scan windows, in lockstep.

    Returns:
        (window, patch ``[s, s, C]``, smoothed success rate on the step batches) of the window whose
        pattern ends with the lowest loss, or None when the budget ran out first.
    """
    rng = np.random.default_rng([config.seed, target, 3])
    c = train.shape[3]
    top = np.argsort(-scan.score[:, target], kind="stable")[:config.patch_windows]
    windows = [scan.windows[i] for i in top]
    thetas = [scan.logits[i][scan.best[i, target]] * 0.5 for i in top]  # +-2: room to move
    optims = [Adam(t.size, config.lr) for t in thetas]
    pairs = max(1, config.pairs // 2)
    batch = min(config.batch, len(train))
    ema_loss = np.zeros(len(windows))
    ema_asr = np.zeros(len(windows))
    ran = 0
    for step in range(config.patch_steps):
        images = train[rng.choice(len(train), size=batch, replace=False)]
        epss = [rng.standard_normal((pairs, t.size)) for t in thetas]
        cands = [np.concatenate([t + config.sigma * e, t - config.sigma * e, t[None]]) for t, e in zip(thetas, epss)]
        wins = [w for w, cand in zip(windows, cands) for _ in range(len(cand))]
        patches = [p for w, cand in zip(windows, cands) for p in patch_decode(cand, w.size, c)]
        try:
            logp = oracle.log_probs(stamp_windows(images, wins, patches))
        except OutOfBudget:
            break
        ran += 1
        logp = logp.reshape(len(windows), 2 * pairs + 1, batch, -1)
        for k in range(len(windows)):
            ce = -logp[k, :, :, target].mean(axis=1)
            thetas[k] = optims[k].step(thetas[k], nes_gradient(ce[:-1], epss[k], config.sigma))
            success = float((logp[k, -1].argmax(axis=1) == target).mean())
            first = step == 0
            ema_loss[k] = ce[-1] if first else (1 - EMA) * ema_loss[k] + EMA * ce[-1]
            ema_asr[k] = success if first else (1 - EMA) * ema_asr[k] + EMA * success
        progress.advance(1)
    progress.advance(config.patch_steps - ran)
    if ran == 0:
        return None
    # Prefer success, then the smaller window, then the lower loss.
    k = min(range(len(windows)), key=lambda i: (-round(ema_asr[i], 2), windows[i].size, ema_loss[i]))
    patch = patch_decode(thetas[k][None], windows[k].size, c)[0]
    return windows[k], patch, float(ema_asr[k])
