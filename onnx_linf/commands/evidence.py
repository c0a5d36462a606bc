"""Trigger evidence for scan, prune and sweep: a given trigger, suspect images, or a synthesized trigger;
and the suspected classes ``clamp --suspects`` excludes from gated images."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decide.flag import Flagged, by_outliers, by_ratio, clean_scores, differential_scores
from ..decide.probes import ProbeCheck, candidate_scores, probe_checks, probes_reason, strongest_suspect
from ..decide.synthesis.oracle import read_pool
from ..decide.synthesis.synthesize import synthesize
from ..errors import UsageError
from ..measure.calibrate import Progress
from ..measure.preprocess import Preprocess, Trigger
from ..measure.probe import Probe
from ..measure.probes import ProbeConfig, probe_trigger, run_probes
from ..measure.sources import DataSource, open_source
from ..measure.stats import ChannelStats
from ..model.load import Model
from ..report.reader import load_report
from ..rewrite.exclude import exclusion_mask
from .options import ScanConfig


@dataclass(frozen=True)
class Evidence:
    """Trigger evidence: a trigger to stamp, real suspect images, or a trigger to synthesize."""

    trigger: Trigger | str | os.PathLike | None = None
    """Pixel-space trigger (or the path of its PNG) stamped on the calibration images."""
    mask: str | os.PathLike | None = None
    """Path of the trigger's mask PNG (with a trigger path)."""
    suspect: str | os.PathLike | None = None
    """Folder or array file of suspect (triggered) images."""
    synthesize: Any = None
    """A `synthesize.SynthConfig`: search a trigger per class with forward passes only."""
    synthesis: Any = None
    """The `synthesize.SynthResult` once the search ran (set by `resolve_evidence`)."""
    probes: ProbeConfig | None = None
    """Also run the class-count-independent probe families (``scan --verdict``; with `synthesize`)."""
    probe_checks: tuple[ProbeCheck, ...] | None = None
    """The probe families' checks once they ran (set by `resolve_evidence`)."""
    probe_report: dict | None = None
    """Their report section (``extra["probes"]``), set with `probe_checks`."""

    def __post_init__(self) -> None:
        # A resolved synthesis carries its own trigger; otherwise exactly one kind of evidence.
        kinds = (self.suspect is not None, self.synthesize is not None,
                 self.trigger is not None and self.synthesis is None)
        if sum(kinds) != 1:
            raise UsageError("give one kind of evidence: --trigger/--mask, --suspect or --synthesize")
        if self.mask is not None and self.trigger is None:
            raise UsageError("--mask needs --trigger")
        if self.probes is not None and self.synthesize is None:
            raise UsageError("the probe families run with the patch search: use --verdict")

    def load_trigger(self, preprocess: Preprocess) -> Trigger | None:
        """The trigger, loaded and checked against the model's input size."""
        if self.trigger is None or isinstance(self.trigger, Trigger):
            return self.trigger
        return Trigger.from_files(self.trigger, self.mask, preprocess)

    def describe(self) -> dict:
        """Report form."""
        if self.probes is not None:
            out = {"kind": "verdict", "families": [*([] if self.probe_checks is None else
                                                     [c.family for c in self.probe_checks]), "patch-synthesis"]}
            suspected = self.suspected_classes()
            out["suspected"], out["target"] = suspected, suspected[0] if suspected else None
            return self._with_trigger(out)
        if self.synthesize is not None:
            out = {"kind": "synthesized"}
            if self.synthesis is not None:
                out["suspected"] = list(self.synthesis.suspected)
                out["target"] = self.synthesis.suspected[0] if self.synthesis.suspected else None
            return self._with_trigger(out)
        if isinstance(self.trigger, Trigger):
            return {"kind": "trigger", "trigger": self.trigger.description}
        if self.trigger is not None:
            return {"kind": "trigger", "trigger": str(self.trigger),
                    "mask": None if self.mask is None else str(self.mask)}
        return {"kind": "suspect", "path": str(self.suspect)}

    def _with_trigger(self, out: dict) -> dict:
        """`out` plus the trigger a resolved search or verdict stamps (what ``prune`` ranks by)."""
        if isinstance(self.trigger, Trigger):
            out["trigger"] = self.trigger.description
        return out

    def suspected_classes(self) -> list[int]:
        """Classes any family suspects: the patch search's first, then the probes' (no repeats)."""
        out = list(self.synthesis.suspected) if self.synthesis is not None else []
        for c in self.probe_checks or ():
            if c.suspected and c.target not in out:
                out.append(c.target)
        return out


