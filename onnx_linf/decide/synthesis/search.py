"""The NES search for one class: Adam on antithetic, rank-shaped gradient estimates of Neural
Cleanse's loss, then validation on held-out images and greedy mask pruning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ...measure.calibrate import Progress
from ...measure.preprocess import Trigger
from .oracle import Oracle, OutOfBudget
from .results import SynthConfig
from .space import Space, stamp

log = logging.getLogger(__name__)


# Neural Cleanse's cost schedule, made gentler: raise lambda by 1.1 after `patience` successful steps,
# lower it by 1.15 after `patience` failing ones. NC's 1.5 / 1.5 ** 1.5 per epoch swung lambda over
# five orders of magnitude within 30 NES steps here (the mask lags lambda through Adam's momentum),
# and the reported norms of the same class then varied threefold between seeds.
_LAMBDA_UP = 1.1

_LAMBDA_DOWN = 1.15

# Lambda multiplies the *mean* mask value (0..1); these bounds keep it where the rank shaping can
# still see both loss terms. Above the upper bound only mask size would count; the lower bound
# keeps a step back from it short.
_LAMBDA_MIN, _LAMBDA_MAX = 1e-3, 300.0

# The search aims a little above the reported ASR threshold so that the smallest snapshot it keeps
# still passes on the larger validation set.
SEARCH_MARGIN = 0.05

# Smoothing of the per-step ASR of the current trigger (measured on `batch` images only): an EMA over
# a few steps is the success signal of the lambda schedule and of the snapshots.
EMA = 0.3

# Keep a snapshot only when the mask shrank by at least this fraction: bounds the snapshot list.
_SNAPSHOT_GAIN = 0.01

# Mask pruning may spend at most this many NES steps' worth of queries per class, on this many images.
PRUNE_STEPS = 12

_PRUNE_IMAGES = 64

# Mask cells fainter than this (mean value) are dropped together before the greedy pruning.
_FAINT = 0.1


class Adam:
    """Adam on a gradient *estimate* (Kingma & Ba's defaults): per-coordinate step sizes make the
    noisy NES estimate usable without tuning a learning rate per parameter group."""

    def __init__(self, dim: int, lr: float) -> None:
        self.m1 = np.zeros(dim)
        self.m2 = np.zeros(dim)
        self.lr = lr
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """One descent step of `theta` along `grad`; returns the new parameters."""
        self.t += 1
        self.m1 = 0.9 * self.m1 + 0.1 * grad
        self.m2 = 0.999 * self.m2 + 0.001 * grad * grad
        m1 = self.m1 / (1 - 0.9 ** self.t)
        m2 = self.m2 / (1 - 0.999 ** self.t)
        return theta - self.lr * m1 / (np.sqrt(m2) + 1e-8)


def nes_gradient(losses: np.ndarray, eps: np.ndarray, sigma: float) -> np.ndarray:
    """Antithetic NES estimate of the gradient of the Gaussian-smoothed loss, on centred ranks.

    `losses` holds the ``2 * pairs`` losses of ``theta + sigma * eps`` then ``theta - sigma * eps``.
    Ranks make the estimate invariant to the loss's scale, so one schedule fits cross-entropies of
    0.001 and of 20.
    """
    pairs = eps.shape[0]
    r = centered_ranks(losses)
    return ((r[:pairs] - r[pairs:])[:, None] * eps).sum(axis=0) / (pairs * sigma)


def centered_ranks(values: np.ndarray) -> np.ndarray:
    """Rank-based fitness shaping: ranks scaled to [-0.5, 0.5] (ties broken by position)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks / max(len(values) - 1, 1) - 0.5


@dataclass
class Plan:
    """Per-class query reservations, so that the budget check never cuts a validation short."""

    step_cost: int
    validations: int
    eval_cost: int
    evidence_cost: int
    prune_cost: int
    patch_cost: int

    @property
    def reserve(self) -> int:
        # One more validation than the binary search needs: the pruned mask is validated too.
        return (self.validations + 1) * self.eval_cost + self.evidence_cost + self.prune_cost + self.patch_cost


def search(oracle: Oracle, space: Space, target: int, train: np.ndarray, config: SynthConfig,
            max_steps: int, soft_deadline: float | None, progress: Progress,
            init: np.ndarray | None = None) -> tuple[list, np.ndarray, int]:
    """NES on one class; returns (snapshots [(l1, theta)], fallback theta, steps run)."""
    rng = np.random.default_rng([config.seed, target])
    theta = space.initial(config.mask_init) if init is None else init.copy()
    adam = Adam(theta.size, config.lr)
    lam, started = config.lambda_init, False
    ups = downs = 0
    ema = 0.0
    goal = min(1.0, config.asr + SEARCH_MARGIN)
    snapshots: list[tuple[float, np.ndarray]] = []
    fallback, fallback_key = theta.copy(), (-1.0, 0.0)
    batch = min(config.batch, len(train))
    p = config.pairs
    steps = 0
    for step in range(max_steps):
        if soft_deadline is not None and time.monotonic() >= soft_deadline:
            log.info("class %d: time slice used up after %d steps", target, step)
            break
        idx = rng.choice(len(train), size=batch, replace=False)
        images = train[idx].astype(np.float32)
        eps = rng.standard_normal((p, space.dim))
        cand = np.concatenate([theta + config.sigma * eps, theta - config.sigma * eps, theta[None]])
        masks, patterns = space.decode(cand)
        try:
            logp = oracle.log_probs(stamp(images, masks, patterns)).reshape(len(cand), batch, -1)
        except OutOfBudget:
            log.info("class %d: query budget or time limit reached after %d steps", target, step)
            break
        steps += 1
        ce = -logp[..., target].mean(axis=1)
        mean_mask = masks.reshape(len(cand), -1).mean(axis=1)
        # Neural Cleanse's loss; no size term until the attack first succeeds (NC starts at cost 0).
        loss = ce + (lam if started else 0.0) * mean_mask
        theta = adam.step(theta, nes_gradient(loss[:-1], eps, config.sigma))
        # The unperturbed trigger (last candidate) is the one we would report: track its success.
        asr_now = float((logp[-1].argmax(axis=1) == target).mean())
        ema = asr_now if step == 0 else (1 - EMA) * ema + EMA * asr_now
        l1 = float(masks[-1].sum())
        key = (ema, -l1)
        if key > fallback_key:
            fallback, fallback_key = cand[-1].copy(), key
        if ema >= goal:
            started = True
            ups, downs = ups + 1, 0
            if not snapshots or l1 < snapshots[-1][0] * (1 - _SNAPSHOT_GAIN):
                snapshots.append((l1, cand[-1].copy()))
        else:
            ups, downs = 0, downs + 1
        if started and ups >= config.patience:
            lam, ups = min(lam * _LAMBDA_UP, _LAMBDA_MAX), 0
        if started and downs >= config.patience:
            lam, downs = max(lam / _LAMBDA_DOWN, _LAMBDA_MIN), 0
        if step % 10 == 0:
            log.debug("class %d step %d: ASR(ema) %.2f, mask L1 %.1f, lambda %.3g", target, step, ema, l1,
                      lam if started else 0.0)
        progress.advance(1)
    progress.advance(config.steps - steps)
    return snapshots, fallback, steps


def stamped_asr(oracle: Oracle, target: int, images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> float:
    """Attack success rate of one trigger on uint8 `images`."""
    trig = Trigger(pattern=pattern.astype(np.float32), mask=mask[..., None].astype(np.float32))
    # Rounded uint8 stamping: exactly what `ClassTrigger.as_trigger().stamp` produces later.
    pred = oracle.logits(trig.stamp(images)).argmax(axis=1)
    return float((pred == target).mean())


def validate(oracle: Oracle, space: Space, target: int, evals: np.ndarray, snapshots: list,
              fallback: np.ndarray, config: SynthConfig, max_validations: int) -> tuple[np.ndarray, float, bool]:
    """The smallest snapshot whose stamped ASR on `evals` reaches the threshold (binary search).

    Snapshots shrink over time and ASR shrinks with them (not strictly), so a binary search over the
    size-sorted list finds the smallest passing one in log2(n) evaluations.
    """
    cache: dict[int, float] = {}

    def asr_of(theta: np.ndarray) -> float:
        mask, pattern = space.decode(theta[None])
        return stamped_asr(oracle, target, evals, mask[0], pattern[0])

    ordered = sorted(snapshots, key=lambda s: s[0])
    lo, hi, best = 0, len(ordered) - 1, None
    used = 0
    try:
        while lo <= hi and used < max_validations:
            mid = (lo + hi) // 2
            cache[mid] = asr_of(ordered[mid][1])
            used += 1
            if cache[mid] >= config.asr:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return ordered[best][1], cache[best], True
        if used < max_validations:
            # The trigger that came closest: it may still pass on the validation images.
            value = asr_of(fallback)
            return fallback, value, value >= config.asr
    except OutOfBudget:
        if best is not None:
            return ordered[best][1], cache[best], True
    log.info("class %d: no budget left to validate the trigger", target)
    return fallback, float("nan"), False


def prune_mask(oracle: Oracle, space: Space, target: int, mask: np.ndarray, pattern: np.ndarray,
           train: np.ndarray, goal: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy backward elimination of mask cells that the attack does not need.

    NES estimates one gradient for all mask cells at once, so cells that stopped mattering early keep
    whatever value they had (a found 3x3 patch came back with a dozen stray pixels). First all faint
    cells (mean below `_FAINT`) are dropped together; then each remaining cell's removal is tried on
    its own (one ORT call for all cells), and the least harmful ones are removed together, halving
    their number until the attack still succeeds; repeat until no single cell can go. Every check
    draws fresh images from `train`: reusing one set for dozens of accept/reject decisions overfits
    it, and the pruned mask then fails validation.

    Returns:
        The pruned mask ``[H, W]`` (the input mask when nothing could be removed or the budget ran out).
    """
    cell = space.mr[:, None] * space.mw + space.mc[None, :]
    area = np.bincount(cell.ravel(), minlength=space.n_mask)
    n_images = min(_PRUNE_IMAGES, len(train))

    def draw() -> np.ndarray:
        return train[rng.choice(len(train), size=n_images, replace=False)].astype(np.float32)

    def success(trial: np.ndarray) -> float:
        pred = oracle.logits(stamp(draw(), trial[None], pattern[None])).argmax(axis=1)
        return float((pred == target).mean())

    mask = mask.copy()
    try:
        mean = np.bincount(cell.ravel(), weights=mask.ravel(), minlength=space.n_mask) / area
        faint = np.flatnonzero((mean > 0) & (mean < _FAINT))
        if len(faint):
            trial = np.where(np.isin(cell, faint), 0.0, mask)
            if success(trial) >= goal:
                mask = trial
        while True:
            mass = np.bincount(cell.ravel(), weights=mask.ravel(), minlength=space.n_mask)
            active = np.flatnonzero(mass > 0)
            if len(active) <= 1:
                break
            trials = np.repeat(mask[None], len(active), axis=0)
            for k, j in enumerate(active):
                trials[k][cell == j] = 0.0
            images = draw()[:max(1, n_images // 2)]
            patterns = np.broadcast_to(pattern, (len(active),) + pattern.shape)
            logp = oracle.log_probs(stamp(images, trials, patterns))
            keep = logp.reshape(len(active), len(images), -1)[..., target].mean(axis=1)
            order = np.argsort(-keep, kind="stable")  # least harmful removal first
            n = len(active) // 2
            accepted = False
            while n >= 1 and not accepted:
                trial = np.where(np.isin(cell, active[order[:n]]), 0.0, mask)
                if success(trial) >= goal:
                    mask, accepted = trial, True
                n //= 2
            if not accepted:
                break
    except OutOfBudget:
        log.info("class %d: pruning stopped at its query allowance", target)
    return mask


def pruned(oracle: Oracle, space: Space, target: int, mask: np.ndarray, pattern: np.ndarray,
            train: np.ndarray, evals: np.ndarray, asr: float, config: SynthConfig,
            plan: Plan) -> tuple[np.ndarray, float]:
    """`prune_mask` within its query allowance, kept only if it still passes validation."""
    rng = np.random.default_rng([config.seed, target, 2])
    oracle.ceiling = oracle.queries + plan.prune_cost
    try:
        pruned = prune_mask(oracle, space, target, mask, pattern, train, min(1.0, config.asr + SEARCH_MARGIN), rng)
    finally:
        oracle.ceiling = None
    if pruned.sum() >= mask.sum():
        return mask, asr
    try:
        pruned_asr = stamped_asr(oracle, target, evals, pruned, pattern)
    except OutOfBudget:
        return mask, asr
    if pruned_asr >= config.asr:
        return pruned.astype(np.float32), pruned_asr
    log.info("class %d: pruned mask failed validation (ASR %.2f); kept the unpruned one", target, pruned_asr)
    return mask, asr
