"""The Ray engine: calibration shards measured by Ray Data actors, merged exactly on the driver.

The pipeline is Ray Data's batch-inference pattern: a dataset with one row per shard (a range
of image indices, one block each), then ``map_batches`` with a stateful actor class,
`ShardWorker`, that builds its ONNX Runtime session once (from the serialized graph) and turns
each shard into one partial result. The source itself (an image folder's file list, or the
arrays) reaches each node once through the object store; a worker cuts its shard out of it by
index, so image files are read where they are measured and must be reachable from every node.

The driver merges the partial results with `engine.tree_merge` in image order, whatever order the
shards finish in, so a run is reproducible for a given number of shards. Actors that die (a
killed process, a lost node) are restarted and their shard retried (Ray Data's default); a
retried shard returns the same partial result, and a shard that arrives twice counts once.

``ray`` is imported only here, inside the functions that need it: nothing imports it unless the
Ray engine is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..errors import EngineError, LinfError
from ..model.load import Model
from .calibrate import Progress
from .engine import Engine, EngineOptions, Job, RunRecord, SessionSpec, tree_merge
from .preprocess import Preprocess
from .session import Session, create_session
from .sources import DataSource, FeedSource

log = logging.getLogger(__name__)

MISSING_EXTRA = "--ray needs the ray extra: pip install 'onnx-linf[ray]'"

#: Retries of a folder-scan task whose worker died. Shards need no setting: Ray Data restarts a
#: dead actor and resubmits the shard it held by default (``max_restarts`` / ``max_task_retries``
#: of -1, which `map_batches` takes only through its deprecated ``**ray_remote_args``).
MAX_RETRIES = 3

#: Ports Ray listens on by default: the GCS of ``ray start --head`` and the Ray Client server.
DEFAULT_PORTS = {"": 6379, "ray": 10001}


def import_ray() -> Any:
    """The ``ray`` module, or a one-line `EngineError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pyarrow: part of the extra)
    except ImportError:
        raise EngineError(MISSING_EXTRA) from None
    return ray


def connect(address: str | None = None) -> Any:
    """Connect to Ray once per process: `address`, else ``RAY_ADDRESS``, else a new local Ray.

    An already initialised Ray (a caller's ``ray.init``) is used as it is.

    Raises:
        EngineError: the extra is missing, or the cluster cannot be reached.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address not in ("auto", "local"):
        _check_reachable(address)
    # Ray's own notes (start-up, token authentication) only from ERROR up: the report records what ran.
    try:
        if address is None:
            # A Ray of our own for this process: the dashboard only costs start-up time here.
            ray.init(include_dashboard=False, logging_level=logging.ERROR)
        else:
            ray.init(address=address, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise EngineError(f"cannot connect to the Ray cluster at {address or 'a new local Ray'}: {_first_line(exc)}",
                          hint="start one with `ray start --head`, or unset RAY_ADDRESS for a local Ray") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address nobody listens on (``ray.init`` would retry for a minute)."""
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, str(DEFAULT_PORTS.get(scheme, 6379))
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {_first_line(exc)}",
                          hint="start it with `ray start --head`, or unset RAY_ADDRESS for a local Ray") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _WorkerSpec:
    """Everything a `ShardWorker` needs; Ray Data stores it once in the object store."""

    model: Model
    """The model without its graph (input, external-data folder); the graph is `payload`."""
    payload: bytes
    """The serialized graph to run."""
    provider: str
    threads: int
    job: Job
    source: DataSource
    preprocess: Preprocess
    batch_size: int
    cwd: str
    """The driver's working directory: relative model and data paths resolve against it."""


def _enter(cwd: str) -> None:
    """Work in the driver's folder where this node has it (on a cluster: a shared file system)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    else:
        log.warning("%s does not exist on this node: relative paths resolve against %s", cwd, os.getcwd())


class ShardWorker:
    """A Ray Data actor: one ORT session for its life, one partial result per block of image indices."""

    def __init__(self, spec: _WorkerSpec) -> None:
        self.spec = spec
        _enter(spec.cwd)  # this actor process serves only this pass
        self.session: Session = create_session(spec.model, onnx.ModelProto.FromString(spec.payload), spec.provider,
                                               threads=spec.threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # One row per shard; a batch is one block, so normally one shard (any number works).
        starts, stops = np.asarray(batch["start"]), np.asarray(batch["stop"])
        partials = []
        for start, stop in zip(starts.tolist(), stops.tolist()):
            shard = self.spec.source.shard(start, stop)
            if hasattr(shard, "workers"):  # image decoding threads: the CPUs this actor owns, not the node's
                shard.workers = self.spec.threads
            partial = self.spec.job.run(self.session, shard, self.spec.preprocess, self.spec.batch_size)
            partials.append(pickle.dumps(partial, protocol=5))
        n = len(partials)
        return {"start": starts, "images": stops - starts, "pid": np.full(n, os.getpid()),
                "provider": np.array([self.session.provider] * n), "partial": np.array(partials, dtype=object)}


def _materialize(source: DataSource, batch_size: int) -> DataSource:
    """A source that cannot be cut (a data-loader script), read here into one in-memory source."""
    log.info("%s cannot be sharded without reading it: reading it on the driver first", source.description)
    arrays, labels = [], []
    for batch in source.batches(batch_size):
        arrays.append(batch.tensor if batch.tensor is not None else batch.pixels)
        if batch.labels is not None:
            labels.append(batch.labels)
    out = FeedSource(arrays, np.concatenate(labels) if labels else None)
    out.description = source.description
    return out


class RayEngine(Engine):
    """Shards measured by Ray Data actors (see the module docstring)."""

    name = "ray"

    def __init__(self, options: EngineOptions | None = None) -> None:
        super().__init__()
        self.options = options or EngineOptions(name="ray")
        self._workers: int | None = None
        self._provider: str | None = None

    @property
    def provider(self) -> str | None:
        return self._provider

    @property
    def worker_threads(self) -> int:
        """ORT intra-op threads per actor: the CPUs it reserves (Ray does not stop it using more)."""
        return max(1, int(self.options.cpus_per_worker))

    def workers(self) -> int:
        """Actors per pass: the option, else what the cluster's CPUs (or GPUs) hold."""
        if self._workers is None:
            if self.options.workers is not None:
                self._workers = self.options.workers
            else:
                resources = connect(self.options.address).cluster_resources()
                if self.options.gpus_per_worker > 0:
                    fit = resources.get("GPU", 0) / self.options.gpus_per_worker
                else:
                    fit = resources.get("CPU", 1) / self.options.cpus_per_worker
                self._workers = max(1, int(fit))
        return self._workers

    def run(self, job: Job, spec: SessionSpec, source: DataSource, preprocess: Preprocess, batch_size: int,
            progress: Progress | None = None, session: Session | None = None) -> Any:
        ray = connect(self.options.address)
        if source.shard(0, 0) is None:
            source = _materialize(source, batch_size)
        images = len(source)
        workers = self.workers()
        shards = max(1, min(images, self.options.shards or 2 * workers))
        gpus = self.options.gpus_per_worker
        provider = spec.provider
        if provider == "auto":  # an actor without a GPU share must not grab the node's GPU
            provider = "cuda" if gpus > 0 else "cpu"
        light = dataclasses.replace(spec.model, proto=onnx.ModelProto())
        wspec = _WorkerSpec(light, spec.payload(), provider, self.worker_threads, job, source, preprocess,
                            batch_size, os.getcwd())
        # One row per shard, built on the driver: from_items starts no tasks (ray.data.range's read
        # tasks and from_numpy's conversion tasks each need a CPU, which the actors may all hold).
        bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(images), shards)])
        ds = ray.data.from_items([{"start": int(a), "stop": int(b)} for a, b in zip(bounds[:-1], bounds[1:])],
                                 override_num_blocks=shards)
        ds.context.enable_progress_bars = False  # the caller's Progress shows shards instead
        out = ds.map_batches(ShardWorker, fn_constructor_kwargs={"spec": wspec}, batch_size=None,
                             batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(workers, shards)),
                             num_cpus=self.options.cpus_per_worker, num_gpus=gpus or None)
        progress = progress or Progress()
        progress.start("calibrate", images)
        parts: dict[int, tuple[int, int, str, Any]] = {}
        try:
            for row in out.iter_rows():
                start, n = int(row["start"]), int(row["images"])
                if start in parts:  # a retried shard that was already delivered
                    continue
                parts[start] = (n, int(row["pid"]), str(row["provider"]), pickle.loads(row["partial"]))
                progress.advance(n)
        except Exception as exc:  # Ray wraps what a worker raised; a user error stays one
            raise _unwrap(exc) from None
        finally:
            progress.finish()
        order = sorted(parts)
        covered = sum(parts[s][0] for s in order)
        if covered != images or any(a + parts[a][0] != b for a, b in zip(order, order[1:])):
            raise EngineError(f"the Ray run returned {covered} of {images} images in {len(order)} shards")
        result = tree_merge([parts[s][3] for s in order], job.merge)
        self._provider = parts[order[0]][2]
        self.runs.append(RunRecord(shards=len(order), images_per_shard=[parts[s][0] for s in order],
                                   worker_processes=len({parts[s][1] for s in order}), provider=self._provider,
                                   shard_workers=[parts[s][1] for s in order]))
        return result

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """One Ray task per item (each with this engine's CPU/GPU share), results in item order."""
        ray = connect(self.options.address)
        task = ray.remote(num_cpus=self.options.cpus_per_worker, num_gpus=self.options.gpus_per_worker,
                          max_retries=MAX_RETRIES)(_apply)
        fn_ref = ray.put(fn)  # once, not once per task
        refs = [task.remote(fn_ref, item, os.getcwd()) for item in items]
        try:
            return ray.get(refs)
        except Exception as exc:
            raise _unwrap(exc) from None

    def describe(self) -> dict:
        return {"name": self.name, "workers": self.workers(), "cpus_per_worker": self.options.cpus_per_worker,
                "gpus_per_worker": self.options.gpus_per_worker,
                "cluster": self.options.address or os.environ.get("RAY_ADDRESS") or "local",
                "passes": [r.to_dict() for r in self.runs]}


def _apply(fn: Callable[[Any], Any], item: Any, cwd: str) -> Any:
    """A folder-scan task: ``fn(item)`` in the driver's folder (`ray.remote` takes no partials)."""
    before = os.getcwd()
    _enter(cwd)
    try:
        return fn(item)
    finally:
        os.chdir(before)  # task processes are reused


def _unwrap(exc: BaseException) -> BaseException:
    """The `LinfError` a worker raised (Ray chains it as the cause), else a one-line `EngineError`."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, LinfError):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    return EngineError(f"the Ray run failed: {_first_line(exc)}")
