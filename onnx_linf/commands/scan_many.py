"""``scan`` over a folder or a Triton model repository: the single-model scan in a loop, fail closed.

Every ``*.onnx`` file found is scanned with its own effective settings (configuration file,
per-model overrides, the Triton ``config.pbtxt`` input size, command line). A model the scan stops
on is recorded as unscannable with the reason, never as clean.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import LinfError
from ..measure.calibrate import Progress
from ..measure.engine import EngineOptions
from ..model.triton import find_models, read_triton
from ..report.many import ModelOutcome, ScanManyReport, worst_exit_code
from .common import make_engine
from .evidence import Evidence
from .gate import judge, unscannable
from .scan import scan
from .settings import Settings, effective, record_settings, scan_options, settings_record

log = logging.getLogger(__name__)


def scan_many(root: str | os.PathLike | Sequence[str | os.PathLike], calib: str | os.PathLike, *,
              settings: Settings | None = None, cli: dict | None = None, defaults: dict | None = None,
              evidence: Evidence | None = None,
              skip_unscannable: bool = False, today: dt.date | None = None,
              progress: Progress | None = None, on_model=None,
              engine: EngineOptions | str | None = None) -> ScanManyReport:
    """Scan every model file under `root`.

    Args:
        root: a folder of ``*.onnx`` files (recursive) or a Triton model repository, or a list of model
            files and folders (as a pre-commit hook gets the staged files).
        calib: clean calibration data, shared by every model.
        settings: the configuration file (`settings.load_settings`).
        cli: settings given on the command line (they win over the file).
        defaults: the command's defaults.
        evidence: trigger or suspect images for every model (synthesis comes from the settings).
        skip_unscannable: models that could not be scanned do not set the exit code (still reported).
        today: the date allowlist expiry is checked against.
        progress: progress sink of each scan.
        on_model: called with each `ModelOutcome` as soon as it is known (with Ray: in model order,
            once all are done).
        engine: ``ray`` runs one Ray task per model (each scan in its task, ORT pinned to the task's
            CPUs); the default scans the models one after the other here.

    Raises:
        ModelLoadError: `root` is not a folder.
    """
    settings = settings or Settings()
    layout, files = collect(root)
    options = EngineOptions.of(engine)
    outcomes: list[ModelOutcome] = []
    if options.name == "ray":
        # One task per model; inside it the scan runs locally on the CPUs the task reserves.
        inner = EngineOptions(threads=max(1, int(options.cpus_per_worker)))
        one = functools.partial(_scan_one, calib=calib, settings=settings, cli=cli or {}, defaults=defaults or {},
                                evidence=evidence, today=today, progress=None, engine=inner)
        for outcome in make_engine(options).map(one, files):
            outcomes.append(outcome)
            if on_model is not None:
                on_model(outcome)
    else:
        for path in files:
            outcome = _scan_one(path, calib, settings, cli or {}, defaults or {}, evidence, today, progress, options)
            outcomes.append(outcome)
            if on_model is not None:
                on_model(outcome)
    shown = str(root) if isinstance(root, (str, os.PathLike)) else " ".join(map(str, root))
    return ScanManyReport(root=shown, layout=layout, models=outcomes, skip_unscannable=skip_unscannable,
                          exit_code=worst_exit_code(outcomes, skip_unscannable),
                          config=None if settings.path is None else str(settings.path))



def _scan_one(path: Path, calib: str | os.PathLike, settings: Settings, cli: dict, defaults: dict,
              evidence: Evidence | None, today: dt.date | None, progress: Progress | None,
              engine: EngineOptions) -> ModelOutcome:
    """Scan one model of the folder: its outcome, or why it could not be scanned."""
    values, triton = None, None
    try:
        info = read_triton(path)
        triton = None if info is None else info.to_dict()
        values = effective(settings, path, cli, defaults, None if info is None else info.size())
        config, ev, gate = scan_options(values, evidence)
        report = scan(path, calib, dataclasses.replace(config, engine=engine), evidence=ev, progress=progress)
        report = record_settings(report, values, settings)
        return judge(report, path=path, allowlist=settings.allowlist, fail_on_suspect=gate, today=today,
                     settings=settings_record(values), triton=triton)
    except LinfError as exc:
        log.info("%s could not be scanned: %s", path, exc)
        return unscannable(path, exc, settings=None if values is None else settings_record(values), triton=triton)


def collect(root: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, list[Path]]:
    """Layout (``folder``, ``triton`` or ``files``) and the model files of a folder or a list of paths."""
    if isinstance(root, (str, os.PathLike)):
        return find_models(root)
    layouts, files = set(), []
    for p in map(Path, root):
        if p.is_dir():
            layout, found = find_models(p)
            layouts.add(layout)
            files.extend(found)
        else:
            files.append(p)  # a missing file is reported as unscannable, never dropped
    return ("triton" if "triton" in layouts else "files"), list(dict.fromkeys(files))
