"""Efficacy benchmark: clean accuracy (ACC) and attack success rate (ASR) after each defence.

Not a test: the project's instrument for every efficacy claim in the README. For each model it
prints markdown tables of ACC/ASR for

* pruning: score (ℓ∞, ℓ1, ℓ2) x ranking (differential with the true trigger, clean-only) x layers x
  ratio, using the real surgery (`rewrite.zero_channels`);
* clamping (when `onnx_linf.clamp` is available): granularity x quantile x layers;
* trigger-free rows added by other modules (see ``EXTRA_ROWS``).

Usage::

    python benchmarks/efficacy.py                       # digits fixtures
    python benchmarks/efficacy.py --cifar benchmarks/.cache/cifar   # + CIFAR-10 models, if trained
    python benchmarks/efficacy.py --out benchmarks/out/efficacy.md

CIFAR-10 models come from ``benchmarks/cifar_models.py`` (trained on CIFAR-10 data that is never
committed); without them only the fixtures are measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_linf.decide.flag import by_ratio, clean_scores, differential_scores
from onnx_linf.measure.accuracy import evaluate
from onnx_linf.measure.preprocess import Preprocess, Trigger
from onnx_linf.measure.probe import Probe
from onnx_linf.measure.sources import ArraySource, ImageFolder
from onnx_linf.model.load import Model, load_model
from onnx_linf.model.taps import find_taps
from onnx_linf.rewrite.zero import zero_channels

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5)
SCORES = ("linf", "l1", "l2")


@dataclass
class Case:
    """One model to defend, with its data and (for measuring only) its real trigger."""

    name: str
    model: Model
    preprocess: Preprocess
    calib: object
    test: ArraySource
    trigger: Trigger | None
    target: int | None


@dataclass
class Row:
    """One line of a results table."""

    defence: str
    setting: str
    acc: float
    asr: float | None
    detail: str = ""


def digits_cases() -> Iterator[Case]:
    fx = ROOT / "fixtures"
    for kind in ("badnets", "blended", "clean"):
        model = load_model(fx / f"digits_{kind}.onnx")
        pp = Preprocess.from_model(model)
        trig_kind = kind if kind != "clean" else "badnets"
        trigger = Trigger.from_files(fx / f"digits_{trig_kind}_trigger.png", fx / f"digits_{trig_kind}_mask.png", pp)
        yield Case(f"digits_{kind}" + (" (BadNets trigger)" if kind == "clean" else ""), model, pp,
                   ImageFolder(fx / "digits_calib", pp.size, pp.channels),
                   ArraySource(fx / "digits_test.npz", pp.size, pp.channels), trigger, 0)


def cifar_cases(folder: Path, calib_images: int) -> Iterator[Case]:
    split = folder / "split.npz"
    if not split.exists():
        print(f"# no CIFAR-10 models in {folder} (run benchmarks/cifar_models.py); skipping", file=sys.stderr)
        return
    tmp = folder / "_bench"
    tmp.mkdir(exist_ok=True)
    with np.load(split) as data:
        np.savez(tmp / "calib.npz", x=data["calib_x"][:calib_images], y=data["calib_y"][:calib_images])
        np.savez(tmp / "test.npz", x=data["test_x"], y=data["test_y"])
    for meta_path in sorted(folder.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        onnx_path = folder / meta_path.name.replace(".json", ".onnx")
        if not onnx_path.exists():
            continue
        model = load_model(onnx_path)
        p = meta.get("preprocess", {})
        pp = Preprocess.from_model(model, mean=p.get("mean"), std=p.get("std"), scale=p.get("scale"))
        attack = meta.get("attack") or {}
        trig_name = attack.get("trigger") or "badnets_trigger.png"
        mask_name = attack.get("mask") or "badnets_mask.png"
        trigger = None
        if (folder / trig_name).exists():
            trigger = Trigger.from_files(folder / trig_name, folder / mask_name, pp)
        yield Case(meta_path.stem, model, pp, ArraySource(tmp / "calib.npz", pp.size, pp.channels),
                   ArraySource(tmp / "test.npz", pp.size, pp.channels), trigger, attack.get("target", 0))


def measure(case: Case, proto=None, refusal: str | None = None):
    """(ACC, ASR) of `proto` (the original model by default) on the test split; with `refusal` (a bool
    output of `proto`), the whole `Evaluation`, refusing what that output names."""
    ev = evaluate(case.model, case.test, case.preprocess, trigger=case.trigger, target=case.target, proto=proto,
                  provider="cpu", batch_size=128, refusal=refusal)
    return ev if refusal is not None else (ev.accuracy, ev.asr)


def pruning_rows(case: Case, layers: str, scores_wanted: tuple[str, ...] = SCORES,
                 ratios: tuple[float, ...] = RATIOS) -> list[Row]:
    taps = find_taps(case.model, layers)
    probe = Probe(case.model, taps, scores_wanted, "cpu")
    clean = probe.measure(case.calib, case.preprocess, 64)
    triggered = probe.measure(case.calib, case.preprocess, 64, case.trigger) if case.trigger else None
    rows = []
    for score in scores_wanted:
        rankings: dict[str, dict] = {"clean-only": clean_scores(clean, score)}
        if triggered is not None:
            rankings["differential"] = differential_scores(clean, triggered, score)
        for ranking, scores in rankings.items():
            for ratio in ratios:
                flagged = by_ratio(scores, ratio, score=f"{ranking} {score}", evidence=ranking != "clean-only")
                proto, _ = zero_channels(case.model, taps, flagged.channels())
                acc, asr = measure(case, proto)
                rows.append(Row("prune", f"{ranking} {score}, layers={layers}, r={ratio}", acc, asr,
                                f"{flagged.total} channels"))
    return rows


#: Extra row producers (clamp, synthesis, dormant, clp) register here: fn(case) -> list[Row].
EXTRA_ROWS: list[Callable[[Case], list[Row]]] = []


def _register_optional() -> None:
    try:
        from onnx_linf.rewrite.clamp import clamp_maps  # noqa: F401
    except ImportError:
        return
    EXTRA_ROWS.append(clamp_rows)
    EXTRA_ROWS.append(baseline_rows)


#: The clamp settings every case gets: today's ℓ∞ clamp, the channel-mean bound at fixed
#: strengths (p = 2 is the setting the lead was measured with), and the default (auto strength).
CLAMP_SETTINGS = (
    ("clamp", "position, q=100, all maps (no trigger)", dict(bounds=("position",))),
    ("clamp v2", "fixed q=99, p=2", dict(strength=99.0, power=2.0)),
    ("clamp v2", "fixed q=99, p=6", dict(strength=99.0)),
    ("clamp v2", "auto + gate, --excess clip", dict(excess="clip")),
    ("clamp v2", "auto + gate, upper evidence against the bound only (the default two releases ago)",
     dict(low_evidence=False, evidence_quantile=None, fold_reference=False, gate_alarm=0.005)),
    ("clamp v2", "auto + gate, --evidence-quantile 99.5", dict(evidence_quantile=99.5)),
    ("clamp v2", "auto + gate, --gate-alarm 0.005 (the default two releases ago)", dict(gate_alarm=0.005)),
    ("clamp v2", "auto + gate, --suspects none (last release's default: gated images pushed to clean averages)",
     dict(gate_output=True, suspects="none")),
    ("clamp v2", "**auto (default)**: gated images never given a class the probes suspect",
     dict(score_output=True, gate_output=True)),
)
#: What ``--clamp-default-only`` runs: last release's default (``--suspects none``) and today's.
DEFAULT_ONLY = CLAMP_SETTINGS[-2:]


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): Mann-Whitney AUROC."""
    values = np.concatenate([negative, positive])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # average ranks of ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    pos = ranks[len(negative):]
    return float((pos.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(negative)))


