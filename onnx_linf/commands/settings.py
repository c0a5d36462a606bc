"""Scan settings from a configuration file, per-model overrides and the command line, with their sources.

The file is ``onnx-linf.toml`` (top-level keys) or ``pyproject.toml`` (``[tool.onnx-linf]``), found
upward from the working directory up to the repository root, or given with ``--config``::

    [tool.onnx-linf]
    layers = "all"
    synthesize = true
    fail_on_suspect = true
    mean = [0.485, 0.456, 0.406]

    [[tool.onnx-linf.overrides]]        # later entries win; globs are relative to the file's folder
    glob = "models/legacy/*"
    size = "32x32"

    [[tool.onnx-linf.allowlist]]        # accepted models: an expired entry fails the gate
    sha256 = "035de6e1..."
    reason = "reviewed in SEC-123"
    expires = 2026-12-31

Precedence, lowest first: the command's defaults, the model's Triton ``config.pbtxt`` (input size),
the file's top level, matching overrides in order, options given on the command line. Every
effective setting is recorded with where it came from.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..decide.synthesis.results import SynthConfig
from ..errors import UsageError
from ..measure.probes import ProbeConfig
from .evidence import Evidence
from .gate import AllowEntry
from .options import PreprocessOptions, ScanConfig

# tomllib is in the standard library from Python 3.11; `tomli` (same API) before that.
tomllib = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")

FILE_NAME = "onnx-linf.toml"
SECTION = "onnx-linf"


def _str(v, key):
    if not isinstance(v, str):
        raise UsageError(f"{key} must be a string, got {v!r}")
    return v


def _num(kind):
    def check(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise UsageError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        return kind(v)
    return check


def _bool(v, key):
    if not isinstance(v, bool):
        raise UsageError(f"{key} must be true or false, got {v!r}")
    return v


def _list(kind, sep=","):
    def check(v, key):
        if isinstance(v, str):
            if kind is int and "size" in key:  # "224x224"
                v = v.lower().replace("x", sep)
            parts = [p.strip() for p in v.split(sep)]
            v = [p for p in parts if p]
        if not isinstance(v, (list, tuple)) or not v:
            raise UsageError(f"{key} must be a non-empty list, got {v!r}")
        try:
            return tuple(kind(p) for p in v)
        except (TypeError, ValueError):
            raise UsageError(f"{key} has a bad element: {v!r}") from None
    return check


def _layers(v, key):
    if isinstance(v, str) and v.strip() in ("all", "all+branches", "last"):
        return v.strip()
    return _list(str)(v, key)


def _batch(v, key):
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    try:
        return int(v)
    except (TypeError, ValueError):
        raise UsageError(f"{key} takes a positive integer or 'auto', got {v!r}") from None


#: Every scan setting a file or the command line can set, with its check/normaliser.
KEYS = {
    "layers": _layers, "policy": _str, "ratio": _num(float), "threshold": _num(float), "score": _str,
    "stats": _list(str), "batch_size": _batch, "provider": _str, "limit": _num(int),
    "size": _list(int), "layout": _str, "channels": _str, "scale": _num(float), "mean": _list(float),
    "std": _list(float), "synthesize": _bool, "classes": _list(int), "seed": _num(int),
    "max_queries": _num(int), "time_limit": _num(float), "synth_threshold": _num(float),
    "fail_on_suspect": _bool, "verdict": _bool,
}


@dataclass(frozen=True)
class Settings:
    """A parsed configuration file (or none)."""

    path: Path | None = None
    """The file, None when there is none."""
    base: dict | None = None
    """Top-level settings."""
    overrides: tuple[tuple[str, dict], ...] = ()
    """(glob, settings) in file order."""
    allowlist: tuple[AllowEntry, ...] = ()
    """Accepted models."""


def option(key: str) -> str:
    """The command-line spelling of a setting, for messages."""
    return "--" + key.replace("_", "-")


def _has_section(path: Path) -> bool:
    try:
        return SECTION in tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True  # let load_settings report the problem instead of silently skipping the file


def find_config(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest ``onnx-linf.toml``, or ``pyproject.toml`` with a ``[tool.onnx-linf]`` table, from `start`
    (default: the working directory) upward, stopping at the repository root (the folder with ``.git``)."""
    folder = Path(start or Path.cwd()).resolve()
    for d in (folder, *folder.parents):
        if (d / FILE_NAME).is_file():
            return d / FILE_NAME
        if (d / "pyproject.toml").is_file() and _has_section(d / "pyproject.toml"):
            return d / "pyproject.toml"
        if (d / ".git").exists():
            return None
    return None


