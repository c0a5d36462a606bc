"""``clamp``: bound every activation map to the range clean calibration images produce, verify, write."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..decide.bounds import MapBound, mean_bound, topk_for_quantile
from ..decide.strength import (
    DEFAULT_GRID,
    SCORE_SCALE_FLOOR,
    StrengthRow,
    choose,
    exceeded,
    validate_grid,
)
from ..errors import UsageError
from ..measure.calibrate import Progress
from ..measure.engine import EngineOptions
from ..measure.folds import measure_folds
from ..measure.preprocess import Preprocess
from ..measure.probe import Probe
from ..measure.session import create_session
from ..measure.sources import DataSource
from ..model.files import check_output_path, save_model
from ..model.load import Model, load_model
from ..model.taps import find_taps
from ..report.types import ClampMapReport, ClampReport, ModelInfo
from ..report.visuals import Visuals
from ..rewrite.clamp import EXCESS_KINDS, GATED_OUTPUT, SCORE_OUTPUT, ClampBound, clamp_maps
from ..rewrite.graph import check_rewritable
from ..rewrite.verify import require_ok, verify_model
from .common import (
    MIN_AGREEMENT,
    calibration_section,
    lift_for_clamp,
    load_with_weights,
    make_engine,
    open_calibration,
    require_agreement,
    verify_inputs,
)
from .crossfit import (
    Evidence,
    MapPlan,
    bounds_at,
    candidate_row,
    cross_fit,
    fit_gate,
    held_out_scaled,
    image_topk,
    with_gate,
)
from .evidence import given_suspects, probed_suspects
from .options import PreprocessOptions

#: Fewest calibration images per fold for ``--strength auto``: below it each held-out fold is too
#: small for its change to mean anything, and some folds would be empty.
MIN_CROSSFIT_IMAGES_PER_FOLD = 2

#: The two kinds of bound (both by default).
BOUND_KINDS = ("position", "channel-mean")
#: Default exponent of the channel-mean scale factor (README, "Clamp with the channel-mean bound"):
#: p = 2 leaves full-image triggers working (digits Blended 78%, VGG SIG 85% ASR at q 99), harder
#: gating removes more; p = 6 was the knee on the CIFAR VGG (Blended 7.2 -> 3.0% for -1 pt ACC;
#: p = 16 cost 2.3 pt). Not best everywhere: on the ResNet-8 SIG model p = 2 did better (6.5 vs 19.7%).
DEFAULT_POWER = 6.0
#: Score gate defaults (see `ClampConfig.gate`).
DEFAULT_GATE = "mean"
#: Gate false-alarm shares to try, largest first (`ClampConfig.gate_alarm`; each held with 95%
#: confidence, `decide.strength.gate_threshold`). 0.005 alone (the previous default) let 18-26% of
#: the Blended models' triggered images through unflagged; at 0.01 the gate flagged 93-99% of every
#: Blended and SIG model's, for 0.4-0.9% of clean images (README, "The gate's alarm"). A gated image
#: without a suspect is pushed to clean averages, mostly losing its class (`gate_output`: refuse it).
DEFAULT_GATE_ALARM = (0.01, 0.005)
DEFAULT_UNSUSPECTED_ALARM = 0.005  # `ClampConfig.unsuspected_alarm`
#: Quantile the channel-mean evidence is graded against when the cross-fit chose a strength above it
#: (`ClampConfig.evidence_quantile`); None by default: on two retrained models it cut the ASR
#: (VGG Blended 13.4 -> 1.8%), on two others it raised it (ResNet-8 Blended 16.3 -> 33.2%: the graded
#: parts' held-out scales grow and the triggered images' scaled evidence shrinks). An option.
DEFAULT_EVIDENCE_QUANTILE = None
#: What the position clamp does to a value above its bound (README, "Fold instead of clip"):
#: ``auto`` folds at ``--quantile 100``, where a value above the bound is above everything clean
#: images produced, and clips below it, where the bound sits inside the clean range and folding
#: would mangle ordinary values (q 50 on a small CNN: 63% of predictions changed).
DEFAULT_EXCESS = "auto"


@dataclass(frozen=True)
class ClampConfig:
    """Options of a clamp."""

    layers: str | tuple[str, ...] = "all"
    """Maps to bound: ``all`` (default: clamping only the last map is far weaker), ``last`` or names."""
    granularity: str = "position"
    """``position`` (one bound per channel x H x W) or ``channel`` (one per channel)."""
    quantile: float = 100.0
    """Bound = this quantile (percent) of clean values; 100 = the maximum (identity on calibration data)."""
    margin: float = 0.0
    """Widen every bound by ``margin * |bound|``."""
    excess: str = DEFAULT_EXCESS
    """A value above its position bound: ``fold`` (reflected at the bound, ``2 hi - a``, floored),
    ``clip`` (kept at the bound, the plain ℓ∞ clamp; see `rewrite.clamp.EXCESS_KINDS`) or ``auto``
    (fold at `quantile` 100, clip below)."""
    batch_size: int = 32
    """Images per ORT run."""
    provider: str = "auto"
    """ORT provider."""
    limit: int | None = None
    """Use at most this many calibration images."""
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    """Preprocessing overrides."""
    verify_images: int = 256
    """Calibration images the verification runs on."""
    min_agreement: float = MIN_AGREEMENT
    """Refuse to write when fewer verification images keep their top-1 class (`common.MIN_AGREEMENT`)."""
    engine: EngineOptions | str = "local"
    """Where the bounds' statistics are computed: ``local``, ``ray``, or `EngineOptions` (the
    position-only clamp; the channel-mean bound's cross-fitted pass runs in this process)."""
    bounds: tuple[str, ...] = BOUND_KINDS
    """Which bounds: ``position`` (the ℓ∞ clamp, `granularity`) and/or ``channel-mean``."""
    strength: float | str = "auto"
    """Channel-mean bound: quantile (percent) of clean per-image channel means, or ``auto``
    (cross-fitted on the calibration images, see `decide.strength`)."""
    power: float = DEFAULT_POWER
    """Exponent p of the channel-mean scale factor ``min(B / mean, 1)^p``."""
    mean_layers: str = "after-first"
    """Maps that get a channel-mean bound: ``after-first`` (every bounded map but the first conv
    map, whose input is the image itself) or ``all``."""
    strength_grid: tuple[float, ...] = DEFAULT_GRID
    """Candidate strengths of ``auto``."""
    folds: int = 5
    """Cross-fitting folds of ``auto``."""
    rule: str = "softmax"
    """Cost ``auto`` bounds: ``softmax`` (estimated accuracy drop) or ``change`` (changed top-1)."""
    slack: float = 0.005
    """``auto`` picks the lowest strength whose held-out cost is at most the cost at 100 plus this
    (the score gate shares it). 0.005 (half a point): with the gate, 0.01 bought little on the
    benchmark models (VGG SIG 4.9% ASR at q 99.5 against 2.3% at q 100 with 0.005) and cost clean
    models up to 1 point."""
    score_output: bool = False
    """Add the per-image anomaly score output ``onnx_linf_score`` to the clamped model."""
    gate: float | str | None = DEFAULT_GATE
    """Score gate (needs ``auto``): images whose running channel-mean evidence (the sum of the score's
    scaled channel-mean parts over the maps so far) passes the gate threshold get their channel means bounded at this
    quantile (percent) of clean ones, or at their average (``"mean"``), from that map on; None: no gate."""
    low_evidence: bool = True
    """The score and the gate also read each channel-mean bounded map's *low* part: how far an
    image's channel means fall below the smallest clean one (triggers that lower activity: a blend
    scales the image by ``1 - alpha``). Evidence only; nothing is scaled up."""
    fold_reference: bool = True
    """``auto``: score the channel-mean parts (and so the gate) against the average of the fold-fitted
    bounds, the bounds the gate's threshold was calibrated with (`_fold_reference`)."""
    evidence_quantile: float | None = DEFAULT_EVIDENCE_QUANTILE
    """``auto``: where the chosen strength is above this quantile, the channel-mean score parts (and
    the gate) are graded against this quantile of clean channel means instead of the bound (None:
    the bound). Fixed strengths always use the bound."""
    gate_alarm: float | tuple[float, ...] = DEFAULT_GATE_ALARM
    """Gate threshold: at most this share of new clean images may score above it, with 95% confidence
    (`decide.strength.gate_threshold`: a distribution-free tolerance bound on the held-out scores);
    several: tried largest first, each at every strength from the chosen one up to q 100."""
    gate_output: bool = False
    """Add the bool ``[N]`` output ``onnx_linf_gated``: the images the gate flagged. A flagged image's
    prediction is that of an image whose channels were pushed to clean averages (mostly not its
    class), so a deployment that can refuse inputs should refuse these; refused when no gate is kept."""
    gate_response: str = "auto"
    """What the gate does to a flagged image: ``average`` (its channel means bounded at `gate`),
    ``exclude`` (with `suspects`: nothing but the exclusion, its suspected classes never win), or
    ``auto``: ``exclude`` where a class is suspected, ``average`` otherwise."""
    unsuspected_alarm: float | None = DEFAULT_UNSUSPECTED_ALARM
    """Where `suspects` names no class (the probes found none) the gate's alarms are capped at this
    (None: not): without evidence of a backdoor, fewer clean images are pushed to clean averages."""
    suspects: str | os.PathLike | tuple[int, ...] = "auto"
    """Classes an image the gate flags must not be given (`rewrite.exclude`): ``auto`` (default), the
    classes the probe families of ``scan --verdict`` suspect on the calibration images (260 forwards
    per probed image, 128 images: ~33k forwards, run wherever the gate is on); class indices; a
    scan report (``--json``) of this model, its suspected classes; or ``none``."""

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        if self.granularity not in ("position", "channel"):
            raise UsageError(f"--granularity must be position or channel, got {self.granularity!r}")
        if not (self.gate is None or self.gate == "mean" or (_quantile_gate(self.gate) and 0 < self.gate <= 100)):
            raise UsageError(f"--gate must be 'mean', a quantile in (0, 100] or off, got {self.gate!r}")
        if self.gate_output and (self.gate is None or self.strength != "auto" or "channel-mean" not in self.bounds):
            raise UsageError("--gate-output needs the score gate: --gate on, --strength auto, the channel-mean bound")
        if not self.gate_alarms or not all(0 < a < 0.5 for a in self.gate_alarms):
            raise UsageError(f"the gate's false-alarm shares must be in (0, 0.5), got {self.gate_alarm}")
        if self.evidence_quantile is not None and not 0 < self.evidence_quantile < 100:
            raise UsageError(f"the evidence quantile must be in (0, 100) or None, got {self.evidence_quantile}")
        if self.margin < 0:
            raise UsageError(f"--margin must be >= 0, got {self.margin}")
        if self.excess not in ("auto",) + EXCESS_KINDS:
            raise UsageError(f"--excess must be auto, {' or '.join(EXCESS_KINDS)}, got {self.excess!r}")
        unknown = [b for b in self.bounds if b not in BOUND_KINDS]
        if unknown or not self.bounds:
            raise UsageError(f"--bounds takes {' and/or '.join(BOUND_KINDS)}, got {','.join(self.bounds) or 'nothing'}")
        if self.strength != "auto" and not (isinstance(self.strength, (int, float)) and 0 < self.strength <= 100):
            raise UsageError(f"--strength must be 'auto' or a quantile in (0, 100], got {self.strength!r}")
        if not self.power > 0:
            raise UsageError(f"--power must be > 0, got {self.power}")
        if self.mean_layers not in ("after-first", "all"):
            raise UsageError(f"mean_layers must be after-first or all, got {self.mean_layers!r}")
        if self.strength == "auto" and self.folds < 2:
            raise UsageError(f"--strength auto needs at least 2 folds, got {self.folds}")
        validate_grid(self.strength_grid)
        choose([StrengthRow(100.0, 0.0, 0.0, 0.0)], self.rule, self.slack)  # rule and slack
        if self.gate_response not in ("auto", "average", "exclude") or (self.gate_response, self.suspects) == (
                "exclude", "none"):
            raise UsageError(f"--gate-response: auto, average, or exclude with --suspects; not {self.gate_response!r}")
        if self.unsuspected_alarm is not None and not 0 < self.unsuspected_alarm < 0.5:
            raise UsageError(f"the unsuspected alarm must be in (0, 0.5) or None, got {self.unsuspected_alarm}")
        if isinstance(self.suspects, tuple) and not all(isinstance(c, int) and c >= 0 for c in self.suspects):
            raise UsageError(f"suspected classes must be class indices >= 0, got {self.suspects!r}")

    @property
    def gate_alarms(self) -> tuple[float, ...]:
        """`gate_alarm` as candidates, largest first."""
        alarms = self.gate_alarm if isinstance(self.gate_alarm, tuple) else (self.gate_alarm,)
        return tuple(sorted({float(a) for a in alarms}, reverse=True))

    @property
    def excess_kind(self) -> str:
        """`excess` with ``auto`` resolved: ``fold`` at quantile 100, else ``clip``."""
        if self.excess != "auto":
            return self.excess
        return "fold" if self.quantile == 100.0 else "clip"

    def evidence(self, auto: bool) -> Evidence:
        """The score parts' references: `evidence_quantile` only for a cross-fitted strength."""
        return Evidence(low=self.low_evidence, quantile=self.evidence_quantile if auto else None)

    @property
    def mean_bounds(self) -> bool:
        """True when channel-mean bounds are applied."""
        return "channel-mean" in self.bounds


