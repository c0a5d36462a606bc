"""onnx-linf: find and remove backdoors in ONNX image classifiers through ℓ∞ activation statistics.

The library is usable without the CLI. Typical use::

    import onnx_linf
    report = onnx_linf.scan("model.onnx", "calib_images/")
    print(report.verdict, report.flagged_channels())
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CalibrationDataError,
    LinfError,
    ModelLoadError,
    NoTapsError,
    RewriteError,
    RuntimeSessionError,
    UnsupportedModelError,
    UsageError,
    VerificationError,
)
from .load import Model, load_model  # noqa: E402
from .pipeline import ScanConfig, scan  # noqa: E402
from .taps import Tap, find_taps  # noqa: E402

__all__ = [
    "CalibrationDataError", "LinfError", "Model", "ModelLoadError", "NoTapsError", "RewriteError",
    "RuntimeSessionError", "ScanConfig", "Tap", "UnsupportedModelError", "UsageError",
    "VerificationError", "__version__", "find_taps", "load_model", "scan",
]