def score_auroc(case: Case, proto) -> tuple[float, float]:
    """AUROC of the clamped model's score output, triggered (non-target) vs clean test images, and
    the false-alarm rate of its cross-fitted 1% threshold is reported by the caller."""
    from onnx_linf.measure.calibrate import model_tensor
    from onnx_linf.measure.session import create_session
    from onnx_linf.rewrite.clamp import SCORE_OUTPUT

    session = create_session(case.model, proto, "cpu")
    clean, triggered = [], []
    for batch in case.test.batches(256):
        clean.append(session.run([SCORE_OUTPUT], model_tensor(batch, case.preprocess))[0])
        keep = batch.labels != case.target
        stamped = session.run([SCORE_OUTPUT], model_tensor(batch, case.preprocess, case.trigger))[0]
        triggered.append(stamped[keep])
    neg, pos = np.concatenate(clean), np.concatenate(triggered)
    return auroc(neg, pos), neg


def clean_predictions(case: Case, proto=None) -> np.ndarray:
    """Top-1 predictions of `proto` (the original by default) on the clean test images, in order."""
    from onnx_linf.measure.calibrate import model_tensor
    from onnx_linf.measure.session import create_session

    session = create_session(case.model, proto, "cpu")
    output = session.inner.get_outputs()[0].name
    return np.concatenate([session.run([output], model_tensor(batch, case.preprocess))[0].argmax(1)
                           for batch in case.test.batches(256)])


def clean_labels(case: Case) -> np.ndarray:
    """The test images' labels, in the order `clean_predictions` runs them."""
    return np.concatenate([batch.labels for batch in case.test.batches(256)])


