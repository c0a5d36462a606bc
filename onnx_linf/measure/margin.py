"""Query-only margin maximisation from noise inputs (the data-free probe of MM-BD, without gradients).

For each class k, search the input box for an image that maximises the logit margin
``z_k - max_{j != k} z_j``, with forward passes only. A backdoor target is a class the network has
learnt to reach from *any* image through a small pattern, so its maximum margin over inputs tends
to be far larger than the other classes' (Wang et al., MM-BD, S&P 2024, who use gradients).

The search is a random search over square windows (in the spirit of the Square attack, Andriushchenko
et al. 2020): start from the best of a pool of uniform-noise images, and at each step overwrite one
random square window with a random corner of the pixel box (or, for half the proposals, random
corners pixel by pixel), keeping the change when the margin
grows. Window search can build a local patch (a BadNets trigger) in a few hundred steps, where
full-dimensional estimators at this budget barely move. The cost is fixed: `MarginConfig.max_queries`
image forwards in all, spread over the classes examined; with more classes than `max_classes`, a
pre-selection on the noise pool keeps the classes whose margins are already highest.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..model.load import Model
from .preprocess import Preprocess
from .session import Session, create_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarginConfig:
    """Options of the margin probe."""

    max_queries: int = 20_000
    """Image forwards in all (pool and search); independent of the number of classes."""
    max_classes: int = 10
    """Classes searched at most; with more, the pre-selection keeps those with the highest pool margin."""
    pool: int = 256
    """Uniform-noise images evaluated first (pre-selection and starting points)."""
    chains: int = 2
    """Independent searches per class (from the class's best pool images)."""
    seed: int = 0
    """RNG seed: the same seed gives the same result."""
    time_limit: float | None = None
    """Seconds after which the search stops (the result says it was cut short)."""

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        if self.max_classes < 3:
            raise UsageError(f"the margin probe needs max_classes >= 3, got {self.max_classes}")
        if self.pool < self.chains or self.chains < 1:
            raise UsageError(f"pool ({self.pool}) must be >= chains ({self.chains}) >= 1")
        if self.max_queries < self.pool + self.chains * self.max_classes:
            raise UsageError(f"max_queries {self.max_queries} is too small: the noise pool alone needs "
                             f"{self.pool} forwards plus one step per class")
        if self.time_limit is not None and self.time_limit <= 0:
            raise UsageError(f"time_limit must be > 0, got {self.time_limit}")


@dataclass(frozen=True)
class MarginResult:
    """Largest logit margin found per examined class."""

    classes: tuple[int, ...]
    """Classes searched, in class order."""
    margins: np.ndarray
    """float64 ``[len(classes)]``: the largest margin found for each."""
    noise_margins: np.ndarray
    """float64 ``[len(classes)]``: the largest margin over the uniform-noise pool (before the search)."""
    not_examined: tuple[int, ...]
    """Classes the pre-selection left out (empty up to `MarginConfig.max_classes` classes)."""
    num_classes: int
    """Classes of the model."""
    queries: int
    """Image forwards spent."""
    seconds: float
    """Wall-clock seconds of the probe."""
    steps: int
    """Search steps run per chain."""
    complete: bool
    """False when the time limit cut the search short."""


def margins_of(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``s[i, c_i] - max_{j != c_i} s[i, j]`` for rows of class scores and one class per row."""
    rows = np.arange(len(scores))
    own = scores[rows, classes]
    other = scores.copy()
    other[rows, classes] = -np.inf
    return own - other.max(axis=1)


def class_scores(session: Session, output: str, preprocess: Preprocess, pixels: np.ndarray) -> np.ndarray:
    """Class scores ``[n, classes]`` for float pixels in [0, 255]: logits, or log-probabilities when the
    model ends in a softmax (margins of probabilities saturate at 1 and would hide the target)."""
    out = np.asarray(session.run([output], preprocess.apply(pixels))[0], dtype=np.float64)
    out = out.reshape(out.shape[0], -1)
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(out, 1e-12, None))
    return out


def max_margins(model: Model, preprocess: Preprocess, config: MarginConfig | None = None,
                provider: str = "auto", session: Session | None = None) -> MarginResult:
    """Largest logit margin per class that a query-only search from uniform noise reaches.

    Args:
        model: the classifier; its first output holds the class scores.
        preprocess: how pixels become the input (the search runs in pixel space, [0, 255]).
        config: probe options.
        provider: ONNX Runtime provider.
        session: an existing session of `model` (default: one is created).

    Returns:
        The margins, the classes examined and left out, and the cost.

    Raises:
        UsageError: bad options, or a model with fewer than 3 class scores.
        RuntimeSessionError: ONNX Runtime rejects the model.
    """
    config = config or MarginConfig()
    config.validate()
    start = time.monotonic()
    deadline = None if config.time_limit is None else start + config.time_limit
    session = session or create_session(model, None, provider)
    output = model.outputs[0].name
    rng = np.random.default_rng(config.seed)
    h, w = preprocess.size
    c = preprocess.num_channels
    chunk = session.fixed_batch or 256

    def run(pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([class_scores(session, output, preprocess, pixels[i:i + chunk])
                               for i in range(0, len(pixels), chunk)])

    pool = rng.uniform(0.0, 255.0, (config.pool, h, w, c)).astype(np.float32)
    pool_scores = run(pool)
    queries = config.pool
    n_classes = pool_scores.shape[1]
    if n_classes < 3:
        raise UsageError(f"the margin probe needs at least 3 class scores, the model's output has {n_classes}")
    # Per class, the margin of every pool image [pool, classes]: the best other score is the row's
    # top score, except for the top class itself, whose runner-up is the second score.
    top2 = np.sort(pool_scores, axis=1)[:, -2:]
    pool_margins = pool_scores - top2[:, 1:]
    is_top = np.arange(n_classes)[None, :] == pool_scores.argmax(axis=1)[:, None]
    pool_margins[is_top] = (top2[:, 1] - top2[:, 0])
    best_pool = pool_margins.max(axis=0)
    if n_classes > config.max_classes:
        keep = np.sort(np.argsort(-best_pool, kind="stable")[:config.max_classes])
    else:
        keep = np.arange(n_classes)
    not_examined = tuple(int(k) for k in range(n_classes) if k not in set(keep.tolist()))

    # Chains: (class, start image) pairs, each class starting from its best pool images.
    starts = np.argsort(-pool_margins[:, keep], axis=0, kind="stable")[:config.chains]  # [chains, classes]
    chain_class = np.tile(keep, config.chains)
    x = pool[starts.reshape(-1)].copy()
    best = pool_margins[starts.reshape(-1), chain_class]
    n_chains = len(chain_class)
    total_steps = (config.max_queries - queries) // n_chains
    steps, complete = 0, True
    area = h * w
    for step in range(total_steps):
        if deadline is not None and time.monotonic() >= deadline:
            complete = False
            break
        # Square-attack schedule: windows start at ~10% of the image and shrink as the search goes.
        frac = 0.1 * (1.0 - step / max(1, total_steps)) ** 2 + 0.002
        side = int(np.clip(round(math.sqrt(frac * area)), 1, min(h, w)))
        cand = x.copy()
        tops = rng.integers(0, h - side + 1, n_chains)
        lefts = rng.integers(0, w - side + 1, n_chains)
        values = rng.integers(0, 2, (n_chains, c)).astype(np.float32) * 255.0
        # Half the proposals fill the window pixel by pixel: a constant window cannot build a
        # checkerboard patch, and on both BadNets models this put the target first.
        pixelwise = rng.random(n_chains) < 0.5
        for i in range(n_chains):
            fill = rng.integers(0, 2, (side, side, c)) * 255.0 if pixelwise[i] else values[i]
            cand[i, tops[i]:tops[i] + side, lefts[i]:lefts[i] + side, :] = fill
        m = margins_of(run(cand), chain_class)
        queries += n_chains
        better = m > best
        x[better] = cand[better]
        best = np.where(better, m, best)
        steps += 1
    per_class = best.reshape(config.chains, len(keep)).max(axis=0)
    seconds = time.monotonic() - start
    log.info("margin probe: %d classes searched, %d forwards, %.1f s", len(keep), queries, seconds)
    return MarginResult(classes=tuple(int(k) for k in keep), margins=per_class.astype(np.float64),
                        noise_margins=best_pool[keep].astype(np.float64), not_examined=not_examined,
                        num_classes=n_classes, queries=queries, seconds=seconds, steps=steps,
                        complete=complete)
