"""Stage 6: policies that turn channel statistics into flagged channels (pure numpy).

Every policy returns the scores it ranked by, so a report can show *why* a channel was flagged.

A warning that shapes this module: on clean images alone, a high ℓ∞ marks the most *active*
channels, not backdoor channels. We measured zero overlap between the top-10% clean-ℓ∞ channels and
the channels a real trigger drives, on three CIFAR-10 models. Scores computed without trigger
evidence are therefore labelled ``clean`` everywhere, and only `differential` scores (evidence minus
clean) are evidence of a backdoor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..measure.stats import ChannelStats
from ..model.taps import GraphIndex

SCORE_STATS = ("linf", "l1", "l2")


@dataclass(frozen=True)
class TapFlags:
    """Scores and flagged channels of one tap."""

    tap: str
    """Tensor name of the tap."""
    scores: np.ndarray
    """float64 ``[C]`` score per channel (higher = more suspicious / more selected)."""
    flagged: tuple[int, ...]
    """Flagged channel indices, most extreme first."""


@dataclass(frozen=True)
class Flagged:
    """The result of a flagging policy over several taps."""

    policy: str
    """``ratio``, ``outliers``, ``report`` ..."""
    score: str
    """What the scores are, e.g. ``differential linf`` or ``clean linf``."""
    evidence: bool
    """True when scores come from trigger/suspect evidence, not clean images alone."""
    taps: dict[str, TapFlags]
    """Per tap name."""

    def channels(self) -> dict[str, list[int]]:
        """Tap name -> sorted flagged channels (taps with none left out)."""
        return {t: sorted(f.flagged) for t, f in self.taps.items() if f.flagged}

    @property
    def total(self) -> int:
        """Number of flagged channels over all taps."""
        return sum(len(f.flagged) for f in self.taps.values())


def clean_scores(stats: Mapping[str, ChannelStats], stat: str = "linf") -> dict[str, np.ndarray]:
    """Mean of `stat` over clean images, per channel: activity, not evidence."""
    _check_stat(stat)
    return {tap: s.moments[stat].mean.copy() for tap, s in stats.items()}


def differential_scores(clean: Mapping[str, ChannelStats], evidence: Mapping[str, ChannelStats],
                        stat: str = "linf") -> dict[str, np.ndarray]:
    """Mean of `stat` on evidence (trigger-stamped or suspect) images minus its mean on clean ones.

    This is the paper's lens: a trigger drives a few channels far above their clean range.
    """
    _check_stat(stat)
    return {tap: evidence[tap].moments[stat].mean - clean[tap].moments[stat].mean for tap in clean}


def _check_stat(stat: str) -> None:
    if stat not in SCORE_STATS:
        raise UsageError(f"unknown score {stat!r}: use one of {', '.join(SCORE_STATS)}")


def top_k(ratio: float, channels: int) -> int:
    """How many channels a ratio selects: round(ratio * C), at least 1."""
    return max(1, int(np.floor(ratio * channels + 0.5)))


def by_ratio(scores: Mapping[str, np.ndarray], ratio: float, *, score: str, evidence: bool) -> Flagged:
    """Flag the top `ratio` fraction of channels of each tap by score.

    Raises:
        UsageError: ratio not in (0, 1).
    """
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"--ratio must be in (0, 1), got {ratio}")
    taps = {}
    for tap, s in scores.items():
        k = top_k(ratio, len(s))
        # Stable sort on -score: ties resolved by channel index, so results are deterministic.
        order = np.argsort(-s, kind="stable")[:k]
        taps[tap] = TapFlags(tap, np.asarray(s, dtype=np.float64), tuple(int(c) for c in order))
    return Flagged("ratio", score, evidence, taps)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """Modified z-score (Iglewicz & Hoaglin): 0.6745 * (x - median) / MAD; 0 where MAD is 0."""
    s = np.asarray(scores, dtype=np.float64)
    med = np.median(s)
    mad = np.median(np.abs(s - med))
    if mad == 0:
        return np.zeros_like(s)
    return 0.6745 * (s - med) / mad


def by_outliers(scores: Mapping[str, np.ndarray], threshold: float = 3.5, *, score: str,
                evidence: bool) -> Flagged:
    """Flag channels whose robust z-score exceeds `threshold` on the high side, per tap."""
    if threshold <= 0:
        raise UsageError(f"outlier threshold must be > 0, got {threshold}")
    taps = {}
    for tap, s in scores.items():
        z = robust_z(s)
        idx = np.flatnonzero(z > threshold)
        idx = idx[np.argsort(-z[idx], kind="stable")]
        taps[tap] = TapFlags(tap, np.asarray(s, dtype=np.float64), tuple(int(c) for c in idx))
    return Flagged("outliers", score, evidence, taps)


def from_channels(channels: Mapping[str, list[int]], *, policy: str = "report", score: str = "from report",
                  evidence: bool = True, sizes: Mapping[str, int] | None = None) -> Flagged:
    """Wrap an explicit {tap: [channels]} selection (e.g. read back from a scan report)."""
    taps = {}
    for tap, chans in channels.items():
        c = (sizes or {}).get(tap, max(chans) + 1 if chans else 0)
        taps[tap] = TapFlags(tap, np.zeros(c), tuple(int(x) for x in chans))
    return Flagged(policy, score, evidence, taps)


def dormant_scores(stats: Mapping[str, ChannelStats], stat: str = "l1") -> dict[str, np.ndarray]:
    """Fine-Pruning's ranking: minus the mean activation on clean data, per channel.

    Fine-Pruning (Liu et al. 2018) prunes the channels least active on clean inputs, on the premise
    that a backdoor hides in channels the clean task leaves dormant. The highest score is the least
    active channel, so `by_ratio` on these scores selects what Fine-Pruning would prune first.

    Args:
        stats: clean statistics per tap.
        stat: ``l1`` (mean absolute activation, the paper's mean activation for ReLU maps), ``linf``
            or ``l2``.

    Returns:
        Tap name -> float64 ``[C]`` scores.

    Raises:
        UsageError: unknown statistic.
    """
    _check_stat(stat)
    return {tap: -np.asarray(s.moments[stat].mean, dtype=np.float64) for tap, s in stats.items()}


def clp_scores(model, taps) -> dict[str, np.ndarray]:
    """Channel Lipschitzness (CLP, Zheng et al. 2022): a data-free upper bound per conv output channel.

    For output channel ``k`` of a convolution with weight ``W`` ``[C_out, C_in/g, kh, kw]``, the
    score is the largest singular value of ``W_k`` reshaped to ``[C_in/g, kh*kw]``, times
    ``|gamma_k / sqrt(var_k + eps)|`` of the BatchNormalization that follows in the tap's chain, if
    any (CLP folds BN into the convolution first). Backdoor channels tend to have an unusually large
    Lipschitz constant, which `by_threshold` flags.

    Args:
        model: the loaded `onnx_linf.load.Model`.
        taps: `onnx_linf.taps.Tap` objects; only ``conv`` taps whose weights are constants are scored
            (merge and head maps, or weights computed in the graph, have no single kernel).

    Returns:
        Tap name -> float64 ``[C]`` scores, for the taps that could be scored.
    """
    # Local import: this module is otherwise pure numpy, and only CLP reads weights from the graph.

    index = GraphIndex(model.proto)
    by_name = {index.node_name(n): n for n in index.nodes}
    out: dict[str, np.ndarray] = {}
    for tap in taps:
        conv = by_name.get(tap.source)
        if tap.kind != "conv" or conv is None or conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        weight = index.const_value(conv.input[1])
        if weight is None or weight.ndim < 3:
            continue
        w = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], weight.shape[1], -1)
        # Batched SVD: singular values of every [C_in/g, kh*kw] slice at once, largest first.
        scores = np.linalg.svd(w, compute_uv=False)[:, 0]
        for name in tap.chain[1:]:
            node = by_name.get(name)
            if node is None or node.op_type != "BatchNormalization":
                continue
            gamma, var = index.const_value(node.input[1]), index.const_value(node.input[4])
            if gamma is None or var is None:
                break
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            scores = scores * np.abs(np.asarray(gamma, dtype=np.float64) / np.sqrt(np.asarray(var, np.float64) + eps))
            break
        out[tap.name] = scores
    return out


def by_threshold(scores: Mapping[str, np.ndarray], u: float = 3.0, *, score: str = "clp",
                 evidence: bool = False) -> Flagged:
    """Flag channels whose score exceeds ``mean + u * std`` of their tap (CLP's rule).

    Args:
        scores: tap name -> per-channel scores.
        u: number of standard deviations above the layer mean (CLP's default is 3).
        score: what the scores are, for reports.
        evidence: True when the scores come from trigger evidence (CLP's do not).

    Returns:
        The flagged channels per tap, most extreme first.

    Raises:
        UsageError: u is negative.
    """
    if u < 0:
        raise UsageError(f"u must be >= 0, got {u}")
    taps = {}
    for tap, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        limit = s.mean() + u * s.std()
        idx = np.flatnonzero(s > limit)
        idx = idx[np.argsort(-s[idx], kind="stable")]
        taps[tap] = TapFlags(tap, s, tuple(int(c) for c in idx))
    return Flagged("threshold", score, evidence, taps)
