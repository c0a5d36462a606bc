"""Clamp v2 bounds from statistics, and the cross-fit that picks the channel-mean strength.

Shared by `clamp` (and anything else that writes a clamped model); the statistics come from one
pass of `measure.folds.measure_folds`, so every candidate strength and every fold is fitted from
the same pass, exactly (merged per-fold top-k, no second statistics pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decide.bounds import map_bound, mean_bound, topk_for_quantile
from ..decide.strength import StrengthRow, gate_threshold, held_out_row, low_gate_threshold, within_budget
from ..measure.calibrate import Progress, model_tensor, prefetch
from ..measure.folds import FoldedSource, FoldStats
from ..measure.preprocess import Preprocess
from ..measure.session import create_session
from ..measure.sources import DataSource
from ..measure.stats import ChannelStats
from ..model.load import Model
from ..model.taps import Tap
from ..rewrite.clamp import GATE_PARTS, SCORE_FLOOR, SCORE_OUTPUT, SCORE_PARTS_OUTPUT, ClampBound, MeanBound, clamp_maps

#: Channel-mean floor, relative to the map's largest bound: a channel silent on clean images
#: (bound ~0) is never divided by zero, and one that wakes up beyond the floor is scaled down.
MEAN_EPS = 1e-3


@dataclass(frozen=True)
class MapPlan:
    """What the clamp bounds at one map."""

    tap: Tap
    """The map."""
    granularity: str | None
    """``position`` or ``channel`` for the position clamp, None for none."""
    mean_stat: str | None
    """``img_mean`` or ``img_pmean`` (signed maps: mean of the positive part), None for no mean bound."""

    @property
    def two_sided(self) -> bool:
        """The position clamp also has a lower bound (the map can go negative)."""
        return self.granularity is not None and not self.tap.non_negative

    def stats(self) -> tuple[str, ...]:
        """Instrumented statistics this plan needs."""
        out: tuple[str, ...] = ()
        if self.granularity == "position":
            out += ("pos_top", "pos_bottom") if self.two_sided else ("pos_top",)
        elif self.granularity == "channel":
            out += ("img_max", "img_min") if self.two_sided else ("img_max",)
        if self.mean_stat is not None:
            out += (self.mean_stat,)
        return out


@dataclass(frozen=True)
class Evidence:
    """What the channel-mean score parts (and so the score gate) are measured against."""

    low: bool = True
    """Each channel-mean bound also carries its channels' smallest clean mean, the reference of the
    map's low part (channel means falling below anything clean)."""
    quantile: float | None = None
    """Grade the mean part against this quantile (percent) of clean channel means when the strength
    is above it (None: against the bound itself). At strength 100 the bound is the clean maximum,
    and a part that is 0 until an image passes every calibration image's mean is a blunt detector."""


def bounds_at(plans: Sequence[MapPlan], stats: dict[str, ChannelStats], images: int, *, strength: float | None,
              position_quantile: float, margin: float, power: float, evidence: Evidence = Evidence(),
              ) -> dict[str, ClampBound]:
    """Bounds of every map from statistics of `images` images (all of them, or all folds but one),
    with the references of the channel-mean score parts `evidence` asks for."""
    out: dict[str, ClampBound] = {}
    for plan in plans:
        st = stats[plan.tap.name]
        hi = lo = mean = None
        if plan.granularity is not None:
            mb = map_bound(plan.tap, st, plan.granularity, margin, quantile=position_quantile, images=images)
            hi, lo = mb.hi, mb.lo
        if plan.mean_stat is not None and strength is not None:
            b = mean_bound(st, plan.mean_stat, strength, images)
            eps = MEAN_EPS * max(float(b.max()), 1e-12)
            low = st.image_moments[plan.mean_stat].min if evidence.low else None
            graded = evidence.quantile is not None and strength > evidence.quantile
            ref = mean_bound(st, plan.mean_stat, evidence.quantile, images) if graded else None
            mean = MeanBound(b, power=power, eps=eps, positive=plan.mean_stat == "img_pmean",
                             lo=None if low is None else np.maximum(low, 0.0), ref=ref)
        if hi is not None or mean is not None:
            out[plan.tap.name] = ClampBound(hi=hi, lo=lo, mean=mean)
    return out


