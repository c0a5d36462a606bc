"""Clean accuracy and attack success rate of a model on labelled data.

ASR is measured the usual way: among test images whose true label is *not* the target, the
fraction classified as the target after the trigger is stamped (pixel space, before
normalisation). Images of the target class are left out because they say nothing about the attack.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from ..errors import CalibrationDataError, UsageError
from ..model.load import Model
from .calibrate import Progress, model_tensor
from .engine import Engine, LocalEngine, SessionSpec
from .preprocess import Preprocess, Trigger
from .session import Session, create_session
from .sources import DataSource, open_source


@dataclass(frozen=True)
class Evaluation:
    """Clean accuracy and (with a trigger) attack success rate."""

    images: int
    """Labelled images evaluated."""
    accuracy: float
    """Top-1 accuracy on clean images."""
    asr: float | None
    """Attack success rate, or None without a trigger."""
    asr_images: int
    """Images counted for the ASR (true label != target)."""
    target: int | None
    """Attack target class."""
    trigger: str | None
    """Trigger description."""
    provider: str
    """ONNX Runtime provider that ran."""
    refused: float | None = None
    """With a refusal output (a bool ``[N]`` output naming inputs a deployment refuses, such as the
    clamp's ``onnx_linf_gated``): the share of clean images it refused; None without one."""
    accepted_correct: float | None = None
    """The share of clean images accepted and classified correctly (a refused one counts as wrong)."""
    refused_triggered: float | None = None
    """The share of the ASR's triggered images it refused."""
    asr_accepted: float | None = None
    """The share of the ASR's triggered images accepted *and* classified as the target."""
    triggered_accuracy: float | None = None
    """The share of the ASR's triggered images classified as their true class (how much of the
    backdoor a defence *undid*, not only stopped); None without a trigger."""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def open_labelled(path: str | os.PathLike, preprocess: Preprocess, limit: int | None = None) -> DataSource:
    """Open labelled data: ``.npz`` with ``x`` and ``y``, or an ImageFolder-style directory.

    Raises:
        CalibrationDataError: the data carries no labels.
    """
    source = open_source(path, preprocess, labelled=True, limit=limit)
    if not source.has_labels:
        raise CalibrationDataError(f"{path} has no labels: give an .npz with 'x' and 'y', or a folder with "
                                   "one subfolder per class")
    return source


@dataclass(frozen=True)
class Counts:
    """Partial result of an evaluation: integer counts, so shards add up exactly."""

    correct: int = 0
    total: int = 0
    hits: int = 0
    counted: int = 0
    provider: str = ""
    refused: int = 0
    accepted_correct: int = 0
    refused_triggered: int = 0
    accepted_hits: int = 0
    triggered_correct: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.correct + other.correct, self.total + other.total, self.hits + other.hits,
                      self.counted + other.counted, self.provider or other.provider, self.refused + other.refused,
                      self.accepted_correct + other.accepted_correct,
                      self.refused_triggered + other.refused_triggered, self.accepted_hits + other.accepted_hits,
                      self.triggered_correct + other.triggered_correct)


