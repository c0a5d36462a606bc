"""Machine-readable reports: frozen dataclasses, one per command, each with one ``to_json()``.

Every report carries `schema_version`; bump it when a field changes meaning or disappears.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .. import __version__
from ..decide.flag import Flagged
from ..measure.stats import ChannelStats
from ..model.load import Model
from ..model.taps import Tap
from .json import jsonable
from .visuals import Visuals, hidden

SCHEMA_VERSION = 1

#: Verdicts. ``not-assessed``: statistics only, no trigger evidence was available to judge.
#: ``invalid``: some statistic is NaN or infinite (the report's ``extra.non_finite`` names the channels).
VERDICTS = ("clean", "suspected", "not-assessed", "invalid")


class Report:
    """Base of every command's report: one JSON form, written by every writer from the same object."""

    def to_dict(self) -> dict:
        """JSON-ready dictionary (numpy values converted, non-finite floats as null).

        Fields marked ``json=False`` (`visuals.hidden`: images and arrays for the HTML report) are left out.
        """
        return jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("json", True)})

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the input model."""

    path: str
    """Path as given."""
    sha256: str
    """sha256 of the model file."""
    opset: int
    """Default-domain opset."""
    input: str
    """Image input name."""
    input_shape: list
    """Input shape (ints, symbolic names or null)."""

    @classmethod
    def of(cls, model: Model) -> ModelInfo:
        """Summarise a loaded model."""
        return cls(str(model.path), model.sha256, model.opset, model.input.name, list(model.input.shape))


@dataclass(frozen=True)
class NormStats:
    """Aggregates of one per-image statistic over the calibration images, per channel."""

    mean: list[float]
    """Mean over images."""
    std: list[float]
    """Population standard deviation over images."""
    max: list[float]
    """Largest value over images."""
    min: list[float]
    """Smallest value over images."""


@dataclass(frozen=True)
class TapReport:
    """Everything measured and decided about one tap."""

    name: str
    """Tensor name."""
    kind: str
    """``conv``, ``merge``, ``head`` or ``named``."""
    channels: int
    """Number of channels."""
    spatial: list
    """[H, W] (null when dynamic)."""
    is_last: bool
    """True for the map feeding the classifier head."""
    stats: dict[str, NormStats]
    """Statistic name -> aggregates over clean calibration images."""
    scores: list[float]
    """Per-channel score the policy ranked by."""
    flagged: list[int]
    """Flagged channels, most extreme first."""
    evidence_stats: dict[str, NormStats] | None = None
    """Same aggregates on trigger-stamped / suspect images, when evidence was given."""


@dataclass(frozen=True)
class ScanReport(Report):
    """Result of `onnx_linf.scan` (and the base of the prune/clamp reports)."""

    model: ModelInfo
    """The input model."""
    provider: str
    """ONNX Runtime execution provider that actually ran."""
    preprocess: dict
    """Preprocessing used (size, layout, channels, scale, mean, std, source)."""
    calibration: dict
    """Calibration source description, image count and batch size."""
    policy: dict
    """Flagging policy: name, score, evidence, parameters."""
    taps: list[TapReport]
    """Per tap, in graph order."""
    verdict: str
    """One of `VERDICTS`."""
    verdict_reason: str
    """One sentence on why."""
    evidence: dict | None = None
    """Trigger or suspect evidence used, if any."""
    schema_version: int = SCHEMA_VERSION
    """Report schema version."""
    tool: str = "onnx-linf"
    """Tool name."""
    tool_version: str = __version__
    """Tool version."""
    extra: dict = field(default_factory=dict)
    """Command-specific sections (prune surgery, clamp bounds, evaluation ...)."""
    visuals: Visuals | None = hidden()
    """Images and arrays for the HTML report (not in the JSON form)."""

    def flagged_channels(self) -> dict[str, list[int]]:
        """Tap name -> flagged channels (taps with none left out)."""
        return {t.name: list(t.flagged) for t in self.taps if t.flagged}

    @classmethod
    def from_dict(cls, data: dict) -> ScanReport:
        """Rebuild a report from `to_dict` output."""
        taps = []
        for t in data["taps"]:
            t = dict(t)
            t["stats"] = {k: NormStats(**v) for k, v in t["stats"].items()}
            if t.get("evidence_stats") is not None:
                t["evidence_stats"] = {k: NormStats(**v) for k, v in t["evidence_stats"].items()}
            taps.append(TapReport(**t))
        kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        kwargs["model"] = ModelInfo(**data["model"])
        kwargs["taps"] = taps
        return cls(**kwargs)


def norm_stats(stats: ChannelStats) -> dict[str, NormStats]:
    """Report form of a tap's per-image statistics."""
    return {
        name: NormStats(m.mean.tolist(), m.std.tolist(), m.max.tolist(), m.min.tolist())
        for name, m in stats.moments.items()
    }


