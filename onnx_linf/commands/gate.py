"""The CI gate: what a scan report means for one model, with the allowlist applied.

A scan says ``clean``, ``suspected``, ``not-assessed`` or ``invalid``; the gate turns that into an outcome and
the exit code a scan of that model gives. An allowlist entry (model sha256, reason, expiry date)
accepts a suspected model until it expires; an expired entry fails the gate, so every exception
gets reviewed again. Models that could not be scanned get the outcome ``unscannable``, never clean.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LinfError
from ..report.many import ModelOutcome
from ..report.types import ScanReport


@dataclass(frozen=True)
class AllowEntry:
    """An accepted model: its sha256, why it is accepted, and until when."""

    sha256: str
    """sha256 of the model file (lower-case hex)."""
    reason: str
    """Why it is accepted (who reviewed it, ticket ...)."""
    expires: dt.date
    """Last day the entry holds."""

    def expired(self, today: dt.date) -> bool:
        """True after the expiry date."""
        return today > self.expires

    def to_dict(self) -> dict:
        """Report form."""
        return {"sha256": self.sha256, "reason": self.reason, "expires": self.expires.isoformat()}


def judge(report: ScanReport, *, path: str | os.PathLike | None = None, allowlist: tuple[AllowEntry, ...] = (),
          fail_on_suspect: bool = False, today: dt.date | None = None, settings: dict | None = None,
          triton: dict | None = None) -> ModelOutcome:
    """The gate's outcome for one scanned model.

    Args:
        report: the scan report.
        path: model path to report (default: the report's).
        allowlist: accepted models.
        fail_on_suspect: the gate is on: a suspected model (or an expired entry) exits 1.
        today: the date expiry is checked against (default: today).
        settings: effective settings and their sources, recorded in the outcome.
        triton: Triton model-repository details, recorded in the outcome.
    """
    today = today or dt.date.today()
    sha = report.model.sha256.lower()
    entry = next((e for e in allowlist if e.sha256 == sha), None)
    fail = 1 if fail_on_suspect else 0
    common = dict(path=str(path if path is not None else report.model.path), sha256=sha, report=report,
                  settings=settings, allowlist=None if entry is None else entry.to_dict(), triton=triton)
    if report.verdict == "invalid":
        # Non-finite statistics: nothing was measured that a verdict (or an allowlist) could rest
        # on. Fail closed like a model that could not be scanned, with the input-error code.
        return ModelOutcome(outcome="unscannable", exit_code=2, reason=report.verdict_reason, **common)
    if entry is not None and entry.expired(today):
        return ModelOutcome(outcome="allowlist-expired", exit_code=fail, **common, reason=(
            f"the allowlist entry for this model expired on {entry.expires.isoformat()} ({entry.reason}); "
            f"review the model again (scan verdict: {report.verdict})"))
    if report.verdict == "suspected":
        if entry is not None:
            return ModelOutcome(outcome="allowlisted", exit_code=0, **common, reason=(
                f"{report.verdict_reason}; accepted by the allowlist until {entry.expires.isoformat()}: "
                f"{entry.reason}"))
        return ModelOutcome(outcome="suspected", exit_code=fail, reason=report.verdict_reason, **common)
    return ModelOutcome(outcome=report.verdict, exit_code=0, reason=report.verdict_reason, **common)


def unscannable(path: str | os.PathLike, error: LinfError, *, settings: dict | None = None,
                triton: dict | None = None) -> ModelOutcome:
    """The outcome of a model the scan stopped on (fail closed: never clean)."""
    return ModelOutcome(path=str(path), outcome="unscannable", reason=str(error), exit_code=error.exit_code,
                        sha256=file_sha256(path), error=type(error).__name__, settings=settings, triton=triton)


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file, None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()