#: Calibration images read for the probes (the seed picks `ProbeConfig.images` of them).
PROBE_POOL = 512


def run_probe_checks(model: Model, source: DataSource, preprocess: Preprocess, config: ProbeConfig,
                     provider: str) -> tuple[tuple[ProbeCheck, ...], dict, np.ndarray]:
    """Run the probe families on calibration images: their checks, a report section, and every
    class's candidate score (`decide.probes.candidate_scores`) for the patch search's pre-selection."""
    pool = read_pool(source, max(PROBE_POOL, config.images))
    run = run_probes(model, preprocess, pool, config, provider)
    checks = probe_checks(run)
    section = {"families": [c.to_dict() for c in checks], "images": len(run.clean), "classes": run.num_classes,
               "clean_queries": run.clean_queries,
               "queries": run.clean_queries + sum(c.queries for c in checks), "seconds": round(run.seconds, 3),
               "seed": config.seed}
    return checks, section, candidate_scores(run)


def resolve_evidence(model: Model, evidence: Evidence, source: DataSource, preprocess: Preprocess,
                     provider: str, progress: Progress | None = None) -> Evidence:
    """Run trigger synthesis when asked; the result carries the most anomalous class's trigger.

    Returns the evidence unchanged for a given trigger or suspect images. For synthesis, a new
    `Evidence` whose `trigger` is the synthesized trigger of the top suspected class; with the probe
    families too (the verdict) and no patch suspect, the best probe of the class the strongest fired
    family suspects (`measure.probes.probe_trigger`: the grating, or a noise blend). None when no
    family suspects a class (then there is nothing to rank channels by).
    """
    if evidence.synthesize is None or evidence.synthesis is not None:
        return evidence
    checks, section, scores = None, None, None
    if evidence.probes is not None:
        checks, section, probe_scores = run_probe_checks(model, source, preprocess, evidence.probes, provider)
        # On a many-class model, classes the probes suspect are searched whatever the patch scan says.
        scores = {"probes": probe_scores}
    result = synthesize(model, source, preprocess, evidence.synthesize, provider=provider, progress=progress,
                        class_scores=scores)
    trigger = result.trigger(result.suspected[0]).as_trigger() if result.suspected else None
    strongest = strongest_suspect(checks or ())
    if trigger is None and strongest is not None:
        k = strongest.top_class
        found = probe_trigger(strongest.best_specs[k], preprocess, seed=evidence.probes.seed)
        trigger = dataclasses.replace(found, description=f"{found.description}, which sends "
                                      f"{100 * strongest.best_share[k]:.0f}% of the probed images to class {k}")
    return dataclasses.replace(evidence, trigger=trigger, synthesis=result, probe_checks=checks,
                               probe_report=section)


def measure_evidence(probe: Probe, evidence: Evidence, calib: DataSource, preprocess: Preprocess,
                     batch_size: int, limit: int | None, progress: Progress | None) -> dict[str, ChannelStats]:
    """Statistics on trigger-stamped calibration images, or on the suspect images."""
    trigger = evidence.load_trigger(preprocess)
    if trigger is not None:
        if not calib.has_pixels:
            raise UsageError("--trigger needs pixel calibration data (images or uint8 arrays), "
                             "not preprocessed float arrays")
        return probe.measure(calib, preprocess, batch_size, trigger, progress)
    suspect = open_source(evidence.suspect, preprocess, limit=limit)
    return probe.measure(suspect, preprocess, batch_size, None, progress)


def score_and_flag(config: ScanConfig, clean: dict[str, ChannelStats],
                   evidence_stats: dict[str, ChannelStats] | None) -> Flagged:
    """Scores (differential when evidence is given, clean otherwise) and the configured policy."""
    if evidence_stats is not None:
        scores = differential_scores(clean, evidence_stats, config.score)
        label = f"differential {config.score}"
    else:
        scores = clean_scores(clean, config.score)
        label = f"clean {config.score}"
    has_evidence = evidence_stats is not None
    if config.policy == "ratio":
        return by_ratio(scores, config.ratio, score=label, evidence=has_evidence)
    return by_outliers(scores, config.threshold, score=label, evidence=has_evidence)