def image_topk(grid: Sequence[float], images: int) -> int:
    """How many per-image values the lowest strength of `grid` needs (over all images)."""
    return max(topk_for_quantile(min(grid), images), 1)


def cross_fit(model: Model, plans: Sequence[MapPlan], folds: FoldStats, source: DataSource, preprocess: Preprocess,
              batch_size: int, grid: Sequence[float], *, position_quantile: float, margin: float, power: float,
              provider: str = "auto", progress: Progress | None = None,
              stop: Callable[[list[StrengthRow]], bool] | None = None, excess: str = "clip",
              evidence: Evidence = Evidence()) -> list[StrengthRow]:
    """Held-out cost of the candidate strengths, strongest last.

    For each candidate, each fold's images run through the model bounded by the other folds'
    statistics (channel means and positions alike); one pass over the source per candidate, with
    one session per fold. `stop` sees the rows so far after each candidate: True ends the search
    (a rule that only accepts an unbroken run from q = 100 needs no candidate past its first miss).
    """
    rows: list[StrengthRow] = []
    for q in grid:
        def fold_bounds(f: int, q: float = q) -> dict[str, ClampBound]:
            return bounds_at(plans, folds.merged(exclude=f), folds.images(exclude=f), strength=q,
                             position_quantile=position_quantile, margin=margin, power=power,
                             evidence=evidence)
        rows.append(_held_out(model, folds, source, preprocess, batch_size, q, fold_bounds, {"excess": excess},
                              provider, progress, f"cross-fit q={q:g}"))
        if stop is not None and stop(rows):
            break
    return rows


def cross_fit_gate(model: Model, plans: Sequence[MapPlan], folds: FoldStats, source: DataSource,
                   preprocess: Preprocess, batch_size: int, row: StrengthRow, gate_quantile: float | str,
                   threshold: float, *, position_quantile: float, margin: float, power: float,
                   provider: str = "auto", progress: Progress | None = None, excess: str = "clip",
                   evidence: Evidence = Evidence(), low_threshold: float | None = None) -> StrengthRow:
    """Held-out cost of the strength of `row` with the score gate added (`with_gate`): what the gate
    costs on clean images, measured like the strength itself (its threshold and part scales are
    the ones `row` fitted on all held-out folds)."""
    def fold_bounds(f: int) -> dict[str, ClampBound]:
        merged, images = folds.merged(exclude=f), folds.images(exclude=f)
        bounds = bounds_at(plans, merged, images, strength=row.quantile, position_quantile=position_quantile,
                           margin=margin, power=power, evidence=evidence)
        return with_gate(bounds, plans, merged, images, gate_quantile)
    gated = _held_out(model, folds, source, preprocess, batch_size, row.quantile, fold_bounds,
                      {"score_scales": row.score_scales or None, "gate_threshold": threshold,
                       "gate_low_threshold": low_threshold, "excess": excess},
                      provider, progress,
                      f"cross-fit gate {gate_quantile}")
    return dataclasses.replace(gated, score_p99=row.score_p99, score_scales=row.score_scales,
                               held_out_scores=row.held_out_scores, held_out_mean_scores=row.held_out_mean_scores,
                               held_out_low_scores=row.held_out_low_scores)


def with_gate(bounds: dict[str, ClampBound], plans: Sequence[MapPlan], stats: dict[str, ChannelStats], images: int,
              quantile: float | str) -> dict[str, ClampBound]:
    """`bounds` with the score gate's tighter channel-mean bound (the `quantile` of clean channel
    means, or their average for ``"mean"``; never above the map's own bound) on every map that has
    a channel-mean bound."""
    out = dict(bounds)
    for plan in plans:
        b = out.get(plan.tap.name)
        if b is None or b.mean is None or plan.mean_stat is None:
            continue
        st = stats[plan.tap.name]
        if quantile == "mean":
            g = st.image_moments[plan.mean_stat].mean.astype(np.float32)
        else:
            g = mean_bound(st, plan.mean_stat, float(quantile), images)
        g = np.minimum(g, b.mean.hi)
        mean = dataclasses.replace(b.mean, gate_hi=g)
        out[plan.tap.name] = dataclasses.replace(b, mean=mean)
    return out


