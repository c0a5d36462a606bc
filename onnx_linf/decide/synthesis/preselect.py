"""Pre-selection: on a model with many classes, pick the candidate target classes the per-class search runs on.

The per-class trigger search costs the same for every class (~60k forwards with the defaults), so
its cost grows with the class count. Pre-selection scores every class from what the search
computes anyway, at no extra forwards, plus any per-class scores the caller adds:

* ``patch_scan``: from the shared patch scan (`patches.patch_scan`), per class, the best mean
  log-probability a random opaque pattern in one window gives it over the scan's images. A patch
  backdoor answers a partial trigger in the right place with its target on *every* image; a natural
  class gains only on the images it is close to already. (The lift over the clean log-probability
  on the same images ranked the planted target of the 100-class BadNets pairs model 5th, 10th and
  1st over seeds 0-2; the plain score ranked it 1st on all three.)
* ``clean_logp``: the clean mean log-probability of the class over the calibration images the model
  does *not* predict as it: classes close to every image are the naturally easy targets (they have
  small natural triggers too, and are what the anomaly index compares against).
* any caller-given source (``class_scores`` of `synthesize`): e.g. class-count-independent probes.

Candidates are picked round robin over the sources, each source's best remaining class in turn, so
a class ranked first by any one source is searched whatever the other sources say. Besides the
candidates, `SynthConfig.references` random other classes are searched: they are an unbiased sample
of the classes left out, so the anomaly index can weigh each of them for the classes it stands for
(`baseline_weights`) and the median/MAD baseline estimates that of all classes rather than that of
the easiest ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...errors import UsageError
from .patches import PatchScan
from .results import Preselection, SynthConfig


def applies(config: SynthConfig, num_classes: int) -> bool:
    """Whether pre-selection narrows the search: no explicit `classes`, and more classes than it keeps."""
    return (config.classes is None and config.candidates is not None
            and num_classes > config.candidates + config.references)


def log_softmax(out: np.ndarray, probabilities: bool) -> np.ndarray:
    """Log-probabilities ``[n, classes]`` from model outputs (logits, or probabilities when `probabilities`)."""
    if probabilities:
        return np.log(np.clip(out, 1e-12, None))
    z = out - out.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def clean_logp_scores(logp: np.ndarray) -> np.ndarray:
    """Per class: mean clean log-probability over the images not predicted as that class."""
    pred = logp.argmax(axis=1)
    n = logp.shape[1]
    others = pred[:, None] != np.arange(n)[None, :]
    counts = np.maximum(others.sum(axis=0), 1)
    return (np.where(others, logp, 0.0).sum(axis=0) / counts).astype(np.float64)


def patch_scan_scores(scan: PatchScan) -> np.ndarray:
    """Per class: the best window's best mean log-probability over the scan's images."""
    return scan.score.max(axis=0).astype(np.float64)


def external_scores(class_scores: Mapping[str, Sequence[float]] | None, num_classes: int) -> dict[str, np.ndarray]:
    """Caller-given per-class scores, checked: one finite value per class, higher = more suspicious.

    Raises:
        UsageError: a source has the wrong length or non-finite values, or reuses a built-in name.
    """
    out: dict[str, np.ndarray] = {}
    for name, values in (class_scores or {}).items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (num_classes,):
            raise UsageError(f"class scores '{name}' have shape {list(v.shape)}, expected one per class "
                             f"({num_classes})")
        if not np.all(np.isfinite(v)):
            raise UsageError(f"class scores '{name}' hold non-finite values")
        if name in ("patch_scan", "clean_logp"):
            raise UsageError(f"class scores '{name}': the name is taken by a built-in score")
        out[str(name)] = v
    return out


def preselect(scores: dict[str, np.ndarray], num_classes: int, candidates: int, references: int,
              seed: int) -> Preselection:
    """Round-robin candidates over the score sources, then seeded random reference classes.

    Args:
        scores: source -> per-class score (higher = more suspicious); iterated in its order.
        num_classes: classes of the model.
        candidates: classes to pick by score (all sources together).
        references: random classes to add from the rest.
        seed: seeds the reference draw.
    """
    orders = [np.argsort(-v, kind="stable") for v in scores.values()]
    picked: list[int] = []
    taken: set[int] = set()
    pos = [0] * len(orders)
    budget = min(candidates, num_classes)
    while orders and len(picked) < budget:
        for i, order in enumerate(orders):
            while pos[i] < num_classes and int(order[pos[i]]) in taken:
                pos[i] += 1
            if pos[i] < num_classes and len(picked) < budget:
                c = int(order[pos[i]])
                picked.append(c)
                taken.add(c)
    rest = np.array([c for c in range(num_classes) if c not in taken], dtype=int)
    rng = np.random.default_rng([seed, 1 << 21])
    # Without any score source, the candidates come from the same random draw as the references.
    n_random = min(len(rest), references + (budget - len(picked)))
    drawn = [int(c) for c in rng.choice(rest, size=n_random, replace=False)] if n_random else []
    extra = budget - len(picked)
    return Preselection(num_classes=num_classes, scores=scores, candidates=tuple(picked + drawn[:extra]),
                        references=tuple(drawn[extra:]))


def baseline_weights(pre: Preselection | None, searched: Sequence[int]) -> np.ndarray | None:
    """Weights of the searched classes in the anomaly index's median and MAD (None: all equal).

    Candidates stand for themselves (weight 1). The references are a uniform random sample of the
    classes that were not picked, so each one that was searched stands for ``(num_classes - k) / r``
    classes, k the candidates picked and r the references searched: the weighted median estimates
    the median over all classes (a stratified sample), not over the easiest ones.
    """
    if pre is None:
        return None
    refs = set(pre.references)
    r = sum(1 for c in searched if c in refs)
    if r == 0:
        return None
    w_ref = (pre.num_classes - len(pre.candidates)) / r
    return np.array([w_ref if c in refs else 1.0 for c in searched], dtype=np.float64)
