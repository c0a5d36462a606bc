"""Option types shared by several commands, and their conversion to library objects."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnx_linf.commands.options import PreprocessOptions
from onnx_linf.decide.synthesis.results import SynthConfig
from onnx_linf.errors import UsageError
from onnx_linf.measure.engine import EngineOptions

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
CalibOpt = Annotated[Path, typer.Option("--calib", "-c", help="Clean calibration data: a folder of images "
                                        "(recursive; PNG/JPEG/BMP/WebP) or a .npy/.npz array file.")]
Layers = Annotated[str, typer.Option("--layers", "-l", help="Activation maps to measure: 'all' (every conv "
                                     "and residual-merge map), 'all+branches' (also the conv outputs that "
                                     "only feed a residual Add), 'last', or comma-separated tensor names.")]
ScanCalibOpt = Annotated[Optional[Path], typer.Option("--calib", "-c", help="Clean calibration data: a folder "
                                                      "of images (recursive; PNG/JPEG/BMP/WebP) or a .npy/.npz "
                                                      "array file. Without it, scan runs the data-free checks "
                                                      "(weights and noise inputs only; weaker).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per inference batch.")]
Provider = Annotated[str, typer.Option("--provider", help="ONNX Runtime provider: auto (CUDA when usable, "
                                       "else CPU), cpu, cuda, tensorrt.")]
JsonOut = Annotated[Optional[str], typer.Option("--json", help="Write the machine-readable report to FILE, "
                                                "or '-' for stdout.", metavar="FILE|-")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Use at most N calibration images.")]
Size = Annotated[Optional[str], typer.Option("--size", help="Resize images to HxW (required when the model's "
                                             "spatial size is dynamic).", metavar="HxW")]
Layout = Annotated[Optional[str], typer.Option("--layout", help="Input layout NCHW or NHWC (default: from the "
                                               "model's input shape).")]
Channels = Annotated[Optional[str], typer.Option("--channels", help="Channel order RGB, BGR or L (default: RGB, "
                                                 "or L for 1-channel inputs).")]
Scale = Annotated[Optional[float], typer.Option("--scale", help="Pixel multiplier applied first (default 1/255).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean after scaling, e.g. "
                                             "0.485,0.456,0.406 (default 0).")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std after scaling, e.g. 0.229,0.224,0.225 "
                                            "(default 1).")]
Trigger = Annotated[Optional[Path], typer.Option("--trigger", help="Trigger image (PNG) at the model's input "
                                                 "size, stamped as x' = (1-m)x + m t.")]
Mask = Annotated[Optional[Path], typer.Option("--mask", help="Trigger mask image: white = trigger, grey = "
                                              "blend, black = image.")]
MinAgreement = Annotated[float, typer.Option("--min-agreement", help="Write nothing (exit 1) when fewer than "
                                             "this fraction of the verification images keep their top-1 "
                                             "class after the rewrite (0 turns the gate off).")]
Suspect = Annotated[Optional[Path], typer.Option("--suspect", help="Real suspicious (triggered) images: folder "
                                                 "or .npy/.npz.")]


RayFlag = Annotated[bool, typer.Option("--ray", help="Compute the statistics on Ray: the cluster in RAY_ADDRESS, "
                                       "else a local Ray (pip install 'onnx-linf[ray]'). Same report.")]
RayWorkers = Annotated[Optional[int], typer.Option("--ray-workers", help="Ray actors measuring shards at once "
                                                   "(default: one per CPU of the cluster).", metavar="N")]
RayGpus = Annotated[float, typer.Option("--ray-gpus", help="GPUs each Ray worker reserves (its session then "
                                        "runs on CUDA); 0 = CPU workers.", metavar="G")]


def engine_options(ray: bool, workers: int | None, gpus: float = 0.0) -> EngineOptions:
    """The library's engine options from --ray / --ray-workers / --ray-gpus."""
    if not ray:
        if workers is not None or gpus:
            raise UsageError("--ray-workers and --ray-gpus need --ray")
        return EngineOptions()
    options = EngineOptions("ray", workers=workers, gpus_per_worker=gpus)
    options.validate()
    _quiet_ray_data()
    return options


def _quiet_ray_data() -> None:
    """Ray Data logs every dataset's plan and timing on stderr; -v (onnx_linf at INFO) keeps them."""
    if logging.getLogger("onnx_linf").getEffectiveLevel() <= logging.INFO:
        return
    try:
        import ray.data  # noqa: F401  (configures its loggers on import: set the level after)
    except ImportError:
        return  # the library says which extra to install
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def parse_layers(value: str) -> str | tuple[str, ...]:
    """'all' / 'all+branches' / 'last' / comma-separated names."""
    value = value.strip()
    if value in ("all", "all+branches", "last"):
        return value
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise UsageError("--layers needs 'all', 'all+branches', 'last' or tensor names")
    return names


def parse_floats(value: str | None, option: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {value!r}") from None


def parse_size(value: str | None) -> tuple[int, int] | None:
    """'224x224' -> (224, 224)."""
    if value is None:
        return None
    parts = value.lower().replace("*", "x").split("x")
    try:
        h, w = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise UsageError(f"--size takes HxW, got {value!r}") from None
    if h < 1 or w < 1:
        raise UsageError(f"--size must be positive, got {value!r}")
    return h, w


def preprocess_options(size: str | None, layout: str | None, channels: str | None, scale: float | None,
                       mean: str | None, std: str | None) -> PreprocessOptions:
    """Build the library's preprocessing overrides from CLI strings."""
    return PreprocessOptions(size=parse_size(size), layout=layout, channels=channels, scale=scale,
                             mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))


SynthFlag = Annotated[bool, typer.Option("--synthesize", help="Synthesize a trigger per class with forward "
                                         "passes only (query-only Neural Cleanse) and use the most anomalous "
                                         "one as evidence.")]
VerdictFlag = Annotated[bool, typer.Option("--verdict", help="Judge the model with every evidence family: "
                                          "noise-blend and grating probes (fixed cost, for full-image "
                                          "triggers) and the patch search of --synthesize; suspected when "
                                          "any family is. Without --calib: the data-free verdict.")]
SynthClasses = Annotated[Optional[str], typer.Option("--classes", help="Candidate target classes for "
                                                     "--synthesize, comma-separated (default: all).")]
SynthSeed = Annotated[int, typer.Option("--seed", help="Seed of --synthesize; the same seed gives the same "
                                        "triggers.")]
MaxQueries = Annotated[Optional[int], typer.Option("--max-queries", help="Most image forward passes "
                                                   "--synthesize may spend.")]
TimeLimit = Annotated[Optional[float], typer.Option("--time-limit", help="Wall-clock limit of --synthesize in "
                                                    "seconds; classes that do not fit are skipped.")]


def synth_config(classes: str | None, seed: int, max_queries: int | None, time_limit: float | None):
    """The library's synthesis options from CLI values."""
    config = SynthConfig(classes=parse_classes(classes), seed=seed, max_queries=max_queries, time_limit=time_limit)
    config.validate()
    return config


def parse_classes(value: str | None) -> tuple[int, ...] | None:
    """'0,3,7' -> (0, 3, 7); None -> None (every class)."""
    if value is None:
        return None
    try:
        classes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--classes takes comma-separated class indices, got {value!r}") from None
    if not classes:
        raise UsageError("--classes needs at least one class index")
    return classes