def tap_reports(taps: list[Tap], clean: dict[str, ChannelStats], flagged: Flagged | None,
                evidence: dict[str, ChannelStats] | None = None) -> list[TapReport]:
    """Assemble per-tap report entries."""
    out = []
    for tap in taps:
        tf = flagged.taps.get(tap.name) if flagged is not None else None
        out.append(TapReport(
            name=tap.name, kind=tap.kind, channels=tap.channels, spatial=list(tap.spatial),
            is_last=tap.is_last, stats=norm_stats(clean[tap.name]),
            scores=[] if tf is None else tf.scores.tolist(),
            flagged=[] if tf is None else list(tf.flagged),
            evidence_stats=None if evidence is None else norm_stats(evidence[tap.name]),
        ))
    return out


@dataclass(frozen=True)
class ClampMapReport:
    """What the clamp bounded at one map."""

    tap: str
    """Tensor name of the map."""
    granularity: str
    """``position`` or ``channel`` (``none``: no position clamp)."""
    two_sided: bool
    """True when a lower bound is applied too."""
    elements: int
    """Bound values per side."""
    hi_mean: float | None
    """Mean upper bound."""
    hi_max: float | None
    """Largest upper bound."""
    lo_min: float | None
    """Smallest lower bound (two-sided maps)."""
    mean_bound: str | None = None
    """Channel-mean bound: ``mean`` (of the map) or ``positive-mean`` (of its positive part), None: none."""
    mean_hi_max: float | None = None
    """Largest channel-mean bound."""
    mean_scaled: float | None = None
    """Share of held-out calibration (image, channel) pairs above their channel-mean bound, at the
    chosen strength (cross-fit), i.e. how often the bound acts on clean data."""


@dataclass(frozen=True)
class ClampReport(Report):
    """Result of `onnx_linf.clamp`."""

    model: ModelInfo
    """The input model."""
    provider: str
    """ONNX Runtime execution provider that actually ran."""
    preprocess: dict
    """Preprocessing used."""
    calibration: dict
    """Calibration source, image count and batch size."""
    config: dict
    """Clamp options as applied."""
    maps: list[ClampMapReport]
    """Per bounded map, in graph order."""
    notes: list[str]
    """Things the user should know (fallbacks, warnings)."""
    verification: dict | None
    """`verify.VerifyResult` as a dictionary, when the clamp must be the identity on calibration data."""
    calibration_agreement: float
    """Fraction of verification images whose top-1 class is unchanged."""
    output: str | None
    """Where the clamped model was written."""
    evaluation: dict | None = None
    """ACC / ASR before and after, when labelled data was given."""
    strength: dict | None = None
    """Channel-mean bound strength: mode (auto or fixed), chosen quantile, power, and for auto the
    rule, slack, folds and the held-out cost of every candidate."""
    score: dict | None = None
    """The anomaly score output, when added: name, held-out calibration distribution, threshold."""
    schema_version: int = SCHEMA_VERSION
    """Report schema version."""
    tool: str = "onnx-linf"
    """Tool name."""
    command: str = "clamp"
    """The command that wrote the report."""
    visuals: Visuals | None = hidden()
    """The bounds themselves, for the HTML report (not in the JSON form)."""


@dataclass(frozen=True)
class EvaluationReport(Report):
    """Result of `onnx_linf.commands.evaluate.evaluate_model`."""

    model: str
    """Model path as given."""
    sha256: str
    """sha256 of the model file."""
    data: str
    """Labelled data as given."""
    preprocess: dict
    """Preprocessing used."""
    evaluation: dict
    """`accuracy.Evaluation` as a dictionary."""
    schema_version: int = SCHEMA_VERSION
    """Report schema version."""
    tool: str = "onnx-linf"
    """Tool name."""


@dataclass(frozen=True)
class SynthesisReport(Report):
    """Result of `onnx_linf.commands.synthesize.synthesize_model`: the search summary plus provenance."""

    synthesis: dict
    """`SynthResult.to_dict()`: suspected classes, anomaly indices, per-class triggers."""
    model: ModelInfo
    """The input model."""
    preprocess: dict
    """Preprocessing used."""
    calibration: dict
    """Calibration source and image count."""
    visuals: Visuals | None = hidden()
    """Trigger and mask images, for the HTML report (not in the JSON form)."""

    def to_dict(self) -> dict:
        """The synthesis summary with provenance sections next to it (the established JSON form)."""
        return jsonable(dict(self.synthesis, model=asdict(self.model), preprocess=self.preprocess,
                             calibration=self.calibration))