@dataclass(frozen=True)
class ClampResult:
    """What `clamp` did."""

    proto: onnx.ModelProto = field(repr=False)
    """The clamped model (already written when an output path was given)."""
    bounds: list = field(repr=False)
    """`bounds.MapBound` per map with a position clamp."""
    records: list
    """`rewrite.ClampRecord` per map."""
    report: ClampReport
    """The report (`ClampReport.to_dict` for its JSON form)."""


def clamp(model_path: str | os.PathLike | Model, calib: str | os.PathLike | DataSource,
          config: ClampConfig | None = None, *, output: str | os.PathLike | None = None, force: bool = False,
          progress: Progress | None = None, preprocess: Preprocess | None = None) -> ClampResult:
    """Bound every activation map to what clean calibration images produce there.

    Two bounds (`ClampConfig.bounds`): per-image channel means scaled down to their clean bound
    (``a * min(B / mean, 1)^p``, for triggers spread over the image) and then the position clamp
    ``Min(a, τ)`` (``Max(a, lo)`` too on maps that go negative; per channel where the spatial size
    is not static). No trigger, labels or gradients: clean images and forward passes only. The
    channel-mean strength is cross-fitted on the calibration images unless fixed; images the score
    gate flags are never given a suspected class (`ClampConfig.suspects`, the probes by default).

    Raises:
        UsageError: bad options or output path.
        VerificationError: where every bound is the maximum over the calibration images, the
            clamped model must reproduce the original's outputs on them; otherwise, or when the
            rewrite changes too many predictions (`ClampConfig.min_agreement`), nothing is written.
    """

    config = config or ClampConfig()
    config.validate()
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    check_rewritable(model)  # before any calibration pass
    if output is not None:
        check_output_path(output, [model.path], force)
    suspects = given_suspects(model, config.suspects)
    taps = find_taps(model, config.layers if isinstance(config.layers, str) else list(config.layers))
    preprocess = preprocess or config.preprocess.resolve(model)
    source = open_calibration(model, calib, preprocess, config.limit, taps=taps, batch_size=config.batch_size)
    k = topk_for_quantile(config.quantile, len(source))
    notes: list[str] = []
    plans = _plans(taps, config, notes)
    auto = config.mean_bounds and config.strength == "auto"
    if auto and len(source) < MIN_CROSSFIT_IMAGES_PER_FOLD * config.folds:
        auto = False
        config = dataclasses.replace(config, strength=100.0)
        needed = MIN_CROSSFIT_IMAGES_PER_FOLD * config.folds
        notes.append(f"only {len(source)} calibration images: too few to cross-fit the channel-mean strength "
                     f"({needed} needed), bounded at their maximum (--strength 100)")
    grid = validate_grid(config.strength_grid) if auto else ()
    fixed = None if not config.mean_bounds or auto else float(config.strength)

    # The per-image top-k must reach the lowest quantile any bound uses (a quantile gate's and the
    # graded evidence's too).
    depth = (grid or (fixed,)) + ((float(config.gate),) if _quantile_gate(config.gate) else ())
    depth += (config.evidence_quantile,) if auto and config.evidence_quantile is not None else ()
    engine = make_engine(config.engine)
    probe = Probe(model, taps, (), config.provider, per_tap_stats={p.tap.name: p.stats() for p in plans}, topk=k,
                  engine=engine if not config.mean_bounds else None)
    if config.mean_bounds:
        if engine.describe() is not None:
            notes.append("channel-mean statistics are cross-fitted in this process, not on the engine")
        folds = measure_folds(probe, source, preprocess, config.batch_size, config.folds if auto else 1, progress,
                              image_topk=image_topk(depth, len(source)))
        stats = folds.merged()
    else:
        folds = None
        stats = probe.measure(source, preprocess, config.batch_size, progress=progress)

    editable = lift_for_clamp(load_with_weights(model), notes)
    strength: dict | None = None
    chosen = fixed
    rows: list[StrengthRow] = []
    if auto:
        rows = cross_fit(editable, plans, folds, source, preprocess, config.batch_size, grid,
                         position_quantile=config.quantile, margin=config.margin, power=config.power,
                         provider=config.provider, progress=progress, excess=config.excess_kind,
                         stop=lambda done: exceeded(done, config.rule, config.slack),
                         evidence=config.evidence(auto))
        choice = choose(rows, config.rule, config.slack)
        chosen = choice.quantile
        strength = {"mode": "auto", "quantile": chosen, "power": config.power, "rule": config.rule,
                    "slack": config.slack, "folds": config.folds,
                    "candidates": [candidate_row(r) for r in rows],
                    "forwards": len(source) * (1 + len(rows))}
    elif fixed is not None:
        strength = {"mode": "fixed", "quantile": fixed, "power": config.power}
    gate = None
    if auto and config.gate is not None:
        if config.suspects != "none":  # before the gate: with no suspect its alarm is capped
            suspects = suspects or probed_suspects(model, source, preprocess, config.provider, config.batch_size)
        cap = config.unsuspected_alarm if config.suspects != "none" and not suspects["classes"] else None
        fitting = config if cap is None else dataclasses.replace(
            config, gate_alarm=tuple(a for a in config.gate_alarms if a <= cap) or cap)
        chosen, gate, strength["gate"] = fit_gate(editable, plans, folds, source, preprocess, fitting, rows, chosen,
                                                  progress)
        strength["forwards"] += len(source) * len(strength["gate"]["tried"])
        if gate is None:
            notes.append("score gate left out: " + strength["gate"]["reason"])
        elif config.gate_output:
            strength["gate"]["output"] = GATED_OUTPUT
        strength["quantile"] = chosen
    elif config.gate is not None and config.mean_bounds and not auto:
        notes.append("score gate left out: it needs the cross-fitted strength (--strength auto) and enough images")
    if config.gate_output and gate is None:
        why = strength["gate"]["reason"] if auto and "gate" in strength else "too few calibration images"
        raise UsageError(f"--gate-output: the score gate was left out ({why}); there is nothing to output")
    if config.suspects not in ("none", "auto") and gate is None:
        notes.append("suspected classes not excluded: no score gate, so no image is flagged")
    elif config.suspects != "none" and gate is not None:
        strength["gate"]["suspects"] = suspects
    response = config.gate_response
    if response == "auto":  # with a suspected class, the exclusion alone (README, "Suspected classes")
        response = "exclude" if suspects and suspects["classes"] else "average"
    if gate is not None:
        strength["gate"]["response"] = response
    chosen_row = next((r for r in rows if r.quantile == chosen), None)
    scales = chosen_row.score_scales if chosen_row is not None else None
    final = bounds_at(plans, stats, len(source), strength=chosen, position_quantile=config.quantile,
                      margin=config.margin, power=config.power, evidence=config.evidence(auto))
    if auto and config.fold_reference and config.evidence_quantile is None:
        final = _fold_reference(final, plans, folds, chosen)
    if gate is not None:
        final = with_gate(final, plans, stats, len(source), config.gate)
        if response == "exclude":  # flag only: a gated image is bounded as any other
            final = {k: b if b.mean is None else dataclasses.replace(b, mean=dataclasses.replace(
                b.mean, gate_hi=None if b.mean.gate_hi is None else b.mean.hi)) for k, b in final.items()}
    proto, records = clamp_maps(editable, final, score_output=config.score_output, score_scales=scales or None,
                                gate_threshold=None if gate is None else gate[0],
                                gate_low_threshold=None if gate is None else gate[1], excess=config.excess_kind,
                                gate_output=config.gate_output,
                                gate_exclude=tuple(suspects["classes"]) if gate is not None and suspects else ())
    inputs = verify_inputs(source, preprocess, config.batch_size, config.verify_images)
    identity = config.quantile == 100.0 and config.margin == 0.0 and chosen in (None, 100.0)
    # Where every bound is a maximum over the calibration images, the clamp is the identity on
    # them, so the original model is the reference. Otherwise it is not meant to be: the check then
    # covers structure and loading, and the agreement gate below how many predictions changed.
    extra = ((SCORE_OUTPUT,) if config.score_output else ()) + ((GATED_OUTPUT,) if config.gate_output else ())
    checked = inputs
    if identity and gate is not None:
        # A graded gate may flag a calibration image even at strength 100; it changes such images by
        # design, so the identity is checked on the others (the gate flags ~`gate_alarm` of them).
        flagged = proto if config.gate_output else clamp_maps(
            editable, final, score_scales=scales or None, gate_threshold=gate[0], gate_low_threshold=gate[1],
            excess=config.excess_kind, gate_output=True)[0]
        checked, gated, total = _ungated(editable, flagged, inputs, config.provider)
        if gated:
            notes.append(f"verified as the identity on {total - gated} of {total} calibration images: the score "
                         f"gate flagged {gated}, which it changes by design")
    result = verify_model(editable, proto, editable.proto, checked, atol=1e-5, rtol=1e-5, provider=config.provider,
                          exact=False, extra_outputs=extra) if identity else None
    if result is not None:
        require_ok(result)
    agreement = require_agreement(editable, proto, inputs, config.provider, config.min_agreement, "clamp")
    if output is not None:
        save_model(proto, output, external_data=model.has_external_data)
    position = {name: b for name, b in final.items() if b.hi is not None}
    bounds = [MapBound(p.tap.name, p.granularity, position[p.tap.name].hi, position[p.tap.name].lo)
              for p in plans if p.tap.name in position]
    scaled = held_out_scaled(plans, folds, chosen) if auto else {}
    report = ClampReport(
        model=ModelInfo.of(model), provider=probe.provider, preprocess=preprocess.to_dict(),
        calibration=calibration_section(source, config.batch_size, engine=engine if not config.mean_bounds else None),
        config={"layers": config.layers if isinstance(config.layers, str) else list(config.layers),
                "granularity": config.granularity, "quantile": config.quantile, "margin": config.margin, "topk": k,
                "excess": config.excess_kind, "low_evidence": config.low_evidence,
                "evidence_quantile": config.evidence(auto).quantile,
                "fold_reference": bool(auto and config.fold_reference and config.evidence_quantile is None),
                "bounds": list(config.bounds), "mean_layers": config.mean_layers},
        maps=[_map_report(p, final.get(p.tap.name), scaled.get(p.tap.name)) for p in plans],
        notes=notes,
        verification=None if result is None else dataclasses.asdict(result),
        calibration_agreement=agreement,
        output=None if output is None else str(output),
        visuals=Visuals(bounds={b.tap: (b.hi, b.lo) for b in bounds}),
        strength=strength,
        score=_score_section(chosen_row, records) if config.score_output else None,
    )
    return ClampResult(proto=proto, bounds=bounds, records=records, report=report)