def synthesis_verdict(result: Any) -> tuple[str, str]:
    """Verdict and reason from a `synthesize.SynthResult` (Neural Cleanse's anomaly index)."""
    if result.suspected:
        top = result.suspected[0]
        t = result.trigger(top)
        conc = "" if t.concentration is None else f"; its differential ℓ∞ concentrates {100 * t.concentration:.0f}% " \
            f"in the top {100 * result.config.evidence_ratio:.0f}% channels of the last map"
        return "suspected", (f"class {top} is reached by an unusually small synthesized trigger (mask L1 "
                             f"{t.mask_l1:.1f}, anomaly index {result.anomaly[top]:.1f} > {result.threshold:g}){conc}")
    incomplete = "" if result.complete else " (the query budget or time limit skipped some classes)"
    return "clean", (f"no class's synthesized trigger is anomalously small (max anomaly index "
                     f"{max(result.anomaly.values(), default=0.0):.1f} <= {result.threshold:g}){incomplete}")


def patch_family(result: Any) -> dict:
    """The patch search as one evidence family of the verdict (summary of `SynthResult`)."""
    order = sorted(result.anomaly, key=lambda k: -result.anomaly[k])
    top = order[0] if order else None
    return {"family": "patch-synthesis", "checked": "the smallest patch trigger (mask and pattern) per class, "
            "searched with forward passes only (query-only Neural Cleanse); anomaly index of its mask L1",
            "statistic": "anomaly index", "threshold": result.threshold, "suspected": bool(result.suspected),
            "target": result.suspected[0] if result.suspected else None, "top_class": top,
            "top_statistic": None if top is None else round(float(result.anomaly[top]), 4),
            "second_statistic": round(float(result.anomaly[order[1]]), 4) if len(order) > 1 else None,
            "top": [{"class": int(k), "statistic": round(float(result.anomaly[k]), 4)} for k in order[:3]],
            "queries": result.queries, "seconds": round(result.seconds, 3), "complete": result.complete}


def families_verdict(evidence: Evidence) -> tuple[str, str, list[dict]]:
    """``scan --verdict``: suspected when any evidence family (probes, patch search) suspects a class.

    Returns:
        The verdict, its reason, and one summary per family (statistic, threshold, cost).
    """
    syn_verdict, syn_reason = synthesis_verdict(evidence.synthesis)
    fired, quiet = probes_reason(evidence.probe_checks or ())
    families = [{k: v for k, v in c.to_dict().items() if k != "per_class"} for c in evidence.probe_checks or ()]
    families.append(patch_family(evidence.synthesis))
    if syn_verdict == "suspected" or fired:
        return "suspected", "; ".join(fired + ([syn_reason] if syn_verdict == "suspected" else [])), families
    return "clean", ("no evidence family suspects a class (" + ", ".join(quiet) + f"); patch search: {syn_reason}"), \
        families


def evidence_verdict(evidence: Evidence) -> tuple[str, str]:
    """Verdict and reason of a resolved search (`synthesis_verdict`) or verdict (`families_verdict`)."""
    if evidence.probes is not None:
        verdict, reason, _ = families_verdict(evidence)
        return verdict, reason
    return synthesis_verdict(evidence.synthesis)


def given_suspects(model: Model, suspects) -> dict | None:
    """The classes `suspects` names (``clamp --suspects``: class indices, or the path of a scan report
    of this model), with where they came from, checked against the model's class count before any
    pass; None for ``none`` and ``auto``."""
    if suspects in ("none", "auto"):
        return None
    if isinstance(suspects, tuple):
        section = {"source": "given", "classes": list(suspects)}
    else:
        report = load_report(suspects)
        if report.model.sha256 != model.sha256:
            raise UsageError(f"{suspects} was made for another model (sha256 {report.model.sha256[:12]}, "
                             f"this one {model.sha256[:12]})")
        section = {"source": str(suspects),
                   "classes": sorted({int(c) for c in (report.evidence or {}).get("suspected") or ()})}
    count = declared_classes(model)
    if count is not None:  # raises for a class out of range
        exclusion_mask(section["classes"], count, model.proto.graph.output[0].name)
    return section


def declared_classes(model: Model) -> int | None:
    """K of the first graph output when it is declared ``[N, K]`` with a static K, else None."""
    dims = model.proto.graph.output[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None


def probed_suspects(model: Model, source: DataSource, preprocess: Preprocess, provider: str,
                    batch_size: int = ProbeConfig.batch_size) -> dict:
    """``clamp --suspects auto``: the classes the probe families suspect on the calibration images;
    none, with the reason, for a model whose first output is not a declared ``[N, K]`` classifier."""
    if declared_classes(model) is None:
        return {"source": "probes", "classes": [],
                "skipped": "the first output is not a declared [N, K] classifier output: nothing to exclude from"}
    config = ProbeConfig(batch_size=batch_size)
    checks, section, _ = run_probe_checks(model, source, preprocess, config, provider)
    return {"source": "probes", "classes": sorted({int(c.target) for c in checks if c.suspected}), "probes": section}
