"""Process exit codes: one enum, documented in ``--help`` and the README."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What the exit status of an onnx-linf command means."""

    OK = 0
    """Done; for ``scan`` with a verdict: no backdoor suspected."""
    SUSPECTED = 1
    """A backdoor is suspected (scan with a verdict), or a rewritten model failed verification or the
    top-1 agreement gate (--min-agreement)."""
    INPUT_ERROR = 2
    """Usage or input error: bad option, missing/invalid model, unreadable data, a batch over the
    memory limit; a scan whose statistics are not finite (verdict invalid)."""
    NOTHING_TO_SCAN = 3
    """The model has no convolutional activation map."""


EPILOG = (
    "Exit codes: 0 done / clean; 1 backdoor suspected, or a rewritten model failed verification or the "
    "--min-agreement gate; 2 usage or input error (also non-finite statistics: verdict invalid); "
    "3 nothing to scan (no conv activation map)."
)