def _plans(taps: list, config: ClampConfig, notes: list[str]) -> list[MapPlan]:
    """Per map: the position clamp's granularity and the channel-mean statistic, if any."""
    plans = []
    first_conv = next((t.name for t in taps if t.kind == "conv"), None)
    for tap in taps:
        g = None
        if "position" in config.bounds:
            g = config.granularity
            if g == "position" and not tap.static_spatial:
                g = "channel"
                notes.append(f"{tap.name}: spatial size is dynamic, bounded per channel")
        mean = None
        if config.mean_bounds and not (config.mean_layers == "after-first" and tap.name == first_conv):
            mean = "img_mean" if tap.non_negative else "img_pmean"
        if g is not None or mean is not None:
            plans.append(MapPlan(tap, g, mean))
    return plans


def _map_report(plan: MapPlan, bound: ClampBound | None, scaled: float | None) -> ClampMapReport:
    hi = None if bound is None else bound.hi
    lo = None if bound is None else bound.lo
    mean = None if bound is None else bound.mean
    return ClampMapReport(
        plan.tap.name, plan.granularity or "none", lo is not None, 0 if hi is None else int(hi.size),
        None if hi is None else float(hi.mean()), None if hi is None else float(hi.max()),
        None if lo is None else float(lo.min()),
        mean_bound=None if mean is None else ("positive-mean" if mean.positive else "mean"),
        mean_hi_max=None if mean is None else float(mean.hi.max()), mean_scaled=scaled)