def paired_change(labels: np.ndarray, before: np.ndarray, after: np.ndarray) -> str:
    """The clean accuracy change of a defence on the same test images, with a 95% confidence interval
    from the paired (McNemar) variance: only the images whose correctness changed carry information,
    so a change of a few tenths of a point on a few thousand images is often not distinguishable from 0."""
    right0, right1 = before == labels, after == labels
    n = len(labels)
    lost, gained = int((right0 & ~right1).sum()), int((~right0 & right1).sum())
    diff = (gained - lost) / n
    half = 1.96 * np.sqrt(max(lost + gained - (gained - lost) ** 2 / n, 0.0)) / n
    return (f"clean ACC change {100 * diff:+.2f} pt, 95% CI [{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}] "
            f"({lost} lost, {gained} gained of {n})")


def blocked_rows(case: Case, proto, labels: np.ndarray, original: np.ndarray, portable: np.ndarray) -> list[Row]:
    """The default model's CPU deployment artefact (`rewrite.blocked.blocked_artifact`: the bounds
    on ONNX Runtime's blocked layout), measured like the portable model, plus how many clean test
    predictions the two disagree on (the artefact must change speed, not what the model does)."""
    from onnx_linf.errors import RewriteError
    from onnx_linf.rewrite.blocked import blocked_artifact

    t0 = time.perf_counter()
    try:
        built = blocked_artifact(proto)
    except RewriteError as exc:
        return [Row("clamp v2", "default, blocked CPU artefact", float("nan"), None, f"not built: {exc}")]
    seconds = time.perf_counter() - t0
    artefact = built.proto
    acc, asr = measure(case, artefact)
    blocked = clean_predictions(case, artefact)
    differs = int((portable != blocked).sum())
    detail = (f"built in {seconds:.1f} s, layout reorders {built.reorders_before} -> {built.reorders_after}; "
              f"top-1 differs from the portable model on {differs} "
              f"of {len(labels)} clean test images; " + paired_change(labels, original, blocked))
    return [Row("clamp v2", "default, blocked CPU artefact", acc, asr, detail)]


def refusal(ev) -> str:
    """What a deployment that refuses the images the gate flags (``--gate-output``) would see, from an
    `Evaluation` measured with the gate output as its refusal: the share of clean and of triggered
    (non-target) test images flagged, the ASR over accepted triggered images, and the clean images
    accepted and correct."""
    return (f"gate flags {100 * ev.refused:.1f}% of clean and {100 * ev.refused_triggered:.1f}% of triggered "
            f"test images; refusing them: ASR {100 * ev.asr_accepted:.1f}%, clean accepted and correct "
            f"{100 * ev.accepted_correct:.1f}%")


def clamp_rows(case: Case, grid: bool = False, default_only: bool = False) -> list[Row]:
    from onnx_linf.commands.clamp import ClampConfig, clamp
    from onnx_linf.errors import UsageError

    rows = []
    labels, original = clean_labels(case), clean_predictions(case)
    for defence, label, options in DEFAULT_ONLY if default_only else CLAMP_SETTINGS:
        t0 = time.perf_counter()
        try:
            result = clamp(case.model, case.calib, ClampConfig(provider="cpu", **options), preprocess=case.preprocess)
        except UsageError:  # --gate-output where the budget left the gate out
            options = {k: v for k, v in options.items() if k != "gate_output"}
            result = clamp(case.model, case.calib, ClampConfig(provider="cpu", **options), preprocess=case.preprocess)
        seconds = time.perf_counter() - t0
        flagged = options.get("gate_output") and case.trigger is not None
        if flagged:
            from onnx_linf.rewrite.clamp import GATED_OUTPUT

            ev = measure(case, result.proto, refusal=GATED_OUTPUT)
            acc, asr = ev.accuracy, ev.asr
        else:
            acc, asr = measure(case, result.proto)
        s = result.report.strength
        detail = f"{len(result.records)} maps, {seconds:.0f} s"
        predicted = clean_predictions(case, result.proto)
        detail += "; " + paired_change(labels, original, predicted)
        if s is not None and s["mode"] == "auto":
            detail += f"; chose q={s['quantile']:g}, {s['forwards']} forwards"
            if (s.get("gate") or {}).get("suspects") is not None:
                detail += f"; suspects excluded from gated images: {s['gate']['suspects']['classes']}"
        if result.report.score is not None and case.trigger is not None:
            area, clean_scores_ = score_auroc(case, result.proto)
            thr = result.report.score["threshold_1pct"]
            far = float((clean_scores_ > thr).mean()) if thr is not None else float("nan")
            detail += f"; score AUROC {area:.3f}, clean test above the 1% threshold: {100 * far:.1f}%"
        if flagged:
            detail += "; " + refusal(ev)
            detail += f"; triggered images given their true class: {100 * ev.triggered_accuracy:.1f}%"
        rows.append(Row(defence, label, acc, asr, detail))
        if (defence, label) == DEFAULT_ONLY[-1][:2]:
            rows.extend(blocked_rows(case, result.proto, labels, original, predicted))
    if not grid:
        return rows
    selections = ["all", "last"]
    if len(find_taps(case.model, "all+branches")) > len(find_taps(case.model, "all")):
        selections.insert(1, "all+branches")  # ResNets: also bound the conv outputs before each merge
    for layers in selections:
        for granularity in ("position", "channel"):
            for quantile in (100.0, 99.0, 95.0, 90.0):
                cfg = ClampConfig(layers=layers, granularity=granularity, quantile=quantile, provider="cpu",
                                  bounds=("position",))
                result = clamp(case.model, case.calib, cfg, preprocess=case.preprocess)
                acc, asr = measure(case, result.proto)
                rows.append(Row("clamp", f"{granularity}, q={quantile:g}, layers={layers}", acc, asr,
                                f"{len(result.records)} maps"))
    return rows


