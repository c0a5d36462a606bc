"""The synthesis driver: one trigger search per class, validation, pruning, ℓ∞ evidence and the verdict."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from ...errors import CalibrationDataError, NoTapsError, UnsupportedModelError, UsageError
from ...measure.calibrate import Progress
from ...measure.preprocess import Preprocess, Trigger
from ...measure.probe import Probe
from ...measure.session import create_session
from ...measure.sources import DataSource
from ...model.load import Model
from ...model.taps import find_taps
from ..flag import differential_scores, top_k
from .oracle import EVAL_CHUNK, Oracle, OutOfBudget, PixelSource, read_pool, static_classes
from .patches import patch_cost, patch_scan, patch_scan_cost, patch_search
from .preselect import (
    applies,
    baseline_weights,
    clean_logp_scores,
    external_scores,
    log_softmax,
    patch_scan_scores,
    preselect,
)
from .results import ClassTrigger, SynthConfig, SynthResult
from .search import PRUNE_STEPS, SEARCH_MARGIN, Plan, pruned, search, validate
from .space import Space, patch_sizes
from .verdict import anomaly_index, suspected_classes

log = logging.getLogger(__name__)


def synthesize(model: Model, source: DataSource, preprocess: Preprocess, config: SynthConfig = SynthConfig(), *,
               provider: str = "auto", progress: Progress | None = None,
               class_scores: Mapping[str, Sequence[float]] | None = None) -> SynthResult:
    """Search a minimal trigger per candidate class with ONNX Runtime forward passes only.

    On a model with more than ``config.candidates + config.references`` classes (and no explicit
    ``config.classes``), a pre-selection (`preselect`) picks the candidate classes to search from
    the shared patch scan, the clean predictions and `class_scores`, plus random reference classes
    for the anomaly index's baseline; the result says which classes were not examined and why.

    Args:
        model: the loaded classifier; its first output holds the class scores (logits or
            probabilities) on the last axis.
        source: clean calibration images (pixels). At most `config.images` are read.
        preprocess: how pixels become the model input.
        config: search options (see `SynthConfig`).
        provider: ORT provider: ``auto``, ``cpu``, ``cuda`` or ``tensorrt``.
        progress: progress sink; one unit per NES step.
        class_scores: extra pre-selection sources: name -> one score per class, higher = more
            likely a backdoor target (e.g. from class-count-independent probes).

    Returns:
        Per-class triggers, anomaly indices and suspected target classes.

    Raises:
        UsageError: invalid options, classes out of range, class scores of the wrong shape, or a
            query budget too small for one step.
        CalibrationDataError: the source has no pixels or fewer than 2 images.
        RuntimeSessionError: ONNX Runtime cannot run the model.
    """
    config.validate()
    started_at = time.monotonic()
    deadline = None if config.time_limit is None else started_at + config.time_limit
    progress = progress or Progress()
    pool = read_pool(source, config.images)
    if tuple(pool.shape[1:3]) != tuple(preprocess.size) or pool.shape[3] != preprocess.num_channels:
        raise CalibrationDataError(
            f"calibration images are {list(pool.shape[1:])} but the model takes "
            f"{preprocess.size[0]}x{preprocess.size[1]}x{preprocess.num_channels}")
    height, width, channels = (int(d) for d in pool.shape[1:])

    session = create_session(model, None, provider)
    output = model.outputs[0].name
    # The one pass over the calibration images always runs (it is what every class needs); the time
    # limit applies from the first optimiser call on.
    oracle = Oracle(session, output, preprocess, config.max_queries, None)
    try:
        clean_out = oracle.logits(pool)
    except OutOfBudget:
        raise UsageError(f"max_queries {config.max_queries} does not cover one pass over the "
                         f"{len(pool)} calibration images") from None
    oracle.deadline = deadline
    n_classes = static_classes(model.outputs[0].shape) or clean_out.shape[1]
    if clean_out.shape[1] != n_classes:
        raise UsageError(f"the model's output '{output}' has {clean_out.shape[1]} values per image, "
                         f"expected {n_classes} class scores")
    # Probabilities (a Softmax at the end) need a log, logits need a log-softmax.
    oracle.probabilities = bool(np.all(clean_out >= 0) and np.allclose(clean_out.sum(axis=1), 1.0, atol=1e-3))
    pred = clean_out.argmax(axis=1)
    classes = tuple(range(n_classes)) if config.classes is None else tuple(config.classes)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise UsageError(f"classes {bad} are out of range: the model has {n_classes} classes")
    extra_scores = external_scores(class_scores, n_classes)
    narrow = applies(config, n_classes)

    space = Space(height, width, channels, config.mask_grid, config.pattern_grid)
    batch = config.batch
    step_cost = (2 * config.pairs + 1) * batch
    probe = _make_probe(model, provider) if config.evidence else None
    max_validations = int(math.ceil(math.log2(config.steps + 1))) + 1
    n_eval_max = min(config.eval_images, len(pool))
    # The ℓ∞ evidence runs the validation images twice through the probe: clean and stamped.
    plan = Plan(step_cost, max_validations, n_eval_max, 2 * n_eval_max if probe is not None else 0,
                 PRUNE_STEPS * step_cost, patch_cost(config) if config.patches else 0)
    scan_cost = patch_scan_cost(len(pool), height, width, channels, config) if config.patches else 0
    needed = scan_cost + step_cost + plan.reserve
    if config.max_queries is not None and oracle.remaining() < needed:
        raise UsageError(f"max_queries {config.max_queries} is too small: one class needs at least "
                         f"{oracle.queries + needed} (calibration pass, patch scan, one step, validation, "
                         "evidence)")
    units = config.steps + (config.patch_steps if config.patches else 0)
    results: list[ClassTrigger] = []
    requested = set(classes)
    skipped: dict[int, str] = {c: "not requested" for c in range(n_classes) if c not in requested}
    scan = None
    if config.patches:
        try:
            scan = patch_scan(oracle, pool, patch_sizes(height, width, config), config)
        except OutOfBudget:
            log.warning("time limit reached during the patch scan")
    pre = None
    if narrow:
        logp = log_softmax(clean_out, oracle.probabilities)
        scores = {"patch_scan": patch_scan_scores(scan)} if scan is not None else {}
        scores.update(clean_logp=clean_logp_scores(logp), **extra_scores)
        pre = preselect(scores, n_classes, config.candidates, config.references, config.seed)
        classes = pre.candidates + pre.references
        picked = set(classes)
        skipped.update({c: "pre-selection" for c in range(n_classes) if c not in picked})
        log.info("pre-selection: candidates %s, references %s of %d classes", list(pre.candidates),
                 list(pre.references), n_classes)
    progress.start("synthesize", len(classes) * units)
    try:
        goal = min(1.0, config.asr + SEARCH_MARGIN)
        for i, target in enumerate(classes):
            left = len(classes) - i
            t0, q0 = time.monotonic(), oracle.queries
            if not oracle.affordable(step_cost + plan.reserve):
                reason = "time" if deadline is not None and time.monotonic() >= deadline else "budget"
                log.warning("%s reached: classes %s not searched", "time limit" if reason == "time" else
                            "query budget", list(classes[i:]))
                skipped.update({c: reason for c in classes[i:]})
                progress.advance(units * left)
                break
            candidates = pool[pred != target]
            if len(candidates) < 2:
                log.warning("class %d: the model predicts it for nearly every calibration image; skipped", target)
                skipped[target] = "predicted for nearly every image"
                progress.advance(units)
                continue
            rng = np.random.default_rng([config.seed, target, 1])
            order = rng.permutation(len(candidates))
            n_eval = min(config.eval_images, len(candidates))
            # Keep validation images apart from the search's when there are enough images for both.
            if len(candidates) - n_eval >= 4 * batch:
                evals, train = candidates[order[:n_eval]], candidates[order[n_eval:]]
            else:
                evals, train = candidates[order[:n_eval]], candidates
            # Share what is left (queries and time) equally among the classes still to search.
            max_steps = config.steps
            if config.max_queries is not None:
                share = oracle.remaining() / left - plan.reserve
                max_steps = max(0, min(max_steps, int(share // step_cost)))
            soft_deadline = None
            if deadline is not None:
                # Leave a tenth of the slice for validation, pruning and evidence.
                soft_deadline = time.monotonic() + 0.9 * (deadline - time.monotonic()) / left
            init, origin = None, "uniform"
            if scan is not None:
                found_patch = patch_search(oracle, scan, target, train, config, progress)
                if found_patch is not None and found_patch[2] >= goal:
                    init, origin = space.from_patch(found_patch[0], found_patch[1]), "patch"
            else:
                progress.advance(units - config.steps)
            snapshots, fallback, steps = search(oracle, space, target, train, config, max_steps,
                                                 soft_deadline, progress, init)
            theta, asr, found = validate(oracle, space, target, evals, snapshots, fallback, config,
                                          max_validations)
            mask, pattern = space.decode(theta[None])
            mask, pattern = mask[0].astype(np.float32), pattern[0].astype(np.float32)
            if found:
                mask, asr = pruned(oracle, space, target, mask, pattern, train, evals, asr, config, plan)
            concentration = None
            if probe is not None and found:
                concentration = _concentration(probe, oracle, evals, mask, pattern, preprocess, config)
            results.append(ClassTrigger(
                target=int(target), mask=mask, pattern=pattern, mask_l1=float(mask.sum()),
                asr=asr, found=found, queries=oracle.queries - q0, seconds=time.monotonic() - t0,
                steps=steps, concentration=concentration, start=origin))
            log.info("class %d: mask L1 %.1f, ASR %.2f%s, start %s, %d queries, %.1f s", target, mask.sum(), asr,
                     "" if found else " (not found)", origin, oracle.queries - q0, time.monotonic() - t0)
    finally:
        progress.finish()

    results.sort(key=lambda t: t.target)
    searched = [t.target for t in results]
    index = (anomaly_index(np.array([t.norm for t in results]), config.scale, np.array([t.found for t in results]),
                           baseline_weights(pre, searched))
             if results else np.zeros(0))
    anomaly = {c: float(v) for c, v in zip(searched, index)}
    suspected = suspected_classes(searched, index, config.threshold)
    return SynthResult(triggers=tuple(results), anomaly=anomaly, suspected=suspected, threshold=config.threshold,
                       queries=oracle.queries, seconds=time.monotonic() - started_at, config=config,
                       complete=len(results) == len(classes), num_classes=n_classes,
                       not_examined=dict(sorted(skipped.items())), preselection=pre)


def _make_probe(model: Model, provider: str):
    """An instrumented session measuring per-channel ℓ∞ of the last activation map, or None."""
    # Imported here: `pipeline` imports half the package, and synthesis without evidence needs none of it.

    try:
        taps = find_taps(model, "last")
    except (NoTapsError, UnsupportedModelError) as exc:
        log.info("no ℓ∞ evidence: %s", exc)
        return None
    return Probe(model, taps, ("linf",), provider)


def _concentration(probe, oracle: Oracle, evals: np.ndarray, mask: np.ndarray, pattern: np.ndarray,
                   preprocess: Preprocess, config: SynthConfig) -> float | None:
    """Share of the positive differential ℓ∞ held by the top `evidence_ratio` channels of the last map."""

    n = len(evals)
    if not oracle.affordable(2 * n):
        return None
    trigger = Trigger(pattern=pattern, mask=mask[..., None])
    clean = probe.measure(PixelSource(evals, "validation images"), preprocess, EVAL_CHUNK)
    stamped = probe.measure(PixelSource(evals, "validation images"), preprocess, EVAL_CHUNK, trigger)
    oracle.queries += 2 * n  # forwards through the probe session count against the same budget
    diff = next(iter(differential_scores(clean, stamped, "linf").values()))
    pos = np.clip(diff, 0.0, None)
    total = float(pos.sum())
    if total <= 0.0:
        return 0.0
    k = top_k(config.evidence_ratio, len(pos))
    return float(np.sort(pos)[::-1][:k].sum() / total)