def _fold_reference(final: dict[str, ClampBound], plans: list[MapPlan], folds,
                    chosen: float) -> dict[str, ClampBound]:
    """`final` with each channel-mean bound's score reference at the average of the five fold-fitted
    bounds: the gate's threshold and the parts' scales come from held-out images scored against
    bounds fitted on 4/5 of the images, and a bound fitted on all of them sits higher (at q 100, a
    maximum over more images), so new images scored against it read systematically less evidence
    than the threshold was calibrated on."""
    out = dict(final)
    fitted = [(folds.merged(exclude=f), folds.images(exclude=f)) for f in range(len(folds.folds))]
    for plan in plans:
        b = final.get(plan.tap.name)
        if b is None or b.mean is None:
            continue
        ref = np.mean([mean_bound(stats[plan.tap.name], plan.mean_stat, chosen, images)
                       for stats, images in fitted], axis=0)
        ref = np.minimum(ref.astype(np.float32), b.mean.hi)
        out[plan.tap.name] = dataclasses.replace(b, mean=dataclasses.replace(b.mean, ref=ref))
    return out


def _ungated(model: Model, flagged: onnx.ModelProto, inputs: list[np.ndarray],
             provider: str) -> tuple[list[np.ndarray], int, int]:
    """`inputs` without the images the gate flags (`GATED_OUTPUT` of `flagged`), their count, the total."""
    session = create_session(model, flagged, provider)
    kept, gated, total = [], 0, 0
    for x in inputs:
        hit = np.asarray(session.run([GATED_OUTPUT], x)[0], dtype=bool).reshape(-1)
        gated, total = gated + int(hit.sum()), total + len(hit)
        if not hit.all():
            kept.append(x[~hit])
    return kept, gated, total