def _check(table: dict, where: str, extra: tuple[str, ...] = ()) -> dict:
    unknown = [k for k in table if k not in KEYS and k not in extra]
    if unknown:
        raise UsageError(f"{where}: unknown setting {unknown[0]!r}",
                         hint=f"known settings: {', '.join(sorted(KEYS))}")
    return {k: KEYS[k](v, f"setting {k!r} ({where})") for k, v in table.items() if k in KEYS}


def _allow(entry, where: str) -> AllowEntry:
    if not isinstance(entry, dict) or not {"sha256", "reason", "expires"} <= set(entry):
        raise UsageError(f"{where}: each allowlist entry needs sha256, reason and expires")
    sha, expires = str(entry["sha256"]).lower(), entry["expires"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise UsageError(f"{where}: allowlist sha256 must be 64 hex digits, got {entry['sha256']!r}")
    if isinstance(expires, str):
        try:
            expires = dt.date.fromisoformat(expires)
        except ValueError:
            raise UsageError(f"{where}: allowlist expires must be a date (YYYY-MM-DD), got {expires!r}") from None
    if isinstance(expires, dt.datetime):
        expires = expires.date()
    if not isinstance(expires, dt.date):
        raise UsageError(f"{where}: allowlist expires must be a date (YYYY-MM-DD), got {expires!r}")
    return AllowEntry(sha, str(entry["reason"]), expires)


def load_settings(path: str | os.PathLike | None = None, *, search: bool = True) -> Settings:
    """Read the configuration file `path`, or the one `find_config` finds (when `search`).

    Raises:
        UsageError: the file is missing, not TOML, or has unknown or badly typed settings.
    """
    if path is None:
        path = find_config() if search else None
        if path is None:
            return Settings()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    table = data.get("tool", {}).get(SECTION, {}) if path.name == "pyproject.toml" else data
    where = f"{path} [tool.{SECTION}]" if path.name == "pyproject.toml" else str(path)
    overrides = []
    for i, o in enumerate(table.get("overrides", [])):
        if not isinstance(o, dict) or not isinstance(o.get("glob"), str):
            raise UsageError(f"{where}: overrides[{i}] needs a glob")
        overrides.append((o["glob"], _check(o, f"{where} overrides[{i}]", extra=("glob",))))
    allow = tuple(_allow(e, where) for e in table.get("allowlist", []))
    return Settings(path=path, base=_check(table, where, extra=("overrides", "allowlist")),
                    overrides=tuple(overrides), allowlist=allow)


def _matches(glob: str, model: Path, folder: Path) -> bool:
    absolute = model.resolve()
    try:
        rel = PurePosixPath(absolute.relative_to(folder.resolve()).as_posix())
    except ValueError:
        rel = PurePosixPath(absolute.as_posix())
    return fnmatch.fnmatch(str(rel), glob) or fnmatch.fnmatch(model.name, glob)


def effective(settings: Settings, model: str | os.PathLike, cli: dict, defaults: dict,
              triton_size: tuple[int, int] | None = None) -> dict[str, dict]:
    """Each setting's value and source for one model.

    Args:
        settings: the configuration file.
        model: the model path (overrides match it).
        cli: settings given on the command line (they win).
        defaults: the command's defaults for everything else.
        triton_size: input (H, W) from the model's Triton ``config.pbtxt``.

    Returns:
        name -> {"value": ..., "source": "default" | "config.pbtxt" | "<file>" | "<file> override '<glob>'" |
        "command line"}.
    """
    out = {k: {"value": KEYS[k](v, option(k)) if v is not None else None, "source": "default"}
           for k, v in defaults.items()}
    if triton_size is not None:
        out["size"] = {"value": tuple(triton_size), "source": "config.pbtxt"}
    if settings.path is not None:
        for k, v in (settings.base or {}).items():
            out[k] = {"value": v, "source": str(settings.path)}
        for glob, table in settings.overrides:
            if _matches(glob, Path(model), settings.path.parent):
                for k, v in table.items():
                    out[k] = {"value": v, "source": f"{settings.path} override {glob!r}"}
    for k, v in cli.items():
        out[k] = {"value": KEYS[k](v, option(k)) if v is not None else None, "source": "command line"}
    return out


def scan_options(values: dict[str, dict], evidence: Evidence | None = None,
                 data_free: bool = False) -> tuple[ScanConfig, Evidence | None, bool]:
    """ScanConfig, evidence (synthesis when ``synthesize``) and the gate flag from effective settings.

    `data_free`: no calibration data; the scan's verdict is the data-free one, so the gate needs no
    ``synthesize`` (a ``synthesize`` setting is then refused: it needs clean images; ``verdict`` is
    accepted and means the data-free verdict).

    ``verdict``: every evidence family with data (the probe families and the patch search); ``synthesize``
    alone is the patch search.

    Raises:
        UsageError: inconsistent settings.
    """
    v = {k: e["value"] for k, e in values.items()}
    size = v.get("size")
    if size is not None and len(size) == 1:
        size = (size[0], size[0])
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise UsageError(f"--size takes a positive HxW, got {'x'.join(map(str, size))}")
    pre = PreprocessOptions(size=size, layout=v.get("layout"), channels=v.get("channels"), scale=v.get("scale"),
                            mean=v.get("mean"), std=v.get("std"))
    config = ScanConfig(layers=v.get("layers", "all"), policy=v.get("policy", "ratio"), ratio=v.get("ratio", 0.1),
                        threshold=v.get("threshold", 3.5), score=v.get("score", "linf"),
                        stats=tuple(v.get("stats") or ("linf", "l1")), batch_size=v.get("batch_size", 32),
                        provider=v.get("provider", "auto"), limit=v.get("limit"), preprocess=pre)
    config.validate()
    gate = bool(v.get("fail_on_suspect"))
    if data_free:
        if v.get("synthesize") or evidence is not None:
            raise UsageError("--synthesize, --trigger and --suspect need clean images: add --calib DATA",
                             hint="without --calib, scan runs the data-free checks only")
        return config, None, gate
    if v.get("synthesize") or v.get("verdict"):
        if evidence is not None:
            flag = "--verdict" if v.get("verdict") else "--synthesize"
            raise UsageError(f"{flag} searches its own trigger: drop --trigger/--mask/--suspect")
        synth = SynthConfig(classes=v.get("classes"), seed=v.get("seed") or 0, max_queries=v.get("max_queries"),
                            time_limit=v.get("time_limit"),
                            threshold=v.get("synth_threshold") or SynthConfig.threshold)
        synth.validate()
        probes = ProbeConfig(seed=v.get("seed") or 0) if v.get("verdict") else None
        evidence = Evidence(synthesize=synth, probes=probes)
    if gate and (evidence is None or evidence.synthesize is None):
        raise UsageError("--fail-on-suspect needs a verdict: add --verdict (or verdict = true)",
                         hint="--synthesize gives the patch search's verdict alone")
    return config, evidence, gate


def settings_record(values: dict[str, dict]) -> dict[str, dict]:
    """JSON form of `effective` (tuples as lists)."""
    return {k: {"value": list(e["value"]) if isinstance(e["value"], tuple) else e["value"], "source": e["source"]}
            for k, e in values.items()}


def record_settings(report, values: dict[str, dict], settings: Settings):
    """The scan report with its effective settings and their sources in ``extra``, when a configuration file
    is in effect (without one, every setting is the command line's or its default, and the JSON stays as it was)."""
    if settings.path is None:
        return report
    return dataclasses.replace(report, extra=dict(report.extra, settings=settings_record(values),
                                                  config=str(settings.path)))
