"""The report of a scan over many models (a folder or a Triton model repository).

Fail closed: every model file found is listed, either as scanned (with its scan report and what the
gate made of it) or as skipped with the reason it could not be scanned. A skipped model is never
counted clean.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import __version__
from .types import SCHEMA_VERSION, Report, ScanReport

#: What the gate concluded about one model. ``allowlisted``: suspected, but its sha256 is on the
#: allowlist with an unexpired entry; ``allowlist-expired``: the model's entry has expired (fails the gate).
OUTCOMES = ("clean", "not-assessed", "suspected", "allowlisted", "allowlist-expired", "unscannable")


@dataclass(frozen=True)
class ModelOutcome:
    """One model file of a many-model scan."""

    path: str
    """Path of the model file as found."""
    outcome: str
    """One of `OUTCOMES`."""
    reason: str
    """One sentence on why (the verdict reason, or the error that stopped the scan)."""
    exit_code: int
    """The exit code a scan of this model alone would give (0 clean, 1 suspected, 2 input error, 3 no map)."""
    sha256: str | None
    """sha256 of the file (None only when it could not be read)."""
    report: ScanReport | None = None
    """The scan report (None when the model could not be scanned)."""
    error: str | None = None
    """Class of the error that stopped the scan (``ModelLoadError`` ...), for skipped models."""
    settings: dict | None = None
    """Setting -> {"value", "source"}: each effective setting and where it came from."""
    allowlist: dict | None = None
    """The allowlist entry that matched the model's sha256 (sha256, reason, expires)."""
    triton: dict | None = None
    """Triton model name, version and the input read from ``config.pbtxt``, when in a model repository."""

    @property
    def scanned(self) -> bool:
        """True when the scan gave a usable result: a report whose verdict is not ``invalid``
        (non-finite statistics count as not scanned: fail closed)."""
        return self.report is not None and self.outcome != "unscannable"

    @property
    def verdict(self) -> str:
        """The scan's verdict, or ``not-scanned``."""
        return self.report.verdict if self.report is not None else "not-scanned"


@dataclass(frozen=True)
class ScanManyReport(Report):
    """Result of `onnx_linf.commands.scan_many.scan_many`."""

    root: str
    """The folder as given."""
    layout: str
    """``folder`` or ``triton`` (a model repository with ``config.pbtxt`` files)."""
    models: list[ModelOutcome]
    """Every model file found, in path order."""
    skip_unscannable: bool
    """True when models that could not be scanned do not set the exit code (they are still reported)."""
    exit_code: int
    """The worst exit code over the models (see `worst_exit_code`)."""
    config: str | None = None
    """The configuration file in effect, if any."""
    schema_version: int = SCHEMA_VERSION
    """Report schema version."""
    tool: str = "onnx-linf"
    """Tool name."""
    tool_version: str = __version__
    """Tool version."""
    command: str = "scan"
    """The command that wrote the report."""

    @property
    def scanned(self) -> list[ModelOutcome]:
        """Models that were scanned."""
        return [m for m in self.models if m.scanned]

    @property
    def skipped(self) -> list[ModelOutcome]:
        """Models that could not be scanned."""
        return [m for m in self.models if not m.scanned]

    def to_dict(self) -> dict:
        """JSON form: the scanned models with their reports, and the skipped ones with reasons."""
        def entry(m: ModelOutcome) -> dict:
            out = {"path": m.path, "sha256": m.sha256, "outcome": m.outcome, "reason": m.reason,
                   "exit_code": m.exit_code, "settings": m.settings, "allowlist": m.allowlist, "triton": m.triton}
            if not m.scanned:
                out["error"] = m.error
            if m.report is not None:  # an invalid scan keeps its report: it names the non-finite channels
                out["report"] = m.report.to_dict()
            return out

        return {
            "schema_version": self.schema_version, "tool": self.tool, "tool_version": self.tool_version,
            "command": self.command, "root": self.root, "layout": self.layout, "config": self.config,
            "skip_unscannable": self.skip_unscannable, "exit_code": self.exit_code,
            "summary": {outcome: sum(m.outcome == outcome for m in self.models) for outcome in OUTCOMES},
            "scanned": [entry(m) for m in self.scanned],
            "skipped": [entry(m) for m in self.skipped],
        }


def worst_exit_code(models: list[ModelOutcome], skip_unscannable: bool) -> int:
    """The exit code of a many-model scan.

    2 when a model could not be scanned (unless `skip_unscannable`), else 1 when one is suspected
    (with the gate on) or its allowlist entry expired, else 3 when nothing at all was scanned, else 0.
    """
    if not skip_unscannable and any(not m.scanned for m in models):
        return 2
    scanned = [m for m in models if m.scanned]
    if any(m.exit_code == 1 for m in scanned):
        return 1
    if not scanned:
        return 3
    return 0