def _distribution(scores: tuple[float, ...]) -> dict | None:
    """Quantiles of the held-out calibration scores (what a deployment compares its own scores to)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    q = np.quantile(values, [0.5, 0.9, 0.99, 0.999], method="inverted_cdf")
    return {"images": int(len(values)), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "p99.9": float(q[3]), "max": float(values.max())}


def _quantile_gate(gate) -> bool:
    return isinstance(gate, (int, float)) and not isinstance(gate, bool)


def _score_section(row: StrengthRow | None, records: list) -> dict:
    parts = [{"map": r.tap, "kind": kind} for r in records for kind in r.score_parts]
    if row is not None and row.score_scales:
        for part, scale in zip(parts, row.score_scales):
            part["scale"] = scale
    return {"output": SCORE_OUTPUT, "floor": 0.0,
            "definition": "largest part over maps (per map: largest log(channel mean / bound) and largest position "
                          "excess relative to the channel's bound), each part divided by its scale",
            "scales": None if row is None else "per part, its 99th percentile on held-out calibration images "
                                               f"(cross-fit), at least {SCORE_SCALE_FLOOR}",
            "parts": parts,
            "threshold_1pct": None if row is None else row.score_p99,
            "held_out_distribution": None if row is None else _distribution(row.held_out_scores),
            "threshold_source": None if row is None else "99th percentile of held-out calibration scores (cross-fit)"}