@dataclass(frozen=True)
class AccuracyJob:
    """Top-1 hits on clean (and trigger-stamped) labelled images, as an engine job."""

    trigger: Trigger | None = None
    target: int | None = None
    refusal: str | None = None
    """Name of a bool ``[N]`` output of the model: True = the deployment refuses that input."""

    def run(self, session: Session, source: DataSource, preprocess: Preprocess, batch_size: int,
            progress: Progress | None = None) -> Counts:
        progress = progress or Progress()
        progress.start("evaluate", len(source))
        clean, stamped = Counts(), Counts()  # clean: correct/total/refused/accepted_correct; stamped: the rest
        target = self.target
        fetch = None if self.refusal is None else [session.inner.get_outputs()[0].name, self.refusal]

        def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Top-1 classes and the refusal flags (all False without a refusal output)."""
            out = session.run(fetch, x)
            refused = np.zeros(len(out[0]), dtype=bool) if fetch is None else np.asarray(out[1], bool).reshape(-1)
            return out[0], refused
        try:
            for batch in source.batches(batch_size):
                logits, refused = run(model_tensor(batch, preprocess))
                if target is not None and not 0 <= target < logits.shape[-1]:
                    raise UsageError(f"--target {target} is not a class of this model (0..{logits.shape[-1] - 1})")
                labels = batch.labels
                right = logits.argmax(axis=-1) == labels
                clean += Counts(correct=int(right.sum()), total=len(labels), refused=int(refused.sum()),
                                accepted_correct=int((right & ~refused).sum()))
                if self.trigger is not None:
                    keep = labels != target
                    if keep.any():
                        logits, refused = run(model_tensor(batch, preprocess, self.trigger))
                        top = logits.argmax(axis=-1)[keep]
                        hit, refused = top == target, refused[keep]
                        stamped += Counts(hits=int(hit.sum()), counted=int(keep.sum()),
                                          refused_triggered=int(refused.sum()),
                                          accepted_hits=int((hit & ~refused).sum()),
                                          triggered_correct=int((top == labels[keep]).sum()))
                progress.advance(len(labels))
        finally:
            progress.finish()
        return clean + stamped + Counts(provider=session.provider)

    def merge(self, a: Counts, b: Counts) -> Counts:
        return a + b


def evaluate(model: Model, data: DataSource, preprocess: Preprocess, *, trigger: Trigger | None = None,
             target: int | None = None, proto: onnx.ModelProto | None = None, batch_size: int = 64,
             provider: str = "auto", progress: Progress | None = None, engine: Engine | None = None,
             refusal: str | None = None) -> Evaluation:
    """Measure clean accuracy and, with a trigger and target, the attack success rate.

    Args:
        model: the loaded model (its input and folder).
        data: labelled data.
        preprocess: preprocessing of pixels.
        trigger: pixel-space trigger to stamp for the ASR.
        target: the attack's target class (required with a trigger).
        proto: evaluate this in-memory model instead of ``model`` (e.g. a pruned one).
        batch_size: images per ORT run.
        provider: ORT provider.
        progress: progress sink.
        engine: where the images run (default: this process); counts merge exactly.
        refusal: a bool ``[N]`` output of the model naming the inputs a deployment refuses (the
            clamp's ``--gate-output``): also measure what refusing them gives.

    Raises:
        UsageError: a trigger without a target, or a target outside the model's classes.
        CalibrationDataError: unlabelled data, or a trigger on preprocessed arrays.
    """
    if not data.has_labels:
        raise CalibrationDataError("evaluation needs labelled data")
    if (trigger is None) != (target is None):
        raise UsageError("--trigger and --target go together")
    engine = engine or LocalEngine()
    c = engine.run(AccuracyJob(trigger, target, refusal), SessionSpec(model, proto, provider), data, preprocess,
                   batch_size, progress)
    share = lambda k, n: None if refusal is None else (k / n if n else float("nan"))  # noqa: E731
    return Evaluation(
        images=c.total,
        accuracy=c.correct / c.total if c.total else float("nan"),
        asr=(c.hits / c.counted if c.counted else float("nan")) if trigger is not None else None,
        asr_images=c.counted,
        target=target,
        trigger=None if trigger is None else trigger.description,
        provider=c.provider,
        refused=share(c.refused, c.total),
        accepted_correct=share(c.accepted_correct, c.total),
        refused_triggered=share(c.refused_triggered, c.counted) if trigger is not None else None,
        asr_accepted=share(c.accepted_hits, c.counted) if trigger is not None else None,
        triggered_accuracy=(c.triggered_correct / c.counted if c.counted else float("nan"))
        if trigger is not None else None,
    )


def predictions(model: Model, data: DataSource, preprocess: Preprocess, *, proto: onnx.ModelProto | None = None,
                trigger: Trigger | None = None, batch_size: int = 64, provider: str = "auto") -> np.ndarray:
    """Top-1 predictions for every image of `data` (stamped with `trigger` if given)."""
    session = create_session(model, proto, provider)
    out = [session.run(None, model_tensor(b, preprocess, trigger))[0].argmax(axis=-1)
           for b in data.batches(batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def before_after(model: Model, rewritten: onnx.ModelProto, data: DataSource, preprocess: Preprocess, *,
                 trigger: Trigger | None = None, target: int | None = None, batch_size: int = 64,
                 provider: str = "auto", refusal: str | None = None) -> dict[str, Evaluation]:
    """Evaluate the original model and a rewritten one on the same data: ``{"before": .., "after": ..}``
    (`refusal`: a refusal output of the rewritten one, see `evaluate`)."""
    return {
        "before": evaluate(model, data, preprocess, trigger=trigger, target=target, batch_size=batch_size,
                           provider=provider),
        "after": evaluate(model, data, preprocess, trigger=trigger, target=target, proto=rewritten,
                          batch_size=batch_size, provider=provider, refusal=refusal),
    }