def _held_out(model: Model, folds: FoldStats, source: DataSource, preprocess: Preprocess, batch_size: int,
              quantile: float, fold_bounds: Callable[[int], dict[str, ClampBound]], options: dict, provider: str,
              progress: Progress | None, label: str) -> StrengthRow:
    """One pass: every image through the model bounded by the statistics of the folds it is not in."""
    k = len(folds.folds)
    n = len(folds.predictions)
    progress = progress or Progress()
    output = model.proto.graph.output[0].name
    sessions = []
    records: list = []
    for f in range(k):
        proto, records = clamp_maps(model, fold_bounds(f), score_output=True, score_parts=True, **options)
        sessions.append(create_session(model, proto, provider))
    new = np.full(n, -1, dtype=np.int64)
    parts = np.full((n, sum(len(r.score_parts) for r in records)), np.nan, dtype=np.float64)
    progress.start(label, n)
    try:
        staged = ((b, model_tensor(b, preprocess)) for b in FoldedSource(source, k).batches(batch_size))
        for batch, x in prefetch(staged):
            logits, part = sessions[batch.fold].run([output, SCORE_PARTS_OUTPUT], x)
            new[batch.indices] = np.asarray(logits).reshape(len(batch), -1).argmax(-1)
            parts[batch.indices] = part
            progress.advance(len(batch))
    finally:
        progress.finish()
    kinds = [kind for r in records for kind in r.score_parts]
    above, below = (np.array([kind == side for kind in kinds], dtype=bool) for side in GATE_PARTS)
    return held_out_row(quantile, folds.probabilities, folds.predictions, new, parts, above, below)


def held_out_scaled(plans: Sequence[MapPlan], folds: FoldStats, strength: float | None) -> dict[str, float]:
    """Per map, the share of held-out (image, channel) pairs whose channel mean exceeds the bound
    fitted on the other folds: how often the channel-mean bound acts on clean data.

    Counted from each fold's top-k of per-image means, which holds every value above the bound as
    long as fewer than k do (k serves the lowest candidate strength over all images).
    """
    if strength is None:
        return {}
    out: dict[str, float] = {}
    k = len(folds.folds)
    n = len(folds.predictions)
    for plan in plans:
        if plan.mean_stat is None:
            continue
        above = pairs = 0
        for f in range(k):
            merged = folds.merged(exclude=f)[plan.tap.name]
            bound = mean_bound(merged, plan.mean_stat, strength, folds.images(exclude=f))
            top = folds.folds[f][plan.tap.name].top[plan.mean_stat].values  # [<=k, C], largest orientation
            above += int((top > bound[None, :]).sum())
            pairs += len(range(f, n, k)) * plan.tap.channels
        out[plan.tap.name] = above / pairs if pairs else 0.0
    return out


def mean_statistics(taps: Sequence[Tap]) -> dict[str, tuple[str, ...]]:
    """Per map, the per-image channel-mean statistic the channel-mean bound and the score use."""
    return {t.name: ("img_mean" if t.non_negative else "img_pmean",) for t in taps}