def baseline_rows(case: Case) -> list[Row]:
    """Trigger-free channel-pruning baselines: Fine-Pruning's dormant channels and data-free CLP."""
    from onnx_linf.decide.flag import by_threshold, clp_scores, dormant_scores

    rows = []
    taps = find_taps(case.model, "last")
    clean = Probe(case.model, taps, ("l1",), "cpu").measure(case.calib, case.preprocess, 64)
    for ratio in (0.1, 0.3, 0.5):
        flagged = by_ratio(dormant_scores(clean, "l1"), ratio, score="dormant l1", evidence=False)
        proto, _ = zero_channels(case.model, taps, flagged.channels())
        acc, asr = measure(case, proto)
        rows.append(Row("dormant", f"last map, r={ratio}", acc, asr, f"{flagged.total} channels"))
    all_taps = find_taps(case.model, "all+branches")  # CLP scores every conv, as in its paper
    for u in (3.0, 2.0):
        flagged = by_threshold(clp_scores(case.model, all_taps), u)
        proto, _ = zero_channels(case.model, all_taps, flagged.channels())
        acc, asr = measure(case, proto)
        rows.append(Row("clp", f"all maps, u={u:g} (no data)", acc, asr, f"{flagged.total} channels"))
    return rows


def table(case: Case, rows: list[Row], base: tuple[float, float | None]) -> str:
    lines = [f"### {case.name}", "",
             f"original: ACC {100 * base[0]:.1f}%" + ("" if base[1] is None else f", ASR {100 * base[1]:.1f}%"), "",
             "| defence | setting | ACC % | ASR % | detail |", "|---|---|---:|---:|---|"]
    for r in rows:
        asr = "—" if r.asr is None else f"{100 * r.asr:.1f}"
        lines.append(f"| {r.defence} | {r.setting} | {100 * r.acc:.1f} | {asr} | {r.detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=None, help="folder of CIFAR-10 models from cifar_models.py")
    parser.add_argument("--calib-images", type=int, default=500, help="CIFAR calibration images to use")
    parser.add_argument("--only", default=None, help="comma-separated case names to run")
    parser.add_argument("--no-prune", action="store_true", help="skip the pruning grid")
    parser.add_argument("--layers", default="last,all", help="layer selections for the pruning grid")
    parser.add_argument("--scores", default="linf,l1,l2", help="norms for the pruning grid")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="ratios for the pruning grid")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--clamp-grid", action="store_true", help="also the position clamp's granularity x "
                        "quantile x layers grid")
    parser.add_argument("--no-baselines", action="store_true", help="skip the dormant / CLP rows")
    parser.add_argument("--clamp-default-only", action="store_true", help="of the clamp settings, only the "
                        "default (auto strength, suspects from the probes, with the score and the gate output) and "
                        "the last release's default (--suspects none)")
    args = parser.parse_args(argv)
    _register_optional()
    cases = list(digits_cases())
    if args.cifar is not None:
        cases += list(cifar_cases(args.cifar, args.calib_images))
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.name.split(" ")[0] in keep]
    chunks = []
    for case in cases:
        t0 = time.perf_counter()
        base = measure(case)
        rows: list[Row] = []
        if not args.no_prune:
            for layers in args.layers.split(","):
                rows += pruning_rows(case, layers, tuple(args.scores.split(",")),
                                     tuple(float(r) for r in args.ratios.split(",")))
        for extra in EXTRA_ROWS:
            if extra is baseline_rows and args.no_baselines:
                continue
            rows += extra(case, args.clamp_grid, args.clamp_default_only) if extra is clamp_rows else extra(case)
        chunk = table(case, rows, base) + f"\n({time.perf_counter() - t0:.0f} s)\n"
        print(chunk, flush=True)
        chunks.append(chunk)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
