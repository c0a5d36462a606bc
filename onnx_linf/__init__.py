"""onnx-linf: find and remove backdoors in ONNX image classifiers through ℓ∞ activation statistics.

The library is usable without the CLI. Typical use::

    import onnx_linf
    report = onnx_linf.scan("model.onnx", "calib_images/")
    suspicious = report.flagged_channels()
    safe = onnx_linf.clamp("model.onnx", "calib_images/", output="safe.onnx")
"""

__version__ = "0.1.0"

from .commands.clamp import ClampConfig, ClampResult, clamp  # noqa: E402
from .commands.evidence import Evidence  # noqa: E402
from .commands.options import PreprocessOptions, ScanConfig  # noqa: E402
from .commands.prune import PruneConfig, PruneResult, prune  # noqa: E402
from .commands.scan import scan  # noqa: E402
from .commands.sweep import sweep_model  # noqa: E402
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
from .model.load import Model, load_model  # noqa: E402
from .model.taps import Tap, find_taps  # noqa: E402

__all__ = [
    "CalibrationDataError",
    "ClampConfig",
    "ClampResult",
    "Evidence",
    "LinfError",
    "Model",
    "ModelLoadError",
    "NoTapsError",
    "PreprocessOptions",
    "PruneConfig",
    "PruneResult",
    "RewriteError",
    "RuntimeSessionError",
    "ScanConfig",
    "Tap",
    "UnsupportedModelError",
    "UsageError",
    "VerificationError",
    "__version__",
    "clamp",
    "find_taps",
    "load_model",
    "prune",
    "scan",
    "sweep_model",
]
