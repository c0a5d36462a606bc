"""One error hierarchy for everything a user can cause.

`LinfError` and its subclasses are *user* errors: a bad model, bad data, a bad option, a failed
verification. The CLI catches `LinfError` once, prints one line (plus the hint) and exits with
`exit_code`. Anything else that escapes is a bug in onnx-linf and keeps its traceback.
"""

from __future__ import annotations


class LinfError(Exception):
    """Base of all user-facing errors.

    Attributes:
        hint: optional advice on what to do next, shown by the CLI after the message.
        exit_code: process exit code the CLI uses for this error class.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(LinfError):
    """An option value is invalid or options contradict each other."""


class ModelLoadError(LinfError):
    """The model file is missing, is not ONNX, or its external data cannot be found."""


class UnsupportedModelError(LinfError):
    """The model is valid ONNX but onnx-linf cannot work on it (custom ops, several image inputs...)."""


class NoTapsError(UnsupportedModelError):
    """The model has no convolutional activation map to measure."""

    exit_code = 3


class CalibrationDataError(LinfError):
    """Calibration or evaluation data is missing, empty, unreadable or does not fit the model."""


class NoEvidenceError(LinfError):
    """Evidence was asked for (trigger synthesis) but none was found: nothing to rank channels by."""


class RuntimeSessionError(LinfError):
    """ONNX Runtime could not create a session or run the model with the requested provider."""


class EngineError(LinfError):
    """The distributed engine cannot run: the ray extra is missing, or the cluster cannot be reached."""


class RewriteError(LinfError):
    """Graph surgery could not be applied (unknown tensor, channel out of range...)."""


class VerificationError(LinfError):
    """The rewritten model failed verification; nothing was written.

    Attributes:
        details: the numbers behind the failure (max abs difference, tolerance, check name).
    """

    exit_code = 1

    def __init__(self, message: str, *, details: dict | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.details = details or {}
