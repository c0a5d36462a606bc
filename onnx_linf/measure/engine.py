"""The engine seam: a source of batches -> per-shard partial results -> one exact merge.

A *job* says what one worker does with a stream of batches (run the session, fold the outputs into
mergeable partial results) and how two partial results combine. An *engine* decides where the
shards run: `LocalEngine` runs the whole source as one shard in this process (today's loop, at
today's speed); `ray_engine.RayEngine` splits it into shards that Ray actors measure, and merges
the partial results on the driver with a fixed binary tree.

Statistics merge exactly (`stats.ChannelStats.merge`): maxima, minima and top-k are order
statistics, so any split gives bit-identical values; Welford moments are equal within float
rounding, because a different split adds the same numbers in another order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx

from ..errors import UsageError
from ..model.load import Model
from .calibrate import Progress, run_batches
from .instrument import Instrumented, TapOutput
from .preprocess import Preprocess, Trigger
from .session import Session, create_session
from .sources import DataSource
from .stats import ChannelStats, StatsCollector

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions:
    """Where calibration runs (plain data: it goes into configs and reports)."""

    name: str = "local"
    """``local`` (this process) or ``ray`` (Ray actors; a local Ray, or the cluster in ``RAY_ADDRESS``)."""
    workers: int | None = None
    """Ray: actors measuring shards at once (None: as many as the cluster's CPUs or GPUs allow)."""
    cpus_per_worker: float = 1.0
    """Ray: CPUs each actor reserves; ONNX Runtime's intra-op threads are pinned to this many."""
    gpus_per_worker: float = 0.0
    """Ray: GPUs each actor reserves; with any, ``provider=auto`` means the CUDA provider."""
    shards: int | None = None
    """Ray: number of shards (None: twice the workers, so a retried shard is a small part of the run)."""
    address: str | None = None
    """Ray: cluster address (None: ``RAY_ADDRESS``, else a local Ray started for the run)."""
    threads: int | None = None
    """Local: ORT intra-op threads (None: ORT's default, all cores); Ray workers use `cpus_per_worker`."""

    @classmethod
    def of(cls, value: EngineOptions | str | None) -> EngineOptions:
        """Options from an `EngineOptions`, an engine name, or None (local)."""
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(name=value)
        return value

    def validate(self) -> None:
        """Raise `UsageError` for inconsistent options."""
        if self.name not in ENGINES:
            raise UsageError(f"unknown engine {self.name!r}: use {' or '.join(ENGINES)}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.shards is not None and self.shards < 1:
            raise UsageError(f"the number of shards must be >= 1, got {self.shards}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise UsageError("a Ray worker needs a positive CPU share and a non-negative GPU share")
        if self.name == "local" and (self.workers is not None or self.shards is not None):
            raise UsageError("--ray-workers needs --ray")


@dataclass(frozen=True)
class SessionSpec:
    """What a worker needs to build its own ORT session: the model and the graph to run."""

    model: Model
    """The loaded model (input, external-data folder)."""
    graph: Instrumented | onnx.ModelProto | None
    """The graph to run (None: the model itself)."""
    provider: str = "auto"
    """ORT provider."""

    def payload(self) -> bytes:
        """The serialized graph (built without a second copy of the weights for `Instrumented`)."""
        if isinstance(self.graph, Instrumented):
            return self.graph.serialize()
        return (self.graph if self.graph is not None else self.model.proto).SerializeToString()


class Job(Protocol):
    """What a worker computes over a stream of batches, and how two of its results merge."""

    def run(self, session: Session, source: DataSource, preprocess: Preprocess, batch_size: int,
            progress: Progress | None = None) -> Any:
        """The partial result of `source`."""

    def merge(self, a: Any, b: Any) -> Any:
        """Exact combination of two partial results (`a` covers the images before `b`'s)."""


@dataclass(frozen=True)
class StatsJob:
    """Run an instrumented session and fold its outputs into per-tap `ChannelStats`."""

    outputs: Mapping[str, TapOutput]
    """Added output name -> (tap, statistic), from `instrument`."""
    channels: Mapping[str, int]
    """Tap name -> number of channels."""
    topk: int = 1
    """k of the top-k statistics."""
    batch_level: tuple[str, ...] = ()
    """Outputs that are extremes over the batch axis (left alone when a fixed batch is padded)."""
    trigger: Trigger | None = None
    """Stamp this trigger on the pixels first."""

    def run(self, session: Session, source: DataSource, preprocess: Preprocess, batch_size: int,
            progress: Progress | None = None) -> dict[str, ChannelStats]:
        collector = StatsCollector(self.outputs, self.channels, self.topk)
        names = list(self.outputs)
        sizes: list[int] = []
        for values in run_batches(session, source, preprocess, names, batch_size, self.trigger, progress,
                                  batch_level=self.batch_level, on_batch=lambda b: sizes.append(len(b))):
            collector.update(values, images=sizes[-1])
        return collector.result()

    def merge(self, a: dict[str, ChannelStats], b: dict[str, ChannelStats]) -> dict[str, ChannelStats]:
        return merge_stats(a, b)


def merge_stats(a: Mapping[str, ChannelStats], b: Mapping[str, ChannelStats]) -> dict[str, ChannelStats]:
    """Tap-wise `ChannelStats.merge`: whatever statistics a `ChannelStats` holds, merged exactly."""
    out = dict(a)
    for tap, st in b.items():
        out[tap] = out[tap].merge(st) if tap in out else st
    return out


def tree_merge(parts: Sequence[Any], merge: Callable[[Any, Any], Any]) -> Any:
    """Merge partial results pairwise, level by level, in the given order.

    The tree depends only on the number of parts, so the same shards give the same result
    however they arrive; each value goes through log2(parts) merges, not parts - 1 as in a fold.
    """
    if not parts:
        raise ValueError("nothing to merge")
    level = list(parts)
    while len(level) > 1:
        nxt = [merge(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@dataclass
class RunRecord:
    """Provenance of one pass over a source: how it was split and who measured it."""

    shards: int
    """Shards the source was measured in."""
    images_per_shard: list[int]
    """Images of each shard, in image order."""
    worker_processes: int
    """Distinct worker processes that returned a shard (more than the workers when one was restarted)."""
    provider: str
    """ORT provider the workers ran."""
    shard_workers: list[int] = field(default_factory=list)
    """Process id that delivered each shard, in image order (not in reports: ids mean nothing later)."""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"shards": self.shards, "images_per_shard": list(self.images_per_shard),
                "worker_processes": self.worker_processes, "provider": self.provider}


class Engine:
    """Runs a `Job` over a source. This base runs everything in this process, as one shard."""

    name = "local"

    def __init__(self, threads: int | None = None) -> None:
        self.runs: list[RunRecord] = []
        """One record per pass, for the report."""
        self._threads = threads

    @property
    def threads(self) -> int | None:
        """ORT intra-op threads of sessions made in this process (None: ORT's default, all cores)."""
        return self._threads

    def run(self, job: Job, spec: SessionSpec, source: DataSource, preprocess: Preprocess, batch_size: int,
            progress: Progress | None = None, session: Session | None = None) -> Any:
        """The merged result of `job` over all of `source`.

        Args:
            job: what to compute per shard and how to merge.
            spec: how a worker builds its session.
            source: the data.
            preprocess: pixels -> model input.
            batch_size: images per ORT run.
            progress: progress sink (advanced per batch locally, per shard on a cluster).
            session: an existing session for `spec` that a local run may reuse.
        """
        session = session or create_session(spec.model, spec.graph, spec.provider, threads=self.threads)
        return job.run(session, source, preprocess, batch_size, progress)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, here in order; on Ray one task per item (folder scans)."""
        return [fn(item) for item in items]

    def describe(self) -> dict | None:
        """The report's record of the engine (None for the local engine: reports stay as they were)."""
        return None

    @property
    def provider(self) -> str | None:
        """The provider the workers ran in the last pass (None when it ran here)."""
        return None


class LocalEngine(Engine):
    """This process: the whole source is one shard (the default)."""