def anomaly_scores(model: Model, taps: Sequence[Tap], clean: dict[str, ChannelStats], source: DataSource,
                   preprocess: Preprocess, batch_size: int, provider: str = "auto") -> dict:
    """The clamp's per-image anomaly score (`rewrite.clamp.SCORE_OUTPUT`) of the images of `source`,
    against bounds at the clean maxima and, for the low parts, minima of the channel means (every
    clean calibration image then scores 0, up to float rounding), without writing a model. Every
    part's scale is 1 here (the raw largest part): the per-part scales of a clamped model come from
    its cross-fit, which a scan does not run.

    Args:
        clean: clean statistics with ``pos_max`` (``pos_min``) and the `mean_statistics` measured.

    Returns:
        images, the share above `SCORE_FLOOR` (outside the clean envelope somewhere), and the
        median, 90th percentile and maximum score.
    """
    bounds = {}
    for tap in taps:
        st = clean[tap.name]
        stat = mean_statistics([tap])[tap.name][0]
        b = mean_bound(st, stat, 100.0, st.count or 1)
        moments = st.image_moments.get(stat)
        mean = MeanBound(b, eps=MEAN_EPS * max(float(b.max()), 1e-12), positive=stat == "img_pmean",
                         lo=None if moments is None else np.maximum(moments.min, 0.0))
        bounds[tap.name] = ClampBound(hi=st.pos_max.astype(np.float32),
                                      lo=None if tap.non_negative else st.pos_min.astype(np.float32), mean=mean)
    proto, _ = clamp_maps(model, bounds, score_output=True)
    session = create_session(model, proto, provider)
    scores = [np.asarray(session.run([SCORE_OUTPUT], model_tensor(b, preprocess))[0])
              for b in source.batches(batch_size)]
    values = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    if len(values) == 0:
        return {"images": 0}
    return {"images": int(len(values)), "above_floor": float((values > SCORE_FLOOR).mean()),
            "median": float(np.median(values)), "p90": float(np.quantile(values, 0.9)),
            "max": float(values.max()), "floor": SCORE_FLOOR,
            "note": "bounds at the clean maxima: clean calibration images score 0; for a threshold at 1% clean "
                    "false alarms, clamp --score-output cross-fits one"}


def candidate_row(row: StrengthRow) -> dict:
    """A strength row for the report (the per-part score scales are reported once, in ``score``)."""
    hidden = ("score_scales", "held_out_scores", "held_out_mean_scores", "held_out_low_scores")
    return {k: v for k, v in dataclasses.asdict(row).items() if k not in hidden}


def fit_gate(model: Model, plans: list[MapPlan], folds, source: DataSource, preprocess: Preprocess,
             config: Any, rows: list[StrengthRow], chosen: float,
             progress: Progress | None) -> tuple[float, tuple[float, float | None] | None, dict]:
    """The strength and gate thresholds (upper side, low side or None) to deploy, and the report of
    how they were chosen. `config` is the clamp's `ClampConfig` (its gate, strength and pass options).

    The gate shares the strength's budget (held-out cost at most the cost at q 100 plus the slack).
    Each alarm, largest first, is tried at the chosen strength, then at the next weaker one, up to
    q 100, before the next alarm: the gate removes more of a full-image backdoor than one step of
    strength does (VGG SIG: 48% ASR at q 99 without it, 4-8% with it; 1.4% at q 100 and alarm 1%
    against 5.5% at q 99.5 and 0.5%, which the other order picked).
    """
    reference = next(r for r in rows if r.quantile == 100.0)
    tried = []
    report = {"quantile": config.gate, "alarms": list(config.gate_alarms)}
    seen = set()
    for alarm in config.gate_alarms:
        for row in sorted((r for r in rows if r.quantile >= chosen), key=lambda r: r.quantile):
            threshold, confidence = gate_threshold(row, alarm)
            if not np.isfinite(threshold) or (row.quantile, threshold) in seen:  # few images: one threshold
                continue
            seen.add((row.quantile, threshold))
            low = low_gate_threshold(row) if config.low_evidence else None
            gated = cross_fit_gate(model, plans, folds, source, preprocess, config.batch_size, row, config.gate,
                                   threshold, position_quantile=config.quantile, margin=config.margin,
                                   power=config.power, provider=config.provider, progress=progress,
                                   excess=config.excess_kind, evidence=config.evidence(True), low_threshold=low)
            tried.append(dict(candidate_row(gated), alarm=alarm, threshold=threshold, low_threshold=low))
            if within_budget(gated, reference, config.rule, config.slack):
                return row.quantile, (threshold, low), dict(
                    report, alarm=alarm, threshold=threshold, confidence=confidence, low_threshold=low, kept=True,
                    strength_without_gate=chosen, tried=tried, rule=GATE_RULE)
    return chosen, None, dict(report, alarm=None, threshold=None, kept=False, strength_without_gate=chosen,
                              tried=tried, rule=GATE_RULE,
                              reason="with the gate, no strength kept the held-out cost within the budget")


GATE_RULE = ("the largest alarm, and at it the strongest strength from the chosen one up to q 100, at which the gated "
             "rewrite's held-out cost stays within the strength's budget (the cost at q 100 plus the slack); no gate "
             "when none does")
