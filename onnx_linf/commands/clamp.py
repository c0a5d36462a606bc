"""``clamp``: bound every activation map to the range clean calibration images produce, verify, write."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import onnx

from ..decide.bounds import map_bound, stats_for, topk_for_quantile
from ..errors import UsageError
from ..measure.calibrate import Progress
from ..measure.engine import EngineOptions
from ..measure.preprocess import Preprocess
from ..measure.probe import Probe
from ..measure.sources import DataSource
from ..model.files import check_output_path, save_model
from ..model.load import Model, load_model
from ..model.taps import find_taps
from ..report.types import ClampMapReport, ClampReport, ModelInfo
from ..report.visuals import Visuals
from ..rewrite.clamp import ClampBound, clamp_maps
from ..rewrite.graph import check_rewritable
from ..rewrite.verify import require_ok, verify_model
from .common import (MIN_AGREEMENT, calibration_section, lift_for_clamp, load_with_weights, make_engine,
                     open_calibration, require_agreement, verify_inputs)
from .options import PreprocessOptions


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
    """Where the bounds' statistics are computed: ``local``, ``ray``, or `EngineOptions`."""


@dataclass(frozen=True)
class ClampResult:
    """What `clamp` did."""

    proto: onnx.ModelProto = field(repr=False)
    """The clamped model (already written when an output path was given)."""
    bounds: list = field(repr=False)
    """`bounds.MapBound` per map."""
    records: list
    """`rewrite.ClampRecord` per map."""
    report: ClampReport
    """The report (`ClampReport.to_dict` for its JSON form)."""


def clamp(model_path: str | os.PathLike | Model, calib: str | os.PathLike | DataSource,
          config: ClampConfig | None = None, *, output: str | os.PathLike | None = None, force: bool = False,
          progress: Progress | None = None, preprocess: Preprocess | None = None) -> ClampResult:
    """Bound every activation map to the range clean calibration images produce: ``Min(a, τ)``.

    No trigger, labels or gradients: clean images and forward passes only. Maps that can go
    negative are bounded on both sides (``Max(a, lo)``). Position granularity falls back to channel
    granularity for maps whose spatial size is not static.

    Raises:
        UsageError: bad options or output path.
        VerificationError: at quantile 100 without margin, the clamped model must reproduce the
            original's outputs on the calibration images exactly; otherwise nothing is written.
    """

    config = config or ClampConfig()
    if config.granularity not in ("position", "channel"):
        raise UsageError(f"--granularity must be position or channel, got {config.granularity!r}")
    if config.margin < 0:
        raise UsageError(f"--margin must be >= 0, got {config.margin}")
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    check_rewritable(model)  # before any calibration pass
    if output is not None:
        check_output_path(output, [model.path], force)
    taps = find_taps(model, config.layers if isinstance(config.layers, str) else list(config.layers))
    preprocess = preprocess or config.preprocess.resolve(model)
    source = open_calibration(model, calib, preprocess, config.limit)
    k = topk_for_quantile(config.quantile, len(source))

    granularity: dict[str, str] = {}
    notes: list[str] = []
    per_tap: dict[str, tuple[str, ...]] = {}
    for tap in taps:
        g = config.granularity
        if g == "position" and not tap.static_spatial:
            g = "channel"
            notes.append(f"{tap.name}: spatial size is dynamic, bounded per channel")
        granularity[tap.name] = g
        per_tap[tap.name] = stats_for(g, two_sided=not tap.non_negative)
    engine = make_engine(config.engine)
    probe = Probe(model, taps, (), config.provider, per_tap_stats=per_tap, topk=k, engine=engine)
    stats = probe.measure(source, preprocess, config.batch_size, progress=progress)
    bounds = [map_bound(tap, stats[tap.name], granularity[tap.name], config.margin) for tap in taps]

    editable = lift_for_clamp(load_with_weights(model), notes)
    proto, records = clamp_maps(editable, {b.tap: ClampBound(hi=b.hi, lo=b.lo) for b in bounds})
    inputs = verify_inputs(source, preprocess, config.batch_size, config.verify_images)
    identity = config.quantile == 100.0 and config.margin == 0.0
    # At q = 100 the clamp is the identity on the images it was fitted on, so the original model is
    # the reference. Below 100 it is not meant to be: the check then covers structure and loading,
    # and the report says how many calibration predictions changed.
    result = verify_model(editable, proto, editable.proto, inputs, atol=1e-5, rtol=1e-5,
                          provider=config.provider, exact=False) if identity else None
    if result is not None:
        require_ok(result)
    agreement = require_agreement(editable, proto, inputs, config.provider, config.min_agreement, "clamp")
    if output is not None:
        save_model(proto, output, external_data=model.has_external_data)
    report = ClampReport(
        model=ModelInfo.of(model), provider=probe.provider, preprocess=preprocess.to_dict(),
        calibration=calibration_section(source, config.batch_size, engine=engine),
        config={"layers": config.layers if isinstance(config.layers, str) else list(config.layers),
                "granularity": config.granularity, "quantile": config.quantile, "margin": config.margin, "topk": k},
        maps=[ClampMapReport(b.tap, b.granularity, b.lo is not None, int(b.hi.size), float(b.hi.mean()),
                             float(b.hi.max()), None if b.lo is None else float(b.lo.min())) for b in bounds],
        notes=notes,
        verification=None if result is None else dataclasses.asdict(result),
        calibration_agreement=agreement,
        output=None if output is None else str(output),
        visuals=Visuals(bounds={b.tap: (b.hi, b.lo) for b in bounds}),
    )
    return ClampResult(proto=proto, bounds=bounds, records=records, report=report)
